"""The chaos matrix: which fault, in which stage of a migration, in which process, and what must
come of it.

A scenario is named ``<stage>/<target>/<fault>`` (``switchover/qemu-dst/sigstop``). Stages are
the phases a fault can land in: ``prepare`` (the destination is being prepared), ``precopy``,
``switchover`` (inside the source's pause), ``cutover`` (the destination runs, the source is paused,
ownership has not moved) and ``cleanup`` (ownership moved). Targets are processes: ``lmo``,
``hostd-src``/``hostd-dst``, ``blockd``, ``vswitch-src``/``vswitch-dst``, ``qemu-src``/``qemu-dst``,
plus the migration link, PostgreSQL and blockd's disk.

How a fault is injected:

* :class:`Arm`: a fault point armed through the target's own API before the migration starts,
  scoped to the chaos VM (``crash``, ``error``, ``delay``, ``hang`` released after a while);
* :class:`Signal`, :class:`Partition`, :class:`PgOutage`, :class:`DiskFull`, :class:`StaleWrite`:
  from outside, at the moment the migration reaches the stage. To land exactly in a short stage,
  the run *pins* it: a ``hang`` armed where the stage is held (the source's pause is held at
  ``hostd.switchover``; the LMO's step at ``controller.before.CuttingOver``), waits until the pin
  fired, injects, then releases the pin.

What must come of it (:class:`Expect`): ``Succeeded``; ``rolled back`` (Failed, Aborted or Cancelled
with the VM running on the source); or ``Failed: VM lost`` when the fault killed the only QEMU that
could still run the guest (the source before switchover, the destination after it resumed):
then no copy of the VM may be left running and the migration must end saying why.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from enum import StrEnum

from livemig.model.migration import Phase


class Expect(StrEnum):
    SUCCEEDED = "Succeeded"
    ROLLED_BACK = "rolled back"
    LOST = "Failed: VM lost"


@dataclass(frozen=True)
class Arm:
    """A fault point armed through ``service``'s API (``lmo``, ``blockd``, ``hostd-src``,
    ``hostd-dst``, ``vswitch-src``, ``vswitch-dst``), scoped to the chaos VM and, with ``side``, to
    the source's or the destination's host."""

    service: str
    point: str
    action: str
    seconds: float | None = None
    count: int | None = 1
    after: int = 0
    side: str | None = None  # "src" | "dst"
    release_after: float | None = None  # hang/hold: released this long after it fired


@dataclass(frozen=True)
class PhaseReached:
    """The stage begins when the LMO reports ``phase`` (PreCopy: once bytes have moved)."""

    phase: Phase


#: how each stage is reached for a fault injected from outside
STAGE_TRIGGERS: dict[str, Arm | PhaseReached] = {
    "prepare": Arm("hostd-dst", "hostd.dst.qmp.migrate-incoming", "hang"),
    "precopy": PhaseReached(Phase.PRECOPY),
    "switchover": Arm("hostd-src", "hostd.switchover", "hang"),
    "cutover": Arm("lmo", "controller.before.CuttingOver", "hang"),
    "cleanup": Arm("lmo", "controller.before.Cleanup", "hang"),
}
STAGES = tuple(STAGE_TRIGGERS)


@dataclass(frozen=True)
class Signal:
    """``kill`` (SIGKILL) or ``stop`` (SIGSTOP, then SIGCONT after ``resume_after``) ``target``."""

    target: str  # lmo | blockd | hostd-src | hostd-dst | vswitch-src | vswitch-dst | qemu-src | qemu-dst
    sig: str
    resume_after: float = 0.0


@dataclass(frozen=True)
class Partition:
    """The migration link between the two namespace hosts drops everything, both ways."""

    heal_after: float | None  # None: until the migration has ended


@dataclass(frozen=True)
class PgOutage:
    """The LMO's PostgreSQL is stopped, and started again after ``down_s``."""

    down_s: float


@dataclass(frozen=True)
class DiskFull:
    """blockd's data filesystem is filled; freed after ``free_after`` (None: when the migration ended)."""

    free_after: float | None


@dataclass(frozen=True)
class StaleWrite:
    """A write through the *source's* attachment, held in the network (the NBD holding proxy) from
    pre-copy until the destination owns the volume and the source is fenced, then released."""


Injection = Arm | Signal | Partition | PgOutage | DiskFull | StaleWrite


@dataclass(frozen=True)
class Scenario:
    stage: str
    target: str
    fault: str
    expected: Expect
    inject: tuple[Injection, ...]
    why: str
    needs: frozenset[str] = frozenset()  # netns, postgres, disk, volume, nic
    ci: bool = False  # in the representative subset CI runs
    gateway: str = "dst"  # where the TCP probe's gateway is plugged: not on a vswitch the fault kills

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.target}/{self.fault}"

    @property
    def external(self) -> bool:
        return any(not isinstance(i, Arm) for i in self.inject)


def _s(
    stage: str,
    target: str,
    fault: str,
    expected: Expect,
    *inject: Injection,
    why: str,
    needs: tuple[str, ...] = (),
    ci: bool = False,
    gateway: str = "dst",
) -> Scenario:
    return Scenario(stage, target, fault, expected, inject, why, frozenset(needs), ci, gateway)


OK, BACK, LOST = Expect.SUCCEEDED, Expect.ROLLED_BACK, Expect.LOST
KILL, STOP = "kill", "stop"
#: how long a SIGSTOP or a hang lasts before the process is continued or the hang released
FREEZE_S = 5.0


def _lmo() -> list[Scenario]:
    recover = "a restarted LMO observes the hosts and finishes"
    return [
        _s(
            "prepare", "lmo", "crash", OK, Arm("lmo", "controller.after.PreparingTarget", "crash"), why=recover, ci=True
        ),
        _s(
            "prepare",
            "lmo",
            "error",
            BACK,
            Arm("lmo", "lmo.call.hostd:POST /vms/*/incoming", "error"),
            why="the destination cannot be prepared: roll back",
        ),
        _s(
            "prepare",
            "lmo",
            "hang",
            OK,
            Arm("lmo", "controller.before.PreparingTarget", "hang", release_after=FREEZE_S),
            why="a stalled controller only delays",
        ),
        _s("prepare", "lmo", "sigstop", OK, Signal("lmo", STOP, FREEZE_S), why="a frozen LMO only delays"),
        _s("precopy", "lmo", "crash", OK, Arm("lmo", "controller.after.PreCopy", "crash", after=3), why=recover),
        _s(
            "precopy",
            "lmo",
            "error",
            BACK,
            Arm("lmo", "lmo.call.hostd:POST /vms/*/migrate", "error"),
            why="the migration cannot start: roll back",
        ),
        _s(
            "precopy",
            "lmo",
            "hang",
            OK,
            Arm("lmo", "controller.before.PreCopy", "hang", after=3, release_after=FREEZE_S),
            why="QEMU copies on without the LMO",
        ),
        _s(
            "precopy",
            "lmo",
            "sigstop",
            OK,
            Signal("lmo", STOP, FREEZE_S),
            why="QEMU and hostd finish the copy",
            ci=True,
        ),
        _s("switchover", "lmo", "crash", OK, Signal("lmo", KILL), why="hostd answers the pause itself; " + recover),
        _s(
            "switchover",
            "lmo",
            "error",
            BACK,
            Arm("hostd-src", "hostd.switchover", "hang", release_after=3),
            Arm("lmo", "controller.before.Switchover", "error"),
            why="an error while the source is still paused at pre-switchover: cancel, the source resumes",
            ci=True,
        ),
        _s(
            "switchover",
            "lmo",
            "hang",
            OK,
            Arm("hostd-src", "hostd.switchover", "hang", release_after=2),
            Arm("lmo", "controller.before.Switchover", "hang", release_after=FREEZE_S),
            why="only delays",
        ),
        _s("switchover", "lmo", "sigstop", OK, Signal("lmo", STOP, FREEZE_S), why="only delays"),
        _s("cutover", "lmo", "crash", OK, Arm("lmo", "controller.after.CuttingOver", "crash"), why=recover, ci=True),
        _s(
            "cutover",
            "lmo",
            "error",
            OK,
            Arm("lmo", "lmo.call.blockd:POST /attachments/*/fence", "error"),
            why="a step after QEMU completed is retried, never rolled back",
            needs=("volume",),
        ),
        _s(
            "cutover",
            "lmo",
            "hang",
            OK,
            Arm("lmo", "controller.before.CuttingOver", "hang", release_after=FREEZE_S),
            why="the destination runs; the source waits paused",
        ),
        _s("cutover", "lmo", "sigstop", OK, Signal("lmo", STOP, FREEZE_S), why="only delays"),
        _s("cleanup", "lmo", "crash", OK, Arm("lmo", "controller.after.Cleanup", "crash"), why=recover),
        _s(
            "cleanup",
            "lmo",
            "error",
            OK,
            Arm("lmo", "lmo.call.hostd:POST /vms/*/guest-check", "error"),
            why="cleanup is retried",
        ),
        _s(
            "cleanup",
            "lmo",
            "hang",
            OK,
            Arm("lmo", "controller.before.Cleanup", "hang", release_after=FREEZE_S),
            why="only delays",
        ),
        _s("cleanup", "lmo", "sigstop", OK, Signal("lmo", STOP, FREEZE_S), why="only delays"),
        _s(
            "precopy",
            "lmo-store",
            "error",
            OK,
            Arm("lmo", "lmo.store.save_migration", "error", count=3, after=5),
            why="a failed save loses one step; the next pass observes and redoes it",
        ),
        _s(
            "cutover",
            "lmo-store",
            "crash",
            OK,
            Arm("lmo", "lmo.store.move_vm", "crash"),
            why="the crash falls between fencing the source and moving ownership; the restarted LMO redoes both",
            ci=True,
        ),
    ]


def _hostd_src() -> list[Scenario]:
    adopt = "the restarted hostd finds QEMU's migration unfinished, cancels it; the LMO rolls back"
    return [
        _s("prepare", "hostd-src", "crash", OK, Signal("hostd-src", KILL), why="the source's hostd is idle now"),
        _s("prepare", "hostd-src", "sigstop", OK, Signal("hostd-src", STOP, FREEZE_S), why="only delays"),
        _s(
            "precopy",
            "hostd-src",
            "crash",
            BACK,
            Arm("hostd-src", "hostd.src.qmp.query-migrate", "crash", after=5),
            why=adopt,
            ci=True,
        ),
        _s(
            "precopy",
            "hostd-src",
            "error",
            BACK,
            Arm("hostd-src", "hostd.src.qmp.migrate-set-parameters", "error"),
            why="the migration cannot be configured: roll back",
        ),
        _s(
            "precopy",
            "hostd-src",
            "hang",
            OK,
            Arm("hostd-src", "hostd.src.qmp.migrate-set-parameters", "hang", release_after=FREEZE_S),
            why="only delays",
        ),
        _s(
            "precopy",
            "hostd-src",
            "sigstop",
            OK,
            Signal("hostd-src", STOP, FREEZE_S),
            why="QEMU waits at pre-switchover for the frozen hostd",
        ),
        _s(
            "switchover",
            "hostd-src",
            "crash",
            BACK,
            Arm("hostd-src", "hostd.src.event.MIGRATION.pre-switchover", "crash"),
            why=adopt,
        ),
        _s(
            "switchover",
            "hostd-src",
            "error",
            BACK,
            Arm("hostd-src", "hostd.src.event.MIGRATION.pre-switchover", "error"),
            why="hostd fails handling the pause: QEMU's migration must be cancelled, the source resumes",
            ci=True,
        ),
        _s(
            "switchover",
            "hostd-src",
            "hang",
            OK,
            Arm("hostd-src", "hostd.switchover", "hang", release_after=3),
            why="a longer pause",
        ),
        _s("switchover", "hostd-src", "sigstop", OK, Signal("hostd-src", STOP, 3.0), why="a longer pause"),
        _s(
            "cutover",
            "hostd-src",
            "crash",
            OK,
            Arm("hostd-src", "hostd.src.qmp.quit", "crash"),
            why="stopping the source is retried by the LMO after the restart",
        ),
        _s(
            "cutover",
            "hostd-src",
            "error",
            OK,
            Arm("hostd-src", "hostd.src.qmp.quit", "error"),
            why="hostd kills a QEMU that does not quit",
        ),
        _s(
            "cutover",
            "hostd-src",
            "hang",
            OK,
            Arm("hostd-src", "hostd.src.qmp.quit", "hang", release_after=FREEZE_S),
            why="only delays",
        ),
        _s("cutover", "hostd-src", "sigstop", OK, Signal("hostd-src", STOP, FREEZE_S), why="only delays"),
        _s("cleanup", "hostd-src", "crash", OK, Signal("hostd-src", KILL), why="the source has no part left"),
    ]


def _hostd_dst() -> list[Scenario]:
    return [
        _s(
            "prepare",
            "hostd-dst",
            "crash",
            OK,
            Arm("hostd-dst", "hostd.dst.qmp.migrate-incoming", "crash"),
            why="the restarted hostd finishes preparing the half-started destination",
            ci=True,
        ),
        _s(
            "prepare",
            "hostd-dst",
            "error",
            BACK,
            Arm("hostd-dst", "hostd.dst.qmp.migrate-incoming", "error"),
            why="the destination cannot listen: roll back",
        ),
        _s(
            "prepare",
            "hostd-dst",
            "hang",
            OK,
            Arm("hostd-dst", "hostd.dst.qmp.migrate-incoming", "hang", release_after=FREEZE_S),
            why="only delays",
        ),
        _s("prepare", "hostd-dst", "sigstop", OK, Signal("hostd-dst", STOP, FREEZE_S), why="only delays"),
        _s(
            "precopy",
            "hostd-dst",
            "crash",
            OK,
            Signal("hostd-dst", KILL),
            why="QEMU receives without hostd; the restarted hostd adopts the incoming VM",
        ),
        _s("precopy", "hostd-dst", "sigstop", OK, Signal("hostd-dst", STOP, FREEZE_S), why="only delays"),
        _s("switchover", "hostd-dst", "crash", OK, Signal("hostd-dst", KILL), why="as in pre-copy"),
        _s(
            "switchover",
            "hostd-dst",
            "error",
            OK,
            Arm("hostd-dst", "hostd.dst.event.RESUME", "error"),
            why="only the guest's pause is not measured",
        ),
        _s("switchover", "hostd-dst", "sigstop", OK, Signal("hostd-dst", STOP, FREEZE_S), why="only delays"),
        _s(
            "cutover",
            "hostd-dst",
            "crash",
            OK,
            Arm("hostd-dst", "hostd.dst.qmp.query-status", "crash", side="dst"),
            why="the LMO observes the destination again after the restart",
            ci=True,
        ),
        _s(
            "cutover",
            "hostd-dst",
            "error",
            OK,
            Arm("hostd-dst", "hostd.dst.qmp.query-status.reply", "error", side="dst"),
            why="a destination that cannot be observed after QEMU completed is observed again, never rolled back",
            ci=True,
        ),
        _s(
            "cutover",
            "hostd-dst",
            "hang",
            OK,
            Arm("hostd-dst", "hostd.dst.qmp.query-status", "hang", side="dst", release_after=FREEZE_S),
            why="only delays",
        ),
        _s("cutover", "hostd-dst", "sigstop", OK, Signal("hostd-dst", STOP, FREEZE_S), why="only delays"),
        _s("cleanup", "hostd-dst", "crash", OK, Signal("hostd-dst", KILL), why="the guest runs on; checks are retried"),
        _s("cleanup", "hostd-dst", "sigstop", OK, Signal("hostd-dst", STOP, FREEZE_S), why="only delays"),
    ]


def _blockd() -> list[Scenario]:
    vol = ("volume",)
    return [
        _s(
            "prepare",
            "blockd",
            "crash",
            OK,
            Arm("blockd", "blockd.attach", "crash"),
            why="attaching is retried after the restart; the guest's I/O waits for the reconnect",
            needs=vol,
        ),
        _s(
            "prepare",
            "blockd",
            "error",
            BACK,
            Arm("blockd", "blockd.attach", "error"),
            why="no volume for the destination: roll back",
            needs=vol,
            ci=True,
        ),
        _s(
            "prepare",
            "blockd",
            "hang",
            OK,
            Arm("blockd", "blockd.attach", "hang", release_after=FREEZE_S),
            why="only delays",
            needs=vol,
        ),
        _s("prepare", "blockd", "sigstop", OK, Signal("blockd", STOP, FREEZE_S), why="only delays", needs=vol),
        _s(
            "precopy",
            "blockd",
            "crash",
            OK,
            Arm("blockd", "blockd.nbd.write", "crash", side="src", after=2),
            why="QEMU's NBD client reconnects and reruns the writes in flight",
            needs=vol,
            ci=True,
        ),
        _s(
            "precopy",
            "blockd",
            "delay",
            OK,
            Arm("blockd", "blockd.nbd.write", "delay", 2.0, count=3, side="src"),
            why="slow storage only delays",
            needs=vol,
        ),
        _s("precopy", "blockd", "sigstop", OK, Signal("blockd", STOP, FREEZE_S), why="only delays", needs=vol),
        _s(
            "switchover",
            "blockd",
            "crash",
            OK,
            Signal("blockd", KILL),
            why="the source's final flush waits for the reconnect",
            needs=vol,
        ),
        _s("switchover", "blockd", "sigstop", OK, Signal("blockd", STOP, 3.0), why="a longer pause", needs=vol),
        _s(
            "cutover",
            "blockd",
            "crash",
            OK,
            Arm("blockd", "blockd.fence", "crash"),
            why="the fence is retried; the source stays paused until it holds",
            needs=vol,
            ci=True,
        ),
        _s(
            "cutover",
            "blockd",
            "error",
            OK,
            Arm("blockd", "blockd.fence", "error"),
            why="the fence is retried",
            needs=vol,
        ),
        _s(
            "cutover",
            "blockd",
            "hang",
            OK,
            Arm("blockd", "blockd.fence", "hang", release_after=FREEZE_S),
            why="only delays",
            needs=vol,
        ),
        _s("cutover", "blockd", "sigstop", OK, Signal("blockd", STOP, FREEZE_S), why="only delays", needs=vol),
        _s(
            "cleanup",
            "blockd",
            "crash",
            OK,
            Arm("blockd", "blockd.detach", "crash"),
            why="detaching is retried",
            needs=vol,
        ),
        _s(
            "cleanup",
            "blockd",
            "error",
            OK,
            Arm("blockd", "blockd.detach", "error"),
            why="detaching is retried",
            needs=vol,
        ),
        _s(
            "cleanup",
            "blockd",
            "hang",
            OK,
            Arm("blockd", "blockd.detach", "hang", release_after=FREEZE_S),
            why="only delays",
            needs=vol,
        ),
    ]


def _vswitch() -> list[Scenario]:
    nic = ("nic",)
    cancel = "the hand-off fails inside the pause: hostd cancels, the source resumes with its network"
    return [
        _s(
            "prepare",
            "vswitch-dst",
            "crash",
            OK,
            Arm("vswitch-dst", "vswitch.attach", "crash"),
            why="plugging the destination's NIC is retried after the restart",
            needs=nic,
            gateway="src",
        ),
        _s(
            "prepare",
            "vswitch-dst",
            "error",
            BACK,
            Arm("vswitch-dst", "vswitch.flows.import", "error"),
            why="flow state cannot be copied: roll back",
            needs=nic,
        ),
        _s(
            "prepare",
            "vswitch-src",
            "crash",
            OK,
            Arm("vswitch-src", "vswitch.flows.export", "crash"),
            why="the restarted vswitch restores its ports (its flows are gone: the copy is empty)",
            needs=nic,
        ),
        _s(
            "precopy",
            "vswitch-src",
            "sigstop",
            OK,
            Signal("vswitch-src", STOP, FREEZE_S),
            why="flow deltas are best effort",
            needs=nic,
        ),
        _s(
            "switchover",
            "vswitch-src",
            "crash",
            BACK,
            Arm("vswitch-src", "vswitch.pause_marker", "crash"),
            why=cancel + " (the restarted vswitch restores its ports)",
            needs=nic,
            ci=True,
        ),
        _s(
            "switchover",
            "vswitch-src",
            "error",
            BACK,
            Arm("vswitch-src", "vswitch.pause_marker", "error"),
            why=cancel,
            needs=nic,
        ),
        _s(
            "switchover",
            "vswitch-src",
            "sigstop",
            OK,
            Signal("vswitch-src", STOP, 3.0),
            why="a longer pause",
            needs=nic,
        ),
        _s(
            "switchover",
            "vswitch-dst",
            "crash",
            BACK,
            Arm("vswitch-dst", "vswitch.handoff", "crash"),
            why=cancel,
            needs=nic,
            gateway="src",
        ),
        _s(
            "switchover",
            "vswitch-dst",
            "error",
            BACK,
            Arm("vswitch-dst", "vswitch.handoff", "error"),
            why=cancel,
            needs=nic,
            ci=True,
        ),
        _s(
            "switchover",
            "vswitch-dst",
            "delay",
            OK,
            Arm("vswitch-dst", "vswitch.handoff", "delay", 1.0),
            why="a longer pause",
            needs=nic,
        ),
        _s(
            "cutover",
            "vswitch-dst",
            "crash",
            OK,
            Arm("vswitch-dst", "vswitch.mapping", "crash", after=1),  # after SyncingFlows' push
            why="the push that moves ingress to the destination is made again once the vswitch is back",
            needs=nic,
            gateway="src",
        ),
        _s(
            "cutover",
            "vswitch-dst",
            "error",
            OK,
            Arm("vswitch-dst", "vswitch.mapping", "error", after=1),  # after SyncingFlows' push
            why="the push that moves ingress to the destination fails after ownership moved: Cleanup pushes again",
            needs=nic,
        ),
        _s(
            "cleanup",
            "vswitch-src",
            "crash",
            OK,
            Signal("vswitch-src", KILL),
            why="the source has no part left",
            needs=nic,
        ),
        _s(
            "precopy",
            "overlay",
            "loss",
            OK,
            Arm("vswitch-dst", "vswitch.overlay.send", "drop", count=40),
            why="TCP retransmits what the overlay lost",
            needs=nic,
        ),
    ]


def _qemu() -> list[Scenario]:
    lost = "the only QEMU holding the guest's current state was killed: the VM is lost, nothing else runs it"
    failed = "the stream breaks: the source runs on"
    return [
        _s("prepare", "qemu-src", "crash", LOST, Signal("qemu-src", KILL), why=lost, ci=True),
        _s("prepare", "qemu-src", "sigstop", OK, Signal("qemu-src", STOP, FREEZE_S), why="only delays"),
        _s("precopy", "qemu-src", "crash", LOST, Signal("qemu-src", KILL), why=lost),
        _s(
            "precopy",
            "qemu-src",
            "error",
            BACK,
            Arm("hostd-src", "hostd.src.qmp.migrate.reply", "error"),
            why="QEMU's answer to migrate is lost: hostd must cancel QEMU's migration before it gives up",
            ci=True,
        ),
        _s(
            "precopy",
            "qemu-src",
            "delay",
            OK,
            Arm("hostd-src", "hostd.src.qmp.query-migrate.reply", "delay", 2.0, count=3),
            why="a slow monitor only delays",
        ),
        _s(
            "precopy",
            "qemu-src",
            "sigstop",
            OK,
            Signal("qemu-src", STOP, FREEZE_S),
            why="the copy stalls, then goes on",
            ci=True,
        ),
        _s("switchover", "qemu-src", "crash", LOST, Signal("qemu-src", KILL), why=lost),
        _s(
            "switchover",
            "qemu-src",
            "error",
            OK,
            Arm("hostd-src", "hostd.src.qmp.migrate-continue.reply", "error"),
            why="QEMU did continue and completed: the migration must go forward, never resume the source",
            ci=True,
        ),
        _s(
            "switchover",
            "qemu-src",
            "delay",
            OK,
            Arm("hostd-src", "hostd.src.qmp.migrate-continue", "delay", 2.0),
            why="a longer pause",
        ),
        _s("switchover", "qemu-src", "sigstop", OK, Signal("qemu-src", STOP, 3.0), why="a longer pause"),
        _s("cutover", "qemu-src", "crash", OK, Signal("qemu-src", KILL), why="the source was to be stopped anyway"),
        _s(
            "cutover",
            "qemu-src",
            "error",
            OK,
            Arm("hostd-src", "hostd.src.qmp.quit.reply", "error"),
            why="hostd kills a QEMU whose quit it cannot confirm",
        ),
        _s(
            "cutover",
            "qemu-src",
            "sigstop",
            OK,
            Signal("qemu-src", STOP, FREEZE_S),
            why="a frozen source is killed when it does not quit",
        ),
        _s("prepare", "qemu-dst", "crash", BACK, Signal("qemu-dst", KILL), why="no destination: roll back", ci=True),
        _s(
            "prepare",
            "qemu-dst",
            "error",
            BACK,
            Arm("hostd-dst", "hostd.dst.qmp.migrate-set-capabilities.reply", "error"),
            why="the destination refuses: roll back",
        ),
        _s(
            "prepare",
            "qemu-dst",
            "delay",
            OK,
            Arm("hostd-dst", "hostd.dst.qmp.migrate-incoming.reply", "delay", 3.0),
            why="only delays",
        ),
        _s("prepare", "qemu-dst", "sigstop", OK, Signal("qemu-dst", STOP, FREEZE_S), why="only delays"),
        _s("precopy", "qemu-dst", "crash", BACK, Signal("qemu-dst", KILL), why=failed),
        _s(
            "precopy",
            "qemu-dst",
            "sigstop",
            OK,
            Signal("qemu-dst", STOP, FREEZE_S),
            why="the copy stalls, then goes on",
        ),
        _s(
            "switchover",
            "qemu-dst",
            "crash",
            BACK,
            Signal("qemu-dst", KILL),
            why="the destination dies before it ran: the source resumes",
        ),
        _s("switchover", "qemu-dst", "sigstop", OK, Signal("qemu-dst", STOP, 3.0), why="a longer pause"),
        _s(
            "cutover",
            "qemu-dst",
            "crash",
            LOST,
            Signal("qemu-dst", KILL),
            why="the destination ran (and may have written the volume): resuming the stale source would be "
            "corruption, so the VM is lost",
            ci=True,
        ),
        _s(
            "cutover",
            "qemu-dst",
            "delay",
            OK,
            Arm("hostd-dst", "hostd.dst.qmp.query-status.reply", "delay", 3.0, side="dst"),
            why="only delays",
        ),
        _s("cutover", "qemu-dst", "sigstop", OK, Signal("qemu-dst", STOP, FREEZE_S), why="only delays"),
        _s("cleanup", "qemu-dst", "crash", LOST, Signal("qemu-dst", KILL), why="the VM's only QEMU died"),
    ]


def _specials() -> list[Scenario]:
    return [
        _s(
            "precopy",
            "partition",
            "mig-link",
            OK,
            Partition(heal_after=FREEZE_S),
            why="TCP carries the stream on once the link is back",
            needs=("netns",),
            ci=True,
        ),
        _s(
            "precopy",
            "partition-held",
            "mig-link",
            BACK,
            Partition(heal_after=None),
            why="no progress: the convergence policy aborts, the source runs on",
            needs=("netns",),
        ),
        _s(
            "switchover", "partition", "mig-link", OK, Partition(heal_after=3.0), why="a longer pause", needs=("netns",)
        ),
        _s(
            "precopy",
            "stale-write",
            "blockd",
            OK,
            StaleWrite(),
            why="the source's late write meets the fence: rejected, counted, never applied",
            needs=("volume",),
            ci=True,
        ),
        _s(
            "precopy",
            "postgres",
            "restart",
            OK,
            PgOutage(down_s=FREEZE_S),
            why="the controller's passes fail while the store is down, then go on",
            needs=("postgres",),
            ci=True,
        ),
        _s(
            "prepare",
            "disk-full",
            "blockd",
            BACK,
            DiskFull(free_after=None),
            why="blockd cannot record the destination's attachment: roll back",
            needs=("disk", "volume"),
            ci=True,
        ),
        _s(
            "cutover",
            "disk-full",
            "blockd",
            OK,
            DiskFull(free_after=FREEZE_S),
            why="the fence cannot be recorded: retried until there is room; the source stays paused",
            needs=("disk", "volume"),
            ci=True,
        ),
    ]


def matrix() -> list[Scenario]:
    """Every scenario, in a stable order."""
    return [*_lmo(), *_hostd_src(), *_hostd_dst(), *_blockd(), *_vswitch(), *_qemu(), *_specials()]


def select(scenarios: list[Scenario], patterns: list[str] | None = None, ci_only: bool = False) -> list[Scenario]:
    """Scenarios whose name matches any of ``patterns`` (shell patterns, or substrings)."""
    chosen = [s for s in scenarios if not ci_only or s.ci]
    if not patterns:
        return chosen
    return [s for s in chosen if any(fnmatch.fnmatchcase(s.name, p) or p in s.name for p in patterns)]


@dataclass
class Result:
    """One row of the table ``livemig chaos`` prints."""

    scenario: str
    expected: str
    actual: str
    invariants_held: bool
    seconds: float
    detail: str = ""
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.invariants_held and self.actual == self.expected
