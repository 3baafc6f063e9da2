"""Unmodified NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) against a real blockd process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from livemig.testing.blockd import MIB, BlockdProcess

pytestmark = pytest.mark.usefixtures("real_clients")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({result.returncode}): {result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 16 MiB raw image: 3 MiB of random data at 1 MiB, the rest holes."""
    path = tmp_path / "src.raw"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
        f.seek(MIB)
        f.write(os.urandom(3 * MIB))
    return path


def test_qemu_img_info_reports_the_export(blockd: BlockdProcess) -> None:
    blockd.create_volume("info", 32 * MIB)
    uri = blockd.attach("info")["nbd_uri"]
    info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == 32 * MIB
    assert info["format"] == "raw"


def test_qemu_img_convert_to_and_from_and_compare(blockd: BlockdProcess, image: Path, tmp_path: Path) -> None:
    blockd.create_volume("conv", 16 * MIB)
    uri = blockd.attach("conv")["nbd_uri"]
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri)
    back = tmp_path / "back.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(back))
    run("qemu-img", "compare", "-F", "qcow2", str(image), str(back))
    # and a compare that must fail, so the compares above mean something
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 8M 4k", uri)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri, check=False).returncode == 1


def test_qemu_io_patterns(blockd: BlockdProcess) -> None:
    blockd.create_volume("qio", 8 * MIB)
    uri = blockd.attach("qio")["nbd_uri"]
    out = run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xab 0 1M",
        "-c", "read -P 0xab 0 1M",
        "-c", "write -z 512k 64k",  # WRITE_ZEROES
        "-c", "read -P 0 512k 64k",
        "-c", "discard 1M 1M",  # TRIM
        "-c", "write -P 0xcd -f 2M 4k",  # FUA
        "-c", "flush",
        "-c", "read -P 0xcd 2M 4k",
        uri,
    ).stdout  # fmt: skip
    assert "Pattern verification failed" not in out
    bad = run("qemu-io", "-f", "raw", "-c", "read -P 0xee 0 4k", uri, check=False)
    assert "Pattern verification failed" in bad.stdout + bad.stderr


def test_nbdinfo_and_nbdcopy(blockd: BlockdProcess, image: Path, tmp_path: Path) -> None:
    blockd.create_volume("lib", 16 * MIB)
    uri = blockd.attach("lib")["nbd_uri"]
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    export = info["exports"][0]
    assert export["export-size"] == 16 * MIB
    assert export["can_flush"] and export["can_fua"] and export["can_trim"] and export["can_zero"]
    assert export["block_size_maximum"] == 32 * MIB
    run("nbdcopy", str(image), uri)
    out = tmp_path / "out.raw"
    run("nbdcopy", uri, str(out))
    assert out.read_bytes() == image.read_bytes()


def test_wrong_secret_and_unknown_export_are_clear(blockd: BlockdProcess) -> None:
    blockd.create_volume("sec", MIB)
    att = blockd.attach("sec")
    base = f"nbd://127.0.0.1:{blockd.nbd_port}"
    wrong = run("qemu-img", "info", f"{base}/sec/{att['id']}.{'0' * 32}", check=False)
    assert wrong.returncode != 0
    assert "secret in the export name does not match" in wrong.stderr
    unknown = run("qemu-img", "info", f"{base}/nope", check=False)
    assert unknown.returncode != 0 and "unknown export" in unknown.stderr
    assert run("nbdinfo", f"{base}/sec/{att['id']}.bad", check=False).returncode != 0
    assert run("qemu-img", "info", att["nbd_uri"]).returncode == 0
