"""Durable, versioned state: blockd's metadata and hostd's VM records go through one envelope; a
record from a newer livemig is refused, a torn or corrupt one is reported, never half-read."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from livemig.errors import StateError
from livemig.host.accel import AccelChoice
from livemig.host.agent import VM_RECORD_VERSION, HostAgent
from livemig.model import VmSpec
from livemig.statefile import StateFile
from livemig.storage.volumes import VolumeStore
from livemig.testing.fakehost import FakeFleet


def test_saved_documents_carry_the_format_version(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "s.json", version=3)
    state.save({"a": 1})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1, "version": 3}
    assert state.load() == {"a": 1, "version": 3}
    assert (tmp_path / "s.json").stat().st_mode & 0o777 == 0o600


def test_a_document_without_a_version_is_format_1(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text('{"a": 1}')
    assert StateFile(tmp_path / "s.json").load() == {"a": 1}


def test_a_document_from_a_newer_livemig_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text('{"a": 1, "version": 2}')
    with pytest.raises(StateError, match="written by a newer livemig \\(format 2; this one reads up to 1\\)"):
        StateFile(tmp_path / "s.json").load()


@pytest.mark.parametrize("text", ['{"a": 1', "", "[1, 2]", '{"version": "x"}'])
def test_a_torn_or_corrupt_document_is_reported(tmp_path: Path, text: str) -> None:
    (tmp_path / "s.json").write_text(text)
    with pytest.raises(StateError, match=str(tmp_path / "s.json")):
        StateFile(tmp_path / "s.json").load()


def test_blockd_refuses_metadata_from_a_newer_livemig(tmp_path: Path) -> None:
    VolumeStore(tmp_path).create("vol", 1 << 20)
    saved = json.loads((tmp_path / "volumes.json").read_text())
    (tmp_path / "volumes.json").write_text(json.dumps({**saved, "version": 99}))
    with pytest.raises(StateError, match="newer livemig"):
        VolumeStore(tmp_path)


def test_hostd_reports_records_it_cannot_trust_and_keeps_them(tmp_path: Path) -> None:
    """A restarted hostd adopts the VMs whose records it trusts and reports the others by name;
    it deletes nothing it could not read (an operator may still need it)."""
    fleet = FakeFleet("A", state_dir=tmp_path / "fleet")
    host = fleet.hosts["A"]

    async def scenario() -> None:
        for name in ("good", "newer", "torn"):
            await host.agent.create(VmSpec(name=name, memory_mib=128))
        vms = host.agent.vms_dir
        record = json.loads((vms / "newer" / "vm.json").read_text())
        assert record["version"] == VM_RECORD_VERSION and record["role"] == "running"
        (vms / "newer" / "vm.json").write_text(json.dumps({**record, "version": VM_RECORD_VERSION + 1}))
        (vms / "torn" / "vm.json").write_text(json.dumps(record)[:40])
        restarted = HostAgent("A", host.agent.state_dir, host.agent.migration_address, AccelChoice("tcg", "test"),
                              4096, runtime=host.runtime)  # fmt: skip
        assert await restarted.adopt() == ["good"]
        refused = restarted.info().refused_records
        assert [line.split(":")[0] for line in refused] == ["newer", "torn"]
        assert "newer livemig" in refused[0] and "corrupt or torn" in refused[1]
        assert (vms / "newer" / "vm.json").exists() and (vms / "torn" / "vm.json").exists()

    asyncio.run(scenario())
