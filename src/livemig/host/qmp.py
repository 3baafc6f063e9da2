"""A thin, typed seam over ``qemu.qmp``'s QMPClient.

Why a seam: hostd code (and its tests) see one ``execute`` that raises ``QemuError`` carrying the
command sent and QEMU's answer, instead of the library's several exception classes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError
from qemu.qmp.qmp_client import ExecuteError

from livemig.errors import QemuError


def event_time(event: dict[str, Any]) -> float:
    """Unix time QEMU stamped on a QMP event (now, if it carries none)."""
    stamp: dict[str, Any] = event.get("timestamp", {})
    return float(stamp.get("seconds", time.time()) + stamp.get("microseconds", 0) / 1e6)


class QmpSession:
    """One QMP connection to one QEMU process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._client = QMPClient(name)

    async def connect(self, socket_path: Path, timeout: float = 10.0) -> None:
        """Connect, retrying while QEMU creates its socket (it may still be starting)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await self._client.connect(str(socket_path))
                return
            except QMPError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise QemuError(f"{self.name}: cannot connect to QMP at {socket_path}: {exc}") from exc
                self._client = QMPClient(self.name)
                await asyncio.sleep(0.05)

    @property
    def connected(self) -> bool:
        return self._client.runstate.name == "RUNNING"

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as exc:
            raise QemuError(
                f"{self.name}: QMP {command} failed: {exc}",
                command=command,
                arguments=arguments or {},
                qemu_error=str(exc),
                qemu_error_class=exc.error_class,
            ) from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QemuError(f"{self.name}: QMP {command} failed: {exc!r}", command=command) from exc

    @contextmanager
    def listener(self, *names: str) -> Iterator[EventListener]:
        """Listen for QMP events by name for the duration of the ``with`` block."""
        with self._client.listener(names) as listener:
            yield listener

    async def close(self) -> None:
        with suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
