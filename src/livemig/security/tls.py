"""Mutual TLS for livemig's services: contexts, certificate reload, and the caller's role in FastAPI.

Three pieces, each a seam the services and the client factory plug into:

* :func:`server_context` / :func:`client_context`: ``ssl.SSLContext`` objects that trust only the
  region CA, speak TLS 1.2 or 1.3, and (on servers) require a client certificate. A caller with no
  certificate, an expired one, or one of another CA fails the handshake: no request is ever read,
  so no handler runs.
* :class:`ReloadingServerContext`: the context a listening socket keeps for its whole life. At each
  handshake it checks (one ``stat`` per file) whether its certificate or key was replaced on disk
  and, if so, serves the new pair from that handshake on, so ``livemig pki rotate`` needs no
  restart. The hook is the SNI callback, which OpenSSL runs on every ClientHello (with or without a
  server name) before the server's certificate is chosen; swapping ``SSLObject.context`` there is
  the documented way to serve another certificate.
* The caller's identity in an ASGI app: uvicorn does not (yet) put the peer certificate in the
  request scope (the ASGI TLS extension is unimplemented there). :class:`MutualTlsH11Protocol` is
  uvicorn's h11 protocol plus one step: when a TLS connection is made (the handshake is complete by
  then) it reads the peer certificate once and adds ``scope["extensions"]["tls"]`` to every
  request of that connection, in the ASGI TLS extension's shape plus the parsed livemig
  :class:`~livemig.security.pki.Identity`. :func:`require_role` is a FastAPI dependency that reads
  it and answers 403 for a valid certificate of the wrong role. When uvicorn implements the
  extension itself, only the protocol class goes.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from livemig.errors import CredentialError, Forbidden, Unauthenticated
from livemig.security.pki import Identity, LeafFiles, Role, identity_of_der

log = logging.getLogger(__name__)

#: Key of the ASGI TLS extension in ``scope["extensions"]``.
TLS_EXTENSION = "tls"
#: Our addition to that extension: the caller's parsed :class:`Identity` (None if it carries none).
IDENTITY_KEY = "livemig_identity"
#: ``app.state`` flag a lab sets to serve plain HTTP (``--insecure``): then no identity is required.
INSECURE_STATE = "livemig_insecure"

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --- contexts -------------------------------------------------------------------------------------


def _base(protocol: int, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_verify_locations(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        raise CredentialError(f"TLS credentials missing: {exc.filename}") from None
    except ssl.SSLError as exc:
        raise CredentialError(f"TLS credentials {cert} / {key} / {ca} are unusable: {exc.reason or exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_context(leaf: LeafFiles) -> ssl.SSLContext:
    """A server that trusts only the region CA and requires every client to present a certificate."""
    return _base(ssl.PROTOCOL_TLS_SERVER, leaf.cert, leaf.key, leaf.ca)


def client_context(leaf: LeafFiles, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client that presents ``leaf`` and accepts only servers of the region CA (host name checked)."""
    context = _base(ssl.PROTOCOL_TLS_CLIENT, leaf.cert, leaf.key, leaf.ca)
    context.check_hostname = check_hostname
    return context


def _signature(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...]:
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


class ReloadingServerContext:
    """A server context whose certificate follows its files: a rotated leaf is served without a restart.

    ``context`` is what the listener is given; each handshake compares the files' signature with
    the one loaded and, when it differs, builds a fresh context from the files. A pair that does
    not load (a key that does not match the certificate, half-way through someone's manual copy)
    is logged and the previous pair stays in service until the files are consistent again.
    """

    def __init__(self, leaf: LeafFiles) -> None:
        self.leaf = leaf
        self._paths = (leaf.cert, leaf.key, leaf.ca)
        self._loaded = _signature(self._paths)
        self.context = server_context(leaf)
        self._current = self.context
        self._failed: tuple[tuple[int, int, int], ...] | None = None
        self.reloads = 0
        self.context.sni_callback = self._on_client_hello

    def _refresh(self) -> ssl.SSLContext:
        signature = _signature(self._paths)
        if signature == self._loaded or signature == self._failed:
            return self._current
        try:
            fresh = server_context(self.leaf)
        except CredentialError as exc:
            self._failed = signature
            log.warning("TLS: %s changed but does not load, still serving the previous certificate: %s",
                        self.leaf.cert, exc.message)  # fmt: skip
            return self._current
        self._current, self._loaded, self._failed = fresh, signature, None
        self.reloads += 1
        log.info("TLS: reloaded %s (rotation %d)", self.leaf.cert, self.reloads)
        return fresh

    def _on_client_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        current = self._refresh()
        if current is not self.context:
            connection.context = current


# --- the caller's identity in ASGI ------------------------------------------------------------------


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI TLS extension (version 0.2) for one connection, plus the parsed livemig identity."""
    der = ssl_object.getpeercert(binary_form=True)
    identity: Identity | None = None
    name: str | None = None
    chain: list[str] = []
    if der:
        chain = [ssl.DER_cert_to_PEM_cert(der)]
        try:
            identity = identity_of_der(der)
            name = identity.distinguished_name
        except CredentialError as exc:
            log.warning("TLS peer certificate carries no usable livemig identity: %s", exc.message)
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
        IDENTITY_KEY: identity,
    }


class _WithTls:
    """Adds one connection's TLS extension to each request scope before the app sees it."""

    def __init__(self, app: AsgiApp, extension: dict[str, Any]) -> None:
        self.app = app
        self.extension = extension

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("extensions", {})[TLS_EXTENSION] = self.extension
        await self.app(scope, receive, send)


class MutualTlsH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that hands the app the peer certificate (``scope["extensions"]["tls"]``)."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _WithTls(self.app, tls_extension(ssl_object))


def uvicorn_tls(context: ssl.SSLContext | ReloadingServerContext) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` that serve mutual TLS with ``context``."""
    ssl_context = context.context if isinstance(context, ReloadingServerContext) else context

    def factory(_config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return ssl_context

    return {"http": MutualTlsH11Protocol, "ssl_context_factory": factory}


def caller_identity(request: Request) -> Identity | None:
    """The identity in the caller's certificate; None on a plain-HTTP connection."""
    extension = request.scope.get("extensions", {}).get(TLS_EXTENSION)
    if extension is None:
        return None
    identity = extension.get(IDENTITY_KEY)
    if identity is None:
        raise Forbidden("the client certificate carries no livemig identity (livemig://<region>/<role>/<name>)")
    assert isinstance(identity, Identity)
    return identity


def require_role(*roles: Role) -> Callable[[Request], Identity | None]:
    """A FastAPI dependency: the caller's certificate must be of one of ``roles`` (else 403).

    On a plain-HTTP connection it answers 401, unless the app was marked insecure
    (``app.state.livemig_insecure = True``, a lab's explicit ``--insecure``), where it returns None.
    """
    allowed = frozenset(roles)
    wanted = ", ".join(sorted(r.value for r in allowed))

    def dependency(request: Request) -> Identity | None:
        identity = caller_identity(request)
        if identity is None:
            if getattr(request.app.state, INSECURE_STATE, False):
                return None
            raise Unauthenticated("this API requires mutual TLS with a certificate of the region")
        if identity.role not in allowed:
            raise Forbidden(
                f"{identity.role.value} {identity.name!r} may not call this: it takes a certificate of role {wanted}",
                caller=identity.uri,
            )
        return identity

    return dependency


def roles_allowed(*roles: Role) -> Callable[[bytes], str | None]:
    """A peer check for non-HTTP servers (blockd's NBD): None admits a certificate of ``roles``, else why not."""
    allowed = frozenset(roles)
    wanted = ", ".join(sorted(r.value for r in allowed))

    def check(der: bytes) -> str | None:
        try:
            identity = identity_of_der(der)
        except CredentialError as exc:
            return exc.message
        if identity.role not in allowed:
            return f"certificate of {identity.uri} may not use this service (role {wanted} required)"
        return None

    return check
