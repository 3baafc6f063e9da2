"""The invariants of live migration, checked by the chaos suite and ``livemig chaos`` alike.

1. At every moment the VM runs on at most one host: a sampler asks every QEMU daemon of the VM its
   runstate over QMP, several times a second, for the whole scenario (not only at the end). A
   paused source and a running destination is fine; two ``running`` is a violation. A SIGSTOPped
   QEMU counts as what it last said: frozen in ``running`` it would run again the moment it is
   continued. One that is not stopped but does not answer (busy, or quitting) is not counted.
2. A failed, cancelled or aborted migration leaves the VM running on the source; a succeeded one
   on the destination, with the source's QEMU gone.
3. No write acknowledged to the guest is lost (the guest's disk log check), no fenced write is
   applied (blockd's counters and the volume's bytes), and no attachment is left behind.
4. The guest's memory is intact (its full check) and an established TCP connection to it still
   echoes.
5. The migration ends in a terminal phase within a bound, with a reason, and every fault that fired
   for it is in its timeline.

Each check returns the violations it found as sentences; an empty list means it held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from livemig.chaos.qemus import QemuProcess, qemu_daemons, runstate
from livemig.faults.model import Firing
from livemig.model.migration import Migration, Phase

RUNNING = "running"


@dataclass
class Sample:
    at: float  # wall clock
    states: dict[str, str]  # QEMU (host:pid) -> runstate, as the sampler counts it

    @property
    def running(self) -> list[str]:
        return sorted(label for label, state in self.states.items() if state == RUNNING)


@dataclass
class SamplerReport:
    samples: int = 0
    max_running: int = 0
    violations: list[str] = field(default_factory=list)
    longest_without_running_s: float = 0.0
    states_seen: set[str] = field(default_factory=set)


class RunstateSampler:
    """Invariant 1, sampled in a thread from :meth:`start` to :meth:`stop`."""

    def __init__(self, vm: str, interval_s: float = 0.2) -> None:
        self.vm = vm
        self.interval_s = interval_s
        self.report = SamplerReport()
        self._last: dict[int, str] = {}  # pid -> the last runstate it answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{vm}", daemon=True)
        self._zero_since: float | None = None

    def start(self) -> RunstateSampler:
        self._thread.start()
        return self

    def stop(self) -> SamplerReport:
        self._stop.set()
        self._thread.join(10)
        return self.report

    def sample(self) -> Sample:
        """One look at every QEMU of the VM (also used alone, after a scenario)."""
        states: dict[str, str] = {}
        for process in qemu_daemons(self.vm):
            states[process.label()] = self._state_of(process)
        return Sample(time.time(), states)

    def _state_of(self, process: QemuProcess) -> str:
        if process.stopped:
            # SIGSTOPped: frozen in the runstate it last had, and it would run on in it when continued
            return self._last.get(process.pid, "unknown")
        answered = runstate(process.observe, timeout=min(1.0, 4 * self.interval_s)) if process.observe else None
        if answered is None:
            return "unresponsive"  # busy, or on its way out (a QEMU told to quit stops answering first)
        self._last[process.pid] = answered
        return answered

    def _run(self) -> None:
        while not self._stop.is_set():
            self.observe(self.sample())
            self._stop.wait(self.interval_s)

    def observe(self, sample: Sample) -> None:
        report = self.report
        report.samples += 1
        report.states_seen.update(sample.states.values())
        running = sample.running
        report.max_running = max(report.max_running, len(running))
        if len(running) > 1 and len(report.violations) < 20:
            stamp = time.strftime("%H:%M:%S", time.localtime(sample.at)) + f".{int(sample.at * 1000) % 1000:03d}"
            report.violations.append(f"two QEMUs ran VM {self.vm} at {stamp}: {', '.join(running)} "
                                     f"(all: {sample.states})")  # fmt: skip
        if running:
            self._zero_since = None
        elif self._zero_since is None:
            self._zero_since = sample.at
        else:
            report.longest_without_running_s = max(report.longest_without_running_s, sample.at - self._zero_since)


# ---------------------------------------------------------------------- after the scenario


def check_terminal(m: Migration | None, bound_s: float) -> list[str]:
    if m is None:
        return ["no migration was created"]
    if not m.terminal:
        return [f"migration {m.id} is still {m.phase.value} after {bound_s:.0f} s"]
    if m.phase is not Phase.SUCCEEDED and not m.reason:
        return [f"migration {m.id} ended {m.phase.value} without a reason"]
    return []


def ownership_moved(m: Migration) -> bool:
    """Did the LMO hand the VM to the destination (after which no rollback is possible)?"""
    return any(e.phase is Phase.CLEANUP and e.fault is None for e in m.timeline)


def check_placement(m: Migration, owner: str, observed_state: str | None, sample: Sample, lost: bool) -> list[str]:
    """Invariant 2: where the VM runs after the migration, by the LMO's word and by QEMU's."""
    if lost:
        # its only runnable QEMU was killed: no copy of it may be left running or half-started
        return [f"VM {m.vm} was lost, yet QEMU still runs it: {sample.states}"] if sample.running else []
    expected = m.destination if m.phase is Phase.SUCCEEDED or ownership_moved(m) else m.source
    problems = []
    if owner != expected:
        problems.append(f"the LMO places VM {m.vm} on {owner}, expected {expected} after {m.phase.value}")
    if observed_state != RUNNING:
        problems.append(f"VM {m.vm} is {observed_state or 'not observed'} on {owner}, not running")
    hosts = [label.split(":")[0] for label in sample.states]
    if hosts != [expected] or sample.running != [label for label in sample.states]:
        problems.append(f"exactly one running QEMU of VM {m.vm}, on {expected}, was expected: {sample.states}")
    return problems


def check_guest(memory: tuple[bool, str] | None, disk: tuple[bool, str] | None,
                echo: dict[str, object] | None) -> list[str]:  # fmt: skip
    """Invariants 3 and 4 from inside the guest: its memory check, its disk log, a live TCP echo."""
    problems = []
    if memory is not None and not memory[0]:
        problems.append(f"guest memory check failed: {memory[1]}")
    if disk is not None and not disk[0]:
        problems.append(f"guest disk log check failed (an acknowledged write lost?): {disk[1]}")
    if echo is not None:
        sent, received = echo.get("sent"), echo.get("received")
        if echo.get("error") or not sent or sent != received:
            problems.append(f"the TCP connection to the guest did not survive: sent {sent}, echoed {received}, "
                            f"error {echo.get('error')}")  # fmt: skip
    return problems


def check_volume(vm: str, host: str | None, attachments: Iterable[dict[str, object]], writer: str | None) -> list[str]:
    """Invariant 3 at blockd: one live attachment, the running host's; it alone may be the writer,
    and none of its writes was rejected (a rejected write is one the running guest lost)."""
    live = [a for a in attachments if a.get("vm") == vm and not a.get("detached")]
    mine = [a for a in live if a.get("host") == host]
    problems = []
    if host is not None and len(mine) != 1:
        problems.append(f"VM {vm} on {host} should hold one attachment of its volume there, holds {len(mine)}")
    leftovers = [f"{a.get('id')} on {a.get('host')}" for a in live if a.get("host") != host]
    if leftovers:
        problems.append(f"attachments left behind: {', '.join(leftovers)}")
    for a in mine:
        if a.get("rejected_writes"):
            problems.append(f"blockd rejected {a.get('rejected_writes')} write(s) of the running VM's attachment")
        if a.get("fenced"):
            problems.append("the running VM's attachment is fenced")
    if writer is not None and mine and writer != mine[0].get("id"):
        problems.append(f"the volume's writer is {writer}, not the running VM's attachment {mine[0].get('id')}")
    return problems


def check_stale_write(rejected: int | None, landed: bool) -> list[str]:
    """The stale write held in the network and released after the destination took over."""
    problems = []
    if landed:
        problems.append("a stale write from the source was applied after the destination took over")
    if rejected is not None and rejected < 1:
        problems.append("blockd did not count the stale write as rejected")
    return problems


def check_firings(m: Migration, fired: Iterable[Firing]) -> list[str]:
    """Invariant 5: every firing for this migration is in its timeline."""
    recorded = {e.fault.id for e in m.timeline if e.fault is not None}
    missing = [f"{f.point} ({f.service})" for f in fired if f.id not in recorded]
    return [f"fault firings missing from the timeline: {', '.join(missing)}"] if missing else []
