"""Pre-flight checks: can this VM move to that host? One list of checks serves both the
``--dry-run`` report and the synchronous validation of ``POST /migrations``, so what a dry run
promises is exactly what a real request enforces."""

from __future__ import annotations

from pydantic import BaseModel

from livemig.control.blockclient import BlockClient
from livemig.control.hostclient import HostClient
from livemig.control.store import Store
from livemig.errors import CapacityError, Conflict, HostUnreachable, InvalidRequest, LivemigError, NotFound
from livemig.model.host import HostInfo
from livemig.model.vm import VolumeDevice


class Check(BaseModel):
    name: str
    ok: bool
    detail: str
    error: str | None = None  # the exception class a real request raises when this fails


class PreflightReport(BaseModel):
    vm: str
    source: str
    destination: str
    ok: bool
    checks: list[Check]

    def raise_first_failure(self) -> None:
        classes: dict[str, type[LivemigError]] = {
            c.__name__: c for c in (Conflict, CapacityError, InvalidRequest, HostUnreachable)
        }
        for check in self.checks:
            if not check.ok:
                raise classes.get(check.error or "", Conflict)(f"{check.name}: {check.detail}")


async def preflight(
    store: Store, hosts: dict[str, HostClient], vm: str, destination: str, block: BlockClient | None = None
) -> PreflightReport:
    """Run every check; unknown VM or host raise NotFound (there is nothing to check then)."""
    spec, source = store.vm(vm)
    if destination not in hosts:
        raise NotFound(f"unknown host {destination!r}", host=destination)
    checks: list[Check] = []

    def add(name: str, ok: bool, detail: str, error: str = "Conflict") -> None:
        checks.append(Check(name=name, ok=ok, detail=detail, error=None if ok else error))

    add(
        "different host",
        destination != source,
        f"VM {vm!r} is on {source}" if destination != source else f"VM {vm!r} is already on host {source}",
    )
    registration = store.host(destination)
    add(
        "destination in service",
        not registration.maintenance,
        f"{destination} is in maintenance (being evacuated)" if registration.maintenance else "in service",
    )
    active = store.migrations(active_only=True, vm=vm)
    add(
        "no active migration",
        not active,
        "none" if not active else f"VM {vm!r} is already migrating ({active[0].id}, {active[0].phase.value})",
    )
    src_info: HostInfo | None = None
    dst_info: HostInfo | None = None
    try:
        src_info = await hosts[source].info()
        observed = await hosts[source].vm(vm)
        state = observed.state if observed else "absent"
        add("source VM running", state == "running", f"QEMU runstate on {source}: {state}")
    except LivemigError as exc:
        add("source reachable", False, exc.message, error="HostUnreachable")
    try:
        dst_info = await hosts[destination].info()
        add("destination reachable", True, f"{destination} answers (accelerator {dst_info.accel})")
    except LivemigError as exc:
        add("destination reachable", False, exc.message, error="HostUnreachable")
    if dst_info is not None:
        free = dst_info.memory_free_mib
        fits = vm in dst_info.vms or free >= spec.memory_mib
        add(
            "destination capacity",
            fits,
            f"{destination} has {free} MiB free, VM needs {spec.memory_mib} MiB",
            error="CapacityError",
        )
        machine_ok = not dst_info.machines or spec.machine in dst_info.machines
        add(
            "machine type",
            machine_ok,
            f"{spec.machine} {'is' if machine_ok else 'is not'} supported by QEMU {dst_info.qemu_version} on "
            f"{destination}",
            error="InvalidRequest",
        )
        if src_info is not None:
            newer_or_same = _version(dst_info.qemu_version) >= _version(src_info.qemu_version)
            add(
                "QEMU version",
                newer_or_same,
                f"source {src_info.qemu_version}, destination {dst_info.qemu_version}"
                + ("" if newer_or_same else ": QEMU cannot migrate to an older version"),
                error="InvalidRequest",
            )
            same_accel = src_info.accel == dst_info.accel or spec.cpu_model != "host"
            add(
                "CPU model",
                same_accel,
                f"{spec.cpu_model} on {src_info.accel} -> {dst_info.accel}"
                + ("" if same_accel else ": cpu 'host' needs the same accelerator"),
                error="InvalidRequest",
            )
    volumes = [d.volume for d in spec.devices if isinstance(d, VolumeDevice)]
    if not volumes:
        add("volumes", True, "no volumes attached")
    elif block is None:
        add("volumes", False, "the VM has volumes but the LMO runs without blockd", error="InvalidRequest")
    else:
        try:
            for name in volumes:
                await block.volume(name)
            add("volumes", True, f"{', '.join(volumes)} reachable on blockd; destination attaches them over NBD")
        except LivemigError as exc:
            add("volumes", False, exc.message, error="HostUnreachable")
    add("VNICs", True, "no VNICs on the livemig dataplane")
    return PreflightReport(vm=vm, source=source, destination=destination, ok=all(c.ok for c in checks),
                           checks=checks)  # fmt: skip


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
