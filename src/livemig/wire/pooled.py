"""The LMO's HTTP client: aiohttp's connection pool, called directly.

Why not httpx here: the LMO calls thousands of hosts a second, and a request through httpx costs
about twice the CPU of the same request through aiohttp (httpx builds its own request and
response around the pool: URL, headers, timeouts, streams), a third of a busy LMO's interpreter
in a profile (``bench/fleet.py``, docs/fleet.md). :class:`PooledHttp` offers the one method
:class:`~livemig.wire.base.AsyncService` uses (``request``) and answers with a
:class:`PooledReply` carrying what a reply is read by (status, headers, body), so every call,
error, credential and fault point stays the same. Processes that call a few services keep httpx
(``async_http()`` without ``pooled``), and fast tests keep theirs: a test transport is an httpx
seam.
"""

from __future__ import annotations

import json as jsonlib
import ssl
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp


class PooledReply:
    """A reply read whole: what :meth:`AsyncService.run` and the ``Call`` parsers look at."""

    __slots__ = ("content", "headers", "reason_phrase", "status_code")

    def __init__(self, status_code: int, reason_phrase: str, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.reason_phrase = reason_phrase
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self, **kwargs: Any) -> Any:
        return jsonlib.loads(self.content, **kwargs)


def _query_value(value: object) -> str:
    """A query value the way httpx writes it (yarl refuses booleans and None)."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    return "" if value is None else str(value)


class PooledHttp:
    """An aiohttp session with the region's TLS context, the caller's headers and a default
    timeout; ``request`` takes the keywords a :class:`~livemig.wire.base.Call` produces."""

    def __init__(
        self, *, timeout_s: float, connect_timeout_s: float | None, headers: Mapping[str, str],
        ssl_context: ssl.SSLContext | None, connections: int, keepalive_s: float,
    ) -> None:  # fmt: skip
        self._headers = dict(headers)
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._connect_s = connect_timeout_s
        self._default = self._timeout(timeout_s)
        self._connections, self._keepalive_s = connections, keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        # the connect limit bounds opening a connection to the peer, as httpx's does; aiohttp's own
        # ``connect`` would also count the wait for a free connection of the pool, which a busy
        # LMO may spend seconds in without anything being wrong with the host
        return aiohttp.ClientTimeout(total=seconds, sock_connect=self._connect_s)

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on first use: aiohttp binds it to the running event loop."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=self._keepalive_s,
                                             ssl=self._ssl)  # fmt: skip
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers, timeout=self._default,
                                                  skip_auto_headers=("User-Agent",))  # fmt: skip
        return self._session

    async def request(
        self, method: str, url: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
        content: bytes | None = None, headers: Mapping[str, str] | None = None, timeout: float | None = None,
    ) -> PooledReply:  # fmt: skip
        data: bytes | None = content
        send_headers = dict(headers) if headers else {}
        if json is not None:
            data = jsonlib.dumps(json, separators=(",", ":")).encode()
            send_headers.setdefault("Content-Type", "application/json")
        query = {k: _query_value(v) for k, v in params.items()} if params else None
        async with self._open().request(
            method, url, data=data, params=query, headers=send_headers or None,
            timeout=self._timeout(timeout) if timeout is not None else self._default,
        ) as reply:  # fmt: skip
            body = await reply.read()
            return PooledReply(reply.status, reply.reason or "", reply.headers, body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
