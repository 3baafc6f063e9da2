"""hostd's migration and NBD TLS over the simulated QEMU (fast): what it asks QEMU over QMP, what the
LMO records, and what happens when the destination does not admit the source's certificate. The
same refusal by real QEMUs: tests/e2e/test_security.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from livemig.control.api import create_app
from livemig.control.store import Store
from livemig.errors import CredentialError
from livemig.host.tls import QemuTls
from livemig.model import Migration, Phase, VmSpec
from livemig.model.migration import ConditionType
from livemig.security import pki
from livemig.security.pki import Role
from livemig.security.qemu_tls import AUTHZ_ID, CREDS_ID
from livemig.testing.callers import bearer, lmo_over_tls
from livemig.testing.fakehost import FakeFleet


@pytest.fixture
def fleet() -> Iterator[FakeFleet]:
    fleet = FakeFleet("A", "B", memory_mib=2048)
    yield fleet
    fleet.close()


@pytest.fixture
def api(fleet: FakeFleet, tmp_path: Path) -> Iterator[TestClient]:
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    app = create_app(store, controller_interval_s=0.01, transport=fleet.transport())
    with TestClient(lmo_over_tls(app), headers=bearer(store)) as client:
        for name, host in fleet.hosts.items():
            assert client.put(f"/hosts/{name}", json=host.registration().model_dump()).status_code == 200
        assert client.post("/vms", json={"spec": VmSpec(name="vm1", memory_mib=256).model_dump(),
                                         "host": "A"}).status_code == 201  # fmt: skip
        yield client


def migrate(api: TestClient, destination: str) -> Migration:
    reply = api.post("/migrations", json={"vm": "vm1", "destination": destination})
    assert reply.status_code == 201, reply.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = Migration.model_validate(api.get(f"/migrations/{reply.json()['id']}").json())
        if m.terminal:
            return m
        time.sleep(0.02)
    raise AssertionError("the migration did not end")


def test_every_migration_is_encrypted_and_admits_only_its_source(api: TestClient, fleet: FakeFleet) -> None:
    m = migrate(api, "B")
    assert m.phase is Phase.SUCCEEDED, m.reason
    encrypted = m.condition(ConditionType.STREAM_ENCRYPTED)
    assert encrypted is not None and encrypted.status
    assert "livemig://test/qemu/a" in encrypted.reason and "destination must be b" in encrypted.reason
    destination = fleet.hosts["B"].vms["vm1"].qemu
    assert destination is not None
    # the destination's objects did their job and are gone once the guest runs there
    assert destination.parameters["tls-creds"] == "" and CREDS_ID not in destination.objects
    assert AUTHZ_ID not in destination.objects


def test_a_source_the_destination_does_not_admit_is_refused_and_the_vm_stays(
    api: TestClient, fleet: FakeFleet, tmp_path: Path
) -> None:
    # host A's QEMU now presents host c's certificate (same CA: the handshake is fine, the identity is not)
    a = fleet.hosts["A"].agent.qemu_tls
    assert a is not None
    stolen = pki.issue(fleet.pki.dir, "c", Role.QEMU, ["c"])
    a.leaf.cert.write_bytes(stolen.cert.read_bytes())
    a.leaf.key.write_bytes(stolen.key.read_bytes())
    m = migrate(api, "B")
    assert m.phase is Phase.FAILED
    assert "Cannot write to TLS channel" in m.reason
    assert "destination B's QEMU: qemu-system-x86_64: TLS x509 authz check for O=test,OU=qemu,CN=c is denied" \
        in m.reason  # fmt: skip
    assert fleet.hosts["A"].vms["vm1"].state == "running"
    assert "vm1" not in fleet.hosts["B"].vms, "the refused destination (still inmigrate) is destroyed"
    source = fleet.hosts["A"].vms["vm1"].qemu
    assert source is not None and source.parameters["tls-creds"] == "" and CREDS_ID not in source.objects


def test_qemu_credentials_follow_a_rotation_in_whole_directories(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    pki.init_ca(directory, "r1")
    leaf = pki.issue(directory, "a", Role.QEMU, ["a", "10.1.0.1"])
    creds = QemuTls(leaf, tmp_path / "tls")
    first = creds.directory()
    assert creds.directory() == first  # unchanged files: the same directory
    assert {p.name for p in first.iterdir()} == set(pki.QEMU_FILES)
    assert oct(first.stat().st_mode & 0o777) == "0o700" and oct((first / "client-key.pem").stat().st_mode)[-3:] == "600"
    pki.rotate(directory, "a", Role.QEMU)
    second = creds.directory()
    assert second != first and (second / "server-cert.pem").read_bytes() == leaf.cert.read_bytes()
    pki.rotate(directory, "a", Role.QEMU)
    third = creds.directory()
    assert {p.name for p in (tmp_path / "tls").iterdir()} == {second.name, third.name}, "older ones pruned"
    assert creds.authz("B") == "O=r1,OU=qemu,CN=b"
    other = pki.issue(directory, "z", Role.QEMU, ["z"])
    leaf.key.write_bytes(other.key.read_bytes())  # a key that is not the certificate's
    with pytest.raises(CredentialError, match="does not belong to"):
        creds.directory()
    with pytest.raises(CredentialError, match="QEMU needs role qemu"):
        QemuTls(pki.issue(directory, "a", Role.HOSTD, ["a"]), tmp_path / "tls2")
