"""Callers for fast tests of the services' real apps: who is asking, without a TLS handshake.

The services decide from the TLS connection who calls (``security.access``): a certificate's
identity, or a user's bearer token on a TLS connection without one. In-process tests reach an app
over ``httpx.ASGITransport``/``TestClient``, where there is no handshake; :func:`over_tls` adds to
each request what uvicorn's TLS protocol adds after a real one (``scope["extensions"]["tls"]``),
so the apps' guards run exactly as in production. The handshake itself (no certificate, another
CA, expiry) is proven with real servers and clients in tests/integration/security.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any

from livemig.control import tokens
from livemig.control.store import Store
from livemig.errors import NotFound
from livemig.security import pki
from livemig.security.access import UserRole
from livemig.security.pki import Identity, LeafFiles, Role
from livemig.security.tls import IDENTITY_KEY, TLS_EXTENSION, AsgiApp, Receive, Scope, Send

REGION = "test"
LMO = Identity(REGION, Role.LMO, "lmo")
_REGISTER = re.compile(r"^/hosts/([^/]+)$")


def tls_extension(identity: Identity | None) -> dict[str, Any]:
    """What a connection presenting ``identity``'s certificate (None: no certificate) looks like."""
    return {
        "server_cert": None,
        "client_cert_chain": [] if identity is None else ["(certificate of a test)"],
        "client_cert_name": None if identity is None else identity.distinguished_name,
        "client_cert_error": None,
        "tls_version": 0x0304,
        "cipher_suite": None,
        IDENTITY_KEY: identity,
    }


def over_tls(app: AsgiApp, identity: Identity | None = None) -> AsgiApp:
    """``app`` as reached over TLS by a client presenting ``identity`` (None: no certificate, a user)."""
    extension = tls_extension(identity)

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("extensions", {})[TLS_EXTENSION] = extension
        await app(scope, receive, send)

    return wrapped


def lmo_over_tls(app: AsgiApp) -> AsgiApp:
    """The LMO as the fake fleet's test sees it: users (bearer tokens, no certificate), and each host
    registering itself (``PUT /hosts/{name}`` presents that host's hostd certificate)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            identity = None
            registering = _REGISTER.match(scope.get("path", ""))
            if registering and scope.get("method") == "PUT":
                identity = Identity(REGION, Role.HOSTD, pki.host_leaf_name(registering.group(1)))
            scope.setdefault("extensions", {})[TLS_EXTENSION] = tls_extension(identity)
        await app(scope, receive, send)

    return wrapped


def bearer(store: Store, role: UserRole = UserRole.ADMIN, name: str = "test") -> dict[str, str]:
    """The ``Authorization`` header of a new token with ``role`` in the LMO's ``store``."""
    _record, token = tokens.issue(store, name, role)
    return {"Authorization": f"Bearer {token}"}


class TestPki:
    """A region CA in a directory and leaves issued on demand, for tests of real TLS servers."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, region: str = REGION) -> None:
        self.dir = directory
        self.region = region
        pki.init_ca(directory, region, exist_ok=True)

    def leaf(self, role: Role, name: str, sans: tuple[str, ...] = ("127.0.0.1", "localhost")) -> LeafFiles:
        try:
            return pki.leaf_files(self.dir, name, role)
        except NotFound:
            return pki.issue(self.dir, name, role, [name, *sans])

    def client_context(self, role: Role, name: str) -> ssl.SSLContext:
        from livemig.security.tls import client_context

        return client_context(self.leaf(role, name))
