"""hostd's QEMU credentials: the host's ``qemu`` certificate in QEMU's ``tls-creds-x509`` layout, kept current.

Why a separate certificate for QEMU: a guest that escaped into its QEMU process gets that
process's key. QEMU's role (``qemu``) opens NBD exports and sends and receives migration streams,
nothing else: no service API takes it. hostd's own certificate (role ``hostd``) stays in hostd.

Why versioned directories: QEMU reads ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem`` ...
one by one when a ``tls-creds-x509`` object is created. A rotation that rewrote those files in
place could hand a QEMU reading at that moment a new certificate with the old key. So each
certificate gets its own directory, named by its fingerprint, written once, and a QEMU is only
ever pointed at a complete one; :meth:`QemuTls.directory` makes the next one when the configured
files change (``livemig pki rotate``), and running VMs never need a restart: the next migration's
objects, and the next VM's NBD client, read the new directory.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from livemig.errors import CredentialError
from livemig.security import qemu_tls
from livemig.security.client import Signature, file_signature
from livemig.security.pki import Identity, LeafFiles, Role, atomic_write, host_leaf_name, identity_of, load_cert

log = logging.getLogger(__name__)


class QemuTls:
    """The host's QEMU certificate (``leaf``, role ``qemu``), laid out for QEMU under ``base``."""

    def __init__(self, leaf: LeafFiles, base: Path) -> None:
        if leaf.identity.role is not Role.QEMU:
            raise CredentialError(f"{leaf.cert} is a {leaf.identity.role.value} certificate; QEMU needs role qemu")
        self.leaf = leaf
        self.base = base
        self.identity: Identity = leaf.identity
        self._signature: Signature | None = None
        self._current: Path | None = None

    def directory(self) -> Path:
        """The directory a new ``tls-creds-x509`` object should read (written if the files changed)."""
        signature = file_signature((self.leaf.cert, self.leaf.key, self.leaf.ca))
        if signature == self._signature and self._current is not None and self._current.is_dir():
            return self._current
        cert, key, ca = self._read_consistent()
        out = self.base / hashlib.sha256(cert + ca).hexdigest()[:16]
        if not (out / "client-cert.pem").is_file():
            staging = self.base / f".{out.name}.{time.monotonic_ns()}"
            staging.mkdir(parents=True, mode=0o700)
            for name, data, mode in (("server-key.pem", key, 0o600), ("client-key.pem", key, 0o600),
                                     ("ca-cert.pem", ca, 0o644), ("server-cert.pem", cert, 0o644),
                                     ("client-cert.pem", cert, 0o644)):  # fmt: skip
                atomic_write(staging / name, data, mode)
            shutil.rmtree(out, ignore_errors=True)
            staging.rename(out)  # complete or absent, never half there
        previous, self._current, self._signature = self._current, out, signature
        self.identity = identity_of(load_cert(self.leaf.cert))
        if previous is not None and previous != out:
            log.info("QEMU TLS: %s now serves %s (rotated)", out, self.identity)
        self._prune(keep={out, previous})
        return out

    def _read_consistent(self) -> tuple[bytes, bytes, bytes]:
        """Certificate, key and CA that belong together (a rotation writes the key, then the certificate)."""
        for _attempt in range(10):  # a rotation writes two files; a short wait (it blocks the loop)
            try:
                cert, key, ca = (p.read_bytes() for p in (self.leaf.cert, self.leaf.key, self.leaf.ca))
            except OSError as exc:
                raise CredentialError(f"QEMU's TLS credentials are unreadable: {exc}") from None
            if _matches(cert, key):
                return cert, key, ca
            time.sleep(0.02)
        raise CredentialError(f"{self.leaf.key} does not belong to {self.leaf.cert}")

    def _prune(self, keep: set[Path | None]) -> None:
        for entry in self.base.iterdir():
            if entry not in keep and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def authz(self, source_host: str) -> str:
        """What ``tls-authz`` must admit: the QEMU certificate of ``source_host`` in this region."""
        return qemu_tls.authz_identity(Identity(self.identity.region, Role.QEMU, host_leaf_name(source_host)))


def _matches(cert_pem: bytes, key_pem: bytes) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki))
