"""Where the controller runs: on its own thread and event loop, beside the API's.

Why a thread: a controller pass steps hundreds of migrations, each a few hundred microseconds of
Python between its host calls, and the store's calls are synchronous. On the API's event loop an
API request would wait behind every step that became ready before it, at each of its own awaits:
hundreds of milliseconds under load. On its own loop the controller competes with the API only
for the interpreter, which it hands back every millisecond (``SWITCH_INTERVAL_S``), so a
request's latency stays its own work. Both loops share the store and the cache of host
registrations; each has its own HTTP client (a client belongs to one loop).

In-process tests hand the app a transport that runs the fake hosts on the caller's loop; there the
controller stays a task on the API's loop, because the fake hosts' QEMUs live on that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Callable

from livemig.control.controller import Controller
from livemig.wire.base import AsyncHttp, async_http

log = logging.getLogger(__name__)

#: how often a thread holding the interpreter lets the other run (Python's default: 0.005)
SWITCH_INTERVAL_S = 0.001


class ControllerThread:
    """Runs ``make(http)``'s controller forever on a thread of its own until :meth:`stop`."""

    def __init__(self, make: Callable[[AsyncHttp], Controller]) -> None:
        self._make = make
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.controller: Controller | None = None
        self._thread = threading.Thread(target=self._run, name="lmo-controller", daemon=True)

    def start(self) -> Controller:
        # The API's thread waits on the store's socket many times per request; each time it must
        # win the interpreter back from a busy controller, which by default yields only every
        # 5 ms: a request of ten statements then waits tens of milliseconds behind the pass.
        # Yielding every millisecond costs the controller a few percent (bench/fleet.py).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread.start()
        self._ready.wait()
        if self.controller is None:
            raise RuntimeError(f"the controller did not start: {self._failure!r}")
        return self.controller

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start() if it happened before the controller existed
            self._failure = exc
            log.exception("controller thread ended")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with async_http(pooled=True) as http:  # thousands of host calls a second
            self.controller = self._make(http)
            self._task = asyncio.current_task()
            self._ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self.controller.run_forever()

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout=30)
