#!/usr/bin/env python3
"""What mutual TLS costs a small API call: plain HTTP vs mTLS, on a reused connection and on a new one.

Starts two real uvicorn servers as subprocesses (this script with ``--serve``) serving the same
FastAPI route behind the same role check (``require_role(Role.LMO)``): one plain HTTP (marked
insecure), one mutual TLS with certificates from a fresh region CA (EC P-256). An httpx client then
times ``--requests`` small POSTs (JSON in, JSON out) per mode, ``--rounds`` times, the order of the
modes rotating each round:

* ``plain_reused`` - the baseline: keep-alive HTTP on one connection;
* ``mtls_reused`` - the same over one mutual-TLS connection (what a service client that keeps its
  connections pays per call, e.g. the hand-off calls inside a migration's pause);
* ``plain_new`` / ``mtls_new`` - a new TCP (and TLS) connection per request, the SSLContext reused:
  the price of a handshake, which must never fall inside a migration's pause.

Prints JSON: per mode the median and p99 latency in ms over all rounds, and ratios to plain_reused.

    flock /tmp/livemig-heavy.lock .venv/bin/python bench/tls_api.py --rounds 3 --requests 300
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from livemig.region.freeport import free_ports
from livemig.security import pki
from livemig.security.pki import Identity, Role
from livemig.security.tls import INSECURE_STATE, ReloadingServerContext, client_context, require_role, uvicorn_tls

BODY = {"vnic": "vnic-0", "marker": 12345, "flows_since": 678}


def make_app(insecure: bool) -> Any:
    from fastapi import Depends, FastAPI

    app = FastAPI()
    setattr(app.state, INSECURE_STATE, insecure)

    @app.post("/ping")
    def ping(body: dict[str, Any], caller: Identity | None = Depends(require_role(Role.LMO))) -> dict[str, Any]:
        return {"ok": True, "echo": body, "caller": caller.uri if caller else None}

    return app


def serve(port: int, pki_dir: Path | None) -> None:
    import uvicorn

    if pki_dir is None:
        config = uvicorn.Config(make_app(True), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    else:
        context = ReloadingServerContext(pki.leaf_files(pki_dir, "api", Role.HOSTD))
        config = uvicorn.Config(
            make_app(False), host="127.0.0.1", port=port, log_level="warning", lifespan="off", **uvicorn_tls(context)
        )
    uvicorn.Server(config).run()


def wait_ready(url: str, client: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server for {url} exited with {proc.returncode}")
        try:
            if client.post(url, json=BODY).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"server for {url} did not come up")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.pki)
        return 0

    with tempfile.TemporaryDirectory(prefix="tls-api-bench-") as tmp:
        region = Path(tmp) / "pki"
        pki.init_ca(region, "bench")
        pki.issue(region, "api", Role.HOSTD, ["localhost", "127.0.0.1"])
        lmo = pki.issue(region, "lmo", Role.LMO, ["lmo"])
        plain_port, tls_port = free_ports(2)
        script = str(Path(__file__).resolve())
        procs = [
            subprocess.Popen([sys.executable, script, "--serve", str(plain_port)]),
            subprocess.Popen([sys.executable, script, "--serve", str(tls_port), "--pki", str(region)]),
        ]
        try:
            context = client_context(lmo)
            # plain clients get a ready context too: httpx would otherwise load the CA bundle per client
            unused = ssl.create_default_context()
            plain_url = f"http://127.0.0.1:{plain_port}/ping"
            tls_url = f"https://127.0.0.1:{tls_port}/ping"
            with httpx.Client() as c:
                wait_ready(plain_url, c, procs[0])
            with httpx.Client(verify=context) as c:
                wait_ready(tls_url, c, procs[1])

            def reused(url: str, verify: Any) -> Callable[[int], list[float]]:
                def run(n: int) -> list[float]:
                    with httpx.Client(verify=verify) as client:
                        client.post(url, json=BODY)  # the connection (and handshake) before the clock
                        out = []
                        for _ in range(n):
                            start = time.perf_counter()
                            reply = client.post(url, json=BODY)
                            out.append(time.perf_counter() - start)
                            assert reply.status_code == 200, reply.text
                        return out

                return run

            def fresh(url: str, verify: Any) -> Callable[[int], list[float]]:
                def run(n: int) -> list[float]:
                    out = []
                    for _ in range(n):
                        start = time.perf_counter()
                        with httpx.Client(verify=verify) as client:
                            reply = client.post(url, json=BODY)
                        out.append(time.perf_counter() - start)
                        assert reply.status_code == 200, reply.text
                    return out

                return run

            modes: dict[str, Callable[[int], list[float]]] = {
                "plain_reused": reused(plain_url, unused),
                "mtls_reused": reused(tls_url, context),
                "plain_new": fresh(plain_url, unused),
                "mtls_new": fresh(tls_url, context),
            }
            samples: dict[str, list[float]] = {name: [] for name in modes}
            names = list(modes)
            for round_no in range(args.rounds):
                order = names[round_no % len(names) :] + names[: round_no % len(names)]
                for name in order:
                    samples[name] += modes[name](args.requests)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)

    result: dict[str, Any] = {
        "requests_per_mode": args.requests * args.rounds,
        "rounds": args.rounds,
        "tls": "TLS 1.3, EC P-256 leaves, client certificate required",
    }
    for name, values in samples.items():
        result[name] = {
            "median_ms": round(statistics.median(values) * 1000, 3),
            "p99_ms": round(percentile(values, 0.99) * 1000, 3),
        }
    base = result["plain_reused"]["median_ms"]
    result["ratio_to_plain_reused"] = {name: round(result[name]["median_ms"] / base, 2) for name in samples}
    result["handshake_cost_ms"] = round(result["mtls_new"]["median_ms"] - result["plain_new"]["median_ms"], 3)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
