"""The NBD server alone, in-process, over a plain file: handshake variants, I/O paths, holes, limits."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from livemig.storage.nbd import protocol as p
from livemig.storage.nbd.client import NbdClient, NbdError, NegotiationError
from livemig.storage.nbd.server import ExportRefused, NbdServer

T = TypeVar("T")
MIB = 1 << 20


class FileSession:
    """A minimal ExportSession over one file: no fencing, just counters."""

    def __init__(self, provider: FileProvider, fd: int, size: int) -> None:
        self.provider, self._fd, self._size = provider, fd, size

    @property
    def size(self) -> int:
        return self._size

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def label(self) -> str:
        return "file"

    @property
    def fault_scope(self) -> tuple[str | None, str | None]:
        return None, None

    def try_begin_write(self) -> bool | None:
        return not self.provider.read_only

    async def begin_write(self) -> bool:
        return not self.provider.read_only

    def end_write(self, nbytes: int) -> None:
        self.provider.writes += 1

    def record_read(self, nbytes: int) -> None:
        self.provider.reads += 1

    def record_flush(self) -> None:
        self.provider.flushes += 1

    def close(self) -> None:
        os.close(self._fd)
        self.provider.closed += 1


class FileProvider:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.read_only = False
        self.reads = self.writes = self.flushes = self.opened = self.closed = 0

    def open_export(self, name: str) -> FileSession:
        if name != "disk":
            raise ExportRefused(f"no export {name!r}")
        self.opened += 1
        return FileSession(self, os.open(self.path, os.O_RDWR), self.path.stat().st_size)


class ServerThread:
    """The server on its own event loop thread, so blocking clients can talk to it from the test."""

    def __init__(self, provider: FileProvider, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._make(provider, options))
        self.port = self.call(self.server.start("127.0.0.1", 0))[1]

    @staticmethod
    async def _make(provider: FileProvider, options: dict[str, Any]) -> NbdServer:
        return NbdServer(provider, **options)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def client(self, export: str = "disk", structured: bool = True) -> NbdClient:
        return NbdClient("127.0.0.1", self.port, export, structured=structured)

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def disk(tmp_path: Path) -> FileProvider:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 * MIB)
    return FileProvider(path)


@pytest.fixture
def server(disk: FileProvider) -> Iterator[ServerThread]:
    thread = ServerThread(disk, handshake_timeout=0.5, inline_read_max=64 * 1024, inline_write_max=64 * 1024)
    yield thread
    thread.stop()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed"
        data += chunk
    return data


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_old_style_export_name(server: ServerThread, no_zeroes: bool) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    assert p.decode_greeting(recv_exactly(sock, p.GREETING_SIZE))
    flags = p.ClientFlag.FIXED_NEWSTYLE | (p.ClientFlag.NO_ZEROES if no_zeroes else 0)
    sock.sendall(p.encode_client_flags(flags) + p.encode_option(p.Option.EXPORT_NAME, b"disk"))
    size, tflags = struct.unpack(">QH", recv_exactly(sock, 10))
    assert size == 8 * MIB and tflags & p.TransmissionFlag.SEND_FLUSH
    assert not tflags & p.TransmissionFlag.SEND_DF  # no structured replies negotiated
    if not no_zeroes:
        assert recv_exactly(sock, 124) == bytes(124)
    sock.sendall(p.encode_request(p.Command.WRITE, 5, 0, 3) + b"abc" + p.encode_request(p.Command.READ, 6, 0, 3))
    assert p.decode_reply_header(recv_exactly(sock, 16)) == p.ReplyHeader(5)
    assert p.decode_reply_header(recv_exactly(sock, 16)) == p.ReplyHeader(6)
    assert recv_exactly(sock, 3) == b"abc"
    sock.close()


def test_unknown_export_name_old_style_disconnects(server: ServerThread) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    recv_exactly(sock, p.GREETING_SIZE)
    sock.sendall(p.encode_client_flags(p.ClientFlag.FIXED_NEWSTYLE) + p.encode_option(p.Option.EXPORT_NAME, b"x"))
    assert sock.recv(100) == b""


def test_info_then_go(server: ServerThread) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    recv_exactly(sock, p.GREETING_SIZE)
    sock.sendall(p.encode_client_flags(p.ClientFlag.FIXED_NEWSTYLE))
    for option in (p.Option.INFO, p.Option.GO):
        request = p.encode_info_request("disk", (p.InfoType.NAME, p.InfoType.BLOCK_SIZE))
        sock.sendall(p.encode_option(option, request))
        info = None
        while True:
            header = p.decode_option_reply_header(recv_exactly(sock, p.OPTION_REPLY_HEADER_SIZE))
            data = recv_exactly(sock, header.length) if header.length else b""
            if header.reply == p.OptionReply.ACK:
                break
            assert header.reply == p.OptionReply.INFO
            info = p.decode_info_reply(data, info)
        assert info is not None and info.size == 8 * MIB and info.block_size == (1, 4096, p.MAX_PAYLOAD)
    sock.sendall(p.encode_request(p.Command.FLUSH, 1))
    assert p.decode_reply_header(recv_exactly(sock, 16)).error == 0
    sock.close()


def test_refused_export_is_a_clear_option_error(server: ServerThread) -> None:
    with pytest.raises(NegotiationError, match="no export 'nope'"):
        server.client("nope")


def test_idle_handshake_times_out(server: ServerThread) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    recv_exactly(sock, p.GREETING_SIZE)
    started = time.monotonic()
    assert sock.recv(100) == b""
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("structured", [True, False])
def test_inline_and_threaded_io_paths(server: ServerThread, disk: FileProvider, structured: bool) -> None:
    big = os.urandom(3 * MIB)  # above inline_*_max: the thread pool path
    with server.client(structured=structured) as client:
        client.write(MIB, big)
        client.write(0, b"small" * 100)
        client.write(5 * MIB, b"fua" * 1000, fua=True)
        assert client.read(MIB, len(big)) == big
        assert client.read(0, 500) == b"small" * 100
        assert client.read(5 * MIB, 3000) == b"fua" * 1000
        client.flush()
    assert disk.path.read_bytes()[MIB : 4 * MIB] == big
    assert disk.flushes == 1


async def _loop_turn() -> None:
    """Runs on the server's loop after whatever it was doing."""


def test_every_answered_request_counts_once_in_its_commands_latency(server: ServerThread) -> None:
    latency = server.server.latency
    with server.client() as client:
        client.write(0, b"small" * 100)  # inline
        client.write(MIB, os.urandom(2 * MIB))  # above inline_write_max: a task
        client.write(4 * MIB, b"fua", fua=True)  # FUA: a task
        client.read(0, 500)  # inline
        client.read(MIB, 2 * MIB)  # a task
        client.flush()
        client.trim(6 * MIB, 4096)
        client.write_zeroes(7 * MIB, 4096)
        with pytest.raises(NbdError):
            client.read(8 * MIB, 4096)  # past the end: refused before it runs, not a request served
    server.call(_loop_turn())  # the loop finished the callback that sent the last reply (and counted it)
    counts = {c.name: latency.count(c) for c in (p.Command.READ, p.Command.WRITE, p.Command.FLUSH,
                                                   p.Command.TRIM, p.Command.WRITE_ZEROES)}  # fmt: skip
    assert counts == {"READ": 2, "WRITE": 3, "FLUSH": 1, "TRIM": 1, "WRITE_ZEROES": 1}
    family = latency.family("livemig_blockd_nbd_request_duration_seconds", "test")
    reads = {s.labels.get("le"): s.value for s in family.samples if s.labels["op"] == "read"}
    assert reads["+Inf"] == 2 and reads[None] > 0, "the +Inf bucket counts both; the sum is their time"
    cumulative = [s.value for s in family.samples if s.labels["op"] == "write" and s.name.endswith("_bucket")]
    assert cumulative == sorted(cumulative) and cumulative[-1] == 3
    assert {s.labels["op"] for s in family.samples} == {"read", "write", "flush", "trim", "write_zeroes"}


def test_trim_and_write_zeroes(server: ServerThread, disk: FileProvider) -> None:
    def allocated() -> int:
        return disk.path.stat().st_blocks * 512

    with server.client() as client:
        client.write(0, b"\xff" * 4 * MIB)
        client.flush()
        full = allocated()
        client.trim(0, MIB)  # hole punched
        assert allocated() <= full - MIB
        client.write_zeroes(MIB, MIB)  # may punch
        assert client.read(MIB, MIB) == bytes(MIB)
        before = allocated()
        client.write_zeroes(2 * MIB, MIB, no_hole=True)  # must stay allocated
        assert client.read(2 * MIB, MIB) == bytes(MIB)
        assert allocated() == before
        assert client.read(3 * MIB, MIB) == b"\xff" * MIB


def test_many_requests_in_flight_with_backpressure(server: ServerThread) -> None:
    with server.client() as client:
        handles = [client.submit(p.Command.WRITE, i * 128 * 1024, data=bytes([i]) * 128 * 1024) for i in range(60)]
        replies = {client.receive().handle for _ in handles}
        assert replies == set(handles)
        handles = [client.submit(p.Command.READ, i * 128 * 1024, 128 * 1024) for i in range(60)]
        for _ in handles:
            reply = client.receive()
            assert reply.error == 0 and reply.data == bytes([handles.index(reply.handle)]) * 128 * 1024


def test_write_gate_refusal_is_eperm(server: ServerThread, disk: FileProvider) -> None:
    disk.read_only = True
    with server.client() as client:
        calls: list[Callable[[], None]] = [
            lambda: client.write(0, b"x"),  # inline path
            lambda: client.write(0, b"x" * MIB),  # thread path
            lambda: client.trim(0, 512),
        ]
        for call in calls:
            with pytest.raises(NbdError) as refused:
                call()
            assert refused.value.error == p.Errno.EPERM
        assert client.read(0, 1) == b"\x00"


def test_vanishing_client_releases_its_export(server: ServerThread, disk: FileProvider) -> None:
    client = server.client()
    client.sock.sendall(p.encode_request(p.Command.WRITE, 1, 0, 2 * MIB) + b"x" * 1000)  # payload never completed
    client.sock.close()
    client = server.client()
    for i in range(8):
        client.submit(p.Command.READ, 0, 2 * MIB + i)  # threaded reads, never collected
    client.sock.close()
    deadline = time.monotonic() + 5
    while disk.closed < disk.opened and time.monotonic() < deadline:
        time.sleep(0.02)
    assert disk.closed == disk.opened == 2
    assert server.server.connection_count == 0
