#!/usr/bin/env python3
"""What TLS costs blockd's NBD: the same blockd, plain vs forced TLS, the same client.

Starts two real blockd processes (``python -m livemig.storage``) on fresh data dirs, one plain and
one with a leaf from a fresh region CA, and a volume on each, filled once. Then
``nbdcopy`` (libnbd over GnuTLS, one connection; ``qemu-img bench`` of QEMU 7.2 cannot create the
``tls-creds-x509`` object a TLS connection needs) runs each workload ``--rounds`` times, alternating
which server goes first:

* ``seq_read_mib_s`` / ``seq_write_mib_s``: the whole volume in 1 MiB requests, 16 in flight;
* ``read_4k_iops`` / ``write_4k_iops``: ``--mib-4k`` MiB in 4 KiB requests, one at a time
  (latency-bound: what a handshake-free but encrypted round trip costs).

Prints JSON: medians for ``plain`` and ``tls`` and the ratio tls / plain (higher is better).

    flock /tmp/livemig-heavy.lock .venv/bin/python bench/nbd_tls.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livemig.security import pki
from livemig.security.pki import Role
from livemig.testing.blockd import MIB, BlockdProcess

SEQ = ["--connections=1", "--requests=16", "--request-size=1048576"]
SMALL = ["--connections=1", "--requests=1", "--request-size=4096"]


def nbdcopy(options: list[str], source: str, target: str) -> float:
    start = time.perf_counter()
    out = subprocess.run(["nbdcopy", *options, source, target], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"nbdcopy failed: {out.stdout}{out.stderr}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--mib-4k", type=int, default=16, help="MiB moved in 4 KiB requests per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nbd-tls-bench-") as tmp:
        base = Path(tmp)
        region = base / "pki"
        pki.init_ca(region, "bench")
        leaf = pki.issue(region, "blockd", Role.BLOCKD, ["127.0.0.1"])
        pki.issue(region, "host", Role.QEMU, ["127.0.0.1"])
        creds = pki.qemu_tls_dir(region, "host", base / "qemu-tls")
        servers = {
            "plain": BlockdProcess(base / "plain", base / "plain.log"),
            "tls": BlockdProcess(base / "tls", base / "tls.log", tls=leaf),
        }
        source = base / "source.raw"
        source.write_bytes(os.urandom(args.size_mib * MIB))
        small = base / "small.raw"
        small.write_bytes(os.urandom(args.mib_4k * MIB))
        sink = base / "sink.raw"
        uris: dict[str, str] = {}
        workloads = ("seq_read_mib_s", "seq_write_mib_s", "read_4k_iops", "write_4k_iops")
        try:
            for name, server in servers.items():
                server.start()
                server.create_volume("bench", args.size_mib * MIB)
                server.create_volume("small", args.mib_4k * MIB)
                uri = server.attach("bench")["nbd_uri"]
                small_uri = server.attach("small")["nbd_uri"]
                suffix = f"?tls-certificates={creds}" if name == "tls" else ""
                uris[name], uris[f"{name}-small"] = uri + suffix, small_uri + suffix
                nbdcopy(SEQ, str(source), uris[name])  # fill once: no first-write allocation in the numbers
                nbdcopy(SEQ, str(small), uris[f"{name}-small"])
            samples: dict[str, dict[str, list[float]]] = {n: {w: [] for w in workloads} for n in servers}
            order = list(servers)
            for round_no in range(args.rounds):
                for name in order if round_no % 2 == 0 else order[::-1]:
                    got = samples[name]
                    got["seq_read_mib_s"].append(args.size_mib / nbdcopy(SEQ, uris[name], str(sink)))
                    got["seq_write_mib_s"].append(args.size_mib / nbdcopy(SEQ, str(source), uris[name]))
                    ops = args.mib_4k * MIB / 4096
                    got["read_4k_iops"].append(ops / nbdcopy(SMALL, uris[f"{name}-small"], str(sink)))
                    got["write_4k_iops"].append(ops / nbdcopy(SMALL, str(small), uris[f"{name}-small"]))
        finally:
            for server in servers.values():
                server.stop()
                server.api.close()
    result: dict[str, Any] = {
        "client": "nbdcopy (libnbd), one connection, loopback",
        "encryption": "TLS 1.3 via NBD STARTTLS, EC P-256, client certificate required",
        "rounds": args.rounds,
    }
    for name, measured in samples.items():
        result[name] = {w: round(statistics.median(v), 1) for w, v in measured.items()}
    result["ratio_tls_to_plain"] = {w: round(result["tls"][w] / result["plain"][w], 3) for w in workloads}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
