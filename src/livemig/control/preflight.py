"""Pre-flight checks: can this VM move to that host? One list of checks serves both the
``--dry-run`` report and the synchronous validation of ``POST /migrations``, so what a dry run
promises is exactly what a real request enforces."""

from __future__ import annotations

from collections.abc import Callable

from livemig.control.network import vm_vnics
from livemig.control.services import Services
from livemig.errors import LivemigError, NotFound
from livemig.model.host import HostInfo
from livemig.model.vm import RunState
from livemig.wire import blockd, hostd, vswitch
from livemig.wire.lmo import Check, MigrationRequest, PreflightReport


async def preflight(services: Services, request: MigrationRequest) -> PreflightReport:
    """Run every check; unknown VM or host raise NotFound (there is nothing to check then)."""
    store, vm, destination = services.store, request.vm, request.destination
    hosts = services.hosts()
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
        src_info = await hosts[source].run(hostd.info())
        observed = await hosts[source].observe(vm)
        state = observed.state if observed else RunState.ABSENT
        add("source VM running", state is RunState.RUNNING, f"QEMU runstate on {source}: {state.value}")
    except LivemigError as exc:
        add("source reachable", False, exc.message, error="HostUnreachable")
    try:
        dst_info = await hosts[destination].run(hostd.info())
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
        if spec.firmware is not None:
            # QEMU migrates the firmware's flash/ROM as RAM: only the very same build may run it
            why = spec.firmware.mismatch(dst_info.firmware, destination)
            add("firmware", why is None,
                why or f"{spec.firmware.build} sha256 {(spec.firmware.sha256 or '')[:16]}… on {destination} too",
                error="InvalidRequest")  # fmt: skip
    volumes = list(spec.volume_slots().values())
    block = services.volumes.block
    if not volumes:
        add("volumes", True, "no volumes attached")
    elif block is None:
        add("volumes", False, "the VM has volumes but the LMO runs without blockd", error="InvalidRequest")
    else:
        try:
            for name in volumes:
                await block.run(blockd.volume(name))
            add("volumes", True, f"{', '.join(volumes)} reachable on blockd; destination attaches them over NBD")
        except LivemigError as exc:
            add("volumes", False, exc.message, error="HostUnreachable")
    await _check_vnics(services, vm_vnics(spec), destination, add)
    return PreflightReport(vm=vm, source=source, destination=destination, ok=all(c.ok for c in checks),
                           checks=checks)  # fmt: skip


async def _check_vnics(services: Services, vnics: list[str], destination: str, add: Callable[..., None]) -> None:
    """A VM on the VCN can move only to a host whose vswitch answers: its flows and its ingress
    are handed over there inside the pause, so a missing one would fail the migration late."""
    if not vnics:
        add("VNICs", True, "no VNICs on the livemig dataplane")
        return
    registration = services.store.host(destination)
    if not registration.vswitch_url:
        add("VNICs", False, f"VM has VNICs {', '.join(vnics)} but {destination} runs no vswitch",
            error="InvalidRequest")  # fmt: skip
        return
    try:
        for vnic in vnics:
            services.network.get("vnics", vnic)
        await services.network.switch(registration).run(vswitch.health())
        add("VNICs", True, f"{', '.join(vnics)} known; the vswitch of {destination} answers")
    except NotFound as exc:
        add("VNICs", False, exc.message, error="InvalidRequest")
    except LivemigError as exc:
        add("VNICs", False, exc.message, error="HostUnreachable")


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
