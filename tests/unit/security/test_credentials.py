"""The client factory's credentials (wire.base) and the config files services and the CLI start from."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from livemig.cli.config import read_client_config, write_client_config, write_toml
from livemig.cli.main import app
from livemig.errors import CredentialError
from livemig.security.pki import Role
from livemig.testing.callers import TestPki
from livemig.wire import base
from livemig.wire.base import Credentials, credentials_for, remember, sync_http

runner = CliRunner()


def test_credentials_are_found_by_the_service_address_else_the_process_default(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    leaf = pki.leaf(Role.LMO, "lmo")
    service = Credentials(ca=leaf.ca, cert=leaf.cert, key=leaf.key)
    user = Credentials(ca=leaf.ca, token="lmt_x")
    remember("https://127.0.0.1:7001/", service)
    remember("https://127.0.0.1:7000", user)
    assert credentials_for("https://127.0.0.1:7001/vms/x?since=3") == service
    assert credentials_for("HTTPS://127.0.0.1:7000") == user
    assert credentials_for("https://127.0.0.1:7002") == base.credentials()
    with sync_http(5, base_url="https://127.0.0.1:7000") as client:
        assert client.headers["authorization"] == "Bearer lmt_x"
    with sync_http(5, base_url="https://127.0.0.1:7001") as client:
        assert "authorization" not in client.headers
    with pytest.raises(CredentialError, match="needs its key"):
        Credentials(cert=leaf.cert)
    with pytest.raises(CredentialError, match="missing"):
        sync_http(5, credentials=Credentials(ca=tmp_path / "nope.pem"))


def test_the_users_config_file_and_the_environment_on_top(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_client_config(tmp_path / "client.toml", "https://10.0.0.5:7700", tmp_path / "ca.pem", "lmt_a")
    assert oct(path.stat().st_mode)[-3:] == "600"
    config = read_client_config(path)
    assert (config.url, config.ca, config.token, config.insecure) == ("https://10.0.0.5:7700", tmp_path / "ca.pem",
                                                                      "lmt_a", False)  # fmt: skip
    monkeypatch.setenv("LIVEMIG_TOKEN", "lmt_b")
    monkeypatch.setenv("LIVEMIG_URL", "http://127.0.0.1:9")
    config = read_client_config(path)
    assert config.token == "lmt_b" and config.insecure
    assert read_client_config(tmp_path / "absent.toml").token == "lmt_b"


def test_a_service_refuses_to_start_without_tls_unless_told_insecure(tmp_path: Path) -> None:
    refused = runner.invoke(app, ["vswitch", "--name", "a"])
    assert refused.exit_code == 1
    assert "serves mutual TLS: give --tls-cert, --tls-key and --tls-ca" in refused.output
    pki = TestPki(tmp_path / "pki")
    wrong = pki.leaf(Role.HOSTD, "a")
    config = write_toml(tmp_path / "vswitch.toml", {"name": "a", "tls_cert": str(wrong.cert),
                                                   "tls_key": str(wrong.key), "tls_ca": str(wrong.ca)})  # fmt: skip
    refused = runner.invoke(app, ["vswitch", "--config", str(config)])
    assert refused.exit_code == 1 and "certificate of role hostd; vswitch a needs role vswitch" in refused.output
    mine = pki.leaf(Role.VSWITCH, "b")
    refused = runner.invoke(app, ["vswitch", "--config", str(config), "--name", "a", "--tls-cert", str(mine.cert),
                                  "--tls-key", str(mine.key)])  # fmt: skip
    assert refused.exit_code == 1 and "names 'b', not this vswitch's host 'a'" in refused.output  # flags win
    typo = write_toml(tmp_path / "typo.toml", {"nmae": "a"})
    refused = runner.invoke(app, ["hostd", "--config", str(typo)])
    assert refused.exit_code == 2 and "unknown setting 'nmae'" in refused.output
    both = runner.invoke(app, ["blockd", "--insecure", "--tls-cert", str(mine.cert), "--tls-key", str(mine.key)])
    assert both.exit_code == 1 and "contradict" in both.output


def test_a_flag_and_a_config_setting_name_the_same_thing(tmp_path: Path) -> None:
    """``lmo = "..."`` in a hostd's file is its ``--lmo`` flag (the parameter is called lmo_url)."""
    config = write_toml(tmp_path / "hostd.toml", {"name": "a", "lmo": "https://lmo:7700", "insecure": True,
                                                  "migration_bandwidth": 0})  # fmt: skip
    result = runner.invoke(app, ["hostd", "--config", str(config)])
    assert result.exit_code == 1 and "--migration-bandwidth and --memory-mib must be positive" in result.output
