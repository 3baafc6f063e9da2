"""blockd's NBD in forced-TLS mode against real clients: nbdinfo/nbdcopy (libnbd, GnuTLS), qemu-img and
qemu-io with ``tls-creds-x509`` objects, a QEMU system process with a TLS ``-blockdev``, and a raw client
that sends exactly the bytes the spec's corner cases need.

What is proven: a client of the region with a host certificate reads and writes; before STARTTLS
every option but STARTTLS/ABORT gets ``NBD_REP_ERR_TLS_REQD`` (GO first included, the message qemu
prints), ``NBD_OPT_EXPORT_NAME`` closes; a second STARTTLS gets ``NBD_REP_ERR_INVALID``; no
certificate, another region's certificate or a wrong ``tls-hostname`` fails the handshake; a valid
certificate of a role that may not attach gets ``NBD_REP_ERR_POLICY``; the attachment secret is
still checked inside TLS; a rotated blockd certificate is served without a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from livemig.security import pki
from livemig.security.pki import LeafFiles, Role
from livemig.security.tls import client_context
from livemig.storage.nbd import protocol as p
from livemig.testing.blockd import MIB, BlockdProcess
from livemig.testing.waiting import wait_until

pytestmark = [
    pytest.mark.usefixtures("real_clients"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86 (QEMU NBD client)"),
]


@dataclass
class Region:
    dir: Path
    blockd: LeafFiles
    host: Path  # QEMU/libnbd layout (tls-creds-x509 dir) of host-a's qemu certificate
    vswitch: Path  # the same layout with a certificate of a role that may not attach
    foreign: Path  # host-a's qemu certificate from another region's CA
    host_leaf: LeafFiles


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Region:
    base = tmp_path_factory.mktemp("pki")
    directory, other = base / "r1", base / "r2"
    pki.init_ca(directory, "r1")
    pki.init_ca(other, "r2")
    blockd = pki.issue(directory, "blockd", Role.BLOCKD, ["blockd", "localhost", "127.0.0.1"])
    host_leaf = pki.issue(directory, "host-a", Role.QEMU, ["host-a", "127.0.0.1"])
    pki.issue(directory, "host-a", Role.VSWITCH, ["host-a", "127.0.0.1"])
    pki.issue(other, "host-a", Role.QEMU, ["host-a", "127.0.0.1"])
    return Region(
        directory,
        blockd,
        host=pki.qemu_tls_dir(directory, "host-a", base / "host-a"),
        vswitch=pki.qemu_tls_dir(directory, "host-a", base / "host-a-vswitch", role=Role.VSWITCH),
        foreign=pki.qemu_tls_dir(other, "host-a", base / "foreign"),
        host_leaf=host_leaf,
    )


@pytest.fixture(scope="module")
def blockd(tmp_path_factory: pytest.TempPathFactory, region: Region) -> Iterator[BlockdProcess]:
    base = tmp_path_factory.mktemp("blockd-tls")
    process = BlockdProcess(base / "data", base / "blockd.log", tls=region.blockd)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        process.api.close()


def run(*argv: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({result.returncode}): {result.stdout}\n{result.stderr}")
    return result


def tls_object(creds: Path) -> str:
    return f"tls-creds-x509,id=tls0,dir={creds},endpoint=client,verify-peer=on"


def image_opts(blockd: BlockdProcess, attachment: dict[str, Any], **extra: str) -> str:
    opts = {
        "driver": "nbd",
        "server.type": "inet",
        "server.host": "127.0.0.1",
        "server.port": str(blockd.nbd_port),
        "export": attachment["export_name"],
        "tls-creds": "tls0",
        **extra,
    }
    return ",".join(f"{k}={v}" for k, v in opts.items())


# --- a raw client ----------------------------------------------------------------------------------


def recv_exactly(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data


def greet(blockd: BlockdProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", blockd.nbd_port), timeout=10)
    p.decode_greeting(recv_exactly(sock, p.GREETING_SIZE))
    sock.sendall(p.encode_client_flags(p.ClientFlag.FIXED_NEWSTYLE | p.ClientFlag.NO_ZEROES))
    return sock


def option(sock: socket.socket | ssl.SSLSocket, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send one option; return its replies up to the final one (GO/INFO send INFO replies first)."""
    sock.sendall(p.encode_option(opt, data))
    replies = []
    while True:
        header = p.decode_option_reply_header(recv_exactly(sock, p.OPTION_REPLY_HEADER_SIZE))
        replies.append((header.reply, recv_exactly(sock, header.length)))
        if header.reply != p.OptionReply.INFO:
            return replies


def starttls(sock: socket.socket, leaf: LeafFiles) -> ssl.SSLSocket:
    (reply, _), *_ = option(sock, p.Option.STARTTLS)
    assert reply == p.OptionReply.ACK
    return client_context(leaf).wrap_socket(sock, server_hostname="127.0.0.1")


def go(export: str) -> bytes:
    return p.encode_info_request(export, ())


# --- real clients ----------------------------------------------------------------------------------


def test_nbdinfo_and_nbdcopy_over_tls(blockd: BlockdProcess, region: Region, tmp_path: Path) -> None:
    blockd.create_volume("lib", 8 * MIB)
    attachment = blockd.attach("lib")
    uri = attachment["nbd_uri"]
    assert uri.startswith("nbds://127.0.0.1:")
    secure = f"{uri}?tls-certificates={region.host}"
    info = json.loads(run("nbdinfo", "--json", secure).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 8 * MIB
    source = tmp_path / "src.raw"
    source.write_bytes(os.urandom(8 * MIB))
    run("nbdcopy", str(source), secure)
    back = tmp_path / "back.raw"
    run("nbdcopy", secure, str(back))
    assert back.read_bytes() == source.read_bytes()


def test_plain_clients_are_told_tls_is_required(blockd: BlockdProcess) -> None:
    blockd.create_volume("plain", MIB)
    plain_uri = blockd.attach("plain")["nbd_uri"].replace("nbds://", "nbd://", 1)
    nbdinfo = run("nbdinfo", plain_uri, check=False, env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert nbdinfo.returncode != 0
    assert "server error message: TLS negotiation required before option 7 (go)" in nbdinfo.stderr
    qemu_img = run("qemu-img", "info", plain_uri, check=False)
    assert qemu_img.returncode != 0
    assert "TLS negotiation required before option 7 (go)" in qemu_img.stderr


def test_qemu_img_and_qemu_io_read_and_write_over_tls(blockd: BlockdProcess, region: Region, tmp_path: Path) -> None:
    blockd.create_volume("qimg", 16 * MIB)
    attachment = blockd.attach("qimg")
    obj = tls_object(region.host)
    opts = image_opts(blockd, attachment)
    image = tmp_path / "img.raw"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
        f.seek(MIB)
        f.write(os.urandom(3 * MIB))
    run("qemu-img", "convert", "-n", "--object", obj, "-f", "raw", str(image), "--target-image-opts", opts)
    local = f"driver=raw,file.driver=file,file.filename={image}"
    run("qemu-img", "compare", "--object", obj, "--image-opts", local, opts)
    out = run("qemu-io", "--object", obj, "--image-opts", opts,
              "-c", "write -P 0x5a 8M 64k", "-c", "read -P 0x5a 8M 64k").stdout  # fmt: skip
    assert "Pattern verification failed" not in out
    differs = run("qemu-img", "compare", "--object", obj, "--image-opts", local, opts, check=False)
    assert differs.returncode == 1, differs.stdout + differs.stderr  # the write above landed


def test_tls_hostname_is_checked_against_blockd_sans(blockd: BlockdProcess, region: Region) -> None:
    blockd.create_volume("hostname", MIB)
    attachment = blockd.attach("hostname")
    obj = tls_object(region.host)
    good = run("qemu-io", "--object", obj, "--image-opts", image_opts(blockd, attachment, **{"tls-hostname": "blockd"}),
               "-c", "read 0 4k")  # fmt: skip
    assert "read 4096/4096" in good.stdout
    bad = run("qemu-io", "--object", obj, "--image-opts", image_opts(blockd, attachment, **{"tls-hostname": "evil"}),
              "-c", "read 0 4k", check=False)  # fmt: skip
    assert bad.returncode != 0 and "read 4096/4096" not in bad.stdout
    assert "hostname" in (bad.stdout + bad.stderr).lower()


def test_another_regions_certificate_is_refused(blockd: BlockdProcess, region: Region) -> None:
    blockd.create_volume("foreign", MIB)
    uri = blockd.attach("foreign")["nbd_uri"]
    refused = run("nbdinfo", f"{uri}?tls-certificates={region.foreign}", check=False)
    assert refused.returncode != 0 and "export-size" not in refused.stdout
    before = blockd.log_text().count("TLS handshake failed")
    obj = tls_object(region.foreign)
    attachment = blockd.attach("foreign")
    qemu = run("qemu-io", "--object", obj, "--image-opts", image_opts(blockd, attachment), "-c", "read 0 4k",
               check=False)  # fmt: skip
    assert qemu.returncode != 0 and "read 4096/4096" not in qemu.stdout
    # our server refused it too (the client also distrusts the server's CA, so check the server's
    # side); blockd logs the failure on its own time, after qemu-io may already have exited
    wait_until(lambda: blockd.log_text().count("TLS handshake failed") > before,
               "blockd logs the foreign client's failed TLS handshake", timeout=10)  # fmt: skip


def test_a_role_that_may_not_attach_gets_policy_error(blockd: BlockdProcess, region: Region) -> None:
    blockd.create_volume("role", MIB)
    uri = blockd.attach("role")["nbd_uri"]
    refused = run("nbdinfo", f"{uri}?tls-certificates={region.vswitch}", check=False,
                  env={**os.environ, "LIBNBD_DEBUG": "1"})  # fmt: skip
    assert refused.returncode != 0
    assert "livemig://r1/vswitch/host-a may not use this service" in refused.stderr


# --- the spec's corner cases with a raw client ---------------------------------------------------------


def test_go_first_and_every_option_before_tls_get_tls_reqd(blockd: BlockdProcess) -> None:
    blockd.create_volume("raw", MIB)
    export = blockd.attach("raw")["export_name"]
    with greet(blockd) as sock:
        [(reply, message)] = option(sock, p.Option.GO, go(export))
        assert reply == p.OptionReply.ERR_TLS_REQD
        assert message == b"TLS negotiation required before option 7 (go)"
        for opt, data in [
            (p.Option.INFO, go(export)),
            (p.Option.LIST, b""),
            (p.Option.STRUCTURED_REPLY, b""),
            (p.Option.SET_META_CONTEXT, b""),
            (99, b"junk"),
        ]:
            assert option(sock, opt, data)[0][0] == p.OptionReply.ERR_TLS_REQD, opt
        assert option(sock, p.Option.ABORT) == [(p.OptionReply.ACK, b"")]


def test_export_name_before_tls_closes_the_connection(blockd: BlockdProcess) -> None:
    blockd.create_volume("oldstyle", MIB)
    export = blockd.attach("oldstyle")["export_name"]
    with greet(blockd) as sock:
        sock.sendall(p.encode_option(p.Option.EXPORT_NAME, export.encode()))
        assert sock.recv(4096) == b""  # closed, nothing sent: no export data before TLS


def test_second_starttls_is_invalid_and_the_session_goes_on(blockd: BlockdProcess, region: Region) -> None:
    blockd.create_volume("twice", MIB)
    export = blockd.attach("twice")["export_name"]
    with greet(blockd) as raw, starttls(raw, region.host_leaf) as tls:
        [(reply, message)] = option(tls, p.Option.STARTTLS)
        assert reply == p.OptionReply.ERR_INVALID and b"already" in message
        replies = option(tls, p.Option.GO, go(export))
        assert replies[-1][0] == p.OptionReply.ACK
        assert any(r == p.OptionReply.INFO and data[:2] == b"\x00\x00" for r, data in replies)  # NBD_INFO_EXPORT
        tls.sendall(p.encode_request(p.Command.READ, 1, 0, 4096))
        reply_header = recv_exactly(tls, p.SIMPLE_REPLY_SIZE)
        assert reply_header[4:8] == b"\x00\x00\x00\x00"  # no error
        assert len(recv_exactly(tls, 4096)) == 4096


def test_the_attachment_secret_is_still_checked_inside_tls(blockd: BlockdProcess, region: Region) -> None:
    blockd.create_volume("secret", MIB)
    export = blockd.attach("secret")["export_name"]
    wrong = export[:-4] + ("0000" if not export.endswith("0000") else "1111")
    with greet(blockd) as raw, starttls(raw, region.host_leaf) as tls:
        [(reply, message)] = option(tls, p.Option.GO, go(wrong))
        assert reply == p.OptionReply.ERR_POLICY and b"does not match" in message


def test_no_client_certificate_fails_the_handshake(blockd: BlockdProcess, region: Region) -> None:
    with greet(blockd) as raw:
        (reply, _), *_ = option(raw, p.Option.STARTTLS)
        assert reply == p.OptionReply.ACK
        context = ssl.create_default_context(cafile=str(region.blockd.ca))
        with pytest.raises((ssl.SSLError, ConnectionError)):  # TLS 1.3: the refusal shows at the first read
            tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
            option(tls, p.Option.GO, go("x/y.z"))


def test_rotated_blockd_certificate_is_served_without_restart(blockd: BlockdProcess, region: Region) -> None:
    def served_serial() -> int:
        with greet(blockd) as raw, starttls(raw, region.host_leaf) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            option(tls, p.Option.ABORT)
            return x509.load_der_x509_certificate(der).serial_number

    before = served_serial()
    assert before == pki.load_cert(region.blockd.cert).serial_number
    rotated = pki.rotate(region.dir, "blockd", Role.BLOCKD)
    assert served_serial() == pki.load_cert(rotated.cert).serial_number != before
    assert blockd.alive


# --- a QEMU system process as the NBD client -----------------------------------------------------------


def test_qemu_blockdev_over_tls(blockd: BlockdProcess, region: Region) -> None:
    """QEMU itself (not only the tools) attaches a volume with ``tls-creds`` and ``tls-hostname``, and does I/O."""
    blockd.create_volume("qemu", 4 * MIB)
    attachment = blockd.attach("qemu", vm="vm1", host="host-a")
    blockdev = {
        "driver": "nbd",
        "node-name": "vol0",
        "export": attachment["export_name"],
        "server": {"type": "inet", "host": "127.0.0.1", "port": str(blockd.nbd_port)},
        "tls-creds": "tls0",
        "tls-hostname": "blockd",
    }
    commands = [
        {"execute": "qmp_capabilities"},
        {"execute": "human-monitor-command", "arguments": {"command-line": 'qemu-io vol0 "write -P 0x6c 1M 64k"'}},
        {"execute": "human-monitor-command", "arguments": {"command-line": 'qemu-io vol0 "read -P 0x6c 1M 64k"'}},
        {"execute": "query-named-block-nodes"},
        {"execute": "quit"},
    ]
    result = subprocess.run(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-object", tls_object(region.host), "-blockdev", json.dumps(blockdev), "-qmp", "stdio"],
        input="\n".join(json.dumps(c) for c in commands) + "\n",
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    answers = [r["return"] for r in replies if "return" in r]
    # HMP's qemu-io prints to QEMU's stdout, between the QMP replies
    assert "wrote 65536/65536 bytes at offset 1048576" in result.stdout, result.stdout + result.stderr
    assert "read 65536/65536 bytes at offset 1048576" in result.stdout
    assert "Pattern verification failed" not in result.stdout
    nodes = answers[3]
    assert any(n["node-name"] == "vol0" and n["drv"] == "nbd" for n in nodes)
    counters = blockd.attachments("qemu")[attachment["id"]]
    assert counters["writes"] >= 1 and counters["bytes_written"] >= 64 * 1024


def test_the_holding_proxy_speaks_tls_to_blockd_and_holds_a_stale_write(blockd: BlockdProcess, region: Region) -> None:
    """The fencing fault point with TLS on: qemu-io speaks plain NBD to the proxy, the proxy
    STARTTLS's to blockd with a certificate blockd admits, holds the source's write until the
    destination wrote, and blockd refuses the stale write when it is released."""
    from livemig.testing.nbdproxy import ThreadedHoldingProxy

    blockd.create_volume("tls-stale", 4 * MIB)
    source = blockd.attach("tls-stale", vm="web", host="A")
    dest = blockd.attach("tls-stale", vm="web", host="B")
    context = client_context(region.host_leaf)
    with ThreadedHoldingProxy("127.0.0.1", blockd.nbd_port, context, "blockd") as proxy:
        proxy.arm()
        stale = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 64k",
                                  f"nbd://127.0.0.1:{proxy.port}/{source['export_name']}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        held = proxy.wait_held(30)
        assert held is not None and (held.offset, held.length) == (0, 64 * 1024), "the write was not held"
        run("qemu-io", "--object", tls_object(region.host), "--image-opts",
            image_opts(blockd, dest, **{"tls-hostname": "blockd"}), "-c", "write -P 0xbb 0 64k")  # fmt: skip
        proxy.release()
        out, _ = stale.communicate(timeout=30)
    assert stale.returncode != 0 and "Operation not permitted" in out, out
    assert blockd.attachments("tls-stale")[source["id"]]["rejected_writes"] == 1
