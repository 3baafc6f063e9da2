"""The image rules (what qemu-img says about an image -> accepted or refused, and why) and the one
function that turns an attachment into qemu-img's NBD options (TLS included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from livemig.errors import InvalidRequest
from livemig.model import NbdExport
from livemig.storage.images import NbdClientTls, check_info, nbd_target

IMG = Path("/images/disk.qcow2")


def qcow2(**data: object) -> dict:
    return {"format": "qcow2", "virtual-size": 2 << 30, "actual-size": 190 << 20,
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "corrupt": False, **data}}}  # fmt: skip


def test_a_clean_qcow2_is_accepted():
    info = check_info(IMG, qcow2(), (0, {"check-errors": 0}, ""))
    assert (info.format, info.virtual_size) == ("qcow2", 2 << 30)
    assert check_info(IMG, qcow2(), (3, {"leaks": 4}, "Leaked cluster")).format == "qcow2", "leaks lose no data"


@pytest.mark.parametrize(
    ("info", "check", "message"),
    [
        ({**qcow2(), "backing-filename": "base.qcow2"}, None, r"has a backing file \(base.qcow2\).*flatten it first"),
        (qcow2(**{"data-file": "data.raw"}), None, r"external data file \(data.raw\)"),
        (qcow2(corrupt=True), None, "marked corrupt by QEMU"),
        ({**qcow2(), "encrypted": True}, None, "is encrypted"),
        ({"format": "vmdk", "virtual-size": 1 << 20}, None, r"is a vmdk image: livemig imports raw or qcow2"),
        ({"format": "raw", "virtual-size": 1000}, None, "not whole 512-byte sectors"),
        ({"format": "raw", "virtual-size": 0}, None, "is empty"),
        (qcow2(), (2, {"corruptions": 117}, "ERROR offset beyond end of file"),
         r"corrupt or truncated: qemu-img check found 117 corruption\(s\)"),
        (qcow2(), (1, {}, "Could not open"), "could not be checked: Could not open"),
    ],
)  # fmt: skip
def test_refusals_say_what_is_wrong(info, check, message):
    with pytest.raises(InvalidRequest, match=message):
        check_info(IMG, info, check)


def test_nbd_target_plain_and_with_a_size():
    export = NbdExport(host="10.213.0.254", port=10809, export="deb/a1.s3cret", attachment="a1")
    plain = nbd_target(export)
    assert plain.objects == [] and plain.object_args() == []
    assert plain.image_opts == ("driver=nbd,server.type=inet,server.host=10.213.0.254,server.port=10809,"
                                "export=deb/a1.s3cret")  # fmt: skip
    sized = nbd_target(export, size=540672)
    assert sized.image_opts.startswith("driver=raw,size=540672,file.driver=nbd,file.server.type=inet,")
    assert "file.export=deb/a1.s3cret" in sized.image_opts


def test_nbd_target_with_tls_adds_the_credentials_object():
    export = NbdExport(host="127.0.0.1", port=10809, export="deb/a1.s", attachment="a1", tls_hostname="blockd")
    target = nbd_target(export, NbdClientTls(Path("/etc/livemig/tls,odd")))
    assert target.object_args() == ["--object", "tls-creds-x509,id=livemig-nbd-client,dir=/etc/livemig/tls,,odd,"
                                    "endpoint=client,verify-peer=on"]  # fmt: skip
    assert target.image_opts.endswith(",tls-creds=livemig-nbd-client,tls-hostname=blockd")
    other = nbd_target(export, NbdClientTls(Path("/t"), hostname="blockd.r1"), size=512)
    assert ",file.tls-creds=livemig-nbd-client,file.tls-hostname=blockd.r1" in other.image_opts
