"""Waiting in tests for what another process does on its own time (a log line, a phase).

A check that reads once right after the action races the process that acts; this one polls until
the condition holds or the timeout passes, then fails naming what it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30.0, interval: float = 0.05) -> None:
    """Return as soon as ``condition()`` is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(interval)
