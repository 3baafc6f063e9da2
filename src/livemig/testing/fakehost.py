"""A fake hostd behind an httpx transport, for unit tests of the LMO's API and controller.

It implements the same REST routes as the real hostd with an in-memory model of QEMU: a
migration "runs" for a configurable number of polls, then completes (or fails), so the
controller's phase logic can be tested in milliseconds. Failure knobs let tests break any step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from livemig.model.vm import VmSpec


@dataclass
class FakeVm:
    spec: VmSpec
    state: str = "running"
    role: str = "running"
    migration: dict[str, Any] | None = None
    polls: int = 0
    incoming_uri: str | None = None
    resumed_at: float | None = None
    flow_versions: dict[str, int] = field(default_factory=dict)  # what the LMO told the source hostd
    guest_resets: list[str] = field(default_factory=list)


@dataclass
class FakeHost:
    name: str
    memory_mib: int = 4096
    migration_address: str = "127.0.100.9"
    vms: dict[str, FakeVm] = field(default_factory=dict)
    polls_to_complete: int = 3
    fail_migration: str | None = None  # QEMU error text to fail with
    crash_after_resume: bool = False  # as a destination: the guest resets right after it resumes
    fail_incoming: bool = False
    dirty_rate_mib_s: float = 0.0  # what the fake QEMU reports as dirty-pages-rate
    down: bool = False
    calls: list[str] = field(default_factory=list)
    peers: dict[str, FakeHost] = field(default_factory=dict)

    def used(self) -> int:
        return sum(vm.spec.memory_mib for vm in self.vms.values())

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "migration_address": self.migration_address, "accel": "tcg",
                "accel_reason": "fake", "qemu_version": "7.2.0", "memory_mib": self.memory_mib,
                "memory_used_mib": self.used(), "vms": sorted(self.vms)}  # fmt: skip

    def status(self, vm: FakeVm) -> dict[str, Any]:
        return {"name": vm.spec.name, "host": self.name, "state": vm.state, "pid": 4242, "role": vm.role,
                "spec": vm.spec.model_dump(), "console_log": None, "resumed_at": vm.resumed_at,
                "guest_resets": vm.guest_resets}  # fmt: skip

    # ------------------------------------------------------------------ routing
    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("fake host is down", request=request)
        path, method = request.url.path, request.method
        self.calls.append(f"{method} {path}")
        body: Any = json.loads(request.content) if request.content else None
        if path == "/host":
            return _json(self.info())
        if path == "/vms" and method == "POST":
            spec = VmSpec.model_validate(body["spec"])
            if spec.name in self.vms:
                return _error(409, "Conflict", f"VM {spec.name} exists")
            if spec.memory_mib > self.memory_mib - self.used():
                return _error(409, "CapacityError", "no room")
            spec = spec.model_copy(update={"machine": "pc-q35-7.2"})
            self.vms[spec.name] = FakeVm(spec)
            return _json(self.status(self.vms[spec.name]), 201)
        match = re.fullmatch(r"/vms/([^/]+)(/.*)?", path)
        if match is None:
            return _error(404, "NotFound", path)
        name, rest = match.group(1), match.group(2) or ""
        vm = self.vms.get(name)
        if rest == "/incoming":
            if self.fail_incoming:
                return _error(500, "QemuError", "QEMU refused to start")
            if vm is None:
                vm = FakeVm(VmSpec.model_validate(body["spec"]), state="inmigrate", role="incoming",
                            incoming_uri=f"tcp:{self.migration_address}:4444")  # fmt: skip
                self.vms[name] = vm
            return _json({"uri": vm.incoming_uri})
        if vm is None:
            if method == "DELETE":
                return httpx.Response(204)
            return _error(404, "NotFound", f"VM {name} not on {self.name}")
        if rest == "" and method == "GET":
            return _json(self.status(vm))
        if rest == "" and method == "DELETE":
            del self.vms[name]
            return httpx.Response(204)
        if rest == "/migrate":
            assert body is not None
            vm.migration = {"vm": name, "uri": body["uri"], "state": "running", "events": [], "samples": [],
                            "stats": None, "error": None}  # fmt: skip
            vm.role = "outgoing"
            return _json(vm.migration, 202)
        if rest == "/migration":
            if vm.migration is None:
                return _error(404, "NotFound", "no migration")
            self._advance(vm)
            return _json(vm.migration)
        if rest == "/migration/flow-versions":
            assert body is not None
            vm.flow_versions.update(body)
            return httpx.Response(204)
        if rest == "/migration/cancel":
            if vm.migration and vm.migration["state"] == "running":
                vm.migration["state"] = "cancelled"
            vm.role, vm.state = "running", "running"
            return httpx.Response(204)
        if rest == "/resume":
            vm.state = "running"
            return _json({"state": "running"})
        if rest == "/guest-check":
            return _json({"ok": True, "detail": "ok pages=1 live_errors=0"})
        return _error(404, "NotFound", path)

    def _advance(self, vm: FakeVm) -> None:
        migration = vm.migration
        assert migration is not None
        if migration["state"] != "running":
            return
        vm.polls += 1
        now = datetime.now(UTC).isoformat()
        migration["samples"] = [{"at": now, "status": "active", "total_bytes": 100, "remaining_bytes": 50,
                                 "dirty_sync_count": vm.polls,
                                 "dirty_pages_rate": int(self.dirty_rate_mib_s * 256)}]  # fmt: skip
        if vm.polls < self.polls_to_complete:
            return
        if self.fail_migration:
            migration.update(state="failed", error=self.fail_migration)
            return
        migration["events"] = [{"at": now, "status": "pre-switchover"}, {"at": now, "status": "completed"}]
        migration["state"] = "completed"
        migration["stats"] = {"status": "completed", "pause_ms": 12, "total_ms": 900, "transferred_bytes": 1 << 20,
                              "rounds": 3, "stopped_at": 1000.0}  # fmt: skip
        vm.state = "postmigrate"
        target = self.peers.get(migration["uri"])
        if target is not None and vm.spec.name in target.vms:
            target.vms[vm.spec.name].state = "running"
            target.vms[vm.spec.name].role = "running"
            target.vms[vm.spec.name].resumed_at = 1000.0175  # the guest ran again 17.5 ms after it stopped
            if target.crash_after_resume:
                target.vms[vm.spec.name].guest_resets.append("RESET (guest-reset), 0.03 s after resuming here")


class FakeFleet:
    """Several fake hosts behind one transport, routed by the URL's port (one per host)."""

    def __init__(self, *names: str, memory_mib: int = 4096) -> None:
        self.hosts = {name: FakeHost(name, memory_mib, f"127.0.100.{i + 1}") for i, name in enumerate(names)}
        for host in self.hosts.values():
            host.peers = {f"tcp:{h.migration_address}:4444": h for h in self.hosts.values()}
        self._by_port = {9000 + i: host for i, host in enumerate(self.hosts.values())}

    def url(self, name: str) -> str:
        port = next(p for p, h in self._by_port.items() if h.name == name)
        return f"http://fake-{name.lower()}:{port}"

    def transport(self) -> httpx.MockTransport:
        def route(request: httpx.Request) -> httpx.Response:
            return self._by_port[request.url.port or 80].handle(request)

        return httpx.MockTransport(route)


def _json(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def _error(status: int, error: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": error, "message": message})
