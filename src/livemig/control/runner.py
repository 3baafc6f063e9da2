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
import os
import sys
import threading
from collections.abc import Callable

from livemig.control.controller import Controller
from livemig.wire.base import AsyncHttp, async_http

log = logging.getLogger(__name__)

#: how often a thread holding the interpreter lets the other run (Python's default: 0.005)
SWITCH_INTERVAL_S = 0.001
#: ``normal`` keeps the controller's thread under the kernel's default policy (see schedule_as_batch)
SCHED_ENV = "LIVEMIG_CONTROLLER_SCHED"


def schedule_as_batch() -> bool:
    """Mark the calling thread (the controller's) as batch work for Linux's scheduler (``SCHED_BATCH``).

    Why: on a machine whose cores are all busy, a request that arrives (to this replica's API, to
    another replica, to a host or the database on the same machine) waits for a core behind whatever
    runs. A pass is throughput work: it keeps its fair share of the CPU, but under ``SCHED_BATCH``
    the kernel no longer lets it preempt a thread that just woke, nor favours it when it wakes, so
    the requests' threads come first. On two cores with 1,000 migrations held, create VM's p99 under
    load fell from 38-41 ms to 34-36 ms, the migrations ended per second unchanged (docs/fleet.md).
    ``LIVEMIG_CONTROLLER_SCHED=normal`` leaves the default; True if the thread is batch now."""
    if os.environ.get(SCHED_ENV, "batch").strip().lower() == "normal" or not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: the calling thread
    except OSError as exc:  # not allowed here (a seccomp profile): the default policy serves
        log.info("the controller's thread keeps the default scheduling policy: %s", exc)
        return False
    return True


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
        schedule_as_batch()
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
