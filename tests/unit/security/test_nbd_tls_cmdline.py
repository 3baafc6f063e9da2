"""QEMU's NBD client over TLS: an ``nbds://`` attachment becomes a blockdev with ``tls-creds`` and
``tls-hostname`` and one ``tls-creds-x509`` object over the host's QEMU certificate; QEMU's own
errors go to its ``-D`` log (a daemonized QEMU would otherwise send them to /dev/null)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from livemig.errors import InvalidRequest
from livemig.host.qemu import NBD_CREDS_ID, VmPaths, command_line
from livemig.model import BootSpec, VmSpec
from livemig.model.vm import NbdExport, VolumeDevice
from livemig.wire.blockd import AttachReply


def reply(uri: str) -> AttachReply:
    return AttachReply(id="att1", volume="v", vm="vm1", host="A", generation=1, created_at=time.time(),
                       is_writer=False, fenced=False, fence_reason=None, detached=False, connections=0, reads=0,
                       writes=0, rejected_writes=0, flushes=0, bytes_read=0, bytes_written=0,
                       export_name="v.att1.secret", secret="secret", nbd_uri=uri)  # fmt: skip


def test_an_nbds_attachment_asks_for_tls_with_the_address_blockd_is_dialled_at() -> None:
    assert reply("nbds://10.0.0.1:10809/v.att1.secret").export() == NbdExport(
        host="10.0.0.1", port=10809, export="v.att1.secret", attachment="att1", tls_hostname="10.0.0.1"
    )
    assert reply("nbd://127.0.0.1:10809/v.att1.secret").export().tls_hostname is None


def spec() -> VmSpec:
    return VmSpec(name="vm1", memory_mib=256, machine="pc-q35-7.2", boot=BootSpec(kernel="/k", initrd="/i"),
                  devices=[VolumeDevice(id="data", pci_addr="0x4", volume="v")])  # fmt: skip


def test_the_blockdev_carries_tls_creds_and_hostname() -> None:
    paths = VmPaths(Path("/run/vm1"))
    export = reply("nbds://10.0.0.1:10809/v.att1.secret").export()
    argv = command_line(spec(), paths, "tcg", exports={"data": export}, nbd_tls=Path("/var/lib/h/tls/ab12"))
    assert argv[argv.index("-object") + 1] == (
        f"tls-creds-x509,id={NBD_CREDS_ID},dir=/var/lib/h/tls/ab12,endpoint=client,verify-peer=on"
    )
    blockdev = json.loads(argv[argv.index("-blockdev") + 1])
    assert blockdev["tls-creds"] == NBD_CREDS_ID and blockdev["tls-hostname"] == "10.0.0.1"
    assert blockdev["export"] == "v.att1.secret", "the attachment's secret stays: fencing judges by attachment"
    assert argv[argv.index("-D") + 1] == str(paths.qemu_log)
    with pytest.raises(InvalidRequest, match="requires TLS but this host has no QEMU certificate"):
        command_line(spec(), paths, "tcg", exports={"data": export})
    plain = command_line(spec(), paths, "tcg", exports={"data": reply("nbd://127.0.0.1:1/v.att1.secret").export()})
    assert "-object" not in plain and "tls-creds" not in json.loads(plain[plain.index("-blockdev") + 1])
