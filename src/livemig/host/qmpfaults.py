"""Fault points around every QMP command hostd sends to a VM's QEMU.

Why a wrapper around the session and not points at each call site: hostd sends QMP from the
agent, the migration job and the guest checks; wrapping the one session object each VM has covers
all of them, now and later. ``hostd.<side>.qmp.<command>`` fires before the command is sent and
``hostd.<side>.qmp.<command>.reply`` once QEMU answered; an ``error`` there is a ``QemuError``, so
what is exercised is hostd's own handling of QEMU refusing. ``<side>`` is ``src`` or ``dst``: the
side of a migration this VM last took part in here (a VM that never migrated is a would-be source).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from livemig.errors import QemuError
from livemig.faults.registry import REGISTRY
from livemig.host.runtime import Qmp


class FaultedQmp:
    """A :class:`Qmp` session with fault points around ``execute``; everything else passes through."""

    def __init__(self, inner: Qmp, vm: str, host: str, side: Callable[[], str]) -> None:
        self.inner = inner
        self.vm = vm
        self.host = host
        self.side = side

    @property
    def connected(self) -> bool:
        return self.inner.connected

    async def connect(self, socket_path: Path, timeout: float = 10.0) -> None:
        await self.inner.connect(socket_path, timeout)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        faults = REGISTRY
        if not faults.armed:
            return await self.inner.execute(command, arguments)
        point = f"hostd.{self.side()}.qmp.{command}"
        await faults.fire(point, vm=self.vm, host=self.host, error=QemuError)
        reply = await self.inner.execute(command, arguments)
        if faults.armed:
            await faults.fire(f"{point}.reply", vm=self.vm, host=self.host, error=QemuError)
        return reply

    def listener(self, *names: str) -> AbstractContextManager[AsyncIterator[Any]]:
        return self.inner.listener(*names)

    async def close(self) -> None:
        await self.inner.close()
