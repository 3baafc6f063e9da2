"""Log lines an operator can follow: the scope filter, the text and JSON formats, the services'
``--log-format`` (flag and config file), and a hostd line logged inside a migration's request."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from livemig import logs
from livemig.cli.main import app
from livemig.faults.model import Scope
from livemig.faults.registry import CURRENT, MIGRATION_HEADER
from livemig.host.api import create_app as hostd_app
from livemig.model import VmSpec
from livemig.testing.callers import LMO, over_tls
from livemig.testing.fakehost import FakeFleet
from livemig.wire.hostd import MigrateRequest, VmLaunch


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, list[logging.Handler]]]:
    """A logger of its own with no handlers (each test adds its own), restored afterwards."""
    logger = logging.getLogger("livemig.test_logs")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    added: list[logging.Handler] = []
    yield logger, io.StringIO(), added
    for handler in added:
        logger.removeHandler(handler)


def _emit(logger: logging.Logger, added: list[logging.Handler], handler: logging.Handler) -> None:
    logger.addHandler(handler)
    added.append(handler)


def test_json_lines_name_the_migration_vm_and_host_only_inside_a_migration(captured) -> None:
    logger, stream, added = captured
    _emit(logger, added, logs.handler("json", host="A", service="hostd", stream=stream))
    logger.info("idle %d", 1)
    token = CURRENT.set(Scope(migration="m-7", vm="web"))
    try:
        logger.warning("pre-copy round %d", 3)
    finally:
        CURRENT.reset(token)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    idle, inside, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert set(idle) == {"time", "level", "logger", "message", "host", "service"}, "unknown fields are left out"
    assert (idle["level"], idle["logger"], idle["message"]) == ("info", "livemig.test_logs", "idle 1")
    assert idle["host"] == "A"
    assert idle["time"].endswith("+00:00") and "T" in idle["time"]
    assert inside["migration"] == "m-7" and inside["vm"] == "web" and inside["message"] == "pre-copy round 3"
    assert inside["level"] == "warning" and inside["service"] == "hostd"
    assert "migration" not in failed, "the scope ended with the step"
    assert "ValueError: boom" in failed["exception"]


def test_text_lines_end_with_the_migration_and_an_explicit_extra_wins(captured) -> None:
    logger, stream, added = captured
    _emit(logger, added, logs.handler("text", stream=stream))
    token = CURRENT.set(Scope(migration="m-8", vm="db"))
    try:
        logger.info("switchover")
        logger.info("about another", extra={"migration": "m-9", "vm": "web"})
    finally:
        CURRENT.reset(token)
    logger.info("nothing in particular")
    scoped, other, plain = stream.getvalue().splitlines()
    assert scoped.endswith(" livemig.test_logs INFO switchover migration=m-8 vm=db")
    assert other.endswith("INFO about another migration=m-9 vm=web")
    assert plain.endswith("INFO nothing in particular"), plain


def test_the_scope_is_added_once_even_through_two_handlers(captured) -> None:
    logger, stream, added = captured
    second = io.StringIO()
    _emit(logger, added, logs.handler("text", stream=stream))
    _emit(logger, added, logs.handler("json", stream=second, host="B"))
    token = CURRENT.set(Scope(migration="m-1"))
    try:
        logger.info("x")
    finally:
        CURRENT.reset(token)
    assert stream.getvalue().rstrip().endswith("INFO x migration=m-1")
    assert json.loads(second.getvalue())["migration"] == "m-1"


def test_a_bad_format_or_level_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="log format must be one of text, json, not 'xml'"):
        logs.formatter("xml")
    with pytest.raises(ValueError, match="log level must be"):
        logs.configure("loud")


@pytest.fixture
def root_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    uvicorn = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
               for name in logs.UVICORN_LOGGERS}  # fmt: skip
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, (kept, propagate) in uvicorn.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = kept
        logger.propagate = propagate


def test_configure_sends_uvicorns_lines_through_the_same_format(root_restored) -> None:
    stray = logging.StreamHandler(io.StringIO())
    logging.getLogger("uvicorn.error").addHandler(stray)  # what uvicorn's own config would have added
    logging.getLogger("uvicorn.error").propagate = False
    stream = io.StringIO()
    logs.configure("info", "json", service="lmo", stream=stream)
    logging.getLogger("uvicorn.error").warning("Uvicorn running on %s", "https://127.0.0.1:7700")
    logging.getLogger("livemig.somewhere").debug("below the level")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["logger"] == "uvicorn.error" and record["service"] == "lmo"
    assert record["message"] == "Uvicorn running on https://127.0.0.1:7700"
    assert stray not in logging.getLogger("uvicorn.error").handlers


def test_every_service_refuses_a_bad_log_format_from_its_flag_or_its_config_file(tmp_path: Path) -> None:
    runner = CliRunner()
    for command in (["lmo"], ["hostd", "--name", "A"], ["blockd"], ["vswitch", "--name", "A"]):
        result = runner.invoke(app, [*command, "--log-format", "yaml"])
        assert result.exit_code == 1, (command, result.output)
        assert "--log-format must be text or json, not 'yaml'" in result.output, result.output
    config = tmp_path / "hostd.toml"
    config.write_text('name = "A"\nlog_format = "xml"\n')
    result = runner.invoke(app, ["hostd", "--config", str(config)])
    assert result.exit_code == 1 and "--log-format must be text or json, not 'xml'" in result.output, result.output


def test_a_hostd_line_logged_in_a_migrations_request_carries_its_id() -> None:
    """The real hostd app: its middleware reads the LMO's header, the request's lines and the
    migration job's (a task the request started, ending after the reply) name the migration."""
    fleet = FakeFleet("A")
    stream = io.StringIO()
    handler = logs.handler("json", host="A", service="hostd", stream=stream)
    host_logger = logging.getLogger("livemig.host")
    level = host_logger.level
    host_logger.addHandler(handler)
    host_logger.setLevel(logging.INFO)
    try:
        with TestClient(over_tls(hostd_app(fleet.hosts["A"].agent), LMO)) as hostd:
            launch = VmLaunch(spec=VmSpec(name="web", memory_mib=256))
            assert hostd.post("/vms", json=launch.model_dump(mode="json")).status_code == 201
            nobody = MigrateRequest(uri="tcp:127.100.0.9:4444")  # no destination listens: the job fails
            reply = hostd.post("/vms/web/migrate", json=nobody.model_dump(mode="json"),
                               headers={MIGRATION_HEADER: "m-42;vm=web"})  # fmt: skip
            assert reply.status_code == 202, reply.text
            deadline = time.monotonic() + 10
            while hostd.get("/vms/web/migration").json()["state"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            metrics = hostd.get("/metrics").text
    finally:
        host_logger.removeHandler(handler)
        host_logger.setLevel(level)
        fleet.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    started = next(line for line in lines if line["message"].startswith("started VM web"))
    assert "migration" not in started, "the VM's creation was no migration's"
    migrating = next(line for line in lines if line["message"].startswith("VM web: migrating to tcp:127.100.0.9:4444"))
    assert (migrating["migration"], migrating["vm"], migrating["host"]) == ("m-42", "web", "A")
    ended = next(line for line in lines if line["message"].startswith("migration of web to tcp:127.100.0.9:4444 ended"))
    assert ended["migration"] == "m-42" and "ended failed" in ended["message"]
    assert "Connection refused" in ended["message"]
    assert 'livemig_host_source_migrations_total{host="A",outcome="failed"} 1.0' in metrics
    assert 'livemig_host_source_migrations_total{host="A",outcome="completed"} 0.0' in metrics
    assert 'livemig_host_qemu_processes{host="A"} 1.0' in metrics and 'livemig_host_vms{host="A"} 1.0' in metrics
