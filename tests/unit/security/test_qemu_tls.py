"""The QMP sequences of migration TLS against a recording fake ``execute`` (the real QEMU run is in
tests/integration/security/test_migration_tls.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from livemig.errors import QemuError
from livemig.security import pki, qemu_tls
from livemig.security.pki import Identity, Role
from livemig.security.tls import roles_allowed


class FakeQmp:
    """Records commands; ``object-del`` of an unknown id fails the way QEMU answers it."""

    def __init__(self, *, gone: bool = False) -> None:
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self.objects: set[str] = set()
        self.gone = gone

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.calls.append((command, arguments))
        if self.gone:
            raise QemuError(f"QMP {command} failed: EOFError()", command=command)
        assert arguments is not None
        if command == "object-del":
            if arguments["id"] not in self.objects:
                raise QemuError("no such object", command=command, qemu_error_class="GenericError")
            self.objects.discard(arguments["id"])
        elif command == "object-add":
            assert arguments["id"] not in self.objects, "duplicate id"
            self.objects.add(arguments["id"])
        return {}


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path / "pki", "r1")
    pki.issue(tmp_path / "pki", "host-b", Role.QEMU, ["host-b"])
    return pki.qemu_tls_dir(tmp_path / "pki", "host-b", tmp_path / "tls")


def test_destination_sequence_and_identity(creds: Path) -> None:
    qmp = FakeQmp()
    source = Identity("r1", Role.QEMU, "host-a")
    asyncio.run(qemu_tls.prepare_destination(qmp.execute, creds, source=source))
    added = [a for c, a in qmp.calls if c == "object-add"]
    assert added == [
        {"qom-type": "tls-creds-x509", "id": qemu_tls.CREDS_ID, "dir": str(creds), "endpoint": "server",
         "verify-peer": True},
        {"qom-type": "authz-simple", "id": qemu_tls.AUTHZ_ID, "identity": "O=r1,OU=qemu,CN=host-a"},
    ]  # fmt: skip
    assert qmp.calls[-1] == (
        "migrate-set-parameters",
        {"tls-creds": qemu_tls.CREDS_ID, "tls-authz": qemu_tls.AUTHZ_ID},
    )
    # a retried step replaces the objects (re-reading a rotated directory) instead of failing on duplicates
    asyncio.run(qemu_tls.prepare_destination(qmp.execute, creds, source=source))
    assert qmp.objects == {qemu_tls.CREDS_ID, qemu_tls.AUTHZ_ID}


def test_source_sequence_and_clear(creds: Path) -> None:
    qmp = FakeQmp()
    asyncio.run(qemu_tls.prepare_source(qmp.execute, creds, destination_hostname="host-b"))
    assert ("migrate-set-parameters", {"tls-creds": qemu_tls.CREDS_ID, "tls-hostname": "host-b"}) in qmp.calls
    asyncio.run(qemu_tls.clear(qmp.execute))
    assert ("migrate-set-parameters", {"tls-creds": "", "tls-hostname": "", "tls-authz": ""}) in qmp.calls
    assert qmp.objects == set()


def test_missing_files_are_refused_before_qemu_is_asked(tmp_path: Path) -> None:
    qmp = FakeQmp()
    with pytest.raises(QemuError, match=r"lack ca-cert\.pem, client-cert\.pem, client-key\.pem"):
        asyncio.run(qemu_tls.prepare_source(qmp.execute, tmp_path, destination_hostname="h"))
    assert qmp.calls == []


def test_a_lost_qmp_connection_is_not_mistaken_for_a_missing_object(creds: Path) -> None:
    with pytest.raises(QemuError, match="EOFError"):
        asyncio.run(qemu_tls.prepare_source(FakeQmp(gone=True).execute, creds, destination_hostname="h"))


def test_roles_allowed(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    pki.init_ca(directory, "r1")
    check = roles_allowed(Role.QEMU, Role.HOSTD)
    qemu = pki.load_cert(pki.issue(directory, "h", Role.QEMU, ["h"]).cert)
    lmo = pki.load_cert(pki.issue(directory, "lmo", Role.LMO, ["lmo"]).cert)
    der = serialization.Encoding.DER
    assert check(qemu.public_bytes(der)) is None
    refusal = check(lmo.public_bytes(der))
    assert refusal == "certificate of livemig://r1/lmo/lmo may not use this service (role hostd, qemu required)"
    assert check(b"not a certificate") is not None
