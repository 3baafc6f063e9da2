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
        _reader, writer = await asyncio.open_unix_connection(str(console_socket))
    except OSError as exc:
        raise GuestError(f"cannot open the guest console {console_socket}: {exc}") from exc
    try:
        yield writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


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


async def command(console_socket: Path, log: Path, verb: str, reply: str, timeout: float = 30.0) -> str:
    """Send ``verb <token>`` and return the guest's ``LIVEMIG <reply> <token> ...`` line."""
    token = next(_tokens)
    start = log.stat().st_size if log.exists() else 0
    async with connected(console_socket) as writer:
        writer.write(f"{verb} {token}\n".encode())
        await writer.drain()
        match = await wait_for_line(log, re.compile(rf"LIVEMIG {reply} {token} (.*)$"), start, timeout)
    return match.group(1).strip()


async def memory_check(console_socket: Path, log: Path, timeout: float = 60.0) -> tuple[bool, str]:
    """Run the workload's full memory pattern check: (passed, the guest's own words)."""
    detail = await command(console_socket, log, "check", "CHECK", timeout)
    return detail.startswith("ok"), detail


def last_heartbeat(log: Path, start: int = 0) -> tuple[int, int] | None:
    """(seq, uptime_ms) of the newest heartbeat after byte ``start``, if any."""
    if not log.exists():
        return None
    found = HEARTBEAT.findall(log.read_bytes()[start:].decode(errors="replace"))
    return (int(found[-1][0]), int(found[-1][1])) if found else None
