#!/usr/bin/env python3
"""How much code TCG must translate on a freshly resumed destination, against the steady source.

Why: under TCG the network blackout ends about 70 ms after the destination resumes (bench/
blackout.py). A new QEMU process starts with an empty translation cache, so the resumed guest
first runs through translation: every translation block it executes is translated once. This
measures that directly with two plain QEMUs (livemig's command line, no hostd, no network): the TB
count (HMP ``info jit``) on the source over the same window before the migration (the baseline:
nothing new to translate) and on the destination from its ``RESUME`` on. KVM has no such
warm-up, so this is the part of the blackout a KVM host does not pay.

    .venv/bin/python bench/tcg_warmup.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from livemig.guest.image import build_image, default_cache_dir, kernel_cmdline
from livemig.host.qemu import TCG_RAM_TRIM_KIB, VmPaths, command_line, resolve_machine
from livemig.model import BootSpec, VmSpec

WINDOW_S = 0.4


async def tb_count(qmp: QMPClient) -> int:
    text = str(await qmp.execute("human-monitor-command", {"command-line": "info jit"}))
    found = re.search(r"TB count\s+(\d+)", text)
    return int(found.group(1)) if found else -1


async def series(qmp: QMPClient, seconds: float) -> list[tuple[float, int]]:
    """(ms since start, TB count) every ~5 ms; the first entry is at 0."""
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        count = await tb_count(qmp)
        samples.append((round((time.monotonic() - started) * 1000, 1), count))
        await asyncio.sleep(0.005)
    return samples


async def one_run(spec: VmSpec, workdir: Path) -> dict[str, Any]:
    clients: dict[str, QMPClient] = {}
    try:
        for role in ("source", "destination"):
            root = workdir / role
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            subprocess.run(command_line(spec, VmPaths(root), "tcg", incoming=role == "destination"), check=True)
            clients[role] = QMPClient(role)
            await clients[role].connect(str(VmPaths(root).qmp))
        source, destination = clients["source"], clients["destination"]
        await asyncio.sleep(10)  # boot, and the workload reaches its steady loop
        steady = await series(source, WINDOW_S)
        await destination.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = (await destination.execute("query-migrate"))["socket-address"][0]["port"]
        await source.execute("migrate-set-parameters", {"max-bandwidth": 2 << 30, "downtime-limit": 20})
        with destination.listener(("RESUME",)) as listener:
            await source.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            async for _event in listener:
                break
        after = await series(destination, WINDOW_S)
        first_answer_ms, translated_first = after[1] if len(after) > 1 else (None, None)
        return {
            "source_new_tbs_in_window": steady[-1][1] - steady[0][1],
            "destination_tbs_in_window": after[-1][1],
            "destination_tbs_at_first_answer": translated_first,
            "destination_first_answer_ms": first_answer_ms,
            "destination_series": after[::5],
        }
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.execute("quit")
            with contextlib.suppress(Exception):
                await client.disconnect()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    image = build_image(default_cache_dir())
    spec = VmSpec(name="warmup", memory_mib=256, ram_trim_kib=TCG_RAM_TRIM_KIB, machine=resolve_machine("q35"),
                  boot=BootSpec(kernel=str(image.kernel), initrd=str(image.initrd),
                                append=kernel_cmdline(64, 5)))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="livemig-bench-warmup-") as tmp:
        runs = [asyncio.run(one_run(spec, Path(tmp))) for _ in range(args.runs)]
    print(json.dumps({"window_ms": WINDOW_S * 1000, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
