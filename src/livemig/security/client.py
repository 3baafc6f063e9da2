"""TLS for livemig's clients: a context that follows its certificate files, and the credentials a client carries.

Why a context that reloads itself: a service keeps one HTTP client (one connection pool) for its
whole life, and ``livemig pki rotate`` replaces its certificate on disk. Servers pick a rotated leaf
up at the next handshake (``tls.ReloadingServerContext``); this is the client's half.
:class:`ReloadingClientContext` is an ``ssl.SSLContext`` whose ``wrap_socket``/``wrap_bio`` (what
httpcore calls for every *new* connection, sync and async) first compare the files' signature
with the loaded one and, when they changed, load the new pair into the same context. Connections
already open keep their session, so a keep-alive connection opened before a migration's pause is
still the one used inside it; only the next handshake presents the new certificate.

No import of the web stack here: the CLI builds a context for every command.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livemig.errors import CredentialError

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int], ...]


def file_signature(paths: tuple[Path, ...]) -> Signature:
    """What changes when a file is replaced (rename gives a new inode) or rewritten."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((0, 0, 0))
            continue
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass(frozen=True)
class Credentials:
    """What a client trusts and proves: the region CA, a certificate (services), a bearer token (users).

    Empty credentials mean a plain client (``http://`` URLs of an ``--insecure`` region, or the
    system's trust store for an ``https://`` URL).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise CredentialError("a client certificate needs its key (and a key its certificate)")

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def describe(self) -> str:
        parts = []
        if self.cert is not None:
            parts.append(f"certificate {self.cert}")
        if self.ca is not None:
            parts.append(f"CA {self.ca}")
        if self.token:
            parts.append("bearer token")
        return ", ".join(parts) or "none"


class ReloadingClientContext(ssl.SSLContext):
    """A client context (TLS 1.2+, host name checked, the region CA) whose certificate follows its files."""

    creds: Credentials

    def __new__(cls, creds: Credentials) -> ReloadingClientContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(self, creds: Credentials) -> None:
        super().__init__()
        self.creds = creds
        self.minimum_version = ssl.TLSVersion.TLSv1_2
        self.options |= ssl.OP_NO_COMPRESSION
        self.check_hostname = True
        self.verify_mode = ssl.CERT_REQUIRED
        self._lock = threading.Lock()
        self._paths = tuple(p for p in (creds.cert, creds.key, creds.ca) if p is not None)
        self._loaded = file_signature(self._paths)
        self._failed: Signature | None = None
        self.reloads = 0
        try:
            if creds.ca is not None:
                self.load_verify_locations(cafile=str(creds.ca))
            else:
                self.load_default_certs()
            if creds.cert is not None and creds.key is not None:
                self.load_cert_chain(str(creds.cert), str(creds.key))
        except FileNotFoundError as exc:
            raise CredentialError(f"TLS credentials missing: {exc.filename}") from None
        except ssl.SSLError as exc:
            raise CredentialError(f"TLS credentials ({creds.describe()}) are unusable: {exc.reason or exc}") from None

    def refresh(self) -> None:
        """Load the files again if they changed since they were loaded (a rotation)."""
        signature = file_signature(self._paths)
        if signature == self._loaded or signature == self._failed:
            return
        with self._lock:
            if signature == self._loaded:
                return
            try:
                if self.creds.ca is not None:
                    self.load_verify_locations(cafile=str(self.creds.ca))  # adds: the old CA stays trusted
                if self.creds.cert is not None and self.creds.key is not None:
                    self.load_cert_chain(str(self.creds.cert), str(self.creds.key))
            except (OSError, ssl.SSLError) as exc:
                self._failed = signature
                log.warning("TLS: %s changed but does not load, still presenting the previous certificate: %s",
                            self.creds.cert, exc)  # fmt: skip
                return
            self._loaded, self._failed = signature, None
            self.reloads += 1
            log.info("TLS client: reloaded %s (rotation %d)", self.creds.cert or self.creds.ca, self.reloads)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        _count_handshake()
        self.refresh()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        _count_handshake()
        self.refresh()
        return super().wrap_bio(*args, **kwargs)


_handshakes = 0


def _count_handshake() -> None:
    global _handshakes
    _handshakes += 1


def handshakes_started() -> int:
    """How many TLS client connections this process has begun (a reading before and after a piece of
    work tells whether it paid for a handshake, e.g. hostd's hand-off inside a migration's pause)."""
    return _handshakes


_contexts: dict[Credentials, ReloadingClientContext] = {}
_contexts_lock = threading.Lock()


def client_context_for(creds: Credentials) -> ReloadingClientContext:
    """One context per set of credentials in a process (building one reads files and costs a few ms)."""
    files = Credentials(ca=creds.ca, cert=creds.cert, key=creds.key)  # the token plays no part in TLS
    with _contexts_lock:
        context = _contexts.get(files)
        if context is None:
            context = _contexts[files] = ReloadingClientContext(files)
        return context
