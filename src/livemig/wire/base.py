"""What every livemig HTTP client shares: how a call is described, made, and how an error reply
turns back into the exception the service raised.

Why calls are values: each route of a service is written once, in its boundary module, as a
function returning a :class:`Call` (method, path, body, and how to read the reply). A sync client
(CLI, tests, benchmarks) and an async client (the LMO, hostd) both execute the same ``Call``, so the
contract of a boundary reads in one place and cannot drift between two copies of a client.

Why one decoder: a service answers an error with ``LivemigError.to_dict()`` (``wire.server``);
:func:`error_from_reply` is its inverse, so the caller raises the *same* class with the same message
(prefixed with who answered) and details. A reply that is not ours (a proxy's 502, a crash page) is
mapped by its status.

Why one factory: every ``httpx`` client in livemig is created here (:func:`async_http`,
:func:`sync_http`), so timeouts, TLS and credentials are set in one place. A process states once
who it is (:func:`configure`: a service its certificate and the region CA, the CLI its bearer
token and the CA, both read from their config files) and every client it makes afterwards carries
that. A process that talks to several regions (the region harness, tests, benchmarks) names the
credentials per service address instead (:func:`remember`), the way a browser keeps one cookie
jar per site: a client for a remembered origin uses those, anything else the process default.

Why aiohttp for the LMO: the LMO calls thousands of hosts a second, and httpx costs a
millisecond or more of CPU per request (its pool checks every pooled connection per request, and
it builds its own request and response around any pool); aiohttp's pool called directly
(:mod:`livemig.wire.pooled`) costs a few hundred microseconds. ``async_http(pooled=True)`` chooses
it; everything else is unchanged (the same calls, errors, credentials and fault points; a test
transport keeps httpx). Both answer with an :class:`HttpReply`.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar, cast
from urllib.parse import urlsplit

import aiohttp
import httpx
from pydantic import BaseModel, TypeAdapter

from livemig import errors
from livemig.faults.registry import CURRENT, FIRED_HEADER, MIGRATION_HEADER, REGISTRY
from livemig.security.client import Credentials as Credentials  # re-exported: clients name their credentials here
from livemig.security.client import client_context_for
from livemig.wire.pooled import PooledHttp
from livemig.wire.timing import timed

T = TypeVar("T")

#: default timeouts: connecting should be quick on a region's network; answers may take a while
#: (a QEMU start, a guest check)
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=3.0)
#: how long an idle keep-alive connection is kept: longer than a migration's pre-copy may run
#: (``MigrationParams.timeout_s``, 300 s by default), so the hand-off inside the pause reuses the
#: connection hostd opened when the migration started (a TLS handshake costs milliseconds of the
#: guest's pause); servers keep theirs a little longer (``SERVER_KEEPALIVE_S``), so the client is
#: the one that lets a connection go and never sends on one the server is closing
KEEPALIVE_S = 600.0
SERVER_KEEPALIVE_S = 610
#: idle connections a client keeps: the LMO's one pool talks to every host of a region, and a new
#: TLS connection costs a handshake
MAX_KEEPALIVE = 100


class HttpReply(Protocol):
    """What a reply is read by: an ``httpx.Response`` or the pooled client's ``PooledReply``."""

    @property
    def status_code(self) -> int: ...
    @property
    def reason_phrase(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content(self) -> bytes: ...
    @property
    def text(self) -> str: ...
    def json(self, **kwargs: Any) -> Any: ...


class AsyncHttp(Protocol):
    """What an :class:`AsyncService` calls through: an ``httpx.AsyncClient`` or a ``PooledHttp``."""

    async def request(
        self, method: str, url: str, *, json: Any = ..., params: Any = ..., content: Any = ...,
        headers: Any = ..., timeout: Any = ...,
    ) -> HttpReply: ...  # fmt: skip
    async def aclose(self) -> None: ...
    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: Any) -> Any: ...


_default = Credentials()
_by_origin: dict[str, Credentials] = {}
_lock = threading.Lock()


def configure(creds: Credentials) -> None:
    """Who this process is, for every client it makes from now on (a service at start, the CLI)."""
    global _default
    _default = creds


def credentials() -> Credentials:
    return _default


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def remember(url: str, creds: Credentials) -> None:
    """Use ``creds`` for every client of the service at ``url``'s origin (scheme, host, port)."""
    with _lock:
        _by_origin[_origin(url)] = creds


def credentials_for(url: str) -> Credentials:
    """The credentials remembered for ``url``'s origin, else the process default."""
    with _lock:
        return _by_origin.get(_origin(url), _default)


_BY_STATUS: dict[int, type[errors.LivemigError]] = {
    400: errors.InvalidRequest,
    422: errors.InvalidRequest,
    404: errors.NotFound,
    409: errors.Conflict,
    502: errors.HostUnreachable,
    503: errors.HostUnreachable,
    504: errors.HostUnreachable,
}


def _error_classes() -> dict[str, type[errors.LivemigError]]:
    """Every ``LivemigError`` subclass loaded in this process, by name (the ``error`` field)."""
    found: dict[str, type[errors.LivemigError]] = {}
    pending: list[type[errors.LivemigError]] = [errors.LivemigError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.__name__, cls)
        pending.extend(cls.__subclasses__())
    return found


def error_from_reply(reply: HttpReply, who: str) -> errors.LivemigError:
    """The exception a service raised, rebuilt from its error reply (the inverse of ``to_dict``)."""
    body: Any = None
    try:
        body = reply.json()
    except (ValueError, json.JSONDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        name = str(body.get("error", ""))
        cls = _error_classes().get(name) or _BY_STATUS.get(reply.status_code, errors.LivemigError)
        details = {k: v for k, v in body.items() if k not in ("error", "message")}
        return cls(f"{who}: {body['message']}", **details)
    cls = _BY_STATUS.get(reply.status_code, errors.LivemigError)
    text = reply.text.strip()[:500] or reply.reason_phrase
    return cls(f"{who}: HTTP {reply.status_code}: {text}")


def _parse_none(_reply: HttpReply) -> None:
    return None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request to a service and how to read its answer."""

    method: str
    path: str
    parse: Callable[[HttpReply], T]
    json: Any = None
    params: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None

    @property
    def name(self) -> str:
        """``POST /vms/{name}/migrate``-style label for logs and fault points."""
        return f"{self.method} {self.path}"

    def request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.json is not None:
            kwargs["json"] = self.json.model_dump(mode="json") if isinstance(self.json, BaseModel) else self.json
        if self.params:
            kwargs["params"] = self.params
        if self.content is not None:
            kwargs["content"] = self.content
        if self.headers:
            kwargs["headers"] = self.headers
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        return kwargs


def reply_model(model: type[T]) -> Callable[[HttpReply], T]:
    """Read a JSON reply as ``model`` (a pydantic model, or ``list[Model]`` and the like)."""
    adapter: TypeAdapter[T] = _adapter(cast(Hashable, model))
    return lambda reply: adapter.validate_json(reply.content)


@functools.lru_cache(maxsize=256)
def _adapter(model: Hashable) -> TypeAdapter[Any]:
    """One adapter per reply type: built for every call, they were 4 % of a controller's CPU at
    scale (a call object is made per host call)."""
    return TypeAdapter(cast(Any, model))


def call(method: str, path: str, reply: Any = None, **kwargs: Any) -> Call[Any]:
    """A :class:`Call` whose answer is read as ``reply`` (a model or type), or ignored (None)."""
    parse = _parse_none if reply is None else reply_model(reply)
    return Call(method, path, parse, **kwargs)


class _Service:
    #: the kind of service this client talks to, as fault points name it (``lmo.call.hostd:...``)
    kind: ClassVar[str] = "service"

    def __init__(self, who: str, base_url: str) -> None:
        self.who = who
        self.base_url = base_url.rstrip("/")
        self.fault_host: str | None = None  # the host a call is for, in fault scopes (a hostd's name)

    def _unreachable(self, request: Call[Any], exc: Exception) -> errors.HostUnreachable:
        return errors.HostUnreachable(f"{self.who} at {self.base_url} did not answer {request.name}: {exc!r}")

    def _read(self, request: Call[T], reply: HttpReply) -> T:
        if reply.status_code >= 400:
            raise error_from_reply(reply, self.who)
        return request.parse(reply)


class AsyncService(_Service):
    """A service reached from inside an event loop (the LMO's host calls, hostd's vswitch calls).

    ``http`` is shared: one connection pool per process, kept alive, so a call inside a migration's
    pause reuses a connection opened before it."""

    def __init__(self, who: str, base_url: str, http: AsyncHttp) -> None:
        super().__init__(who, base_url)
        self.http = http

    async def run(self, request: Call[T]) -> T:
        """Make the call. Fault points ``<service>.call.<kind>:<call>`` (before it is sent) and
        ``<service>.reply.<kind>:<call>`` (its answer arrived, not yet read): this is the one place
        every call between services passes. The migration a task works for travels in a header."""
        faults = REGISTRY
        if faults.armed:
            await faults.fire(f"{faults.service}.call.{self.kind}:{request.name}", host=self.fault_host)
        kwargs = request.request_kwargs()
        scope = CURRENT.get()
        if scope is not None and scope.migration:
            named = f"{scope.migration};vm={scope.vm}" if scope.vm else scope.migration
            kwargs["headers"] = {**kwargs.get("headers", {}), MIGRATION_HEADER: named}
        try:
            with timed(self.kind):  # the caller's Server-Timing, if it serves a request
                reply = await self.http.request(request.method, self.base_url + request.path, **kwargs)
        except (TimeoutError, httpx.HTTPError, aiohttp.ClientError) as exc:  # the aiohttp pool's own
            raise self._unreachable(request, exc) from exc
        fired = reply.headers.get(FIRED_HEADER)
        if fired is not None:
            faults.remote_seen[self.base_url] = int(fired) if fired.isdigit() else 0
        if faults.armed:
            await faults.fire(f"{faults.service}.reply.{self.kind}:{request.name}", host=self.fault_host)
        return self._read(request, reply)


class SyncService(_Service):
    """A service reached from plain code (the CLI, tests, benchmarks); owns its connection pool."""

    def __init__(
        self, who: str, base_url: str, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        credentials: Credentials | None = None,
    ) -> None:  # fmt: skip
        super().__init__(who, base_url)
        self.http = sync_http(timeout, credentials=credentials or credentials_for(base_url))

    def run(self, request: Call[T]) -> T:
        try:
            reply = self.http.request(request.method, self.base_url + request.path, **request.request_kwargs())
        except httpx.HTTPError as exc:
            raise self._unreachable(request, exc) from exc
        return self._read(request, reply)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _client_options(creds: Credentials) -> dict[str, Any]:
    """TLS (the region CA, the client's certificate, reloaded when rotated) and the bearer token."""
    options: dict[str, Any] = {
        "headers": creds.headers(),
        "limits": httpx.Limits(
            max_connections=MAX_KEEPALIVE, max_keepalive_connections=MAX_KEEPALIVE, keepalive_expiry=KEEPALIVE_S
        ),
    }
    if creds.tls:
        options["verify"] = client_context_for(creds)
    return options


def async_http(
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
    credentials: Credentials | None = None,
    *,
    pooled: bool = False,
    connections: int = MAX_KEEPALIVE,
) -> AsyncHttp:
    """The one place an async HTTP client is made (``transport``: the seam fast tests replace);
    ``credentials`` default to the process's (:func:`configure`); ``pooled``: aiohttp's connection
    pool (:mod:`livemig.wire.pooled`), for processes that call many hosts, at most ``connections``
    at once."""
    creds = credentials or _default
    if transport is None and pooled:
        total, connect = (
            (timeout.read or 30.0, timeout.connect) if isinstance(timeout, httpx.Timeout) else (timeout, None)
        )
        return PooledHttp(timeout_s=total, connect_timeout_s=connect, headers=creds.headers(),
                          ssl_context=client_context_for(creds) if creds.tls else None, connections=connections,
                          keepalive_s=KEEPALIVE_S)  # fmt: skip
    return httpx.AsyncClient(timeout=timeout, transport=transport, **_client_options(creds))


def sync_http(
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, base_url: str = "", credentials: Credentials | None = None
) -> httpx.Client:
    """The one place a blocking HTTP client is made (``base_url``: for tests that send raw requests);
    ``credentials`` default to those remembered for ``base_url``, else the process's."""
    creds = credentials or (credentials_for(base_url) if base_url else _default)
    return httpx.Client(timeout=timeout, base_url=base_url, **_client_options(creds))
