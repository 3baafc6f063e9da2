"""Bad clients never crash blockd nor disturb a well-behaved client doing I/O at the same time."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from livemig.storage.nbd import protocol as p
from livemig.storage.nbd.client import NbdClient, NegotiationError
from livemig.testing.blockd import MIB, BlockdProcess

BLOCK = 4096


class SteadyClient(threading.Thread):
    """Writes and reads back random blocks on its own volume until stopped; remembers any failure."""

    def __init__(self, blockd: BlockdProcess, attachment: dict[str, Any], size: int) -> None:
        super().__init__(name="steady-nbd-client", daemon=True)
        self.blockd, self.attachment, self.size = blockd, attachment, size
        self.stop_event = threading.Event()
        self.ops = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(7)
        model: dict[int, bytes] = {}
        try:
            with self.blockd.client(self.attachment) as client:
                while not self.stop_event.is_set():
                    offset = rng.randrange(self.size // BLOCK) * BLOCK
                    data = rng.randbytes(BLOCK)
                    client.write(offset, data)
                    model[offset] = data
                    check = rng.choice(list(model))
                    assert client.read(check, BLOCK) == model[check], f"data mismatch at {check}"
                    if self.ops % 50 == 0:
                        client.flush()
                    self.ops += 1
        except BaseException as exc:
            self.failure = exc

    def finish(self) -> int:
        self.stop_event.set()
        self.join(30)
        if self.failure is not None:
            raise AssertionError(f"the well-behaved client was disturbed: {self.failure!r}") from self.failure
        return self.ops


@pytest.fixture
def steady(blockd: BlockdProcess) -> Iterator[SteadyClient]:
    name = f"steady{random.randrange(1 << 30)}"
    blockd.create_volume(name, 4 * MIB)
    client = SteadyClient(blockd, blockd.attach(name, vm="steady", host="A"), 4 * MIB)
    client.start()
    yield client
    client.stop_event.set()
    client.join(30)


@pytest.fixture
def victim(blockd: BlockdProcess) -> dict[str, Any]:
    """A 1 MiB volume and attachment the bad clients are allowed to scribble on."""
    name = f"victim{random.randrange(1 << 30)}"
    blockd.create_volume(name, MIB)
    return blockd.attach(name, vm="fuzz", host="X")


def connect(blockd: BlockdProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", blockd.nbd_port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_server(sock: socket.socket, timeout: float = 10) -> bool:
    """Drain until EOF; True if the server closed the connection."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()
    return True


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "server closed the connection"
        data += chunk
    return data


def raw_option(sock: socket.socket, option: int, data: bytes = b"") -> int:
    """Send one option; return the reply type (its message is read and dropped)."""
    sock.sendall(p.encode_option(option, data))
    header = p.decode_option_reply_header(recv_exactly(sock, p.OPTION_REPLY_HEADER_SIZE))
    recv_exactly(sock, header.length)
    return header.reply


def assert_healthy(blockd: BlockdProcess) -> None:
    assert blockd.alive, blockd.log_text()[-3000:]
    assert blockd.api.get("/healthz").json()["status"] == "ok"
    assert "Traceback" not in blockd.log_text()


def test_bad_requests_get_errors_and_the_connection_survives(
    blockd: BlockdProcess, steady: SteadyClient, victim: dict[str, Any]
) -> None:
    for structured in (True, False):
        with blockd.client(victim, structured=structured) as client:
            cases = [
                (p.Command.READ, MIB, 1, b"", 0, p.Errno.EINVAL),  # past end
                (p.Command.READ, 0, MIB + 1, b"", 0, p.Errno.EINVAL),  # length past end
                (p.Command.READ, 0, p.MAX_PAYLOAD + 1, b"", 0, p.Errno.EINVAL),  # over max payload
                (p.Command.WRITE, MIB - 2, 0, b"xyz", 0, p.Errno.ENOSPC),  # write past end, payload consumed
                (p.Command.TRIM, 2**63, 1, b"", 0, p.Errno.EINVAL),
                (p.Command.WRITE_ZEROES, 0, 2 * MIB, b"", 0, p.Errno.ENOSPC),
                (77, 0, 512, b"", 0, p.Errno.EINVAL),  # unknown command
                (p.Command.BLOCK_STATUS, 0, 512, b"", 0, p.Errno.EINVAL),  # not negotiated
                (p.Command.READ, 0, 512, b"", 0x4000, p.Errno.EINVAL),  # unknown flag
                (p.Command.FLUSH, 1, 0, b"", 0, p.Errno.EINVAL),
                (p.Command.READ, 0, 0, b"", 0, p.Errno.EINVAL),  # zero length
            ]
            for command, offset, length, data, flags, expected in cases:
                client.submit(command, offset, length, data, flags)
                reply = client.receive()
                assert reply.error == expected, (command, offset, length, reply)
            client.write(0, b"ok" * 256)  # the connection is still in sync
            assert client.read(0, 512) == b"ok" * 256
    assert steady.finish() > 0
    assert_healthy(blockd)


def test_fatal_garbage_drops_only_that_connection(
    blockd: BlockdProcess, steady: SteadyClient, victim: dict[str, Any]
) -> None:
    export = victim["export_name"]
    survivor = blockd.client(victim)  # an idle connection to the same export must survive too

    def handshaken() -> socket.socket:
        client = NbdClient("127.0.0.1", blockd.nbd_port, export)
        return client.sock

    # bad request magic
    sock = handshaken()
    sock.sendall(b"\xde\xad\xbe\xef" + bytes(24))
    assert closed_by_server(sock)
    # WRITE above the maximum payload: the server cannot trust the stream any more
    sock = handshaken()
    sock.sendall(p.encode_request(p.Command.WRITE, 1, 0, p.MAX_PAYLOAD + 1))
    assert closed_by_server(sock)
    # a write without its payload, then the client vanishes
    sock = handshaken()
    sock.sendall(p.encode_request(p.Command.WRITE, 1, 0, 65536) + b"x" * 100)
    sock.close()
    # disconnect mid-request: a large read asked for, never collected
    sock = handshaken()
    sock.sendall(p.encode_request(p.Command.READ, 1, 0, MIB) * 8)
    sock.close()
    # unknown client flags; bad option magic; an unknown export via EXPORT_NAME (can only disconnect)
    for after_greeting in (
        struct.pack(">I", 0xFFFF),
        struct.pack(">I", 1) + b"NOTMAGIC" + bytes(8),
        struct.pack(">I", 3) + p.encode_option(p.Option.EXPORT_NAME, b"no/such.export"),
        struct.pack(">I", 3) + struct.pack(">QII", p.IHAVEOPT, p.Option.GO, 0xFFFFFFFF),  # absurd option length
    ):
        sock = connect(blockd)
        sock.recv(p.GREETING_SIZE)
        sock.sendall(after_greeting)
        assert closed_by_server(sock)
    # wrong secret and unknown export via GO: a clear refusal, not a disconnect
    with pytest.raises(NegotiationError) as refused:
        NbdClient("127.0.0.1", blockd.nbd_port, f"{export.rsplit('.', 1)[0]}.{'f' * 32}")
    assert refused.value.reply == p.OptionReply.ERR_POLICY and "secret" in refused.value.message
    with pytest.raises(NegotiationError) as refused:
        NbdClient("127.0.0.1", blockd.nbd_port, "nope/abc.def")
    assert refused.value.reply == p.OptionReply.ERR_UNKNOWN
    # options blockd refuses politely, on one connection
    sock = connect(blockd)
    sock.recv(p.GREETING_SIZE)
    sock.sendall(struct.pack(">I", 3))
    assert raw_option(sock, p.Option.LIST) == p.OptionReply.ERR_POLICY
    assert raw_option(sock, p.Option.STARTTLS) == p.OptionReply.ERR_UNSUP
    assert raw_option(sock, 999) == p.OptionReply.ERR_UNSUP
    assert raw_option(sock, p.Option.GO, b"\x00") == p.OptionReply.ERR_INVALID
    assert raw_option(sock, p.Option.STRUCTURED_REPLY) == p.OptionReply.ACK
    assert raw_option(sock, p.Option.STRUCTURED_REPLY) == p.OptionReply.ERR_INVALID
    assert raw_option(sock, p.Option.ABORT) == p.OptionReply.ACK
    assert closed_by_server(sock)

    assert survivor.read(0, 512) is not None
    survivor.close()
    assert steady.finish() > 0
    assert_healthy(blockd)


def random_request(rng: random.Random, size: int) -> tuple[int, int, int, int, bytes]:
    """A well-framed request with random (often invalid) fields: command, flags, offset, length, payload."""
    command = rng.choice([0, 0, 1, 1, 1, 3, 4, 6, 2, 5, 7, 8, rng.randrange(65536)])
    flags = rng.choice([0, 0, 1, 2, 4, 3, rng.randrange(65536)])
    offset = rng.choice([0, rng.randrange(size), rng.randrange(size * 2), rng.randrange(2**64)])
    length = rng.choice([1, 512, 4096, rng.randrange(1, 65537), rng.randrange(size + 1), rng.randrange(2**32), 0])
    if command == p.Command.WRITE:
        length = min(length, 65536) if rng.random() < 0.98 else p.MAX_PAYLOAD + rng.randrange(1, 1000)
        payload = rng.randbytes(length) if length <= p.MAX_PAYLOAD else b""
        return command, flags, offset, length, payload
    if command == p.Command.DISC and rng.random() < 0.8:
        command = p.Command.READ  # keep disconnects rare enough that connections do some work
    return command, flags, offset, length, b""


class FuzzConnection:
    """A raw transmission-phase connection that sends whatever it is told and parses replies."""

    def __init__(self, blockd: BlockdProcess, export: str, structured: bool) -> None:
        self.client = NbdClient("127.0.0.1", blockd.nbd_port, export, structured=structured)
        self.sock = self.client.sock

    def batch(self, requests: list[tuple[int, int, int, int, bytes]]) -> tuple[int, bool]:
        """Send requests; collect replies. Returns (replies received, connection still usable)."""
        sent: list[int] = []
        fatal = False
        handle_base = random.randrange(1 << 40)
        for i, (command, flags, offset, length, payload) in enumerate(requests):
            handle = handle_base + i
            self.sock.sendall(p.encode_request(command, handle, offset, length, flags) + payload)
            self.client._pending[handle] = (command, length)
            if command == p.Command.DISC or (command == p.Command.WRITE and length > p.MAX_PAYLOAD):
                fatal = True
                self.client._pending.pop(handle)
                break
            sent.append(handle)
        received = 0
        for _ in sent:
            reply = self.client.receive()
            assert reply.error in {e.value for e in p.Errno}, reply
            received += 1
        if fatal:
            assert closed_by_server(self.sock)
        return received, not fatal

    def close(self) -> None:
        self.client.close()


@pytest.mark.slow
def test_fuzz_ten_thousand_random_requests(blockd: BlockdProcess, steady: SteadyClient, victim: dict[str, Any]) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    size = MIB
    export = victim["export_name"]
    started = time.monotonic()
    structured_sent = 0
    conn: FuzzConnection | None = None
    while structured_sent < 9000:
        if conn is None:
            conn = FuzzConnection(blockd, export, structured=rng.random() < 0.7)
        batch = [random_request(rng, size) for _ in range(rng.randrange(1, 33))]
        received, usable = conn.batch(batch)
        structured_sent += max(received, 1)
        if not usable:
            conn = None
    if conn is not None:
        conn.close()

    random_sent = 0
    while random_sent < 1000:
        if rng.random() < 0.5:  # garbage instead of a handshake
            sock = connect(blockd)
            sock.recv(p.GREETING_SIZE)
        else:  # a valid handshake, then garbage in the transmission phase
            sock = NbdClient("127.0.0.1", blockd.nbd_port, export, structured=rng.random() < 0.5).sock
        sock.sendall(rng.randbytes(rng.randrange(1, 300)))
        sock.shutdown(socket.SHUT_WR)  # garbage too short to judge: the server then sees EOF
        assert closed_by_server(sock), f"seed {seed}: server kept a garbage connection open"
        random_sent += 1

    elapsed = time.monotonic() - started
    assert steady.finish() > 0, f"seed {seed}"
    assert_healthy(blockd)
    with blockd.client(blockd.attach(blockd.create_volume(f"after{seed}", MIB)["name"])) as client:
        client.write(0, b"still fine" * 50)
        client.flush()
        assert client.read(0, 500) == b"still fine" * 50
    print(f"fuzz seed {seed}: {structured_sent} framed + {random_sent} random-bytes requests in {elapsed:.1f}s")
