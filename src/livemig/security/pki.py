"""The region CA: one certificate authority per region, and a leaf certificate per service and host.

Why a private CA and not a public one: every party that talks TLS inside a region (the LMO, each
hostd, each vswitch, blockd, each host's QEMU) is ours, so trust is "issued by this region's CA"
and nothing else; a certificate from another region or from the public web is worthless here.

Layout of a PKI directory (the region's state dir holds one)::

    <dir>/ca-cert.pem                 the region CA (public; what every verifier trusts)
    <dir>/ca-key.pem                  its key, 0600 (only ``issue``/``rotate`` read it)
    <dir>/<role>/<name>/cert.pem      a leaf: service or host ``name`` in ``role``
    <dir>/<role>/<name>/key.pem       its key, 0600

How a verifier reads the role: every leaf carries exactly one URI SAN
``livemig://<region>/<role>/<name>`` (:func:`identity_of`). A URI SAN, and not the subject's
OU or an extension of our own, because a SAN is covered by every TLS library's chain validation,
is printed by ``openssl x509 -text`` for a human, and cannot be confused with a host name (a
``livemig:`` URI never matches a DNS or IP check). The subject repeats it for tools that only
know distinguished names - QEMU's ``tls-authz`` compares the peer's DN, as
``O=<region>,OU=<role>,CN=<name>`` (``qemu_tls.authz_identity``).

Each leaf names its host and every address it is reached on (API, migration and storage
networks) in DNS and IP SANs: TLS clients check the address they dialled against those, and a
missing migration address is the most common way TLS migration breaks in practice. Every leaf is
good for both ends of a connection (serverAuth and clientAuth): the LMO calls a hostd and is
called by it, and QEMU uses the same certificate as migration source (client) and destination
(server).

Keys are EC P-256: accepted by OpenSSL (Python's ``ssl``), GnuTLS (QEMU, libnbd/nbdinfo) and
every browser, and cheap to sign and verify. Files are replaced atomically (write, fsync,
rename), so a service reloading on change never reads half a certificate, and a rotated leaf
appears as a whole.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from livemig.errors import Conflict, CredentialError, InvalidRequest, NotFound

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
LEAF_CERT = "cert.pem"
LEAF_KEY = "key.pem"
URI_SCHEME = "livemig"
CA_DAYS = 3650
LEAF_DAYS = 90
#: Certificates start this long before "now", so a peer whose clock is a little behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class Role(StrEnum):
    """What a certificate's holder is; services decide from it what a caller may do."""

    LMO = "lmo"  # the control plane: drives hostds, fences volumes, programs vswitches
    HOSTD = "hostd"  # a host agent: reports to the LMO, hands network state to its vswitch
    BLOCKD = "blockd"  # the block service: serves NBD and its admin API
    VSWITCH = "vswitch"  # a host's dataplane: its API, and the hand-off between vswitches
    QEMU = "qemu"  # a host's QEMU processes: migration stream and NBD client, nothing else


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is."""

    region: str
    role: Role
    name: str

    @property
    def uri(self) -> str:
        return f"{URI_SCHEME}://{self.region}/{self.role.value}/{self.name}"

    @property
    def distinguished_name(self) -> str:
        """The subject as RFC 4514 prints it (most specific first; QEMU's ``tls-authz`` uses another order,
        see ``qemu_tls.authz_identity``)."""
        return f"CN={self.name},OU={self.role.value},O={self.region}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class CaFiles:
    dir: Path
    region: str

    @property
    def cert(self) -> Path:
        return self.dir / CA_CERT

    @property
    def key(self) -> Path:
        return self.dir / CA_KEY


@dataclass(frozen=True)
class LeafFiles:
    """A leaf's certificate and key, and the CA certificate that verifies its peers."""

    identity: Identity
    cert: Path
    key: Path
    ca: Path


# --- validation -----------------------------------------------------------------------------------


def validate_name(value: str, what: str) -> str:
    """Region and service/host names: lower-case DNS labels, so they fit a URI and a DN unchanged."""
    if not _NAME.fullmatch(value):
        raise InvalidRequest(f"bad {what} {value!r}: use lower-case letters, digits and '-' (at most 63)")
    return value


def parse_role(value: str | Role) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidRequest(f"unknown role {value!r}: one of {', '.join(r.value for r in Role)}") from None


def parse_sans(sans: Sequence[str]) -> list[x509.GeneralName]:
    """Host names and IP addresses, each once, in the order given."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in sans:
        text = raw.strip()
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            if not _HOSTNAME.fullmatch(text):
                raise InvalidRequest(f"bad subject alternative name {raw!r}: not a host name or IP address") from None
            key = text.lower()
            if key not in seen:
                seen.add(key)
                names.append(x509.DNSName(key))
            continue
        if str(address) not in seen:
            seen.add(str(address))
            names.append(x509.IPAddress(address))
    if not names:
        raise InvalidRequest("a leaf certificate needs at least one host name or address")
    return names


# --- files ----------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` so a reader sees the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise NotFound(f"no certificate at {path}") from None
    except (OSError, ValueError) as exc:
        raise CredentialError(f"{path} is not a PEM certificate: {exc}") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise NotFound(f"no key at {path}") from None
    except (OSError, ValueError, TypeError) as exc:
        raise CredentialError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{path} is not an EC key")
    return key


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


# --- the CA ---------------------------------------------------------------------------------------


def ca_files(directory: Path) -> CaFiles:
    """The CA of an existing PKI directory (its region read from the certificate)."""
    return CaFiles(directory, _region_of_ca(load_cert(directory / CA_CERT), directory / CA_CERT))


def _region_of_ca(cert: x509.Certificate, path: Path) -> str:
    regions = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if not regions:
        raise CredentialError(f"{path} is not a livemig region CA (no O= in its subject)")
    return str(regions[0].value)


def init_ca(
    directory: Path, region: str, *, days: int = CA_DAYS, exist_ok: bool = False, now: dt.datetime | None = None
) -> CaFiles:
    """Create the region CA in ``directory`` (key 0600); an existing CA is kept only with ``exist_ok``."""
    validate_name(region, "region")
    if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
        if not exist_ok:
            raise Conflict(f"{directory} already holds a CA; refusing to replace it", dir=str(directory))
        existing = ca_files(directory)
        if existing.region != region:
            raise Conflict(f"{directory} holds the CA of region {existing.region!r}, not {region!r}")
        return existing
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, region),
            x509.NameAttribute(NameOID.COMMON_NAME, f"livemig region {region} CA"),
        ]
    )
    start = _now(now) - CLOCK_SKEW
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    ).sign(key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / CA_KEY, _pem_key(key), 0o600)
    _atomic_write(directory / CA_CERT, _pem_cert(cert), 0o644)
    return CaFiles(directory, region)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


# --- leaves ---------------------------------------------------------------------------------------


def leaf_dir(directory: Path, role: Role | str, name: str) -> Path:
    return directory / parse_role(role).value / validate_name(name, "name")


def leaf_files(directory: Path, name: str, role: Role | str) -> LeafFiles:
    """The files of an issued leaf (which must exist), with the identity its certificate carries."""
    where = leaf_dir(directory, role, name)
    cert = load_cert(where / LEAF_CERT)
    if not (where / LEAF_KEY).exists():
        raise NotFound(f"no key at {where / LEAF_KEY}")
    return LeafFiles(identity_of(cert), where / LEAF_CERT, where / LEAF_KEY, directory / CA_CERT)


def leaf_from_paths(cert: Path, key: Path, ca: Path) -> LeafFiles:
    """A leaf given by its three files (how a service on another machine is configured)."""
    for path in (key, ca):
        if not path.is_file():
            raise NotFound(f"no such file: {path}")
    return LeafFiles(identity_of(load_cert(cert)), cert, key, ca)


def issue(
    directory: Path,
    name: str,
    role: Role | str,
    sans: Sequence[str],
    *,
    days: int = LEAF_DAYS,
    now: dt.datetime | None = None,
) -> LeafFiles:
    """Issue (or re-issue) the leaf of ``name`` in ``role``: a new key, a certificate naming every SAN.

    The key is written before the certificate, each atomically; a reader that reloads on the
    certificate's change (see ``livemig.security.tls``) therefore finds the matching key in place.
    """
    role = parse_role(role)
    validate_name(name, "name")
    if days < 1:
        raise InvalidRequest(f"a certificate must be valid for at least one day, not {days}")
    names = parse_sans(sans)
    ca = ca_files(directory)
    ca_cert = load_cert(ca.cert)
    ca_key = _load_key(ca.key)
    identity = Identity(ca.region, role, name)
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now(now) - CLOCK_SKEW
    end = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca.region),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([*names, x509.UniformResourceIdentifier(identity.uri)]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    where = leaf_dir(directory, role, name)
    where.mkdir(parents=True, exist_ok=True)
    _atomic_write(where / LEAF_KEY, _pem_key(key), 0o600)
    _atomic_write(where / LEAF_CERT, _pem_cert(cert), 0o644)
    return LeafFiles(identity, where / LEAF_CERT, where / LEAF_KEY, ca.cert)


def sans_of(cert: x509.Certificate) -> list[str]:
    """The host names and addresses a leaf names (its ``livemig:`` URI left out)."""
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *extension.get_values_for_type(x509.DNSName),
        *(str(a) for a in extension.get_values_for_type(x509.IPAddress)),
    ]


def rotate(
    directory: Path,
    name: str,
    role: Role | str,
    sans: Sequence[str] | None = None,
    *,
    days: int = LEAF_DAYS,
    now: dt.datetime | None = None,
) -> LeafFiles:
    """Re-issue an existing leaf in place (new key, new validity), keeping its SANs unless given.

    Running services pick the new files up on their next handshake (``tls.ReloadingServerContext``);
    QEMU reads its directory when a ``tls-creds-x509`` object is created, i.e. per migration.
    """
    current = leaf_files(directory, name, role)
    names = list(sans) if sans is not None else sans_of(load_cert(current.cert))
    return issue(directory, name, role, names, days=days, now=now)


# --- reading identities ---------------------------------------------------------------------------


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity a leaf carries in its one ``livemig://<region>/<role>/<name>`` URI SAN."""
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CredentialError("certificate has no subject alternative names, so no livemig identity") from None
    uris = [
        u for u in extension.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(f"{URI_SCHEME}://")
    ]
    if len(uris) != 1:
        raise CredentialError(f"certificate carries {len(uris)} livemig identities; exactly one is required")
    parts = uris[0].removeprefix(f"{URI_SCHEME}://").split("/")
    if len(parts) != 3:
        raise CredentialError(f"malformed livemig identity {uris[0]!r}: want livemig://<region>/<role>/<name>")
    region, role, name = parts
    try:
        return Identity(validate_name(region, "region"), parse_role(role), validate_name(name, "name"))
    except InvalidRequest as exc:
        raise CredentialError(f"malformed livemig identity {uris[0]!r}: {exc.message}") from None


def identity_of_der(der: bytes) -> Identity:
    """:func:`identity_of` for the DER bytes ``ssl`` hands out (``getpeercert(binary_form=True)``)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CredentialError(f"peer certificate cannot be parsed: {exc}") from None
    return identity_of(cert)


# --- QEMU -----------------------------------------------------------------------------------------

QEMU_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


def qemu_tls_dir(directory: Path, name: str, out: Path, *, role: Role | str = Role.QEMU) -> Path:
    """Write ``out`` in QEMU's ``tls-creds-x509`` layout from the leaf of ``name`` (role ``qemu``).

    The same certificate serves as ``server-*`` (migration destination) and ``client-*``
    (migration source, NBD client): it carries serverAuth and clientAuth. Copies, not links, so
    ``out`` can be shipped to a host on its own; run it again after :func:`rotate` (QEMU reads the
    directory each time a ``tls-creds-x509`` object is created, so the next migration uses the new
    certificate without restarting any VM). Libnbd's ``tls-certificates=DIR`` reads the same layout.
    """
    leaf = leaf_files(directory, name, role)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    cert = leaf.cert.read_bytes()
    key = leaf.key.read_bytes()
    # keys first: a reader that sees a new certificate finds its key already there
    _atomic_write(out / "server-key.pem", key, 0o600)
    _atomic_write(out / "client-key.pem", key, 0o600)
    _atomic_write(out / "ca-cert.pem", leaf.ca.read_bytes(), 0o644)
    _atomic_write(out / "server-cert.pem", cert, 0o644)
    _atomic_write(out / "client-cert.pem", cert, 0o644)
    return out


def verify(ca_cert: Path, cert: Path, *, now: dt.datetime | None = None) -> Identity:
    """Check ``cert`` the way a TLS peer would (chain to this CA, validity, clientAuth) and read its identity.

    For tools and tests (``livemig pki verify``); live connections are checked by the TLS library.
    """
    ca = load_cert(ca_cert)
    leaf = load_cert(cert)
    verifier = verification.PolicyBuilder().store(verification.Store([ca])).time(_now(now)).build_client_verifier()
    try:
        verifier.verify(leaf, [])
    except verification.VerificationError as exc:
        raise CredentialError(f"{cert} does not verify against {ca_cert}: {exc}") from None
    identity = identity_of(leaf)
    region = _region_of_ca(ca, ca_cert)
    if identity.region != region:
        raise CredentialError(f"{cert} names region {identity.region!r} but its CA is region {region!r}")
    return identity
