"""Talking to the guest workload over the serial console.

QEMU logs every byte the guest prints to ``console.log`` (even with no client connected) and
accepts input on ``console.sock``. A command is written to the socket; its answer is found in the
log after the offset the log had before the command, matched by a token, so concurrent readers
and old output never confuse the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from livemig.errors import GuestError

_tokens = itertools.count(int(time.time()) % 100000 * 1000)
HEARTBEAT = re.compile(r"LIVEMIG HB seq=(\d+) uptime_ms=(\d+)")


@asynccontextmanager
async def connected(console_socket: Path) -> AsyncIterator[asyncio.StreamWriter]:
    """A connection to the console socket, kept open while the caller waits for the answer:
    closing right after writing can lose bytes QEMU has not yet handed to the guest's UART."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(console_socket))
    except OSError as exc:
        raise GuestError(f"cannot open the guest console {console_socket}: {exc}") from exc
    # QEMU stops forwarding guest output to a connected client that does not read (and the
    # guest then blocks on its console); the log file has every byte anyway, so discard here.
    drain = asyncio.create_task(_discard(reader))
    try:
        yield writer
    finally:
        drain.cancel()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def send_line(console_socket: Path, line: str, linger: float = 0.5) -> None:
    async with connected(console_socket) as writer:
        writer.write(line.encode() + b"\n")
        await writer.drain()
        await asyncio.sleep(linger)


async def wait_for_line(log: Path, pattern: re.Pattern[str], start: int, timeout: float) -> re.Match[str]:
    """Wait until a line matching ``pattern`` appears in ``log`` after byte ``start``."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_bytes()[start:].decode(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            match = pattern.search(line)
            if match:
                return match
        if time.monotonic() > deadline:
            raise GuestError(f"no line matching {pattern.pattern!r} in {log} within {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def command(console_socket: Path, log: Path, verb: str, reply: str, timeout: float = 30.0,
                  resend_s: float = 5.0) -> str:  # fmt: skip
    """Send ``verb <token>`` and return the guest's ``LIVEMIG <reply> <token> ...`` line.

    The line is re-sent every ``resend_s`` until answered (a line can be lost, e.g. typed while
    the guest's UART was not yet accepting); the token makes a duplicate answer harmless.
    """
    token = next(_tokens)
    start = log.stat().st_size if log.exists() else 0
    pattern = re.compile(rf"LIVEMIG {reply} {token} (.*)$")
    port = console_socket.with_name("cmd.sock")
    if port.exists():  # the virtio-serial command port: robust across migrations (see workload.c)
        return await _command_over_port(port, f"{verb} {token}", pattern, timeout, resend_s)
    deadline = time.monotonic() + timeout
    async with connected(console_socket) as writer:
        while True:
            writer.write(f"{verb} {token}\n".encode())
            await writer.drain()
            try:
                left = deadline - time.monotonic()
                match = await wait_for_line(log, pattern, start, min(resend_s, max(left, 0.1)))
                return match.group(1).strip()
            except GuestError:
                if time.monotonic() >= deadline:
                    raise GuestError(
                        f"the guest did not answer {verb!r} within {timeout:.0f}s (console log {log})"
                    ) from None


async def _command_over_port(port: Path, line: str, pattern: re.Pattern[str], timeout: float, resend_s: float) -> str:
    """Send ``line`` on the command port and read the answer from the same port: the guest writes
    every console line there too, so a wedged UART cannot hide the answer."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(port))
    except OSError as exc:
        raise GuestError(f"cannot open the guest command port {port}: {exc}") from exc
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while loop.time() < deadline:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            resend_at = min(loop.time() + resend_s, deadline)
            while (left := resend_at - loop.time()) > 0:
                try:
                    raw = await asyncio.wait_for(reader.readline(), timeout=left)
                except TimeoutError:
                    break
                if not raw:
                    raise GuestError(f"the guest command port {port} closed")
                match = pattern.search(raw.decode(errors="replace").strip())
                if match:
                    return match.group(1).strip()
        raise GuestError(f"the guest did not answer {line.split()[0]!r} within {timeout:.0f}s on {port}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def memory_check(console_socket: Path, log: Path, timeout: float = 60.0) -> tuple[bool, str]:
    """Run the workload's full memory pattern check: (passed, the guest's own words)."""
    detail = await command(console_socket, log, "check", "CHECK", timeout)
    return detail.startswith("ok"), detail


async def disk_check(console_socket: Path, log: Path, timeout: float = 60.0) -> tuple[bool, str]:
    """Run the workload's disk log check (every acknowledged record present and intact)."""
    detail = await command(console_socket, log, "diskcheck", "DISKCHECK", timeout)
    return detail.startswith("ok"), detail


def last_heartbeat(log: Path, start: int = 0) -> tuple[int, int] | None:
    """(seq, uptime_ms) of the newest heartbeat after byte ``start``, if any."""
    if not log.exists():
        return None
    found = HEARTBEAT.findall(log.read_bytes()[start:].decode(errors="replace"))
    return (int(found[-1][0]), int(found[-1][1])) if found else None
