"""Pre-flight checks: can this VM move to that host? One list of checks serves both the
``--dry-run`` report and the synchronous validation of ``POST /migrations``, so what a dry run
promises is exactly what a real request enforces."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from livemig.control.network import vm_vnics
from livemig.control.services import Services
from livemig.errors import LivemigError, NotFound
from livemig.model.host import HostRegistration
from livemig.model.migration import Compression, MigrationPolicies
from livemig.model.vm import RunState, VmSpec
from livemig.wire import blockd, hostd, vswitch
from livemig.wire.hostd import HostdClient
from livemig.wire.lmo import Check, MigrationRequest, PreflightReport


async def preflight(services: Services, request: MigrationRequest) -> PreflightReport:
    """Run every check; unknown VM or host raise NotFound (there is nothing to check then).

    Hosts' facts (QEMU version, accelerator, machine types, free memory) come from the LMO's
    inventory, as hostd reported them; the hosts are asked only whether the VM runs and whether
    the destination answers. A host that reported no facts (an older hostd) is asked for them."""
    vm, destination = request.vm, request.destination
    facts = await asyncio.to_thread(services.store.move_facts, vm, destination)  # NotFound: unknown VM or host
    spec, source, active = facts.spec, facts.source, facts.active
    registration, source_registration, capacity = facts.destination_host, facts.source_host, facts.destination_capacity
    checks: list[Check] = []

    def add(name: str, ok: bool, detail: str, error: str = "Conflict") -> None:
        checks.append(Check(name=name, ok=ok, detail=detail, error=None if ok else error))

    add(
        "different host",
        destination != source,
        f"VM {vm!r} is on {source}" if destination != source else f"VM {vm!r} is already on host {source}",
    )
    add(
        "destination in service",
        not registration.maintenance,
        f"{destination} is in maintenance (being evacuated)" if registration.maintenance else "in service",
    )
    add(
        "no active migration",
        not active,
        "none" if not active else f"VM {vm!r} is already migrating ({active[0].id}, {active[0].phase.value})",
    )
    services.registrations.remember(source_registration)  # read with the facts: no second round trip
    services.registrations.remember(registration)
    source_host, destination_host = services.host(source), services.host(destination)

    async def ask_source() -> tuple[HostFacts, RunState]:
        facts = await _facts(source_host, source_registration)
        observed = await source_host.observe(vm)
        return facts, observed.state if observed else RunState.ABSENT

    # both hosts at once: a request waits for the slower, not for the two in turn
    asked_source, asked_destination = await asyncio.gather(
        ask_source(), _facts(destination_host, registration, answer=True), return_exceptions=True
    )
    src_facts: HostFacts | None = None
    dst_facts: HostFacts | None = None
    if isinstance(asked_source, LivemigError):
        add("source reachable", False, asked_source.message, error="HostUnreachable")
    elif isinstance(asked_source, BaseException):
        raise asked_source
    else:
        src_facts, state = asked_source
        add("source VM running", state is RunState.RUNNING, f"QEMU runstate on {source}: {state.value}")
    if isinstance(asked_destination, LivemigError):
        add("destination reachable", False, asked_destination.message, error="HostUnreachable")
    elif isinstance(asked_destination, BaseException):
        raise asked_destination
    else:
        dst_facts = asked_destination
        add("destination reachable", True, f"{destination} answers (accelerator {dst_facts.accel})")
    if dst_facts is not None:
        free = dst_facts.free_mib if dst_facts.free_mib is not None else capacity.free_mib
        fits = vm in dst_facts.vms or (free is None or free >= spec.memory_mib)
        add(
            "destination capacity",
            fits,
            f"{destination} has {free} MiB free, VM needs {spec.memory_mib} MiB",
            error="CapacityError",
        )
        machine_ok = not dst_facts.machines or spec.machine in dst_facts.machines
        add(
            "machine type",
            machine_ok,
            f"{spec.machine} {'is' if machine_ok else 'is not'} supported by QEMU {dst_facts.qemu_version} on "
            f"{destination}",
            error="InvalidRequest",
        )
        if src_facts is not None:
            newer_or_same = _version(dst_facts.qemu_version) >= _version(src_facts.qemu_version)
            add(
                "QEMU version",
                newer_or_same,
                f"source {src_facts.qemu_version}, destination {dst_facts.qemu_version}"
                + ("" if newer_or_same else ": QEMU cannot migrate to an older version"),
                error="InvalidRequest",
            )
            same_accel = src_facts.accel == dst_facts.accel or spec.cpu_model != "host"
            add(
                "CPU model",
                same_accel,
                f"{spec.cpu_model} on {src_facts.accel} -> {dst_facts.accel}"
                + ("" if same_accel else ": cpu 'host' needs the same accelerator"),
                error="InvalidRequest",
            )
        if spec.firmware is not None:
            # QEMU migrates the firmware's flash/ROM as RAM: only the very same build may run it
            # (the builds are not in the inventory: the destination says, for VMs booted by firmware)
            try:
                builds = (await destination_host.run(hostd.info())).firmware
                why = spec.firmware.mismatch(builds, destination)
                add("firmware", why is None,
                    why or f"{spec.firmware.build} sha256 {(spec.firmware.sha256 or '')[:16]}… on {destination} too",
                    error="InvalidRequest")  # fmt: skip
            except LivemigError as exc:
                add("firmware", False, exc.message, error="HostUnreachable")
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
    policies = request.params.policies or spec.migration or MigrationPolicies()
    _check_policies(policies, "this migration" if request.params.policies else "the VM's spec", spec, add)
    return PreflightReport(vm=vm, source=source, destination=destination, ok=all(c.ok for c in checks),
                           checks=checks, policies=policies)  # fmt: skip


def _check_policies(policies: MigrationPolicies, origin: str, spec: VmSpec, add: Callable[..., None]) -> None:
    """The policies the migration would run with, and where they come from. QEMU refuses an
    XBZRLE cache larger than the guest's RAM, so that is refused here, before anything starts."""
    if policies.compression is Compression.XBZRLE and policies.xbzrle_cache_mib > spec.memory_mib:
        add("migration policies", False, f"XBZRLE cache {policies.xbzrle_cache_mib} MiB exceeds the guest's "
            f"{spec.memory_mib} MiB of RAM", error="InvalidRequest")  # fmt: skip
        return
    add("migration policies", True, f"{policies.describe()} (from {origin})")


async def _check_vnics(services: Services, vnics: list[str], destination: str, add: Callable[..., None]) -> None:
    """A VM on the VCN can move only to a host whose vswitch answers: its flows and its ingress
    are handed over there inside the pause, so a missing one would fail the migration late."""
    if not vnics:
        add("VNICs", True, "no VNICs on the livemig dataplane")
        return
    registration = services.registration(destination)
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


@dataclass(frozen=True)
class HostFacts:
    """What the checks need to know of a host."""

    qemu_version: str
    accel: str
    machines: list[str]
    vms: list[str]
    free_mib: int | None  # None: the inventory's number applies


async def _facts(host: HostdClient, registration: HostRegistration, answer: bool = False) -> HostFacts:
    """A host's facts from its registration; asked of the host when it reported none. With
    ``answer``, the host must answer either way (a cheap health call)."""
    if registration.qemu_version is None or registration.accel is None or registration.memory_mib is None:
        info = await host.run(hostd.info())
        return HostFacts(info.qemu_version, info.accel, info.machines, info.vms, info.memory_free_mib)
    if answer:
        await host.run(hostd.health())
    return HostFacts(registration.qemu_version, registration.accel, registration.machines, [], None)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
