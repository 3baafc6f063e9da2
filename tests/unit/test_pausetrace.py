"""Splitting a guest's pause from QEMU's trace lines and QMP event times (bench/pause.py)."""

from pathlib import Path

import pytest

from livemig.host.qemu import TRACE_DIR_ENV, trace_arguments
from livemig.model import VmSpec
from livemig.testing.pausetrace import read_trace, split_pause

T = 1_800_000_000.0
SOURCE = """\
qemu-system-x86_64: warning: something unrelated
7@{a:.6f}:vm_state_notify running 0 reason 7 (finish-migrate)
7@{b:.6f}:migration_completion_vm_stop ret 0
7@{c:.6f}:savevm_state_complete_precopy
7@{d:.6f}:migration_bitmap_sync_start
7@{e:.6f}:migration_bitmap_sync_end dirty_pages 12
7@{f:.6f}:vmstate_save timer, timer
7@{g:.6f}:migrate_set_state new state completed
"""
DESTINATION = """\
9@{a:.6f}:vmstate_load ram, (old)
9@{b:.6f}:qemu_loadvm_state_section_startfull 0(timer) 0 2
9@{c:.6f}:qemu_loadvm_state_post_main 0
9@{d:.6f}:vm_state_notify running 1 reason 9 (running)
"""


def test_each_step_between_stop_and_resume(tmp_path: Path):
    ms = 0.001
    (tmp_path / "vm-out-1.log").write_text(SOURCE.format(
        a=T, b=T + 0.5 * ms, c=T + 3 * ms, d=T + 3.1 * ms, e=T + 5.1 * ms, f=T + 6 * ms, g=T + 8 * ms))  # fmt: skip
    (tmp_path / "vm-in-2.log").write_text(DESTINATION.format(
        a=T + 6.5 * ms, b=T + 7 * ms, c=T + 12 * ms, d=T + 12.5 * ms))  # fmt: skip
    steps = split_pause(tmp_path, stopped_at=T + 0.2 * ms, resumed_at=T + 12.6 * ms,
                        pre_switchover_at=T + 1.2 * ms, completed_at=T + 8.1 * ms)  # fmt: skip
    assert steps == pytest.approx({
        "stop_to_pre_switchover": 1.0, "stop_to_complete": 2.8, "hook": 1.8, "bitmap_sync": 2.0,
        "final_ram": 0.9, "device_save": 2.0, "destination_lag": 3.9, "device_load": 5.0,
        "destination_start": 0.6,
    }, abs=0.02)  # fmt: skip
    assert len(read_trace(tmp_path / "vm-out-1.log")) == 7  # the warning line is no event


def test_without_a_trace_only_the_qmp_edges_are_known(tmp_path: Path):
    steps = split_pause(None, stopped_at=T, resumed_at=T + 0.015, pre_switchover_at=T + 0.001)
    assert steps["stop_to_pre_switchover"] == pytest.approx(1.0)
    assert all(v is None for k, v in steps.items() if k != "stop_to_pre_switchover")


def test_qemu_traces_only_when_asked(tmp_path: Path):
    spec = VmSpec(name="vm", memory_mib=256)
    assert trace_arguments(spec, False, environ={}) == []
    argv = trace_arguments(spec, True, environ={TRACE_DIR_ENV: str(tmp_path)})
    assert argv[:3] == ["-msg", "timestamp=on", "-D"] and Path(argv[3]).parent == tmp_path
    assert Path(argv[3]).name.startswith("vm-in-") and "enable=vm_state_notify" in argv
