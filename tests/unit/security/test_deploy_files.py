"""deploy/ stays true: every example config file loads into its command (no unknown setting), and
every unit starts the command its config file is written for."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from livemig.cli.config import load_into_defaults, read_client_config
from livemig.cli.main import app

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
COMMANDS = ("lmo", "hostd", "vswitch", "blockd")


@pytest.mark.parametrize("command", COMMANDS)
def test_each_example_config_loads_into_its_command(command: str) -> None:
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    ctx = cmd.make_context(command, ["--help"], resilient_parsing=True)
    load_into_defaults(ctx, None, DEPLOY / "etc" / f"{command}.toml")
    assert ctx.default_map and {"tls_cert", "tls_key", "tls_ca", "log_format"} <= set(ctx.default_map)
    unit = (DEPLOY / "systemd" / f"livemig-{command}.service").read_text()
    assert f"livemig {command} --config /etc/livemig/{command}.toml" in unit


def test_the_hostd_unit_never_kills_a_vm_and_the_client_file_reads() -> None:
    assert "KillMode=process" in (DEPLOY / "systemd" / "livemig-hostd.service").read_text()
    config = read_client_config(DEPLOY / "etc" / "client.toml")
    assert config.url == "https://10.0.0.1:7700" and config.token == "lmt_..."
