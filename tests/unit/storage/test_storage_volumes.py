"""Volumes: name/size validation, sparse files, grow-only resize, metadata that survives restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from livemig.errors import Conflict, InvalidRequest, NotFound
from livemig.storage.volumes import MAX_SIZE, VolumeStore, validate_name, validate_size

MIB = 1 << 20


@pytest.mark.parametrize("name", ["a", "db-1", "vol.0_x", "0abc", "x" * 63])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-x", ".x", "a/b", "a..b", "x" * 64, "vol name", "é", "../etc"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid volume name"):
        validate_name(name)


@pytest.mark.parametrize("size", [0, -512, 513, MAX_SIZE + 512])
def test_bad_sizes(size: int) -> None:
    with pytest.raises(InvalidRequest, match="size_bytes"):
        validate_size(size)


def test_create_is_sparse_and_listed(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    volume = store.create("v1", 64 * MIB)
    assert volume.size_bytes == 64 * MIB
    assert store.path("v1").stat().st_size == 64 * MIB
    assert store.allocated_bytes("v1") < MIB  # sparse
    assert [v.name for v in store.list()] == ["v1"]
    with pytest.raises(Conflict):
        store.create("v1", MIB)
    with pytest.raises(NotFound):
        store.get("nope")


def test_resize_only_grows(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    store.create("v", MIB)
    store.path("v").write_bytes(b"\x01" * 512 + bytes(MIB - 512))
    assert store.resize("v", 2 * MIB).size_bytes == 2 * MIB
    assert store.path("v").stat().st_size == 2 * MIB
    assert store.path("v").read_bytes()[:512] == b"\x01" * 512
    assert store.resize("v", 2 * MIB).size_bytes == 2 * MIB  # same size: no-op
    with pytest.raises(InvalidRequest, match="only grow"):
        store.resize("v", MIB)


def test_metadata_survives_restart(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    store.create("a", MIB)
    store.create("b", 2 * MIB)
    store.resize("b", 4 * MIB)
    store.delete("a")
    again = VolumeStore(tmp_path)
    assert [(v.name, v.size_bytes) for v in again.list()] == [("b", 4 * MIB)]
    assert not again.path("a").exists()


def test_reconcile_after_crash(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    store.create("kept", MIB)
    # crash during create: a temp file and a file never recorded; crash during resize: file grown
    (store.dir / ".new.vol.creating").write_bytes(b"x")
    (store.dir / "orphan.vol").write_bytes(b"x")
    with open(store.path("kept"), "r+b") as f:
        f.truncate(2 * MIB)
    again = VolumeStore(tmp_path)
    assert sorted(p.name for p in again.dir.iterdir()) == ["kept.vol"]
    assert again.path("kept").stat().st_size == MIB
    assert json.loads((tmp_path / "volumes.json").read_text())["volumes"][0]["name"] == "kept"
