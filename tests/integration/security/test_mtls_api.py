"""Mutual TLS on a real uvicorn server with a FastAPI app, reached by real TLS clients (httpx, curl, openssl).

The app stands for a hostd: only the LMO may drive it. What is proven: the right role gets 200; a
valid certificate of the wrong role gets 403 from the route's dependency; no certificate, a
certificate of another CA and an expired certificate fail the handshake and reach no handler; a
plain-HTTP app answers 401 unless a lab marked it insecure; a leaf rotated on disk is served to new
connections by the same process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from fastapi import Depends, FastAPI

from livemig import errors
from livemig.security import pki
from livemig.security.pki import Identity, LeafFiles, Role
from livemig.security.tls import INSECURE_STATE, ReloadingServerContext, client_context, require_role, uvicorn_tls
from livemig.testing.tlsserver import ThreadedUvicorn
from livemig.wire.base import AsyncService, Credentials, async_http, call
from livemig.wire.pooled import PooledHttp
from livemig.wire.server import install_error_handlers

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("openssl") is None,
    reason="needs curl and openssl (Debian: curl openssl)",
)


@dataclass
class Region:
    dir: Path
    server: LeafFiles
    lmo: LeafFiles
    vswitch: LeafFiles
    foreign_lmo: LeafFiles
    expired_lmo: LeafFiles


@dataclass
class App:
    app: FastAPI
    calls: list[str] = field(default_factory=list)


def make_app() -> App:
    app = FastAPI()
    install_error_handlers(app)
    state = App(app)

    @app.post("/vms/{vm}/migrate")
    def migrate(vm: str, caller: Identity | None = Depends(require_role(Role.LMO))) -> dict[str, str | None]:
        state.calls.append(vm)
        return {"vm": vm, "caller": caller.uri if caller else None}

    return state


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Region:
    base = tmp_path_factory.mktemp("pki")
    directory = base / "r1"
    pki.init_ca(directory, "r1", now=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))
    other = base / "other"
    pki.init_ca(other, "r1")  # the same region name from another CA: still a stranger
    return Region(
        directory,
        server=pki.issue(directory, "host-a", Role.HOSTD, ["host-a", "localhost", "127.0.0.1"]),
        lmo=pki.issue(directory, "lmo", Role.LMO, ["lmo"]),
        vswitch=pki.issue(directory, "host-b", Role.VSWITCH, ["host-b"]),
        foreign_lmo=pki.issue(other, "lmo", Role.LMO, ["lmo"]),
        expired_lmo=pki.issue(
            directory, "old-lmo", Role.LMO, ["old-lmo"], days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=5)
        ),
    )


@pytest.fixture
def served(region: Region) -> Iterator[tuple[App, ThreadedUvicorn, ReloadingServerContext]]:
    state = make_app()
    context = ReloadingServerContext(pki.leaf_files(region.dir, "host-a", Role.HOSTD))
    with ThreadedUvicorn(state.app, **uvicorn_tls(context)) as server:
        yield state, server, context


def url(server: ThreadedUvicorn, path: str = "/vms/vm1/migrate") -> str:
    return f"https://127.0.0.1:{server.port}{path}"


def no_cert_context(region: Region) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(region.dir / "ca-cert.pem"))
    return context


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "-X", "POST", "-o", "-", "-w", "\n%{http_code}", *args],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip


def s_client(server: ThreadedUvicorn, *args: str) -> str:
    """openssl s_client: handshake, send one request, print what the server said (alerts included)."""
    request = "POST /vms/vm1/migrate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-ign_eof", *args],
        input=request, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return result.stdout + result.stderr


def test_right_role_200_wrong_role_403_with_httpx(served: tuple[App, ThreadedUvicorn, ReloadingServerContext],
                                                  region: Region) -> None:  # fmt: skip
    state, server, _ = served
    with httpx.Client(verify=client_context(region.lmo)) as client:
        reply = client.post(url(server))
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"vm": "vm1", "caller": "livemig://r1/lmo/lmo"}
    with httpx.Client(verify=client_context(region.vswitch)) as client:
        reply = client.post(url(server))
    assert reply.status_code == 403
    assert reply.json()["error"] == "Forbidden"
    assert "vswitch 'host-b' may not call this" in reply.json()["message"]
    assert state.calls == ["vm1"]  # the 403 ran no handler


def test_the_lmo_pooled_client_proves_its_role_and_refuses_strangers(
    served: tuple[App, ThreadedUvicorn, ReloadingServerContext], region: Region
) -> None:
    """The LMO's aiohttp pool (``async_http(pooled=True)``) over the same mutual TLS: its
    certificate is presented and the server's verified against the region CA."""
    state, server, _ = served

    def creds(leaf: LeafFiles) -> Credentials:
        return Credentials(ca=leaf.ca, cert=leaf.cert, key=leaf.key)

    async def scenario() -> None:
        base = f"https://127.0.0.1:{server.port}"
        async with async_http(5, credentials=creds(region.lmo), pooled=True) as http:
            assert isinstance(http, PooledHttp)
            reply = await AsyncService("host A", base, http).run(call("POST", "/vms/vm2/migrate", dict[str, str]))
            assert reply == {"vm": "vm2", "caller": "livemig://r1/lmo/lmo"}
        async with async_http(5, credentials=creds(region.vswitch), pooled=True) as http:
            with pytest.raises(errors.Forbidden, match="may not call this"):
                await AsyncService("host A", base, http).run(call("POST", "/vms/vm3/migrate"))
        async with async_http(5, credentials=creds(region.foreign_lmo), pooled=True) as http:
            with pytest.raises(errors.HostUnreachable):
                await AsyncService("host A", base, http).run(call("POST", "/vms/vm4/migrate"))

    asyncio.run(scenario())
    assert state.calls == ["vm2"]


@pytest.mark.parametrize("who", ["none", "foreign_lmo", "expired_lmo"])
def test_bad_client_certificates_fail_the_handshake_with_httpx(
    served: tuple[App, ThreadedUvicorn, ReloadingServerContext], region: Region, who: str
) -> None:
    state, server, _ = served
    context = no_cert_context(region) if who == "none" else client_context(getattr(region, who))
    with (
        httpx.Client(verify=context) as client,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
    ):
        client.post(url(server))
    assert state.calls == []


def test_curl(served: tuple[App, ThreadedUvicorn, ReloadingServerContext], region: Region) -> None:
    state, server, _ = served
    ca = ["--cacert", str(region.dir / "ca-cert.pem")]
    ok = curl(*ca, "--cert", str(region.lmo.cert), "--key", str(region.lmo.key), url(server))
    assert ok.returncode == 0 and ok.stdout.endswith("\n200"), ok.stderr
    wrong = curl(*ca, "--cert", str(region.vswitch.cert), "--key", str(region.vswitch.key), url(server))
    assert wrong.returncode == 0 and wrong.stdout.endswith("\n403"), wrong.stderr
    for leaf in (None, region.foreign_lmo, region.expired_lmo):
        creds = [] if leaf is None else ["--cert", str(leaf.cert), "--key", str(leaf.key)]
        refused = curl(*ca, *creds, url(server))
        assert refused.returncode != 0, refused.stdout  # a TLS error (35/56), never an HTTP status
        assert not refused.stdout.rstrip().endswith(("200", "403")), refused.stdout
    # and curl checks the server too: without the region CA it does not trust the server
    untrusted = curl("--cert", str(region.lmo.cert), "--key", str(region.lmo.key), url(server))
    assert untrusted.returncode == 60, untrusted.stderr
    assert len(state.calls) == 1


def test_openssl_s_client(served: tuple[App, ThreadedUvicorn, ReloadingServerContext], region: Region) -> None:
    """The request gets through only with a good certificate, over TLS 1.3 and 1.2.

    asyncio drops a connection whose handshake failed without flushing the TLS alert, so a refused
    client sees the connection end (TLS 1.2: "unexpected eof" inside the handshake), not an alert.
    """
    state, server, _ = served
    ca = ["-CAfile", str(region.dir / "ca-cert.pem"), "-verify_return_error"]
    for version in ("-tls1_3", "-tls1_2"):
        good = s_client(server, version, *ca, "-cert", str(region.lmo.cert), "-key", str(region.lmo.key))
        assert "HTTP/1.1 200 OK" in good and "Verify return code: 0 (ok)" in good, good
        for leaf in (None, region.foreign_lmo, region.expired_lmo):
            creds = [] if leaf is None else ["-cert", str(leaf.cert), "-key", str(leaf.key)]
            refused = s_client(server, version, *ca, *creds)
            assert "HTTP/1.1" not in refused, refused
            if version == "-tls1_2":
                assert "unexpected eof while reading" in refused, refused
    assert len(state.calls) == 2


def test_plain_http_needs_an_explicit_insecure(region: Region) -> None:
    state = make_app()
    with ThreadedUvicorn(state.app) as server, httpx.Client() as client:
        plain = f"http://127.0.0.1:{server.port}/vms/vm1/migrate"
        reply = client.post(plain)
        assert reply.status_code == 401 and reply.json()["error"] == "Unauthenticated"
        setattr(state.app.state, INSECURE_STATE, True)
        reply = client.post(plain)
        assert reply.status_code == 200 and reply.json()["caller"] is None
    assert state.calls == ["vm1"]


def served_serial(port: int, region: Region) -> int:
    context = client_context(region.lmo)
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_rotation_is_served_without_restart(
    served: tuple[App, ThreadedUvicorn, ReloadingServerContext], region: Region
) -> None:
    state, server, context = served
    before = served_serial(server.port, region)
    assert before == pki.load_cert(region.server.cert).serial_number
    with httpx.Client(verify=client_context(region.lmo)) as kept:
        assert kept.post(url(server)).status_code == 200  # a keep-alive connection opened before the rotation
        rotated = pki.rotate(region.dir, "host-a", Role.HOSTD)
        after = served_serial(server.port, region)
        assert after == pki.load_cert(rotated.cert).serial_number != before
        assert context.reloads == 1
        assert kept.post(url(server)).status_code == 200  # still served on its old session
    with httpx.Client(verify=client_context(region.lmo)) as fresh:
        assert fresh.post(url(server)).status_code == 200
    assert served_serial(server.port, region) == after and context.reloads == 1  # no reload without a change
    assert len(state.calls) == 3


def test_a_half_written_rotation_keeps_the_old_certificate(
    served: tuple[App, ThreadedUvicorn, ReloadingServerContext], region: Region, tmp_path: Path
) -> None:
    _, server, context = served
    before = served_serial(server.port, region)
    other = pki.issue(region.dir, "host-z", Role.HOSTD, ["127.0.0.1"])
    saved = region.server.key.read_bytes()
    region.server.key.write_bytes(other.key.read_bytes())  # key no longer matches the certificate
    try:
        assert served_serial(server.port, region) == before
        assert context.reloads == 0
    finally:
        region.server.key.write_bytes(saved)
    assert served_serial(server.port, region) == before
