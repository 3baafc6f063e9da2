"""``livemig volume import`` and ``export`` against a real region (LMO, blockd) with real qemu-img:
images arrive whole and sparse, come back identical, and every refused image is refused with a
message that says why, leaving no volume, attachment or transfer behind."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig.region.local import Region
from livemig.wire import lmo as wire_lmo
from livemig.wire.lmo import LmoClient

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed (qemu-utils)"),
]
MIB = 1 << 20


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    region = Region(tmp_path_factory.mktemp("region"))
    region.up(("A",))
    try:
        yield region
    finally:
        region.down()


@pytest.fixture
def lmo(region: Region) -> Iterator[LmoClient]:
    config = region.load()
    assert config is not None
    with LmoClient(config.lmo_url) as client:
        yield client


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB qcow2 with 8 MiB of data, and every kind of image an import must refuse."""
    d = tmp_path_factory.mktemp("images")

    def img(*argv: str) -> None:
        subprocess.run(["qemu-img", *argv], check=True, capture_output=True, cwd=d)

    img("create", "-q", "-f", "qcow2", "disk.qcow2", "64M")
    subprocess.run(["qemu-io", "-c", "write -P 0xab 0 4M", "-c", "write -P 0xcd 32M 4M", "disk.qcow2"],
                   check=True, capture_output=True, cwd=d)  # fmt: skip
    img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "disk.qcow2", "overlay.qcow2")
    img("create", "-q", "-f", "qcow2", "-o", "data_file=external.raw", "datafile.qcow2", "64M")
    img("create", "-q", "-f", "vmdk", "disk.vmdk", "64M")
    img("create", "-q", "-f", "qcow2", "big.qcow2", "256M")
    img("convert", "-f", "qcow2", "-O", "raw", "disk.qcow2", "disk.raw")
    whole = (d / "disk.qcow2").read_bytes()
    (d / "truncated.qcow2").write_bytes(whole[: 1 * MIB])  # a download cut short
    corrupt = bytearray(whole)
    l1 = struct.unpack(">Q", corrupt[40:48])[0]  # the L1 table's offset, from the qcow2 header
    corrupt[l1 : l1 + 8] = struct.pack(">Q", (1 << 63) | 0x7FFF0000)  # an L2 table far past the end
    (d / "corrupt.qcow2").write_bytes(bytes(corrupt))
    (d / "odd.raw").write_bytes(b"x" * 1000)
    return d


def cli(region: Region, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig.cli.main", *argv, "--state-dir", str(region.state_dir)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def nothing_left(lmo: LmoClient, volume: str, existed: bool) -> None:
    names = {v.name for v in lmo.run(wire_lmo.volumes())}
    assert (volume in names) == existed, f"volume {volume} {'lost' if existed else 'left behind'}: {names}"
    if existed:
        assert lmo.volume(volume).attachments == [], "the transfer's attachment is detached"


def test_import_is_sparse_and_export_gives_the_same_image_back(region, lmo, images, tmp_path):
    done = cli(region, "volume", "import", "img1", str(images / "disk.qcow2"))
    assert done.returncode == 0, done.stderr
    assert "volume img1 (created, 64 MiB): qcow2 image" in " ".join(done.stdout.split())
    detail = lmo.volume("img1")
    assert detail.volume.size_bytes == 64 * MIB and detail.attachments == []
    assert detail.volume.allocated_bytes <= 10 * MIB, "56 MiB of zeros stayed holes on blockd"
    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"back.{fmt}"
        back = cli(region, "volume", "export", "img1", str(out), "--format", fmt)
        assert back.returncode == 0, back.stderr
        same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", fmt, str(images / "disk.qcow2"), str(out)],
                              capture_output=True, text=True)  # fmt: skip
        assert same.returncode == 0, same.stdout + same.stderr
    again = cli(region, "volume", "export", "img1", str(tmp_path / "back.raw"), "--format", "raw")
    assert again.returncode == 1 and "exists: pass --force to replace it" in again.stderr
    # a raw image over the same volume: what was data there must read back as this image's zeros
    (images / "zeros.raw").write_bytes(bytes(64 * MIB))
    assert cli(region, "volume", "import", "img1", str(images / "zeros.raw"), "--format", "raw").returncode == 0
    assert cli(region, "volume", "export", "img1", str(tmp_path / "z.raw"), "--format", "raw").returncode == 0
    assert (tmp_path / "z.raw").read_bytes() == bytes(64 * MIB)
    lmo.delete_volume("img1")


@pytest.mark.parametrize(
    ("image", "args", "message"),
    [
        ("overlay.qcow2", (), "has a backing file (disk.qcow2): import a self-contained image"),
        ("datafile.qcow2", (), "keeps its data in an external data file (external.raw)"),
        ("corrupt.qcow2", (), "is corrupt or truncated: qemu-img check found"),
        ("truncated.qcow2", (), "is corrupt or truncated: qemu-img check found"),
        ("disk.vmdk", (), "is a vmdk image: livemig imports raw or qcow2"),
        ("disk.qcow2", ("--format", "vmdk"), "unknown image format 'vmdk': livemig imports raw or qcow2"),
        ("disk.raw", ("--format", "qcow2"), "is not a qcow2 image: Could not open"),
        ("odd.raw", (), "not whole 512-byte sectors"),
        ("missing.qcow2", (), "missing.qcow2: no such file"),
    ],
)
def test_refused_images_change_nothing(region, lmo, images, image, args, message):
    refused = cli(region, "volume", "import", "refused", str(images / image), *args)
    assert refused.returncode == 1
    assert message in " ".join(refused.stderr.split()), refused.stderr
    assert "Traceback" not in refused.stderr
    nothing_left(lmo, "refused", existed=False)


def test_an_image_larger_than_the_volume_needs_grow(region, lmo, images):
    lmo.create_volume("small", 64)
    refused = cli(region, "volume", "import", "small", str(images / "big.qcow2"))
    assert refused.returncode == 1
    assert "is 268435456 bytes (256.0 MiB) but volume small holds 67108864 (64.0 MiB): pass --grow" in " ".join(
        refused.stderr.split()
    )
    nothing_left(lmo, "small", existed=True)
    assert lmo.volume("small").volume.size_bytes == 64 * MIB
    grown = cli(region, "volume", "import", "small", str(images / "big.qcow2"), "--grow")
    assert grown.returncode == 0, grown.stderr
    assert lmo.volume("small").volume.size_bytes == 256 * MIB
    nothing_left(lmo, "small", existed=True)
    lmo.delete_volume("small")


def test_an_abandoned_transfer_expires(region, lmo):
    """A client killed mid-copy cannot detach; its lease runs out and the LMO detaches it."""
    lmo.create_volume("lease", 1)
    transfer = lmo.run(wire_lmo.open_transfer("lease", wire_lmo.TransferMode.WRITE, ttl_s=5))
    assert [a.host for a in lmo.volume("lease").attachments] == ["transfer"]
    import time

    deadline = time.monotonic() + 20
    while lmo.volume("lease").attachments:
        assert time.monotonic() < deadline, "the expired transfer was not detached"
        time.sleep(0.5)
    with pytest.raises(Exception, match="no transfer"):
        lmo.run(wire_lmo.transfer(transfer.id))
    lmo.delete_volume("lease")
