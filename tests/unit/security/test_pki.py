"""The region CA: what a leaf names, who it says its holder is, its files' modes, and what does not verify."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from livemig.errors import Conflict, CredentialError, InvalidRequest, NotFound
from livemig.security import pki
from livemig.security.pki import Identity, Role


@pytest.fixture
def region(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init_ca(directory, "r1")
    return directory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_key_is_0600_and_the_ca_is_a_ca(region: Path) -> None:
    assert mode(region / "ca-key.pem") == 0o600
    ca = pki.load_cert(region / "ca-cert.pem")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True
    assert pki.ca_files(region).region == "r1"


def test_init_ca_refuses_to_replace_and_exist_ok_keeps_it(region: Path) -> None:
    before = (region / "ca-cert.pem").read_bytes()
    with pytest.raises(Conflict):
        pki.init_ca(region, "r1")
    assert pki.init_ca(region, "r1", exist_ok=True).region == "r1"
    with pytest.raises(Conflict, match="region 'r1'"):
        pki.init_ca(region, "r2", exist_ok=True)
    assert (region / "ca-cert.pem").read_bytes() == before


def test_leaf_names_every_address_and_its_role(region: Path) -> None:
    leaf = pki.issue(region, "host-a", Role.HOSTD, ["host-a", "10.0.0.1", "192.168.50.1", "fd00::1", "HOST-A"])
    cert = pki.load_cert(leaf.cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["host-a"]  # once, lower-cased
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.1"),
        ipaddress.ip_address("192.168.50.1"),
        ipaddress.ip_address("fd00::1"),
    ]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["livemig://r1/hostd/host-a"]
    assert pki.identity_of(cert) == Identity("r1", Role.HOSTD, "host-a")
    assert leaf.identity.distinguished_name == "CN=host-a,OU=hostd,O=r1"
    assert cert.subject.rfc4514_string() == "CN=host-a,OU=hostd,O=r1"
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert mode(leaf.key) == 0o600
    assert pki.verify(region / "ca-cert.pem", leaf.cert) == leaf.identity


def test_openssl_accepts_the_leaf_as_server_and_client(region: Path) -> None:
    leaf = pki.issue(region, "blockd", Role.BLOCKD, ["127.0.0.1"])
    for purpose in ("sslserver", "sslclient"):
        result = subprocess.run(
            ["openssl", "verify", "-CAfile", str(leaf.ca), "-purpose", purpose, str(leaf.cert)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def test_expiry(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    region = tmp_path / "pki"
    pki.init_ca(region, "r1", now=now - dt.timedelta(days=30))
    leaf = pki.issue(region, "lmo", Role.LMO, ["lmo"], days=2)
    cert = pki.load_cert(leaf.cert)
    assert now < cert.not_valid_after_utc <= now + dt.timedelta(days=2)
    assert cert.not_valid_before_utc <= now  # a little back-dated for clock skew
    stale = pki.issue(region, "old", Role.LMO, ["old"], days=1, now=now - dt.timedelta(days=10))
    with pytest.raises(CredentialError, match="not valid at validation time"):
        pki.verify(region / "ca-cert.pem", stale.cert)
    # the same certificate was good while it lasted: only time makes it fail
    assert pki.verify(region / "ca-cert.pem", stale.cert, now=now - dt.timedelta(days=9, hours=12)).name == "old"


def test_a_leaf_of_another_ca_does_not_verify(region: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other, "r1")  # same region name, different CA: still foreign
    foreign = pki.issue(other, "host-a", Role.HOSTD, ["host-a"])
    with pytest.raises(CredentialError, match="does not verify"):
        pki.verify(region / "ca-cert.pem", foreign.cert)
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(region / "ca-cert.pem"), str(foreign.cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0


def test_rotate_replaces_key_and_certificate_and_keeps_the_sans(region: Path) -> None:
    first = pki.issue(region, "host-b", Role.QEMU, ["host-b", "10.0.0.2"])
    old_cert, old_key = first.cert.read_bytes(), first.key.read_bytes()
    second = pki.rotate(region, "host-b", Role.QEMU)
    assert second.cert == first.cert
    assert second.cert.read_bytes() != old_cert and second.key.read_bytes() != old_key
    assert pki.sans_of(pki.load_cert(second.cert)) == ["host-b", "10.0.0.2"]
    assert mode(second.key) == 0o600
    third = pki.rotate(region, "host-b", Role.QEMU, ["host-b", "10.0.0.2", "10.9.0.2"])
    assert "10.9.0.2" in pki.sans_of(pki.load_cert(third.cert))
    with pytest.raises(NotFound):
        pki.rotate(region, "never-issued", Role.QEMU)


def test_qemu_tls_dir_layout(region: Path, tmp_path: Path) -> None:
    leaf = pki.issue(region, "host-a", Role.QEMU, ["host-a", "127.0.0.1"])
    out = pki.qemu_tls_dir(region, "host-a", tmp_path / "qemu-tls")
    assert sorted(p.name for p in out.iterdir()) == sorted(pki.QEMU_FILES)
    assert (out / "server-cert.pem").read_bytes() == (out / "client-cert.pem").read_bytes() == leaf.cert.read_bytes()
    assert mode(out / "server-key.pem") == mode(out / "client-key.pem") == 0o600
    assert mode(out) == 0o700
    assert (out / "ca-cert.pem").read_bytes() == (region / "ca-cert.pem").read_bytes()


@pytest.mark.parametrize(
    ("name", "role", "sans", "message"),
    [
        ("Host_A", "hostd", ["h"], "bad name"),
        ("host-a", "admin", ["h"], "unknown role"),
        ("host-a", "hostd", [], "at least one"),
        ("host-a", "hostd", ["not a host!"], "subject alternative name"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(
    region: Path, name: str, role: str, sans: list[str], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        pki.issue(region, name, role, sans)
    assert sorted(p.name for p in region.iterdir()) == ["ca-cert.pem", "ca-key.pem"]


def test_identity_needs_exactly_one_livemig_uri(region: Path) -> None:
    leaf = pki.issue(region, "x", Role.VSWITCH, ["x"])
    cert = pki.load_cert(leaf.cert)
    assert pki.identity_of_der(cert.public_bytes(serialization.Encoding.DER)).role is Role.VSWITCH
    ca = pki.load_cert(region / "ca-cert.pem")
    with pytest.raises(CredentialError, match="no subject alternative names"):
        pki.identity_of(ca)
