"""A real QEMU NIC on a vswitch port: ``-netdev dgram`` built from the attachment, frames both ways.

No guest is booted: the virtio-net option ROM (iPXE) runs DHCP on its own, and the vswitch answers
it from the mapping — proof that QEMU sends its frames to the switch port and accepts ours.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from livemig.testing.fakevm import SAMPLE

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


def test_qemu_dhcp_through_the_vswitch(net, tmp_path):
    net.push()
    attachment = net.client("A").attach("web")
    net.attached.append(("A", "web"))
    cmd = ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "q35,accel=tcg", "-m", "128",
           "-netdev", attachment.netdev("n0"), "-device", f"virtio-net-pci,netdev=n0,mac={SAMPLE['web'][0]}",
           "-boot", "n", "-serial", "none", "-monitor", "none"]  # fmt: skip
    log = (tmp_path / "qemu.log").open("wb")
    qemu = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and qemu.poll() is None:
            counters = net.client("A").counters()
            if counters.switch.get("dhcp_replies", 0) >= 2:  # OFFER and ACK
                break
            time.sleep(0.2)
        assert counters.switch.get("dhcp_replies", 0) >= 2, (counters, (tmp_path / "qemu.log").read_text())
        assert counters.vnics["web"].get("rx", 0) >= 2, "QEMU's DHCP frames reached the VNIC"
    finally:
        qemu.kill()
        qemu.wait()
