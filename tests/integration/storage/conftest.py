"""Fixtures: a real blockd subprocess per module, extra ones per test, and a check for the NBD clients."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livemig.testing.blockd import BlockdProcess


@pytest.fixture(scope="session")
def real_clients() -> None:
    missing = [tool for tool in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing NBD clients: {', '.join(missing)} (Debian: qemu-utils libnbd-bin)")


@pytest.fixture(scope="module")
def blockd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockdProcess]:
    base = tmp_path_factory.mktemp("blockd")
    process = BlockdProcess(base / "data", base / "blockd.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()
        process.api.close()


@pytest.fixture
def blockd_factory(tmp_path: Path) -> Iterator[Any]:
    """Start extra blockd processes (own data dir, env) for one test; all stopped afterwards."""
    started: list[BlockdProcess] = []

    def make(name: str = "b", env: dict[str, str] | None = None) -> BlockdProcess:
        process = BlockdProcess(tmp_path / f"{name}-data", tmp_path / f"{name}.log", env)
        process.start()
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()
        process.api.close()
