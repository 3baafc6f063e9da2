"""QEMU's native TLS on the migration stream, as QMP command sequences for both ends.

Why per migration and not at QEMU start: QEMU reads a ``tls-creds-x509`` directory when the object
is created, so adding the object just before a migration (and deleting it after) picks up a leaf
rotated since the VM started - no VM restart - and a VM started before TLS was configured can
still migrate encrypted.

What each end does (qapi/migration.json, docs/system/tls.rst):

* destination: ``tls-creds-x509`` with ``endpoint=server`` and ``verify-peer`` (the source must
  present a certificate of the region CA), an ``authz-simple`` naming the one source identity
  allowed to send, and ``migrate-set-parameters tls-creds/tls-authz``, before ``migrate-incoming``;
* source: ``tls-creds-x509`` with ``endpoint=client`` and ``verify-peer``, and
  ``migrate-set-parameters tls-creds/tls-hostname``: the destination's certificate must name
  ``tls-hostname`` (its host name) in its SAN, whatever address the migration URI dials.

The identity ``authz-simple`` compares is the peer certificate's subject as QEMU gets it from
GnuTLS (``gnutls_x509_crt_get_dn``): in the certificate's own order, *not* RFC 4514's reversed
one, e.g. ``O=r1,OU=qemu,CN=host-a`` for the ``qemu`` leaf of ``host-a`` in region ``r1``
(:func:`authz_identity`; seen in QEMU 7.2's "TLS x509 authz check for O=r1,OU=qemu,CN=host-c is
denied"). A source whose certificate chains to
the CA but names another host is refused by the destination QEMU ("TLS x509 authz check for ... is
denied"); the source's migration fails and its VM keeps running.

Every function takes hostd's QMP seam: an async ``execute(command, arguments)`` that raises
:class:`~livemig.errors.QemuError` when QEMU answers with an error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from livemig.errors import QemuError
from livemig.security.pki import QEMU_FILES, Identity

Execute = Callable[[str, dict[str, Any] | None], Awaitable[Any]]

CREDS_ID = "livemig-migration-tls"
AUTHZ_ID = "livemig-migration-authz"


def authz_identity(identity: Identity) -> str:
    """The string ``authz-simple`` must hold to let ``identity``'s QEMU send a migration.

    It mirrors the subject ``pki.issue`` writes (O, OU, CN in that order) as GnuTLS prints it.
    """
    return f"O={identity.region},OU={identity.role.value},CN={identity.name}"


def _check_dir(creds_dir: Path, endpoint: str) -> None:
    wanted = [n for n in QEMU_FILES if n == "ca-cert.pem" or n.startswith(endpoint)]
    missing = [n for n in wanted if not (creds_dir / n).is_file()]
    if missing:
        raise QemuError(f"TLS credentials in {creds_dir} lack {', '.join(missing)} (see pki.qemu_tls_dir)")


async def _replace_object(execute: Execute, arguments: dict[str, Any]) -> None:
    """object-add, after deleting a leftover of the same id (a retried step re-reads the files)."""
    await _delete_object(execute, str(arguments["id"]))
    await execute("object-add", arguments)


async def _delete_object(execute: Execute, object_id: str) -> None:
    try:
        await execute("object-del", {"id": object_id})
    except QemuError as exc:
        if "qemu_error_class" not in exc.details:
            raise  # QEMU did not answer (QMP gone): not a missing object
        # QEMU answered with an error: there is no such object, nothing to delete


async def add_tls_creds(execute: Execute, creds_dir: Path, endpoint: str, *, creds_id: str = CREDS_ID) -> None:
    """A ``tls-creds-x509`` object over ``creds_dir`` for ``endpoint`` (``server`` or ``client``), peer verified."""
    if endpoint not in ("server", "client"):
        raise ValueError(f"endpoint must be server or client, not {endpoint!r}")
    _check_dir(creds_dir, endpoint)
    await _replace_object(
        execute,
        {
            "qom-type": "tls-creds-x509",
            "id": creds_id,
            "dir": str(creds_dir),
            "endpoint": endpoint,
            "verify-peer": True,
        },
    )


async def prepare_destination(
    execute: Execute,
    creds_dir: Path,
    *,
    source: Identity | str,
    creds_id: str = CREDS_ID,
    authz_id: str = AUTHZ_ID,
) -> None:
    """Before ``migrate-incoming``: accept a TLS migration only from ``source``'s certificate."""
    identity = authz_identity(source) if isinstance(source, Identity) else source
    await add_tls_creds(execute, creds_dir, "server", creds_id=creds_id)
    await _replace_object(execute, {"qom-type": "authz-simple", "id": authz_id, "identity": identity})
    await execute("migrate-set-parameters", {"tls-creds": creds_id, "tls-authz": authz_id})


async def prepare_source(
    execute: Execute, creds_dir: Path, *, destination_hostname: str, creds_id: str = CREDS_ID
) -> None:
    """Before ``migrate``: encrypt, present this host's certificate, check the destination's name."""
    await add_tls_creds(execute, creds_dir, "client", creds_id=creds_id)
    await execute("migrate-set-parameters", {"tls-creds": creds_id, "tls-hostname": destination_hostname})


async def clear(execute: Execute, *, creds_id: str = CREDS_ID, authz_id: str = AUTHZ_ID) -> None:
    """After a migration (either end, any outcome): plain parameters again, objects deleted."""
    await execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": "", "tls-authz": ""})
    await _delete_object(execute, authz_id)
    await _delete_object(execute, creds_id)
