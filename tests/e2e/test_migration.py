"""Real QEMU guests migrated live through the real LMO and hostd processes."""

from __future__ import annotations

import signal
import time

import pytest

from livemig.guest.workload import heartbeat_seq, wait_heartbeat_after, workload_vm_spec
from livemig.model import Phase
from livemig.region.proc import pid_alive
from livemig.testing.processes import qemu_pids_running
from livemig.wire.lmo import LmoClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def boot(lmo: LmoClient, name: str, host: str = "A", rate: int = 20, memory: int = 256) -> dict:
    view = lmo.create_vm(workload_vm_spec(memory_mib=memory, rate=rate, wss_mib=96, name=name), host=host)
    lmo.wait_for_console(name, "LIVEMIG HB", timeout=90)
    return view


def test_round_trip_keeps_memory_intact_and_runs_on_one_host(lmo: LmoClient):
    boot(lmo, "rt")
    try:
        for destination in ("B", "A"):
            before_pid = lmo.vm("rt").observed.pid
            seq = heartbeat_seq(lmo.console("rt")) or 0
            m = lmo.wait(lmo.migrate("rt", destination).id, timeout=180)
            assert m.phase is Phase.SUCCEEDED, m.reason
            assert m.guest_check == "ok", "the guest's own pattern check must pass on the destination"
            assert m.stats.pause_ms is not None and m.stats.total_ms and m.stats.transferred_bytes > 0
            assert m.stats.rounds >= 1
            assert [e.phase for e in m.timeline][-1] is Phase.SUCCEEDED
            assert lmo.vm("rt").host == destination
            migration_address = {"A": "127.0.100.1", "B": "127.0.100.2"}[destination]
            assert m.incoming_uri and m.incoming_uri.startswith(f"tcp:{migration_address}:"), (
                "migration traffic uses the destination's migration address, never its API address"
            )
            assert not pid_alive(before_pid), "the source QEMU must have exited"
            assert wait_heartbeat_after(lambda: lmo.console("rt", tail=50), seq) > seq, (
                "heartbeat must continue on the destination"
            )
        pids = qemu_pids_running("rt")
        assert len(pids) == 1, f"exactly one QEMU must run the VM, found {pids}"
        assert lmo.vm("rt").observed.pid == pids[0]
    finally:
        lmo.delete_vm("rt")
    assert qemu_pids_running("rt") == []


def test_hostd_sigkill_leaves_the_vm_running_and_manageable(region, lmo: LmoClient):
    boot(lmo, "survivor")
    try:
        pid = lmo.vm("survivor").observed.pid
        region.kill_host("A", signal.SIGKILL)
        assert pid_alive(pid), "killing hostd must never kill a VM"
        console_log = region.state_dir / "hosts" / "A" / "vms" / "survivor" / "console.log"
        seq = heartbeat_seq(console_log.read_text())
        time.sleep(2.5)
        assert (heartbeat_seq(console_log.read_text()) or 0) > (seq or 0), "the guest keeps running unmanaged"
        region.restart_host("A")
        view = lmo.vm("survivor")
        assert view.observed.state == "running" and view.observed.pid == pid
        check = lmo.guest_check("survivor")
        assert check.ok, check
        # still manageable: it migrates away and back after the restart
        m = lmo.wait(lmo.migrate("survivor", "B").id, timeout=180)
        assert m.phase is Phase.SUCCEEDED and m.guest_check == "ok", m.reason
        assert not pid_alive(pid)
    finally:
        lmo.delete_vm("survivor")
    assert qemu_pids_running("survivor") == []


def test_bad_requests_get_clear_errors_and_start_nothing(lmo: LmoClient):
    boot(lmo, "target", memory=256)
    try:
        cases = [
            ("POST", "/migrations", {"vm": "ghost", "destination": "B"}, 404, "unknown VM"),
            ("POST", "/migrations", {"vm": "target", "destination": "nowhere"}, 404, "unknown host"),
            ("POST", "/migrations", {"vm": "target", "destination": "A"}, 409, "already on host A"),
            ("POST", "/vms", {"spec": {"name": "zero", "memory_mib": 0}}, 422, "memory_mib"),
            ("POST", "/vms", {"spec": {"name": "huge", "memory_mib": 1024 * 1024}, "host": "B"}, 409, "no host"),
            ("POST", "/vms", {"spec": {"name": "target", "memory_mib": 256}}, 409, "taken"),
        ]
        for method, path, body, status, needle in cases:
            reply = lmo.http.request(method, lmo.url + path, json=body)
            assert reply.status_code == status, (path, body, reply.text)
            assert needle in reply.json()["message"], reply.text
        malformed = lmo.http.post(
            lmo.url + "/migrations", content=b'{"vm": ', headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 422 and malformed.json()["error"] == "InvalidRequest"
        assert lmo.migrations() == [] or all(m.vm != "target" for m in lmo.migrations())
        assert qemu_pids_running("zero") == [] and qemu_pids_running("huge") == []
        assert len(qemu_pids_running("target")) == 1
    finally:
        lmo.delete_vm("target")


def test_a_guest_that_rebooted_never_passes_its_check(region, lmo: LmoClient):
    """A guest that crashes reboots (``panic=-1``), and a freshly booted workload passes its own
    memory check, so the check must not ask it: hostd reports the guest's reset instead. The
    reboot here is the guest's own (busybox ``reboot -f`` on its serial console), as after the
    TCG dirty-tracking crash that the RAM trim prevents (host/qemu.py: TCG_RAM_TRIM_KIB)."""
    import socket

    boot(lmo, "rebooter", rate=5)
    try:
        assert lmo.guest_check("rebooter").ok
        lmo.console_input("rebooter", "exit 0")  # the workload ends; init starts a shell on the console
        lmo.wait_for_console("rebooter", "LIVEMIG SHELL", timeout=30)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(region.state_dir / "hosts" / "A" / "vms" / "rebooter" / "console.sock"))
            sock.sendall(b"\nreboot -f\n")
            deadline = time.monotonic() + 30
            while not lmo.vm("rebooter").observed.guest_resets:
                assert time.monotonic() < deadline, "QEMU reports the guest's reset"
                time.sleep(0.2)
        lmo.wait_for_console("rebooter", "LIVEMIG HB seq=2 ", timeout=90)  # the fresh boot's workload runs...
        check = lmo.guest_check("rebooter")
        assert not check.ok and "crashed or rebooted" in check.detail and "RESET" in check.detail, check
        region.kill_host("A")  # a restarted hostd still knows (vm.json)
        region.restart_host("A")
        assert not lmo.guest_check("rebooter").ok
    finally:
        lmo.delete_vm("rebooter")
