"""Running one chaos scenario against a real region, and judging it.

One scenario, start to end: make sure the chaos VM is healthy; open a TCP connection to it from a
gateway; start the runstate sampler; arm the scenario's fault points (and its pin); start a
migration to the other host; at the stage, inject the external fault and release the pin; release
each ``hang`` after its time; wait for the migration to end (within a bound) while the supervisor
restarts whatever died; undo every fault; then check every invariant (``invariants.py``) and
classify what happened: ``Succeeded``, ``rolled back``, ``Failed: VM lost``, or what it was instead.
The run undoes its faults even when the scenario itself fails.
"""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from livemig.chaos import external, invariants
from livemig.chaos.environment import PARAMS, VM, VOLUME_MIB, ChaosEnv, EchoProbe, wait_phase
from livemig.chaos.scenarios import (
    STAGE_TRIGGERS,
    Arm,
    DiskFull,
    Expect,
    PgOutage,
    PhaseReached,
    Result,
    Scenario,
    Signal,
    StaleWrite,
)
from livemig.chaos.scenarios import Partition as PartitionFault
from livemig.errors import LivemigError
from livemig.faults.model import Action, ArmRequest, Firing
from livemig.faults.model import Scope as FaultScope
from livemig.model.migration import Migration, Phase
from livemig.security.client import client_context_for
from livemig.wire import faults as wire_faults

#: every migration must end within this (the LMO's own limits are shorter)
TERMINAL_BOUND_S = 240.0
#: how long a stage may take to be reached
STAGE_TIMEOUT_S = 120.0
STALE_PATTERN = 0xAA


@dataclass
class Armed:
    spec: Arm
    role: str
    id: str
    released: bool = False


@dataclass
class Run:
    """What one scenario's run has seen so far."""

    scenario: Scenario
    source: str
    destination: str
    armed: list[Armed] = field(default_factory=list)
    migration: Migration | None = None
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    stale_rejected: int | None = None
    stale_landed: bool = False


class ChaosRunner:
    def __init__(self, env: ChaosEnv, work_dir: Path) -> None:
        self.env = env
        self.work_dir = work_dir

    # ------------------------------------------------------------------ one scenario

    def run(self, scenario: Scenario) -> Result:
        started = time.monotonic()
        missing = [why for need in sorted(scenario.needs) if (why := self.env.missing(need))]
        if missing:
            return Result(scenario.name, scenario.expected.value, f"not run: {missing[0]}", True, 0.0, scenario.why)
        env = self.env
        env.supervisor.start()
        try:
            env.ensure_vm()
            source = env.owner()
            run = Run(scenario, source, env.other(source))
            result = self._run(run)
        except LivemigError as exc:
            result = Result(scenario.name, scenario.expected.value, f"run failed: {exc.message}", False,
                            0.0, scenario.why, [exc.message])  # fmt: skip
        finally:
            problems = env.reset()
        if problems:
            result.violations.append(f"cleanup: {'; '.join(problems)}")
            result.invariants_held = False
        result.seconds = round(time.monotonic() - started, 1)
        return result

    def _run(self, run: Run) -> Result:
        env, scenario = self.env, run.scenario
        seqs = self._firing_seqs()
        probe = self._probe(run)
        sampler = invariants.RunstateSampler(VM).start()
        releasers: list[threading.Thread] = []
        stale = None
        try:
            pin = self._pin(scenario)
            for spec in [s for s in scenario.inject if isinstance(s, Arm)] + ([pin] if pin else []):
                run.armed.append(self._arm(run, spec))
            if any(isinstance(i, StaleWrite) for i in scenario.inject):
                run.armed.append(self._arm(run, Arm("lmo", "controller.before.Cleanup", "hang")))
            for armed in run.armed:
                if armed.spec.release_after is not None:
                    releasers.append(self._release_later(run, armed))
            run.migration = env.lmo.migrate(VM, run.destination, PARAMS)
            if scenario.external:
                stale = self._inject_external(run, pin)
            run.migration = self._wait_terminal(run)
        finally:
            for thread in releasers:
                thread.join(timeout=1)
            if stale is not None:
                stale.stop()
            sampler_report = sampler.stop()
            echo = probe.finish() if probe is not None else None
        problems = env.reset()
        run.notes.extend(f"cleanup: {p}" for p in problems)
        return self._judge(run, sampler_report, echo, seqs)

    # ------------------------------------------------------------------ faults

    def _pin(self, scenario: Scenario) -> Arm | None:
        """The hang that holds the stage while an external fault is injected (None: a phase)."""
        if not scenario.external or any(isinstance(i, StaleWrite) for i in scenario.inject):
            return None
        if any(isinstance(i, DiskFull) for i in scenario.inject) and scenario.stage == "prepare":
            return Arm("blockd", "blockd.attach", "hang")  # before blockd records the destination
        trigger = STAGE_TRIGGERS[scenario.stage]
        return trigger if isinstance(trigger, Arm) else None

    def _arm(self, run: Run, spec: Arm) -> Armed:
        role = self._role(spec.service, run)
        host = {"src": run.source, "dst": run.destination}.get(spec.side or "")
        vm = None if spec.point == "vswitch.overlay.send" else VM  # a datagram knows no VM
        request = ArmRequest(point=spec.point, action=Action(spec.action), seconds=spec.seconds, count=spec.count,
                             after=spec.after, scope=FaultScope(vm=vm, host=host))  # fmt: skip
        armed = self.env.client(role).run(wire_faults.arm(request))
        return Armed(spec, role, armed.id)

    def _role(self, service: str, run: Run) -> str:
        kind, _, which = service.partition("-")
        if not which:
            return service
        return f"{kind}-{run.source if which == 'src' else run.destination}"

    def _fired(self, armed: Armed) -> bool:
        try:
            firings = self.env.client(armed.role).run(wire_faults.firings())
        except LivemigError:
            return False
        return any(f.arm == armed.id for f in firings)

    def _wait_fired(self, run: Run, armed: Armed, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._fired(armed):
                return True
            with contextlib.suppress(LivemigError):  # the LMO may be the one that is down
                if run.migration is not None and self.env.lmo.migration(run.migration.id).terminal:
                    return self._fired(armed)
            time.sleep(0.05)
        return False

    def _release(self, armed: Armed) -> None:
        with contextlib.suppress(LivemigError):
            self.env.client(armed.role).run(wire_faults.release(armed.id))
        armed.released = True

    def _release_later(self, run: Run, armed: Armed) -> threading.Thread:
        def release() -> None:
            deadline = time.monotonic() + TERMINAL_BOUND_S
            while run.migration is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._wait_fired(run, armed, TERMINAL_BOUND_S):
                time.sleep(armed.spec.release_after or 0.0)
                self._release(armed)

        thread = threading.Thread(target=release, name=f"release-{armed.id}", daemon=True)
        thread.start()
        return thread

    def _inject_external(self, run: Run, pin: Arm | None) -> StaleProxy | None:
        env, scenario = self.env, run.scenario
        assert run.migration is not None
        pinned = next((a for a in run.armed if pin is not None and a.spec is pin), None)
        stale: StaleProxy | None = None
        if any(isinstance(i, StaleWrite) for i in scenario.inject):
            return self._stale_write(run)
        if pinned is not None:
            if not self._wait_fired(run, pinned, STAGE_TIMEOUT_S):
                run.violations.append(f"the stage {scenario.stage} was never reached (pin {pinned.spec.point})")
                return None
        else:
            trigger = STAGE_TRIGGERS[scenario.stage]
            assert isinstance(trigger, PhaseReached)
            if not wait_phase(env.lmo, run.migration.id, trigger.phase, STAGE_TIMEOUT_S):
                run.violations.append(f"the stage {scenario.stage} was never reached")
                return None
        undo: list[tuple[float, object]] = []  # (seconds from now, undo)
        for fault in scenario.inject:
            if isinstance(fault, Signal):
                pid = env.pid_of(fault.target, run.source, run.destination)
                if pid is None:
                    run.violations.append(f"no process for {fault.target} to signal")
                    continue
                if fault.sig == "kill":
                    external.kill(pid)
                    run.notes.append(f"SIGKILL {fault.target} (pid {pid})")
                else:
                    external.stop(pid)
                    run.notes.append(f"SIGSTOP {fault.target} (pid {pid}) for {fault.resume_after:g} s")
                    undo.append((fault.resume_after, lambda pid=pid: external.cont(pid)))
            elif isinstance(fault, PartitionFault):
                env.partition = external.Partition(env.migration_ends(run.source, run.destination))
                env.partition.cut()
                run.notes.append("migration link partitioned" + (f" for {fault.heal_after:g} s" if fault.heal_after
                                                                  else " until the migration ended"))  # fmt: skip
                if fault.heal_after is not None:
                    undo.append((fault.heal_after, env.partition.heal))
            elif isinstance(fault, PgOutage):
                assert env.postgres is not None
                env.postgres.stop()
                run.notes.append(f"PostgreSQL stopped for {fault.down_s:g} s")
                undo.append((fault.down_s, env.postgres.start))
            elif isinstance(fault, DiskFull):
                taken = env.filler.fill()
                run.notes.append(f"blockd's disk filled ({taken >> 20} MiB)")
                if fault.free_after is not None:
                    undo.append((fault.free_after, env.filler.free))
        # the pin lets go now (the stage was reached, the fault is in), unless its own process is the
        # one stopped: then it can only be released once that process runs again
        pin_frozen = pinned is not None and any(
            isinstance(f, Signal) and f.sig == "stop" and self._role(f.target, run) == pinned.role
            for f in scenario.inject
        )
        if pinned is not None and not pin_frozen:
            self._release(pinned)
        elapsed = 0.0
        for delay, action in sorted(undo, key=lambda u: u[0]):
            time.sleep(max(0.0, delay - elapsed))
            elapsed = delay
            action()  # type: ignore[operator]
        if pinned is not None and not pinned.released:
            self._release(pinned)  # after the stopped process was continued
        return stale

    def _stale_write(self, run: Run) -> StaleProxy | None:
        """Hold a write through the source's attachment in the network from pre-copy until the
        source is fenced and the destination owns the volume (the LMO held before Cleanup), then
        release it and see what blockd does with it."""
        env = self.env
        assert run.migration is not None
        held = next(a for a in run.armed if a.spec.point == "controller.before.Cleanup")
        proxy = self._hold_stale_write(run)
        if proxy is None:
            self._release(held)  # nothing to release late: the migration goes on, not into the bound
            return None
        run.notes.append("a source write held in the network")
        if not self._wait_fired(run, held, TERMINAL_BOUND_S):
            run.violations.append("the migration never reached Cleanup")
            return proxy
        attachments, _writer = env.volume_state()
        proxy.release()
        outcome = proxy.outcome()
        run.notes.append(f"the stale write, released after the fence: {outcome}")
        after, _writer = env.volume_state()
        source_id = next((a["id"] for a in attachments if a["host"] == run.source), None)
        before_rejected = next((a["rejected_writes"] for a in attachments if a["id"] == source_id), 0)
        now_rejected = next((a["rejected_writes"] for a in after if a["id"] == source_id), None)
        run.stale_rejected = None if now_rejected is None else now_rejected - before_rejected
        run.stale_landed = env.volume_bytes(proxy.offset, 4096) == bytes([STALE_PATTERN]) * 4096
        self._release(held)
        return proxy

    def _hold_stale_write(self, run: Run) -> StaleProxy | None:
        """In pre-copy, a write through the source's attachment, held by the proxy (None: a violation says why)."""
        env = self.env
        assert run.migration is not None
        if not wait_phase(env.lmo, run.migration.id, Phase.PRECOPY, STAGE_TIMEOUT_S):
            run.violations.append("pre-copy was never reached")
            return None
        export = env.source_export(run.source)
        if export is None:
            run.violations.append(f"no NBD export recorded for {VM} on {run.source}")
            return None
        # over TLS when blockd forces it: the proxy's leg presents the region's LMO certificate
        tls = client_context_for(env.region.service_credentials()) if export.tls_hostname else None
        proxy = StaleProxy(export.host, export.port, export.export, VOLUME_MIB * 1024 * 1024 - 4096, tls,
                           export.tls_hostname)  # fmt: skip
        if not proxy.start():
            proxy.stop()
            run.violations.append(f"the stale write was not held by the proxy (qemu-io: {proxy.outcome()})")
            return None
        return proxy

    def _wait_terminal(self, run: Run) -> Migration:
        assert run.migration is not None
        deadline = time.monotonic() + TERMINAL_BOUND_S
        m = run.migration
        while time.monotonic() < deadline:
            with contextlib.suppress(LivemigError):
                m = self.env.lmo.migration(run.migration.id)
                if m.terminal:
                    return m
            time.sleep(0.2)
        return m

    # ------------------------------------------------------------------ judging

    def _firing_seqs(self) -> dict[str, int]:
        seqs = {}
        for role in self.env.roles():
            with contextlib.suppress(LivemigError):
                seqs[role] = self.env.client(role).run(wire_faults.faults()).fired
        return seqs

    def _firings_since(self, seqs: dict[str, int]) -> list[Firing]:
        found: list[Firing] = []
        for role in self.env.roles():
            with contextlib.suppress(LivemigError):
                new: list[Firing] = self.env.client(role).run(wire_faults.firings(seqs.get(role, 0)))
                found.extend(new)
        return found

    def _probe(self, run: Run) -> EchoProbe | None:
        if self.env.missing("nic") is not None:
            return None
        host = run.destination if run.scenario.gateway == "dst" else run.source
        self.env.ensure_gateway(host)
        probe = EchoProbe(self.env.gateways[host][0], self.work_dir / "echo-stop")
        time.sleep(1.0)  # echoes flow before the migration starts
        return probe

    def _judge(self, run: Run, sampled: invariants.SamplerReport, echo: dict[str, object] | None,
               seqs: dict[str, int]) -> Result:  # fmt: skip
        env, scenario = self.env, run.scenario
        violations = list(run.violations) + sampled.violations
        m = run.migration
        violations += invariants.check_terminal(m, TERMINAL_BOUND_S)
        if m is None:
            return Result(scenario.name, scenario.expected.value, "no migration", False, 0.0, scenario.why, violations)
        every = self._firings_since(seqs)
        m = self._settled(m, [f for f in every if f.migration == m.id or (f.migration is None and f.vm == VM)])
        sample = invariants.RunstateSampler(VM).sample()
        try:
            view = env.lmo.vm(VM)
            owner, state = view.host, (view.observed.state.value if view.observed else None)
        except LivemigError as exc:
            owner, state = "?", None
            run.notes.append(f"the LMO does not answer for the VM: {exc.message}")
        lost = not sample.states
        actual = self._actual(m, owner, state, lost)
        violations += invariants.check_placement(m, owner, state, sample, lost=lost)
        if not lost and m.terminal:
            memory = env.memory_check()
            disk = env.disk_check(owner) if owner in env.hosts else (False, f"the VM is on {owner}")
            violations += invariants.check_guest(memory, disk, echo)
            attachments, writer = env.volume_state()
            violations += invariants.check_volume(VM, owner, attachments, writer)
            env.vm_ok = memory[0] and disk[0]
        else:
            env.vm_ok = False
        if any(isinstance(i, StaleWrite) for i in scenario.inject):
            violations += invariants.check_stale_write(run.stale_rejected, run.stale_landed)
        fired = [f for f in every if f.migration == m.id or (f.migration is None and f.vm == VM)]
        ended = _ended(m)
        violations += invariants.check_firings(m, [f for f in fired if f.at <= ended])
        unfired = [a.spec.point for a in run.armed if not any(f.arm == a.id for f in every)]
        if unfired:
            violations.append(f"the scenario's fault never fired: {', '.join(unfired)}")
        detail = "; ".join([f"{m.phase.value}: {m.reason}" if m.reason else m.phase.value, *run.notes,
                            *(f"restarted {r}" for r in env.supervisor.restarts[-3:])])  # fmt: skip
        env.supervisor.restarts.clear()
        if sampled.longest_without_running_s > 1:
            detail += f"; no QEMU ran the guest for {sampled.longest_without_running_s:.1f} s"
        return Result(scenario.name, scenario.expected.value, actual, not violations, 0.0, detail, violations)

    def _settled(self, m: Migration, fired: list[Firing], timeout: float = 30.0) -> Migration:
        """The migration once the LMO's last word on it is in: its firings, some of which it may
        collect only after the service that fired them came back (``control/firings.py``)."""
        deadline = time.monotonic() + timeout
        ended = _ended(m)
        while True:
            time.sleep(0.5)
            with contextlib.suppress(LivemigError):
                m = self.env.lmo.migration(m.id)
            if not invariants.check_firings(m, [f for f in fired if f.at <= ended]) or time.monotonic() > deadline:
                return m

    @staticmethod
    def _actual(m: Migration, owner: str, state: str | None, lost: bool) -> str:
        if not m.terminal:
            return f"stuck in {m.phase.value}"
        if m.phase is Phase.SUCCEEDED:
            return Expect.SUCCEEDED.value
        if lost:
            return Expect.LOST.value
        if owner == m.source and state == "running" and not invariants.ownership_moved(m):
            return Expect.ROLLED_BACK.value
        return f"{m.phase.value}: VM {state or 'absent'} on {owner}"


def _ended(m: Migration) -> datetime:
    return max((e.at for e in m.timeline), default=m.updated_at)


class StaleProxy:
    """``qemu-io`` writing one block through the source's attachment, via the NBD holding proxy
    (which speaks TLS to blockd when ``tls`` is given; qemu-io speaks plain NBD to the proxy)."""

    def __init__(self, host: str, port: int, export: str, offset: int, tls: ssl.SSLContext | None = None,
                 tls_hostname: str | None = None) -> None:  # fmt: skip
        from livemig.testing.nbdproxy import ThreadedHoldingProxy

        self.offset = offset
        self.export = export
        self.proxy = ThreadedHoldingProxy(host, port, tls, tls_hostname)
        self.writer: subprocess.Popen[str] | None = None

    def start(self) -> bool:
        port = self.proxy.start()
        self.proxy.arm()
        self.writer = subprocess.Popen(
            ["qemu-io", "-f", "raw", "-c", f"write -P {STALE_PATTERN:#x} {self.offset} 4k",
             f"nbd://127.0.0.1:{port}/{self.export}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        return self.proxy.wait_held(30) is not None

    def release(self) -> None:
        self.proxy.release()

    def outcome(self) -> str:
        if self.writer is None:
            return "not started"
        try:
            out, _ = self.writer.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.writer.kill()
            return "no answer"
        if "Operation not permitted" in out:
            return "rejected (EPERM)"
        lines = out.strip().splitlines()
        return lines[-1][:120] if lines else f"no output (exit {self.writer.returncode})"

    def stop(self) -> None:
        if self.writer is not None and self.writer.poll() is None:
            self.writer.kill()
        with contextlib.suppress(Exception):
            self.proxy.stop()
