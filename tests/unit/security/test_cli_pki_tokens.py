"""``livemig pki`` and ``livemig token --db`` as an operator runs them (the API path of ``token`` runs
against a real region in tests/e2e/test_security.py)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from livemig.cli.main import app
from livemig.control import tokens
from livemig.control.store import Store
from livemig.errors import Conflict, InvalidRequest
from livemig.security import pki

runner = CliRunner()


def test_pki_init_issue_rotate_list_verify(tmp_path: Path) -> None:
    where = ["--dir", str(tmp_path / "pki")]
    assert runner.invoke(app, ["pki", "init", "--region", "dc1", *where]).exit_code == 0
    issued = runner.invoke(app, ["pki", "issue", "a", "--role", "qemu", "--san", "10.1.0.11", "--qemu-dir",
                                 str(tmp_path / "qemu-a"), *where])  # fmt: skip
    assert issued.exit_code == 0, issued.output
    assert "livemig://dc1/qemu/a" in issued.output and (tmp_path / "qemu-a" / "server-key.pem").exists()
    cert = tmp_path / "pki" / "qemu" / "a" / "cert.pem"
    before = pki.load_cert(cert).serial_number
    assert runner.invoke(app, ["pki", "rotate", "a", "--role", "qemu", *where]).exit_code == 0
    assert pki.load_cert(cert).serial_number != before
    assert pki.sans_of(pki.load_cert(cert)) == ["a", "10.1.0.11"], "a rotation keeps the names"
    listed = json.loads(runner.invoke(app, ["pki", "list", "--json", *where]).output)
    assert [(r["identity"], r["names"], r["expired"]) for r in listed] == [("livemig://dc1/qemu/a",
                                                                            ["a", "10.1.0.11"], False)]  # fmt: skip
    verified = runner.invoke(app, ["pki", "verify", str(cert), *where])
    assert verified.exit_code == 0 and "valid, livemig://dc1/qemu/a" in verified.output
    bad = runner.invoke(app, ["pki", "issue", "Not_A_Name", "--role", "qemu", *where])
    # a LivemigError: main() prints its one line (no traceback)
    assert isinstance(bad.exception, InvalidRequest) and "bad name 'Not_A_Name'" in bad.exception.message
    again = runner.invoke(app, ["pki", "init", "--region", "dc1", *where])
    assert isinstance(again.exception, Conflict), "never replaces a CA"


def test_the_first_admin_token_from_the_store(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'lmo.db'}"
    made = runner.invoke(app, ["token", "create", "alice", "--role", "admin", "--db", db, "--json"])
    assert made.exit_code == 0, made.output
    token = json.loads(made.output)
    user = tokens.checker(Store(db))(token["token"])
    assert user is not None and (user.name, user.role.value) == ("alice", "admin")
    listed = runner.invoke(app, ["token", "list", "--db", db, "--json"])
    assert token["token"] not in listed.output and '"name": "alice"' in listed.output
    assert runner.invoke(app, ["token", "revoke", token["id"], "--db", db]).exit_code == 0
    assert tokens.checker(Store(db))(token["token"]) is None
    refused = runner.invoke(app, ["token", "create", "bob", "--role", "root", "--db", db])
    assert isinstance(refused.exception, InvalidRequest) and "unknown role 'root'" in refused.exception.message
