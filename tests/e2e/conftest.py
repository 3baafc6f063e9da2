"""A real region (LMO + two hostd processes + real QEMU) for end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig.client import LmoClient
from livemig.guest.image import build_image
from livemig.region import Region


def image_cache() -> Path:
    return Path(os.environ.get("LIVEMIG_CACHE") or Path.home() / ".cache" / "livemig")


def qemu_pids_running(vm: str) -> list[int]:
    """Every QEMU process on this machine that runs ``vm`` (by its -name guest=... argument)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and f"guest={vm},".encode() in b" ".join(argv):
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="session")
def guest_image():
    return build_image(image_cache())


@pytest.fixture(scope="module")
def region(tmp_path_factory, guest_image) -> Iterator[Region]:
    region = Region(tmp_path_factory.mktemp("region"))
    region.up(("A", "B"), accel=os.environ.get("LIVEMIG_ACCEL", "auto"))
    try:
        yield region
    finally:
        region.down()


@pytest.fixture
def lmo(region) -> Iterator[LmoClient]:
    config = region.load()
    assert config is not None
    with LmoClient(config.lmo_url) as client:
        yield client
