"""Start a real blockd (``livemig blockd``) on free loopback ports and drive its API.

Why in the package and not in tests/: the integration tests, the benchmark and other services'
end-to-end tests all need "a blockd I can kill -9 and restart on the same data"; one harness.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from livemig.region.freeport import free_ports
from livemig.security.pki import LeafFiles
from livemig.storage.nbd.client import NbdClient
from livemig.wire.base import sync_http

MIB = 1 << 20

#: How a TLS blockd is started until ``livemig blockd`` takes --tls-cert/--tls-key/--tls-ca:
#: the same ``run_blockd`` the command calls, given blockd's leaf.
_TLS_BLOCKD = (
    "import logging, sys\n"
    "from pathlib import Path\n"
    "from livemig.security.pki import leaf_from_paths\n"
    "from livemig.storage.service import run_blockd\n"
    "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
    "data, api, nbd, cert, key, ca = sys.argv[1:]\n"
    "run_blockd(Path(data), api, nbd, tls=leaf_from_paths(Path(cert), Path(key), Path(ca)))\n"
)


class BlockdProcess:
    """One blockd subprocess plus an API client; restartable on the same data dir and ports."""

    def __init__(
        self, data_dir: Path, log_path: Path, env: dict[str, str] | None = None, tls: LeafFiles | None = None
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.tls = tls  # blockd's leaf: its NBD server then requires TLS
        self.api_port, self.nbd_port = free_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = sync_http(30, base_url=f"http://127.0.0.1:{self.api_port}")  # raw: tests send bad requests too

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        api, nbd = f"127.0.0.1:{self.api_port}", f"127.0.0.1:{self.nbd_port}"
        if self.tls is None:
            argv = [sys.executable, "-m", "livemig.cli.main", "blockd",
                    "--data-dir", str(self.data_dir), "--listen", api, "--nbd-listen", nbd]  # fmt: skip
        else:
            leaf = self.tls
            argv = [sys.executable, "-c", _TLS_BLOCKD, str(self.data_dir), api, nbd,
                    str(leaf.cert), str(leaf.key), str(leaf.ca)]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"blockd exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if self.api.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"blockd did not become healthy:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    # --- API helpers ------------------------------------------------------------------------------

    def create_volume(self, name: str, size_bytes: int) -> dict[str, Any]:
        reply = self.api.post("/volumes", json={"name": name, "size_bytes": size_bytes})
        assert reply.status_code == 201, reply.text
        return dict(reply.json())

    def attach(self, volume: str, vm: str = "vm", host: str = "A") -> dict[str, Any]:
        reply = self.api.post(f"/volumes/{volume}/attachments", json={"vm": vm, "host": host})
        assert reply.status_code == 201, reply.text
        return dict(reply.json())

    def attachments(self, volume: str) -> dict[str, dict[str, Any]]:
        reply = self.api.get(f"/volumes/{volume}/attachments")
        assert reply.status_code == 200, reply.text
        return {a["id"]: a for a in reply.json()}

    def client(self, attachment: dict[str, Any], *, structured: bool = True) -> NbdClient:
        return NbdClient("127.0.0.1", self.nbd_port, attachment["export_name"], structured=structured)
