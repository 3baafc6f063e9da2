"""A fault point for fencing tests: a TCP proxy in front of blockd that can hold back one NBD request.

Why a proxy: the dangerous case fencing exists for is a write the *source* issued before the
switch that reaches blockd *after* the destination's first write. With a proxy between the
source's real NBD client (qemu-io, QEMU) and blockd, a test produces exactly that: arm the
proxy, let the source write (the proxy holds it), let the destination write directly, then
release - and observe what blockd does with the now-stale write.

The proxy understands just enough of the client->server stream to find request boundaries:
the 4-byte client flags, options (``IHAVEOPT`` header + data) until a request magic shows up,
then request headers and WRITE payloads. Server->client bytes are copied blindly. Holding a
request pauses that connection's client->server direction (later requests queue behind it, as
they would behind a slow network); other connections are not affected.

A blockd that forces TLS: with ``tls`` (a client context blockd admits), the proxy speaks plain
NBD to its client and TLS to blockd. It passes blockd's greeting on, sends the client's flags and
then ``NBD_OPT_STARTTLS`` itself, upgrades its leg, and relays the rest as before; so the test's
client needs no certificate, and the held request is still readable to the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from livemig.storage.nbd import protocol as p

T = TypeVar("T")

_REQUEST_MAGIC_BYTES = struct.pack(">I", p.REQUEST_MAGIC)


class HoldingProxy:
    """Forwards NBD connections to ``target``; :meth:`arm` makes it hold the next matching request."""

    def __init__(self, target_host: str, target_port: int, tls: ssl.SSLContext | None = None,
                 tls_hostname: str | None = None) -> None:  # fmt: skip
        self.target = (target_host, target_port)
        self.tls, self.tls_hostname = tls, tls_hostname
        self._server: asyncio.Server | None = None
        self._predicate: Callable[[p.Request], bool] | None = None
        self.held = asyncio.Event()
        self._release = asyncio.Event()
        self.held_request: p.Request | None = None
        self.forwarded_requests = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._release.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def arm(self, predicate: Callable[[p.Request], bool] | None = None) -> None:
        """Hold the next request matching ``predicate`` (default: the next WRITE)."""
        self._predicate = predicate or (lambda r: r.command == p.Command.WRITE)
        self.held.clear()
        self._release.clear()
        self.held_request = None

    def release(self) -> None:
        """Let the held request (and everything queued behind it) through."""
        self._release.set()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
            flags_sent = await self._upgrade(server_r, server_w, client_r, client_w) if self.tls else False
        except (OSError, asyncio.IncompleteReadError, p.ProtocolError):
            client_w.close()
            self._tasks.discard(task)
            return
        down = asyncio.create_task(self._pump(server_r, client_w))
        try:
            await self._client_to_server(client_r, server_w, flags_sent)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            server_w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(down, 5)
            client_w.close()
            self._tasks.discard(task)

    async def _upgrade(self, server_r: asyncio.StreamReader, server_w: asyncio.StreamWriter,
                       client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> bool:  # fmt: skip
        """blockd's greeting to the client, the client's flags to blockd, then STARTTLS on the
        proxy's own leg (the client keeps speaking plain NBD to the proxy). Returns True: the
        client's flags are sent."""
        assert self.tls is not None
        client_w.write(await server_r.readexactly(p.GREETING_SIZE))
        await client_w.drain()
        server_w.write(await client_r.readexactly(p.CLIENT_FLAGS_SIZE))
        server_w.write(p.encode_option(p.Option.STARTTLS))
        await server_w.drain()
        reply = p.decode_option_reply_header(await server_r.readexactly(p.OPTION_REPLY_HEADER_SIZE))
        if reply.length:
            await server_r.readexactly(reply.length)
        if reply.reply != p.OptionReply.ACK:
            raise p.ProtocolError(f"blockd refused STARTTLS (reply {reply.reply:#x})")
        await server_w.start_tls(self.tls, server_hostname=self.tls_hostname)
        return True

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client_to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                flags_sent: bool = False) -> None:  # fmt: skip
        if not flags_sent:
            writer.write(await reader.readexactly(p.CLIENT_FLAGS_SIZE))
        # options until the first request magic shows up
        while True:
            first = await reader.readexactly(4)
            if first == _REQUEST_MAGIC_BYTES:
                pending = first
                break
            header = first + await reader.readexactly(p.OPTION_HEADER_SIZE - 4)
            option = p.decode_option_header(header)
            writer.write(header + (await reader.readexactly(option.length) if option.length else b""))
            await writer.drain()
        while True:
            header = pending + await reader.readexactly(p.REQUEST_SIZE - len(pending))
            pending = b""
            request = p.parse_request(header)
            payload = await reader.readexactly(request.length) if request.command == p.Command.WRITE else b""
            predicate = self._predicate
            if predicate is not None and predicate(request):
                self._predicate = None
                self.held_request = request
                self.held.set()
                await self._release.wait()
            writer.write(header + payload)
            await writer.drain()
            self.forwarded_requests += 1


class ThreadedHoldingProxy:
    """:class:`HoldingProxy` on its own event loop thread, driven with plain blocking calls.

    Tests drive real clients with ``subprocess`` (blocking); this keeps the proxy running meanwhile.
    """

    def __init__(self, target_host: str, target_port: int, tls: ssl.SSLContext | None = None,
                 tls_hostname: str | None = None) -> None:  # fmt: skip
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nbd-proxy", daemon=True)
        self._thread.start()
        self.proxy = self._call(self._make(target_host, target_port, tls, tls_hostname))
        self.port = 0

    @staticmethod
    async def _make(host: str, port: int, tls: ssl.SSLContext | None, tls_hostname: str | None) -> HoldingProxy:
        return HoldingProxy(host, port, tls, tls_hostname)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> int:
        self.port = self._call(self.proxy.start())
        return self.port

    def arm(self, predicate: Callable[[p.Request], bool] | None = None) -> None:
        """Armed when this returns (so a client started right after is caught)."""

        async def arm() -> None:
            self.proxy.arm(predicate)

        self._call(arm())

    def wait_held(self, timeout: float) -> p.Request | None:
        async def wait() -> p.Request | None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proxy.held.wait(), timeout)
            return self.proxy.held_request

        return self._call(wait(), timeout + 5)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self.proxy.release)

    def stop(self) -> None:
        try:
            self._call(self.proxy.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def __enter__(self) -> ThreadedHoldingProxy:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
