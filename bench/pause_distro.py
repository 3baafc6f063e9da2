#!/usr/bin/env python3
"""Pause and total migration time of a real Debian guest booted by firmware from a blockd volume:
livemig's settings vs plain QEMU defaults, same guest, same run.

The sibling of ``bench/pause.py`` for users' own VMs: the Debian 12 disk image (``livemig image
build-disk``) imported into a volume, booted under OVMF (its NVRAM a volume too, rewritten whole
by the destination when it resumes) and, for comparison, under SeaBIOS (no NVRAM). Each guest is
migrated A<->B --runs times per setting, interleaved (livemig, defaults, livemig, ...) so machine
noise hits both alike. Prints JSON: per firmware and setting, QEMU's pause (downtime), the pause
the guest saw (source STOP to destination RESUME, which includes the destination's store rewrite),
and total time; then the ratios livemig/defaults.

    .venv/bin/python bench/pause_distro.py --runs 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livemig.guest.distro import build_disk_image
from livemig.guest.image import default_cache_dir
from livemig.model import Phase, VmSpec
from livemig.region.local import Region
from livemig.wire.lmo import LmoClient

_spec = importlib.util.spec_from_file_location("bench_pause", Path(__file__).with_name("pause.py"))
assert _spec is not None and _spec.loader is not None
pause = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pause)
SETTINGS = pause.SETTINGS
percentile = pause.percentile
BOOTED = "login:"  # the serial getty's prompt: the system is up (cloud-init has run its boot stages)


def boot(lmo: LmoClient, region: Region, firmware: str, image: Path, memory_mib: int) -> str:
    name = f"bench-{firmware}"
    done = subprocess.run([sys.executable, "-m", "livemig.cli.main", "volume", "import", f"{name}-root", str(image),
                           "--state-dir", str(region.state_dir)], capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"import failed: {done.stderr}")
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDJuRPwE8S1jtKoRN58zY9JX7VQmI6ACuYvv7l4UhgXj bench@livemig"
    lmo.create_vm(VmSpec.model_validate({
        "name": name, "memory_mib": memory_mib, "firmware": firmware,
        "devices": [{"kind": "volume", "id": "root", "pci_addr": "0x4", "volume": f"{name}-root", "boot_index": 0}],
        "cloud_init": {"hostname": name, "ssh_authorized_keys": [key]},
    }), host="A")  # fmt: skip
    started = time.monotonic()
    lmo.wait_for_console(name, BOOTED, timeout=600)
    print(f"{name}: booted in {time.monotonic() - started:.0f}s", file=sys.stderr)
    time.sleep(10)  # let the last boot-time services settle before the first migration
    return name


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def values(key: str) -> list[float]:
        return [r[key] for r in runs if r[key] is not None]

    return {
        "runs": len(runs),
        "succeeded": sum(r["phase"] == "Succeeded" for r in runs),
        "pause_ms_p50": percentile(values("pause_ms"), 50),
        "pause_ms_p99": percentile(values("pause_ms"), 99),
        "guest_pause_ms_p50": percentile(values("guest_pause_ms"), 50),
        "guest_pause_ms_p99": percentile(values("guest_pause_ms"), 99),
        "total_ms_p50": percentile(values("total_ms"), 50),
        "total_ms_p99": percentile(values("total_ms"), 99),
        "raw": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="migrations per setting and firmware")
    parser.add_argument("--memory", type=int, default=512, help="guest memory, MiB")
    parser.add_argument("--firmware", default="uefi,bios", help="uefi, bios or both (comma-separated)")
    args = parser.parse_args()
    firmwares = [f.strip() for f in args.firmware.split(",") if f.strip()]
    image = build_disk_image(default_cache_dir())
    results: dict[str, dict[str, list[dict[str, Any]]]] = {f: {s: [] for s in SETTINGS} for f in firmwares}
    with tempfile.TemporaryDirectory(prefix="livemig-bench-") as tmp:
        region = Region(Path(tmp))
        config = region.up()
        try:
            with LmoClient(config.lmo_url) as lmo:
                for firmware in firmwares:
                    name = boot(lmo, region, firmware, image.path, args.memory)
                    host = "A"
                    for i in range(args.runs):
                        for setting, params in SETTINGS.items():
                            destination = "B" if host == "A" else "A"
                            m = lmo.wait(lmo.migrate(name, destination, params).id, timeout=600)
                            results[firmware][setting].append({
                                "pause_ms": m.stats.pause_ms, "guest_pause_ms": m.stats.guest_pause_ms,
                                "total_ms": m.stats.total_ms, "rounds": m.stats.rounds, "phase": m.phase.value,
                                "transferred_bytes": m.stats.transferred_bytes,
                            })  # fmt: skip
                            print(f"{firmware} run {i + 1}/{args.runs} {setting:13s} {host}->{destination}: "
                                  f"pause {m.stats.pause_ms} ms (guest {m.stats.guest_pause_ms} ms) "
                                  f"total {m.stats.total_ms} ms {m.phase.value}", file=sys.stderr)  # fmt: skip
                            if m.phase is Phase.SUCCEEDED:
                                host = destination
                    lmo.delete_vm(name)
                    lmo.delete_volume(f"{name}-root")
        finally:
            region.down()
    report: dict[str, Any] = {
        "guest": {"image": str(image.path), "memory_mib": args.memory, "kernel": image.kernel_version},
        "settings": {name: params.model_dump() for name, params in SETTINGS.items()},
    }
    ok = True
    for firmware, by_setting in results.items():
        ours, theirs = summarize(by_setting["livemig"]), summarize(by_setting["qemu_defaults"])
        ok = ok and ours["succeeded"] == ours["runs"]
        report[firmware] = {
            "livemig": ours,
            "qemu_defaults": theirs,
            "ratio": {
                key: (round(ours[key] / theirs[key], 3) if ours[key] is not None and theirs[key] else None)
                for key in ("pause_ms_p50", "guest_pause_ms_p50", "total_ms_p50")
            },
        }
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
