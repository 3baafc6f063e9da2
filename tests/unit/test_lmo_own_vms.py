"""The LMO with VMs booted by firmware, on fake hosts and a real blockd (in-process): their own
volumes, the firmware pre-flight check, and transfers (fast; tests/e2e/test_own_vm.py boots them)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from livemig.control.api import create_app
from livemig.control.store import Store
from livemig.model import Migration, Phase, VmSpec
from livemig.model.vm import CIDATA_BYTES, CIDATA_SLOT, NVRAM_BYTES, NVRAM_SLOT
from livemig.testing.callers import bearer, lmo_over_tls
from livemig.testing.fakehost import FakeFleet

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDJuRPwE8S1jtKoRN58zY9JX7VQmI6ACuYvv7l4UhgXj test@livemig"


@pytest.fixture
def fleet():
    fleet = FakeFleet("A", "B", memory_mib=2048, blockd=True)
    yield fleet
    fleet.close()


@pytest.fixture
def api(fleet, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    app = create_app(store, controller_interval_s=0.01, transport=fleet.transport(), blockd_url=fleet.blockd_url)
    with TestClient(lmo_over_tls(app), headers=bearer(store)) as client:  # an admin; hosts register themselves
        for name, host in fleet.hosts.items():
            assert client.put(f"/hosts/{name}", json=host.registration().model_dump()).status_code == 200
        yield client


def spec(name: str = "web", firmware: object = "uefi", **extra: object) -> dict:
    return VmSpec.model_validate({
        "name": name, "memory_mib": 256, "firmware": firmware,
        "devices": [{"kind": "volume", "id": "boot", "pci_addr": "0x4", "volume": "deb", "boot_index": 0}],
        "cloud_init": {"hostname": name, "ssh_authorized_keys": [KEY]}, **extra,
    }).model_dump()  # fmt: skip


def create(api, body: dict, host: str = "A"):
    return api.post("/vms", json={"spec": body, "host": host})


def volumes(api) -> dict[str, dict]:
    return {v["name"]: v for v in api.get("/volumes").json()}


def wait_terminal(api, migration_id: str, timeout: float = 10.0) -> Migration:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = Migration.model_validate(api.get(f"/migrations/{migration_id}").json())
        if m.terminal:
            return m
        time.sleep(0.02)
    raise AssertionError(f"migration {migration_id} did not end")


def test_uefi_vm_gets_its_own_volumes_filled_by_hostd_and_they_move(api, fleet):
    assert api.post("/volumes", json={"name": "deb", "size_bytes": 64 << 20}).status_code == 201
    reply = create(api, spec())
    assert reply.status_code == 201, reply.text
    resolved = VmSpec.model_validate(reply.json()["spec"])
    assert resolved.firmware is not None and resolved.firmware.build == "ovmf-4m" and resolved.firmware.sha256
    assert resolved.firmware.nvram_volume == "web.nvram" and resolved.cloud_init is not None
    assert resolved.cloud_init.volume == "web.cidata" and resolved.cloud_init.instance_id == "iid-web"
    sizes = {name: v["size_bytes"] for name, v in volumes(api).items()}
    assert sizes == {"deb": 64 << 20, "web.nvram": NVRAM_BYTES, "web.cidata": CIDATA_BYTES}
    written = fleet.hosts["A"].runtime.volumes
    assert written["web.nvram"][0x28:0x2C] == b"_FVH", "hostd wrote the empty store of its build"
    assert len(written["web.cidata"]) == CIDATA_BYTES and b"iid-web" in written["web.cidata"]
    record = fleet.hosts["A"].agent.vms["web"]
    assert set(record.exports) == {"boot", NVRAM_SLOT, CIDATA_SLOT}
    assert record.spec.workload is None and record.spec.ram_trim_kib == 8

    migration = api.post("/migrations", json={"vm": "web", "destination": "B"}).json()
    m = wait_terminal(api, migration["id"])
    assert m.phase is Phase.SUCCEEDED, m.reason
    assert m.guest_check is None, "no livemig workload to check in a distribution guest"
    assert set(fleet.hosts["B"].agent.vms["web"].exports) == {"boot", NVRAM_SLOT, CIDATA_SLOT}
    assert "web.nvram" not in fleet.hosts["B"].runtime.volumes, "a destination never rewrites the store"
    for name in ("deb", "web.nvram", "web.cidata"):
        attachments = api.get(f"/volumes/{name}").json()["attachments"]
        assert [a["host"] for a in attachments] == ["B"], name

    assert api.delete("/vms/web").status_code == 204
    assert set(volumes(api)) == {"deb"}, "the VM's own volumes go with it; its boot volume stays"


def test_bios_vm_has_no_store(api, fleet):
    api.post("/volumes", json={"name": "deb", "size_bytes": 64 << 20})
    reply = create(api, spec("old", "bios"))
    assert reply.status_code == 201, reply.text
    assert VmSpec.model_validate(reply.json()["spec"]).firmware.build == "seabios"  # type: ignore[union-attr]
    assert set(volumes(api)) == {"deb", "old.cidata"}


def test_failed_create_leaves_no_volume_or_attachment_behind(api, fleet):
    reply = create(api, spec())  # boot volume "deb" does not exist: attaching it fails
    assert reply.status_code == 404, reply.text
    assert "deb" in reply.json()["message"]
    assert volumes(api) == {}, "the store and seed created for it are deleted again"
    assert api.get("/vms").json() == []


def test_destination_with_another_ovmf_build_is_refused_by_dry_run_and_post(api, fleet):
    api.post("/volumes", json={"name": "deb", "size_bytes": 64 << 20})
    assert create(api, spec()).status_code == 201
    code = fleet.hosts["B"].runtime.firmware_dir / "OVMF_CODE_4M.fd"
    code.write_bytes(b"simulated OVMF 4M code, another build")
    report = api.post("/migrations/preflight", json={"vm": "web", "destination": "B"}).json()
    check = next(c for c in report["checks"] if c["name"] == "firmware")
    assert not report["ok"] and not check["ok"]
    assert "host B has another ovmf-4m build" in check["detail"] and "mismatched code" in check["detail"]
    reply = api.post("/migrations", json={"vm": "web", "destination": "B"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["message"].startswith("firmware: host B has another ovmf-4m build")
    assert api.get("/migrations").json() == []
    code.unlink()  # B without OVMF at all
    report = api.post("/migrations/preflight", json={"vm": "web", "destination": "B"}).json()
    assert "host B has no ovmf-4m firmware (Debian package ovmf)" in str(report["checks"])


def test_transfers_guard_volumes_and_expire(api, fleet):
    api.post("/volumes", json={"name": "deb", "size_bytes": 64 << 20})
    opened = api.post("/volumes/deb/transfers", json={"mode": "write", "ttl_s": 5})
    assert opened.status_code == 201, opened.text
    transfer = opened.json()
    assert transfer["export"]["export"].startswith("deb/") and transfer["size_bytes"] == 64 << 20
    again = api.post("/volumes/deb/transfers", json={"mode": "read"})
    assert again.status_code == 409 and "already has transfer" in again.json()["message"]
    busy = create(api, spec())
    assert busy.status_code == 409 and "volume 'deb' is being copied" in busy.json()["message"]
    assert volumes(api)["deb"]["attachments"] == 1
    # a client that stops renewing loses its transfer: the sweep detaches it
    fleet_blockd = fleet.blockd
    assert fleet_blockd is not None
    renewed = api.post(f"/transfers/{transfer['id']}/renew", json={"ttl_s": 5}).json()
    assert renewed["expires_at"] >= transfer["expires_at"]
    deadline = time.monotonic() + 15
    while api.get(f"/transfers/{transfer['id']}").status_code == 200:
        assert time.monotonic() < deadline, "an expired transfer is detached"
        time.sleep(0.2)
    assert volumes(api)["deb"]["attachments"] == 0
    assert api.delete(f"/transfers/{transfer['id']}").status_code == 404
    # a VM's volume cannot be copied while the VM has it
    assert create(api, spec()).status_code == 201
    refused = api.post("/volumes/deb/transfers", json={"mode": "read"})
    assert refused.status_code == 409 and "attached to VM web on host A" in refused.json()["message"]
    grow = api.post("/volumes/deb/resize", json={"size_bytes": 128 << 20})
    assert grow.status_code == 409 and "grow it while nothing has it attached" in grow.json()["message"]


def test_transfer_close_detaches(api, fleet):
    api.post("/volumes", json={"name": "img", "size_bytes": 1 << 20})
    transfer = api.post("/volumes/img/transfers", json={"mode": "read"}).json()
    assert api.delete(f"/transfers/{transfer['id']}").status_code == 204
    assert volumes(api)["img"]["attachments"] == 0
    assert api.post("/volumes/img/resize", json={"size_bytes": 2 << 20}).json()["size_bytes"] == 2 << 20
