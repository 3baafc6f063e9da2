"""Everything acknowledged after a flush (or with FUA) survives ``kill -9`` of blockd, metadata included."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable

from livemig.testing.blockd import MIB, BlockdProcess

Factory = Callable[..., BlockdProcess]


def test_flushed_data_and_metadata_survive_kill_9(blockd_factory: Factory) -> None:
    blockd = blockd_factory("durable")
    blockd.create_volume("d1", 8 * MIB)
    blockd.create_volume("d2", 2 * MIB)
    grown = blockd.api.post("/volumes/d2/resize", json={"size_bytes": 4 * MIB})
    assert grown.status_code == 200
    att = blockd.attach("d1", vm="db", host="A")
    rng = random.Random(11)
    expected: dict[int, bytes] = {}
    with blockd.client(att) as client:
        for _ in range(200):
            offset = rng.randrange(8 * MIB // 4096) * 4096
            data = rng.randbytes(4096)
            client.write(offset, data)
            expected[offset] = data
        client.write(0, b"\x5a" * 65536)  # a large one too, overlapping whatever was at 0
        for offset in list(expected):
            if offset < 65536:
                del expected[offset]
        expected[0] = b"\x5a" * 65536
        client.write_zeroes(MIB, 64 * 1024)
        expected = {o: d for o, d in expected.items() if not MIB <= o < MIB + 64 * 1024}
        expected[MIB] = bytes(64 * 1024)
        client.flush()
        client.write(7 * MIB, b"\xf0" * 4096, fua=True)  # FUA: durable on its own
        expected[7 * MIB] = b"\xf0" * 4096
        # keep the connection open and kill blockd under it
        blockd.kill9()

    blockd.start()
    volumes = {v["name"]: v["size_bytes"] for v in blockd.api.get("/volumes").json()}
    assert volumes == {"d1": 8 * MIB, "d2": 4 * MIB}
    with blockd.client(att) as client:  # the same export name and secret still work
        for offset, data in expected.items():
            assert client.read(offset, len(data)) == data, f"lost acknowledged data at {offset}"


def test_kill_9_during_a_large_write_restarts_cleanly(blockd_factory: Factory) -> None:
    """blockd killed under a real client's 60 MiB write: it restarts and the flushed data is intact."""
    blockd = blockd_factory("convert")
    blockd.create_volume("c", 64 * MIB)
    att = blockd.attach("c")
    with blockd.client(att) as client:
        client.write(0, b"\x77" * MIB)
        client.flush()
    copier = subprocess.Popen(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x33 1M 60M", att["nbd_uri"]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    blockd.kill9()
    copier.wait(30)
    blockd.start()
    with blockd.client(att) as client:
        assert client.read(0, MIB) == b"\x77" * MIB
    assert blockd.api.get("/healthz").json()["status"] == "ok"
