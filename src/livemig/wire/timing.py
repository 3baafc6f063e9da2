"""Where an API request's time went, told back in its ``Server-Timing`` header (W3C).

A slow call to the LMO is slow in one of three places: the store, another service it calls (a
host's hostd, blockd, the vswitch), or the LMO's own work and its wait for a core. The answer
says which, per request, without a log to search: ``store;dur=2.1, hostd;dur=31.4,
total;dur=38.0`` (milliseconds; curl -i and a browser's developer tools show it). The fleet
benchmark reads it to split create-VM's latency into the LMO's part and the host's.

Parts are summed over the request: two store statements add up, and calls made side by side
(``asyncio.gather``) add up too, so parts can exceed ``total``. Work outside a request (the
controller's passes) is timed by nobody: :func:`timed` costs nothing there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestTiming:
    """The seconds one request spent in each part so far. Store calls run on worker threads
    (``asyncio.to_thread`` carries the request's context there), hence the lock."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.spent: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            self.spent[part] = self.spent.get(part, 0.0) + seconds

    def header(self) -> str:
        total = time.perf_counter() - self.started
        with self._lock:
            parts = [f"{part};dur={seconds * 1000:.1f}" for part, seconds in self.spent.items()]
        return ", ".join([*parts, f"total;dur={total * 1000:.1f}"])


CURRENT: ContextVar[RequestTiming | None] = ContextVar("livemig_request_timing", default=None)


@contextmanager
def timed(part: str) -> Iterator[None]:
    """Count the block's time to ``part`` of the request being served, if any."""
    timing = CURRENT.get()
    if timing is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        timing.add(part, time.perf_counter() - started)


def parse(header: str) -> dict[str, float]:
    """A ``Server-Timing`` header back into milliseconds by part (what :meth:`RequestTiming.header`
    writes; other metrics' descriptions are skipped)."""
    parts: dict[str, float] = {}
    for metric in header.split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur" and name:
                try:
                    parts[name] = float(value)
                except ValueError:
                    continue
    return parts


class ServerTimingMiddleware:
    """Times every HTTP request and adds its ``Server-Timing`` header to the answer, errors too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timing = RequestTiming()
        token = CURRENT.set(timing)

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = [*message.get("headers", []), (b"server-timing", timing.header().encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            CURRENT.reset(token)
