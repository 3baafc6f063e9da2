"""Who may call which route of a livemig service: one table per service, one guard that applies it.

Why a table and not a dependency on each route: the whole answer to "who may do what" for a
service reads in one place (and is printed in docs/security.md), and the guard is installed on the
app itself, so a route added later without a rule is refused (403), never open by accident. A
unit test checks every route of every service has its rule.

A caller is one of:

* a **service**, by the certificate it presented in the TLS handshake (its role and name from the
  ``livemig://region/role/name`` URI SAN, ``pki.identity_of``); a rule names the roles it admits and
  whether a host's certificate must be this host's own (``own_host``: hostd's vswitch takes
  attachments only from its own hostd; the LMO takes a registration for host ``a`` only from
  ``hostd/a``);
* a **user**, by a bearer token (only the LMO has users): ``viewer`` reads, ``operator`` also
  changes (VMs, migrations, evacuations, volumes, the network), ``admin`` also manages tokens.

A certificate of the wrong role gets 403. No certificate, or one of another CA, or an expired one,
never gets here: the TLS handshake fails first (``tls.server_context``). On the LMO, whose listener
also serves users, a connection without a certificate must carry a token: none, an unknown or a
revoked one gets 401 with ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fastapi import Request

from livemig.errors import Forbidden, Unauthenticated
from livemig.security.pki import Identity, Role, host_leaf_name
from livemig.security.tls import INSECURE_STATE, TLS_EXTENSION, caller_identity

log = logging.getLogger(__name__)


class UserRole(StrEnum):
    """What a user's token allows; each role includes the ones before it."""

    VIEWER = "viewer"  # read everything the API shows (hosts, VMs, migrations, volumes, network)
    OPERATOR = "operator"  # also create, migrate, cancel, evacuate, delete
    ADMIN = "admin"  # also create, list and revoke tokens

    @property
    def rank(self) -> int:
        return list(UserRole).index(self)


@dataclass(frozen=True)
class User:
    """A user as their bearer token says (``token`` is its public id, never the secret)."""

    token: str
    name: str
    role: UserRole

    def __str__(self) -> str:
        return f"{self.name} ({self.role.value})"


Caller = Identity | User | None
#: looks a presented bearer token up: the user, or None for an unknown or revoked token
TokenCheck = Callable[[str], User | None]


@dataclass(frozen=True)
class Access:
    """Who may call one route."""

    services: frozenset[Role] = frozenset()
    user: UserRole | None = None  # the least user role admitted (None: no user)
    own_host: bool = False  # a host certificate (hostd, vswitch, qemu) must name the host in question
    public: bool = False  # no credential at all (health checks)
    pages: bool = False  # a browser page: the token may come from the login cookie; none -> the login page

    def describe(self) -> str:
        """For the docs' table: ``lmo; hostd (own host); user operator+``."""
        if self.public:
            return "anyone"
        parts = []
        for role in sorted(self.services):
            own = " (own host)" if self.own_host and role in HOST_ROLES else ""
            parts.append(f"{role.value}{own}")
        if self.user is not None:
            parts.append(f"user {self.user.value}+" + (" (or login cookie)" if self.pages else ""))
        return "; ".join(parts) or "nobody"


HOST_ROLES = frozenset({Role.HOSTD, Role.VSWITCH, Role.QEMU})
#: every service of the region (health, metrics); not QEMU's certificate: a guest that escaped into
#: its QEMU process holds that key, and it opens NBD exports and migration streams, no API
ANY_SERVICE = frozenset(Role) - {Role.QEMU}
PUBLIC = Access(public=True)
#: FastAPI's generated schema and docs pages would be routes outside every guard: none are served
NO_DOCS: dict[str, Any] = {"openapi_url": None, "docs_url": None, "redoc_url": None}

Policy = Mapping[tuple[str, str], Access]


def services(*roles: Role, own_host: bool = False, user: UserRole | None = None) -> Access:
    return Access(frozenset(roles), user=user, own_host=own_host)


def users(role: UserRole, *roles: Role, pages: bool = False) -> Access:
    return Access(frozenset(roles), user=role, pages=pages)


_LMO_ONLY = Access(frozenset({Role.LMO}))


def lmo_only(_method: str, _path: str) -> Access:
    """The default of hostd, blockd and the vswitch for a route their table does not name yet: the
    LMO, their one driver (the unit tests still insist every route is named)."""
    return _LMO_ONLY


class LoginRequired(Exception):
    """A browser asked for a page without a valid login: the app answers with the login page."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)  # hashed by identity: FastAPI caches a dependency's result per request by it
class Guard:
    """The FastAPI dependency a service's app is built with: applies ``policy`` to every request.

    ``host``: this service's host (hostd, vswitch), which ``own_host`` rules compare a host
    certificate against; ``host_param``: or the path parameter naming the host (the LMO's
    registration route). ``tokens``: the LMO's users; ``cookie``: the dashboard's login cookie.
    """

    policy: Policy
    host: str | None = None
    host_param: str | None = None
    tokens: TokenCheck | None = None
    cookie: str | None = None
    default: Callable[[str, str], Access | None] | None = None

    def access(self, method: str, path: str) -> Access | None:
        """The rule for a route (``path`` as declared, e.g. ``/vms/{name}``); for a route the table
        does not name, ``default(method, path)`` (None, or no default: refused)."""
        method = "GET" if method == "HEAD" else method
        rule = self.policy.get((method, path))
        if rule is None and self.default is not None:
            rule = self.default(method, path)
        return rule

    async def __call__(self, request: Request) -> Caller:
        route: Any = request.scope.get("route")
        # the route's declared path; the URL's only without one (building request.url costs a
        # twentieth of a simulated fleet's CPU when done for every request)
        path = route.path if route is not None and hasattr(route, "path") else request.url.path
        access = self.access(request.method, path)
        if access is None:
            raise Forbidden(f"no access rule for {request.method} {path}: refused")
        request.state.caller = None
        if access.public or getattr(request.app.state, INSECURE_STATE, False):
            return None
        if TLS_EXTENSION not in request.scope.get("extensions", {}):
            raise Unauthenticated("this API is served over TLS only; plain HTTP is not authenticated")
        identity = caller_identity(request)  # Forbidden for a certificate without a livemig identity
        caller: Caller = (
            self._service(request, access, identity) if identity is not None else self._user(request, access)
        )
        request.state.caller = caller  # for a route that records who asked (``caller_of``)
        return caller

    def _service(self, request: Request, access: Access, identity: Identity) -> Identity:
        if identity.role not in access.services:
            wanted = access.describe()
            raise Forbidden(f"{identity.role.value} {identity.name!r} may not call {request.method} "
                            f"{request.url.path}: allowed {wanted}", caller=identity.uri)  # fmt: skip
        if access.own_host and identity.role in HOST_ROLES:
            host = self.host if self.host_param is None else request.path_params.get(self.host_param)
            if host is None or identity.name != host_leaf_name(str(host)):
                raise Forbidden(f"{identity.role.value} {identity.name!r} may act only for its own host, "
                                f"not {host!r}", caller=identity.uri)  # fmt: skip
        return identity

    def _user(self, request: Request, access: Access) -> User:
        if self.tokens is None:  # a service without users (its handshake already asks for a certificate)
            raise Unauthenticated("this API takes a client certificate of the region")
        token = _bearer(request)
        if token is None and access.pages and self.cookie:
            token = request.cookies.get(self.cookie)
        if token is None:
            if access.pages:
                raise LoginRequired("log in with a token")
            raise Unauthenticated("a bearer token is required (Authorization: Bearer <token>)")
        user = self.tokens(token)
        if user is None:
            if access.pages:
                raise LoginRequired("the token is unknown or was revoked")
            raise Unauthenticated("the bearer token is unknown or was revoked",
                                  challenge='Bearer realm="livemig", error="invalid_token"')  # fmt: skip
        if access.user is None:
            raise Forbidden(f"{request.method} {request.url.path} takes a client certificate of the region "
                            f"({access.describe()}), not a user's token", user=user.name)  # fmt: skip
        if user.role.rank < access.user.rank:
            raise Forbidden(f"user {user.name!r} ({user.role.value}) may not {request.method} {request.url.path}: "
                            f"it takes {access.user.value} or above", user=user.name)  # fmt: skip
        return user


def caller_of(request: Request) -> Caller:
    """Who the guard admitted for this request (None: a public route or an insecure service)."""
    caller: Caller = getattr(request.state, "caller", None)
    return caller


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'",
                              challenge='Bearer realm="livemig", error="invalid_request"')  # fmt: skip
    return value.strip()


def served_routes(app: Any) -> set[tuple[str, str]]:
    """Every (method, path) ``app`` serves, routers included (FastAPI >= 0.120 includes them lazily)."""
    found: set[tuple[str, str]] = set()
    for route in app.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        pairs = [(c.path, c.original_route) for c in contexts()] if contexts else [(getattr(route, "path", ""), route)]
        for path, original in pairs:
            for method in getattr(original, "methods", None) or ():
                if method != "HEAD":
                    found.add((method, path))
    return found


def unruled_routes(app: Any, policy: Policy) -> list[str]:
    """Routes of ``app`` without a rule (for the test that every route has one)."""
    return sorted(f"{method} {path}" for method, path in served_routes(app) if (method, path) not in policy)


def policy_table(policy: Policy, default: str | None = None) -> str:
    """The rules as a Markdown table (docs/security.md prints them; a test keeps the page current)."""
    rows = ["| route | who may call |", "|---|---|"]
    for (method, path), access in sorted(policy.items(), key=lambda item: (item[0][1], item[0][0])):
        rows.append(f"| `{method} {path}` | {access.describe()} |")
    if default:
        rows.append(f"| any other route | {default} |")
    return "\n".join(rows)
