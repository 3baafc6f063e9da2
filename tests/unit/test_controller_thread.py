"""The controller's own thread: its passes run as batch work for the kernel, the API's threads not.

The LMO app runs the controller on a thread of its own (``runner.ControllerThread``); marked
``SCHED_BATCH`` there, a pass keeps its share of the CPU but no longer preempts a request's thread
that just woke (docs/fleet.md measured what it changes on two busy cores).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from livemig.control.controller import Controller
from livemig.control.runner import SCHED_ENV, ControllerThread
from livemig.control.services import Services
from livemig.control.store import Store
from livemig.wire.base import AsyncHttp


def start_and_read_policies(tmp_path: Path) -> tuple[int, int, int]:
    """Start a controller's thread; the policy of its thread, of a worker it starts (the store's
    calls run on such), and of the thread that started it."""
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    seen: dict[str, int] = {}

    def make(http: AsyncHttp) -> Controller:
        seen["controller"] = os.sched_getscheduler(0)
        worker = threading.Thread(target=lambda: seen.__setitem__("worker", os.sched_getscheduler(0)))
        worker.start()
        worker.join()
        return Controller(Services.build(store, http), interval_s=0.05, replica="r1", capacity=10)

    thread = ControllerThread(make)
    controller = thread.start()
    try:
        assert controller.replica == "r1"
    finally:
        thread.stop()
    return seen["controller"], seen["worker"], os.sched_getscheduler(0)


def test_the_controller_runs_as_batch_work_and_the_api_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SCHED_ENV, raising=False)
    controller, worker, api = start_and_read_policies(tmp_path)
    assert controller == os.SCHED_BATCH and worker == os.SCHED_BATCH
    assert api == os.SCHED_OTHER


def test_the_default_policy_stays_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SCHED_ENV, "normal")
    controller, worker, api = start_and_read_policies(tmp_path)
    assert controller == worker == api == os.SCHED_OTHER
