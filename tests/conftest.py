"""Shared fixtures: a real region (LMO + two hostd processes + real QEMU) for e2e and chaos tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig.guest.image import build_image, default_cache_dir
from livemig.region.local import Region
from livemig.wire.lmo import LmoClient


def image_cache() -> Path:
    return default_cache_dir()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (``make test`` starts the server as root)."""
    admin = os.environ.get("LIVEMIG_TEST_POSTGRES_URL")
    if not admin:
        pytest.skip("no PostgreSQL: run as root via `make test` (scripts/postgres.sh) to include these")
    import uuid

    from sqlalchemy import create_engine, text

    name = f"livemig_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield admin.rsplit("/", 1)[0] + "/" + name
    finally:
        with engine.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        engine.dispose()


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
