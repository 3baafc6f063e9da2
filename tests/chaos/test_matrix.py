"""The chaos matrix (``livemig.chaos``) against a real region with a real guest: every scenario's
outcome is the expected one and every invariant held throughout.

CI (``make test``) runs the representative subset (``Scenario.ci``); ``make chaos`` runs them all
(the rest are marked ``chaos_full``, which ``pyproject.toml`` leaves out by default). The region is
the one ``livemig chaos --own-region`` makes: as root, namespace hosts (for the partition of the
migration link) and blockd on a 256 MiB tmpfs (for the full disk); with a PostgreSQL
(``make test`` starts one as root), the LMO's store is on it (for the PostgreSQL restart).

The last test is the checker's own proof: with fencing switched off in blockd (a deliberately
broken build), the stale-write scenario must be caught.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig.chaos.environment import ChaosEnv
from livemig.chaos.runner import ChaosRunner
from livemig.chaos.scenarios import Scenario, matrix
from livemig.storage.fencing import UNSAFE_ENV

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def chaos_db() -> Iterator[str | None]:
    """A fresh PostgreSQL database for the module's LMO, when the run has a PostgreSQL."""
    admin = os.environ.get("LIVEMIG_TEST_POSTGRES_URL")
    if not admin:
        yield None
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    name = f"livemig_chaos_{uuid.uuid4().hex[:8]}"
    # no pooled connection: the PostgreSQL scenario restarts the server, which ends every open one
    engine = create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with engine.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield admin.rsplit("/", 1)[0] + "/" + name
    finally:
        with engine.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        engine.dispose()


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory, guest_image: object, chaos_db: str | None) -> Iterator[ChaosRunner]:
    from livemig.cli.chaos import own_region

    work = tmp_path_factory.mktemp("chaos")
    region = own_region(work / "region", chaos_db, print)
    env = ChaosEnv(region, say=print)
    try:
        env.setup()
        yield ChaosRunner(env, work)
    finally:
        try:
            env.teardown()
        finally:
            region.down()


def params() -> list[object]:
    return [pytest.param(s, id=s.name, marks=() if s.ci else (pytest.mark.chaos_full,)) for s in matrix()]


@pytest.mark.parametrize("scenario", params())
def test_scenario(chaos: ChaosRunner, scenario: Scenario) -> None:
    missing = [why for need in sorted(scenario.needs) if (why := chaos.env.missing(need))]
    if missing:
        pytest.skip(missing[0])
    result = chaos.run(scenario)
    print(f"{result.scenario}: {result.actual} in {result.seconds:.0f} s; {result.detail}")
    assert result.invariants_held, "\n".join(result.violations)
    assert result.actual == result.expected, f"{result.detail}\nwhy expected: {scenario.why}"


def test_the_checker_catches_a_build_without_fencing(chaos: ChaosRunner, tmp_path: Path) -> None:
    """blockd restarted with fencing off: the source's late write lands, and the checker says so."""
    env = chaos.env
    if env.missing("volume"):
        pytest.skip(str(env.missing("volume")))
    scenario = next(s for s in matrix() if s.name == "precopy/stale-write/blockd")
    env.restart_blockd(env={UNSAFE_ENV: "1"})
    try:
        result = chaos.run(scenario)
    finally:
        env.restart_blockd()
        env.vm_ok = False  # its volume took a stale write: the next scenario starts from a fresh one
    print(f"without fencing: {result.actual}; violations: {result.violations}")
    assert not result.invariants_held
    assert any("stale write from the source was applied" in v for v in result.violations), result.violations
