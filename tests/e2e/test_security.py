"""A region as ``livemig up`` starts it, attacked and used with real TLS clients (curl, openssl s_client,
httpx, nbdinfo) and real QEMU guests.

What it proves, each able to fail on its own:

* every service (LMO, hostd, vswitch, blockd) refuses in the TLS handshake a client without a
  certificate (the LMO excepted: it serves users, who must then bring a token), one from another
  CA and an expired one: no handler runs;
* a valid certificate of the wrong role gets 403; a host may register only itself;
* no token: 401 with ``WWW-Authenticate: Bearer``; a viewer migrating: 403; a revoked token: 401;
* NBD: a plain client is told TLS is required; another region's certificate is refused;
* a guest's disk is reached over NBD with TLS; its QMP, console and command sockets are 0600;
* a migration runs over QEMU's TLS; a source whose QEMU certificate the destination does not admit
  (tls-authz) is refused by the destination QEMU: the migration ends Failed with that reason, the
  VM keeps running on its source with its memory intact, the refused destination QEMU is gone;
* a rotated certificate is served and used without restarting any service or VM.

Run with the shared lock::

    flock /tmp/livemig-heavy.lock .venv/bin/pytest tests/e2e/test_security.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from livemig.guest.workload import workload_vm_spec
from livemig.model import Phase
from livemig.model.migration import ConditionType
from livemig.region.local import Region, RegionConfig
from livemig.region.proc import pid_alive
from livemig.security import pki
from livemig.security.pki import LeafFiles, Role
from livemig.testing.processes import qemu_pids_running
from livemig.testing.waiting import wait_until
from livemig.wire.lmo import LmoClient

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("curl", "openssl", "nbdinfo")), reason="needs curl, openssl, nbdinfo"
    ),
]
VM, VOLUME = "sec", "sec-data"


def config_of(region: Region) -> RegionConfig:
    config = region.load()
    assert config is not None and not config.insecure
    return config


def leaf(region: Region, role: Role, name: str) -> LeafFiles:
    return pki.leaf_files(region.pki_dir, name, role)


def strangers(region: Region, tmp_path: Path) -> dict[str, LeafFiles]:
    """Certificates that must never get in: another CA's (same region name), an expired one of ours."""
    other = tmp_path / "other-ca"
    pki.init_ca(other, "local")
    return {
        "another CA": pki.issue(other, "lmo", Role.LMO, ["lmo", "127.0.0.1"]),
        "expired": pki.issue(
            region.pki_dir,
            "old-lmo",
            Role.LMO,
            ["127.0.0.1"],
            days=1,
            now=dt.datetime.now(dt.UTC) - dt.timedelta(days=5),
        ),
    }


def curl(url: str, *args: str, method: str = "GET") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "-i", "-X", method, "-o", "-", "-w", "\n%{http_code}", *args, url],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip


def curl_as(region: Region, who: LeafFiles | None, url: str, *args: str, method: str = "GET") -> tuple[int, str]:
    creds = [] if who is None else ["--cert", str(who.cert), "--key", str(who.key)]
    done = curl(url, "--cacert", str(region.pki_dir / pki.CA_CERT), *creds, *args, method=method)
    code = done.stdout.rstrip().rsplit("\n", 1)[-1]
    return (int(code) if done.returncode == 0 else 0), done.stdout + done.stderr


def s_client(url: str, region: Region, who: LeafFiles | None) -> str:
    address = url.removeprefix("https://").split("/")[0]
    request = f"GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    creds = [] if who is None else ["-cert", str(who.cert), "-key", str(who.key)]
    done = subprocess.run(["openssl", "s_client", "-connect", address, "-tls1_2", "-ign_eof", "-CAfile",
                           str(region.pki_dir / pki.CA_CERT), *creds],
                          input=request, capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    return done.stdout + done.stderr


def services(config: RegionConfig) -> dict[str, str]:
    host = config.hosts[0]
    return {"hostd": host.url, "vswitch": host.vswitch_url, "blockd": config.blockd_url}


def test_no_certificate_another_ca_or_an_expired_one_fails_the_handshake(region: Region, tmp_path: Path) -> None:
    config = config_of(region)
    bad = strangers(region, tmp_path)
    for service, url in services(config).items():
        lmo = leaf(region, Role.LMO, "lmo")
        assert curl_as(region, lmo, f"{url}/healthz")[0] == 200, service
        for what, who in {"no certificate": None, **bad}.items():
            code, said = curl_as(region, who, f"{url}/healthz")
            assert code == 0, f"{service} let in {what}: {said}"  # a TLS error, never an HTTP status
            context = ssl.create_default_context(cafile=str(region.pki_dir / pki.CA_CERT))
            if who is not None:
                context.load_cert_chain(who.cert, who.key)
            with (
                httpx.Client(verify=context) as client,
                pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
            ):
                client.get(f"{url}/healthz")
        assert "HTTP/1.1" not in s_client(url, region, None), f"{service} answered openssl without a certificate"
        assert "HTTP/1.1 200 OK" in s_client(url, region, leaf(region, Role.LMO, "lmo"))
    # the LMO serves users too: a connection without a certificate gets as far as 401, a bad one not even that
    for what, who in bad.items():
        code, said = curl_as(region, who, f"{config.lmo_url}/vms")
        assert code == 0, f"the LMO let in {what}: {said}"
    code, said = curl_as(region, None, f"{config.lmo_url}/vms")
    assert code == 401 and 'www-authenticate: Bearer realm="livemig"' in said.lower().replace(
        "bearer realm", "Bearer realm"
    )


def test_a_valid_certificate_of_the_wrong_role_gets_403(region: Region) -> None:
    config = config_of(region)
    host_a, host_b = config.hosts[0], config.hosts[1]
    vswitch_a = leaf(region, Role.VSWITCH, "a")
    code, said = curl_as(region, vswitch_a, f"{host_a.url}/vms/x/migrate", "-H", "content-type: application/json",
                         "-d", '{"uri": "tcp:127.0.0.1:1"}', method="POST")  # fmt: skip
    assert code == 403 and "vswitch 'a' may not call POST /vms/x/migrate" in said
    code, said = curl_as(region, leaf(region, Role.HOSTD, "a"), f"{config.blockd_url}/attachments/x/fence",
                         method="POST")  # fmt: skip
    assert code == 403, said  # only the LMO fences a volume
    code, said = curl_as(region, leaf(region, Role.HOSTD, "b"), f"{config.lmo_url}/hosts/A", "-H",
                         "content-type: application/json", "-d", json.dumps({"name": "A", "api_url": host_b.url,
                         "migration_address": host_b.migration_address}), method="PUT")  # fmt: skip
    assert code == 403 and "only for its own host" in said  # host B cannot take over A's registration
    code, said = curl_as(region, leaf(region, Role.QEMU, "a"), f"{host_b.vswitch_url}/mapping", "-H",
                         "content-type: application/json", "-d", '{"generation": 99}', method="PUT")  # fmt: skip
    assert code == 403, said  # a guest that escaped into its QEMU gets no service API


def livemig(region: Region, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LIVEMIG_CONFIG": str(region.client_file)}
    if token is not None:
        env["LIVEMIG_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "livemig.cli.main", *args, "--state-dir", str(region.state_dir)],
                          capture_output=True, text=True, timeout=120, env=env, check=False)  # fmt: skip


def test_tokens_401_without_403_for_a_viewer_migrating_401_once_revoked(region: Region, lmo: LmoClient) -> None:
    config = config_of(region)
    made = livemig(region, "token", "create", "watcher", "--role", "viewer", "--json")
    assert made.returncode == 0, made.stderr
    viewer = json.loads(made.stdout)
    looked = livemig(region, "status", "--json", token=viewer["token"])
    assert looked.returncode == 0 and "hosts" in json.loads(looked.stdout), looked.stderr
    refused = livemig(region, "migrate", "nope", "--to", "B", token=viewer["token"])
    assert refused.returncode == 1 and "user 'watcher' (viewer) may not POST /migrations" in refused.stderr
    code, said = curl_as(region, None, f"{config.lmo_url}/migrations", "-H", f"Authorization: Bearer {viewer['token']}",
                         "-H", "content-type: application/json", "-d", '{"vm": "x", "destination": "B"}',
                         method="POST")  # fmt: skip
    assert code == 403, said
    assert livemig(region, "token", "revoke", viewer["id"]).returncode == 0
    code, said = curl_as(region, None, f"{config.lmo_url}/vms", "-H", f"Authorization: Bearer {viewer['token']}")
    assert code == 401 and 'error="invalid_token"' in said
    listed = json.loads(livemig(region, "token", "list", "--json").stdout)
    assert next(t for t in listed if t["id"] == viewer["id"])["revoked_at"] is not None


def test_nbd_refuses_plain_clients_and_other_regions(region: Region, lmo: LmoClient, tmp_path: Path) -> None:
    config = config_of(region)
    lmo.create_volume("probe", 8)
    try:
        view = lmo.volume("probe")
        assert view.volume.name == "probe"
        nbd = f"127.0.0.1:{config.nbd_port}"
        plain = subprocess.run(["nbdinfo", f"nbd://{nbd}/whatever"], capture_output=True, text=True, timeout=30,
                               env={**os.environ, "LIBNBD_DEBUG": "1"}, check=False)  # fmt: skip
        assert plain.returncode != 0 and "TLS negotiation required before option 7 (go)" in plain.stderr
        # a raw client sending GO first, before STARTTLS: NBD_REP_ERR_TLS_REQD (2^31 + 5)
        with socket.create_connection(("127.0.0.1", config.nbd_port), timeout=10) as raw:
            assert raw.recv(18)[:16] == b"NBDMAGICIHAVEOPT"
            raw.sendall((1 | 2).to_bytes(4, "big"))  # fixed newstyle, no zeroes
            name = b"whatever"
            raw.sendall(b"IHAVEOPT" + (7).to_bytes(4, "big") + (4 + len(name) + 2).to_bytes(4, "big")
                        + len(name).to_bytes(4, "big") + name + (0).to_bytes(2, "big"))  # fmt: skip
            reply = b""
            while len(reply) < 20:
                reply += raw.recv(20 - len(reply))
            assert int.from_bytes(reply[12:16], "big") == 2**31 + 5
        other = tmp_path / "other"
        pki.init_ca(other, "local")
        pki.issue(other, "a", Role.QEMU, ["a"])
        foreign = pki.qemu_tls_dir(other, "a", tmp_path / "foreign")
        log = region.state_dir / "logs" / "blockd.log"
        before = log.read_text().count("TLS handshake failed")
        refused = subprocess.run(["nbdinfo", f"nbds://{nbd}/whatever?tls-certificates={foreign}"],
                                 capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        assert refused.returncode != 0 and "export-size" not in refused.stdout
        # the client gives up first; blockd logs its side of the failed handshake a moment later
        wait_until(lambda: log.read_text().count("TLS handshake failed") > before,
                   "blockd refused it, not only the client", timeout=10)  # fmt: skip
    finally:
        lmo.delete_volume("probe")


def migrate(lmo: LmoClient, destination: str):  # type: ignore[no-untyped-def]
    return lmo.wait(lmo.migrate(VM, destination).id, timeout=300)


def swap_qemu_certificate(region: Region, host: str, to: LeafFiles) -> None:
    """Put another host's QEMU certificate where ``host``'s is (what a misconfigured or stolen one looks like)."""
    mine = leaf(region, Role.QEMU, host)
    mine.key.write_bytes(to.key.read_bytes())
    mine.cert.write_bytes(to.cert.read_bytes())


def test_a_guest_over_tls_end_to_end_and_an_unauthorised_source_is_refused(region: Region, lmo: LmoClient) -> None:
    config = config_of(region)
    hostd_pids = {h.name: h.pid for h in config.hosts}
    lmo.create_volume(VOLUME, 32)
    lmo.create_vm(workload_vm_spec(256, 10, name=VM, volume=VOLUME, disk_rate=20, wss_mib=64), host="A")
    try:
        lmo.wait_for_console(VM, "disk_acked=", timeout=120)  # the guest writes its disk over NBD with TLS
        vm_dir = region.state_dir / "hosts" / "A" / "vms" / VM
        for name in ("qmp.sock", "console.sock", "cmd.sock"):
            st = (vm_dir / name).stat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, name
            assert st.st_uid == os.getuid()
        assert stat.S_IMODE(vm_dir.stat().st_mode) == 0o700

        there = migrate(lmo, "B")
        assert there.phase is Phase.SUCCEEDED, there.reason
        assert there.guest_check == "ok" and there.disk_check == "ok"
        encrypted = there.condition(ConditionType.STREAM_ENCRYPTED)
        assert encrypted is not None and encrypted.status and "livemig://local/qemu/a" in encrypted.reason

        # B's QEMU now presents host c's certificate: same CA, so the handshake would pass, but A's
        # tls-authz admits only B's QEMU identity
        stolen = pki.issue(region.pki_dir, "c", Role.QEMU, ["c", "127.0.0.1"])
        swap_qemu_certificate(region, "b", stolen)
        before = set(qemu_pids_running(VM))
        refused = migrate(lmo, "A")
        assert refused.phase is Phase.FAILED, refused.reason
        assert "TLS x509 authz check for O=local,OU=qemu,CN=c is denied" in refused.reason, refused.reason
        assert lmo.vm(VM).host == "B" and lmo.vm(VM).observed.state.value == "running"  # type: ignore[union-attr]
        assert lmo.guest_check(VM).ok, "the guest kept running on its source, memory intact"
        assert set(qemu_pids_running(VM)) == before, "the refused destination QEMU (left inmigrate) was destroyed"
        seen = {h.registration.name: h.info for h in lmo.hosts()}
        assert seen["A"] is not None and VM not in seen["A"].vms

        # a rotation puts B's own identity back: picked up at the next migration, no VM or hostd restart
        assert livemig(region, "pki", "rotate", "b", "--role", "qemu", "--san", "b",
                       "--san", config.hosts[1].migration_address).returncode == 0  # fmt: skip
        back = migrate(lmo, "A")
        assert back.phase is Phase.SUCCEEDED and back.guest_check == "ok" and back.disk_check == "ok", back.reason
        assert all(pid_alive(pid) for pid in hostd_pids.values() if pid), "no hostd restarted"
    finally:
        lmo.delete_vm(VM)
        lmo.delete_volume(VOLUME)


def test_a_rotated_service_certificate_is_served_without_a_restart(region: Region, lmo: LmoClient) -> None:
    config = config_of(region)
    url = config.hosts[0].url
    address = url.removeprefix("https://")
    host, port = address.rsplit(":", 1)

    def served_serial() -> int:
        context = ssl.create_default_context(cafile=str(region.pki_dir / pki.CA_CERT))
        lmo_leaf = leaf(region, Role.LMO, "lmo")
        context.load_cert_chain(lmo_leaf.cert, lmo_leaf.key)
        with socket.create_connection((host, int(port))) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    before = served_serial()
    rotated = livemig(region, "pki", "rotate", "a", "--role", "hostd")
    assert rotated.returncode == 0 and "no restart" in " ".join(rotated.stdout.split()), rotated.stderr
    assert served_serial() != before
    assert served_serial() == pki.load_cert(leaf(region, Role.HOSTD, "a").cert).serial_number
    # the LMO still drives host A (new connections verify the new certificate), and the LMO's own
    # rotated certificate is presented by its clients from their next connection
    assert livemig(region, "pki", "rotate", "lmo", "--role", "lmo").returncode == 0
    assert {h.registration.name for h in lmo.hosts() if h.info is not None} == {"A", "B"}
    pid = config.hosts[0].pid
    assert pid is not None and pid_alive(pid)
