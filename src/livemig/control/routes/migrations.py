"""Migrations: the pre-flight report, creating one (validated synchronously, then driven by the
controller), listing, observing and cancelling them.

Creating one hands its store calls (the pre-flight's read, the insert) to a worker thread: made
on the event loop, their round trips to PostgreSQL held every other request of this replica (a
host's answer, another user's create). The reads of one row or one page stay on the loop: a
thread's hop and its turns at the GIL cost them more than the round trip they would free
(``docs/fleet.md`` has both measured)."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Query, Request

from livemig.control.controller import CANCELLABLE
from livemig.control.preflight import preflight
from livemig.control.services import ServicesDep
from livemig.errors import Conflict
from livemig.model.migration import TERMINAL_PHASES, Migration, Phase
from livemig.security.access import caller_of
from livemig.wire.lmo import MigrationRequest, PreflightReport

router = APIRouter()


@router.post("/migrations/preflight")
async def dry_run(body: MigrationRequest, services: ServicesDep) -> PreflightReport:
    return await preflight(services, body)


@router.post("/migrations", status_code=201)
async def create_migration(body: MigrationRequest, services: ServicesDep, request: Request) -> Migration:
    report = await preflight(services, body)
    report.raise_first_failure()
    source = report.source
    params = body.params.model_copy(update={"policies": report.policies})  # what QEMU will be told
    migration = Migration(id=f"m-{uuid.uuid4().hex[:10]}", vm=body.vm, source=source,
                          destination=body.destination, params=params,
                          verify_guest=body.verify_guest)  # fmt: skip
    caller = caller_of(request)
    by = f" by {caller}" if caller is not None else ""
    policies = params.resolved_policies()
    migration.transition(Phase.PENDING, f"requested{by}: {body.vm} {source} -> {body.destination}; "
                                        f"{policies.describe()}",
                         policies=policies.model_dump(mode="json"))  # fmt: skip
    await asyncio.to_thread(services.store.add_migration, migration)
    return migration


@router.get("/migrations")
async def list_migrations(services: ServicesDep, vm: str | None = None, active: bool = False,
                          limit: int | None = Query(default=None, ge=1, le=100_000)) -> list[Migration]:  # fmt: skip
    """Migrations, oldest first (only active ones, one VM's; at most ``limit``)."""
    return services.store.migrations(active_only=active, vm=vm, limit=limit)


@router.get("/migrations/counts")
async def migration_counts(services: ServicesDep) -> dict[str, int]:
    """How many migrations are in each phase, and how many are active and finished in all."""
    by_phase = services.store.counts()
    finished = sum(n for phase, n in by_phase.items() if Phase(phase) in TERMINAL_PHASES)
    return {**by_phase, "active": sum(by_phase.values()) - finished, "finished": finished}


@router.get("/migrations/{migration_id}")
async def get_migration(migration_id: str, services: ServicesDep) -> Migration:
    return services.store.migration(migration_id)


@router.post("/migrations/{migration_id}/cancel", status_code=202)
async def cancel_migration(migration_id: str, services: ServicesDep) -> Migration:
    store = services.store
    migration = store.migration(migration_id)
    if migration.terminal:
        raise Conflict(f"migration {migration_id} already ended ({migration.phase.value})")
    if migration.phase not in CANCELLABLE:
        raise Conflict(f"migration {migration_id} is past the point of no return ({migration.phase.value})")
    store.request_cancel(migration_id)
    return store.migration(migration_id)
