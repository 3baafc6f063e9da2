"""Fixtures the fast tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from livemig.faults.registry import REGISTRY, FaultRegistry


@pytest.fixture
def clean_registry() -> Iterator[FaultRegistry]:
    """The process's fault registry, empty, for the LMO and the fake hosts that share it; a crash
    armed in an in-process test fails the test instead of ending pytest."""
    REGISTRY.reset()
    service, crash = REGISTRY.service, REGISTRY.crash
    REGISTRY.service = "lmo"
    REGISTRY.crash = lambda: (_ for _ in ()).throw(AssertionError("crash armed in an in-process test"))
    yield REGISTRY
    REGISTRY.reset()
    REGISTRY.service, REGISTRY.crash = service, crash
