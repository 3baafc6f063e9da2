"""Shared fixtures: a real region (LMO + two hostd processes + real QEMU) for e2e and chaos tests."""

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
