"""The LMO's durable store (SQLAlchemy; SQLite by default, PostgreSQL for HA replicas).

Records are stored as their pydantic JSON next to the columns that queries and accounting need,
so the typed model stays the single definition and no request scans a whole table:

- hosts carry their **inventory**: the memory they offer (reported by hostd when it registers and
  whenever it changes), what their VMs use as hostd last saw it, and what the LMO itself placed
  there (VMs, plus memory reserved by migrations on their way in). ``free_mib`` is kept up to date
  with every change and indexed, so placement is one indexed query and one conditional update, safe
  across replicas: two replicas can never both fill the last room on a host.
- VMs carry their host (indexed), size and last known dirty rate (for the wave planner).
- migrations carry source, destination, the bandwidth share admission reserved, the memory they
  reserve on the destination, their evacuation, and a version that every save increments, so a
  controller re-reads only the documents that changed.

The store is the only writer of desired state; everything it says about hosts is re-observed
before the controller acts.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    Row,
    String,
    Table,
    Text,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, InvalidatePoolError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from livemig.errors import CapacityError, Conflict, NotFound
from livemig.faults.points import sync_point
from livemig.faults.registry import REGISTRY
from livemig.model.host import HostRegistration
from livemig.model.migration import TERMINAL_PHASES, Migration, Phase, utcnow
from livemig.model.vm import NbdExport, VmSpec
from livemig.wire.lmo import LmoPace
from livemig.wire.timing import timed

#: the key of PostgreSQL's advisory lock that serialises admission decisions across replicas
ADMISSION_LOCK = 0x6C6D6F01
#: how many ids one ``IN (...)`` list carries
CHUNK = 500
#: how many migrations one transaction saves at most
SAVE_BATCH = 64


class Base(DeclarativeBase):
    pass


class HostRow(Base):
    __tablename__ = "hosts"
    __table_args__ = (Index("hosts_by_free_memory", "maintenance", "free_mib", "name"),)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    doc: Mapped[str] = mapped_column(Text)  # HostRegistration as JSON
    # set by the LMO (evacuation), never by the host's own registration
    maintenance: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    migration_bandwidth_mib_s: Mapped[int] = mapped_column(Integer, default=1024)
    # the inventory: what the host offers (None: never reported), what its VMs use as it last
    # reported, what the LMO placed or reserved there, and what is free by the larger of the two
    memory_mib: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reported_used_mib: Mapped[int] = mapped_column(Integer, default=0)
    placed_mib: Mapped[int] = mapped_column(Integer, default=0)
    free_mib: Mapped[int | None] = mapped_column(Integer, nullable=True)


class VmRow(Base):
    __tablename__ = "vms"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(64), index=True)
    spec_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    memory_mib: Mapped[int] = mapped_column(Integer, default=0)
    # the guest's last known dirty rate: measured by hostd, or seen in its last migration
    dirty_rate_mib_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    dirty_rate_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    dirty_rate_source: Mapped[str | None] = mapped_column(String(32), nullable=True)


class MigrationRow(Base):
    __tablename__ = "migrations"
    # at most one active migration per VM, enforced by the database itself (safe across replicas)
    __table_args__ = (
        Index("one_active_migration_per_vm", "vm", unique=True,
              sqlite_where=text("active"), postgresql_where=text("active")),
    )  # fmt: skip
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    vm: Mapped[str] = mapped_column(String(64), index=True)
    phase: Mapped[str] = mapped_column(String(32), index=True)
    active: Mapped[bool] = mapped_column(Boolean, index=True)
    doc: Mapped[str] = mapped_column(Text)
    # written only by the API, read by the controller: never overwritten by a controller save
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # which LMO replica drives this migration: its lease is the replica's (ReplicaRow.alive_until)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    # no longer read (leases were per migration, renewed every pass); kept because stores written
    # before have it NOT NULL
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    source: Mapped[str] = mapped_column(String(64), default="")
    destination: Mapped[str] = mapped_column(String(64), default="")
    # the bandwidth share admission reserved (None: not admitted), and the destination memory held
    reserved_mib_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    memory_mib: Mapped[int] = mapped_column(Integer, default=0)
    evacuation: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    version: Mapped[int] = mapped_column(Integer, default=0)


class AttachmentRow(Base):
    """A blockd attachment the LMO made for a VM on a host (one per volume device per host)."""

    __tablename__ = "attachments"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    vm: Mapped[str] = mapped_column(String(64), index=True)
    host: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(64))
    export_json: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class TransferRow(Base):
    """A short-lived attachment through which a client copies an image into or out of a volume.

    It expires unless renewed, so a client that dies mid-copy leaves nothing attached for long."""

    __tablename__ = "transfers"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    volume: Mapped[str] = mapped_column(String(128), index=True)
    doc: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[float] = mapped_column(Float)


class NetObjectRow(Base):
    """VCN objects (vcns, subnets, vnics, security-lists) as JSON, keyed by kind and id."""

    __tablename__ = "netobjects"
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    doc: Mapped[str] = mapped_column(Text)


class EvacuationRow(Base):
    __tablename__ = "evacuations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    doc: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReplicaRow(Base):
    """An LMO replica's heartbeat, which is also the lease on every migration it drives: live
    replicas share the active migrations, and those of a replica whose lease ran out are free.

    One row per replica renewed each pass, not one per migration: renewing a thousand leases
    every pass cost PostgreSQL a thousand row versions and the claim 60 ms at p50 (7 ms now)."""

    __tablename__ = "replicas"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    seen_at: Mapped[float] = mapped_column(Float)
    alive_until: Mapped[float] = mapped_column(Float, default=0.0)
    # the most migrations it drives at once: the wave planner's pace of the LMO itself
    capacity: Mapped[int] = mapped_column(Integer, default=0)
    # the pace it measured while it had more to step than its passes took (``Controller.pace``):
    # migrations ended per second, how many it held meanwhile, when (kept after its lease ends)
    pace_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    pace_held: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pace_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class TokenRow(Base):
    """A user's bearer token: only its SHA-256 is kept (the token is shown once, when created)."""

    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class HostCapacity:
    """A host's inventory as the LMO keeps it."""

    name: str
    memory_mib: int | None
    placed_mib: int
    reported_used_mib: int
    free_mib: int | None
    maintenance: bool


@dataclass(frozen=True)
class MoveFacts:
    """What the store knows of a VM about to move, read together (a migration's pre-flight)."""

    spec: VmSpec
    source: str
    source_host: HostRegistration
    destination_host: HostRegistration
    destination_capacity: HostCapacity
    active: list[Migration]  # the VM's active migrations (at most one)


@dataclass(frozen=True)
class VmFacts:
    """What the wave planner needs of a VM, without parsing its spec."""

    name: str
    host: str
    memory_mib: int
    dirty_rate_mib_s: float | None
    dirty_rate_at: datetime | None
    dirty_rate_source: str | None


@dataclass(frozen=True)
class DirtyRate:
    """A VM's dirty rate as last seen, for the wave planner."""

    vm: str
    mib_s: float
    at: datetime
    source: str


@dataclass(frozen=True)
class Reservation:
    """An admitted migration's hold on its hosts' migration bandwidth."""

    id: str
    source: str
    destination: str
    reserved_mib_s: int


@dataclass(frozen=True)
class Claim:
    """A migration this replica holds the lease on, with its version and cancel flag."""

    id: str
    version: int
    cancel_requested: bool


def _chunks(items: Sequence[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), CHUNK):
        yield list(items[start : start + CHUNK])


# The tables, and the statements the hot paths run, built once: a statement built per call costs
# more than SQLite takes to run it. Parameters are bound by name at execution.
H = cast(Table, HostRow.__table__)
V = cast(Table, VmRow.__table__)
M = cast(Table, MigrationRow.__table__)
A = cast(Table, AttachmentRow.__table__)
N = cast(Table, NetObjectRow.__table__)
E = cast(Table, EvacuationRow.__table__)
R = cast(Table, ReplicaRow.__table__)
T = cast(Table, TokenRow.__table__)
TR = cast(Table, TransferRow.__table__)


def _placed(delta: ColumnElement[int]) -> dict[str, ColumnElement[int]]:
    """Column updates that move ``placed_mib`` by ``delta`` and keep ``free_mib`` in step."""
    placed = H.c.placed_mib + delta
    used = case((placed > H.c.reported_used_mib, placed), else_=H.c.reported_used_mib)
    return {"placed_mib": placed, "free_mib": H.c.memory_mib - used}


_DELTA = bindparam("delta", type_=Integer)
_HAS_ROOM = or_(H.c.memory_mib.is_(None), H.c.free_mib >= _DELTA)
GET_HOST = select(H).where(H.c.name == bindparam("name"))
HOSTS_NAMED = select(H).where(H.c.name.in_(bindparam("names", expanding=True)))
MOVE_PLACED = update(H).where(H.c.name == bindparam("host")).values(**_placed(_DELTA))
CLAIM_ROOM = update(H).where(H.c.name == bindparam("host"), _HAS_ROOM).values(**_placed(_DELTA))
BEST_HOST = (
    select(H.c.name)
    .where(H.c.maintenance.is_(False), H.c.free_mib >= bindparam("memory", type_=Integer),
           H.c.name.not_in(bindparam("exclude", expanding=True)))
    .order_by(H.c.free_mib.desc(), H.c.name.desc())
    .limit(1)
)  # fmt: skip
# a claim of room that returns the host's row (its registration, for the call to it that follows):
# on the host named, or on the most free one (chosen inside the update: one round trip, not two)
CLAIM_NAMED = (update(H).where(H.c.name == bindparam("host"), H.c.maintenance.is_(False), _HAS_ROOM)
               .values(**_placed(_DELTA)).returning(*H.c))  # fmt: skip
CLAIM_BEST = (update(H).where(H.c.name == BEST_HOST.scalar_subquery(), _HAS_ROOM)
              .values(**_placed(_DELTA)).returning(*H.c))  # fmt: skip
GET_VM = select(V.c.spec_json, V.c.host, V.c.memory_mib).where(V.c.name == bindparam("name"))


def _claim_and_record(claim: Any) -> Select[Any]:
    """``claim`` and the new VM's row in one statement (PostgreSQL: a data-modifying CTE), so
    placing a VM is a single round trip; the claimed host's row is what it returns. Nothing is
    inserted when the claim is refused, and a taken name fails the whole statement."""
    claimed = claim.cte("claimed")
    row = select(bindparam("vm", type_=String), claimed.c.name, bindparam("spec_json", type_=Text), _DELTA,
                 bindparam("created_at", type_=DateTime(timezone=True))).select_from(claimed)  # fmt: skip
    record = insert(V).from_select(["name", "host", "spec_json", "memory_mib", "created_at"], row)
    return select(claimed).add_cte(record.cte("recorded"))


PLACE_NAMED = _claim_and_record(CLAIM_NAMED)
PLACE_BEST = _claim_and_record(CLAIM_BEST)
SET_SPEC = update(V).where(V.c.name == bindparam("b_name")).values(spec_json=bindparam("b_spec", type_=Text))


def _upsert_host(upsert: Any) -> Any:
    """A host's registration as one statement: an insert that, meeting the host's row, updates
    it from that row's own columns (capacity the host leaves out stays as known; the free memory
    is what it offers less the larger of what the LMO placed and what the host uses)."""
    memory, used = bindparam("b_memory", type_=Integer), bindparam("b_used", type_=Integer)
    reported = func.coalesce(used, 0)
    statement = upsert(H).values(name=bindparam("b_name", type_=String), doc=bindparam("b_doc", type_=Text),
                                 migration_bandwidth_mib_s=bindparam("b_bandwidth", type_=Integer), maintenance=False,
                                 placed_mib=0, registered_at=bindparam("b_at", type_=DateTime(timezone=True)),
                                 memory_mib=memory, reported_used_mib=reported, free_mib=memory - reported)  # fmt: skip
    known_memory, known_used = func.coalesce(memory, H.c.memory_mib), func.coalesce(used, H.c.reported_used_mib)
    return statement.on_conflict_do_update(index_elements=[H.c.name], set_={
        "doc": statement.excluded.doc,
        "migration_bandwidth_mib_s": statement.excluded.migration_bandwidth_mib_s,
        "memory_mib": known_memory,
        "reported_used_mib": known_used,
        "free_mib": known_memory - case((H.c.placed_mib > known_used, H.c.placed_mib), else_=known_used),
    })  # fmt: skip


UPSERT_HOST_POSTGRESQL = _upsert_host(postgresql_insert)
UPSERT_HOST_SQLITE = _upsert_host(sqlite_insert)
VMS_NAMED = select(V.c.name, V.c.spec_json, V.c.host).where(V.c.name.in_(bindparam("names", expanding=True)))
VM_FACTS = select(V.c.name, V.c.host, V.c.memory_mib, V.c.dirty_rate_mib_s, V.c.dirty_rate_at,
                  V.c.dirty_rate_source).where(V.c.host.in_(bindparam("hosts", expanding=True)))  # fmt: skip
GET_MIGRATION = select(M.c.doc, M.c.cancel_requested).where(M.c.id == bindparam("id"))
MIGRATIONS_NAMED = select(M.c.id, M.c.version, M.c.doc, M.c.cancel_requested).where(
    M.c.id.in_(bindparam("ids", expanding=True))
)
_SAVED = {"phase": bindparam("b_phase"), "doc": bindparam("b_doc"), "active": bindparam("b_active"),
          "reserved_mib_s": bindparam("b_reserved", type_=Integer), "version": M.c.version + 1}  # fmt: skip
SAVE = update(M).where(M.c.id == bindparam("b_id")).values(**_SAVED).returning(M.c.version)
SAVE_OWNED = (update(M).where(M.c.id == bindparam("b_id"), M.c.owner == bindparam("b_owner"))
              .values(**_SAVED).returning(M.c.version))  # fmt: skip
RECORD_DIRTY_RATE = (
    update(V)
    .where(V.c.name == bindparam("b_vm"), or_(V.c.dirty_rate_at.is_(None), V.c.dirty_rate_at <= bindparam("b_at")))
    .values(dirty_rate_mib_s=bindparam("b_rate"), dirty_rate_at=bindparam("b_at"),
            dirty_rate_source=bindparam("b_source"))
)  # fmt: skip
#: SAVE_OWNED without RETURNING, for executemany (a lost lease shows in OWNED_VERSIONS instead)
SAVE_OWNED_MANY = update(M).where(M.c.id == bindparam("b_id"), M.c.owner == bindparam("b_owner")).values(**_SAVED)
OWNED_VERSIONS = select(M.c.id, M.c.version).where(
    M.c.id.in_(bindparam("ids", expanding=True)), M.c.owner == bindparam("owner")
)
#: a migration's end, for executemany (which rows take is known before: ENDING_MANY)
END_MANY = update(M).where(M.c.id == bindparam("b_id")).values(**_SAVED, owner=None, memory_mib=0)
END_OWNED_MANY = (update(M).where(M.c.id == bindparam("b_id"), M.c.owner == bindparam("b_owner"))
                  .values(**_SAVED, owner=None, memory_mib=0))  # fmt: skip
ENDING_MANY = (select(M.c.id, M.c.owner, M.c.active, M.c.memory_mib, M.c.version)
               .where(M.c.id.in_(bindparam("ids", expanding=True))).order_by(M.c.id))  # fmt: skip
HOSTS_OF_VMS = select(V.c.name, V.c.host).where(V.c.name.in_(bindparam("names", expanding=True)))
MINE = (
    select(M.c.id, M.c.version, M.c.cancel_requested)
    .where(M.c.owner == bindparam("owner"), M.c.active.is_(True))
    .order_by(M.c.created_at, M.c.id)
)


def _free(now: float) -> ColumnElement[bool]:
    """A migration any replica may take: none drives it, or the one that did is out of lease."""
    return or_(M.c.owner.is_(None), M.c.owner.not_in(select(R.c.id).where(R.c.alive_until > now)))


#: a pooled PostgreSQL connection unused this long is pinged before it is used again
PING_IDLE_S = 5.0


def _ping_when_idle(engine: Engine) -> None:
    """Test a pooled connection before use only when it sat idle for :data:`PING_IDLE_S`: a
    restarted server or a dropped link ends connections silently, and the pool replaces every
    connection older than a failed ping. SQLAlchemy's ``pool_pre_ping`` pings on *every* checkout,
    a round trip more per transaction or read (of two to five) on the busiest paths. A connection
    used within the last seconds that meets a restarted server fails that one statement, which is
    what any statement in flight during the restart meets anyway; SQLAlchemy then replaces the
    pool's older connections."""

    def checked_in(_connection: Any, entry: ConnectionPoolEntry) -> None:
        entry.info["idle_since"] = time.monotonic()

    def checked_out(connection: Any, entry: ConnectionPoolEntry, _proxy: Any) -> None:
        idle_since = entry.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < PING_IDLE_S:
            return
        try:
            engine.dialect.do_ping(connection)
            connection.rollback()  # the ping may have begun a transaction; nothing otherwise
        except Exception as exc:  # any failure means a connection not to use
            raise InvalidatePoolError(f"idle connection failed its ping: {exc}") from exc

    event.listen(engine, "checkin", checked_in)
    event.listen(engine, "checkout", checked_out)


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = url.startswith("postgresql")
        self.engine: Engine = create_engine(url, pool_size=8, max_overflow=24)
        if self.postgres:
            _ping_when_idle(self.engine)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        _upgrade(self.engine)
        # SQLite takes one writer at a time: serialise this process's transactions instead of
        # retrying on "database is locked"; PostgreSQL transactions run side by side
        self._lock: threading.Lock | None = None if self.postgres else threading.Lock()
        # a read of one statement needs no transaction around it: one round trip, not three
        self._reads = self.engine.execution_options(isolation_level="AUTOCOMMIT") if self.postgres else self.engine

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads that need no transaction (each statement sees committed data).
        Readers take no lock: SQLite's WAL lets them run beside the one writer."""
        with timed("store"), self._reads.connect() as conn:
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        if self._lock is None:
            with timed("store"), self.engine.begin() as conn:
                yield conn
            return
        with timed("store"), self._lock, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def statement(self) -> Iterator[Connection]:
        """For a write that is one statement on PostgreSQL, atomic by itself: sent there on its own
        (one round trip, where a transaction adds BEGIN and COMMIT), with at most reads around it
        that need no transaction; on SQLite a transaction under the lock."""
        with self.read() if self.postgres else self.transaction() as conn:
            yield conn

    # ------------------------------------------------------------------ hosts
    @sync_point("lmo.store.upsert_host")
    def upsert_host(self, host: HostRegistration) -> None:
        """Record a host's registration; capacity it leaves out (an older hostd) stays as known.
        One statement (``_upsert_host``): every host sends it at start and whenever its VMs'
        memory changes, so it is an API replica's most frequent write."""
        with self.statement() as c:
            c.execute(UPSERT_HOST_POSTGRESQL if self.postgres else UPSERT_HOST_SQLITE, {
                "b_name": host.name, "b_doc": host.model_dump_json(exclude={"maintenance"}),
                "b_bandwidth": host.migration_bandwidth_mib_s, "b_at": utcnow(),
                "b_memory": host.memory_mib, "b_used": host.memory_used_mib,
            })  # fmt: skip

    @sync_point("lmo.store.set_maintenance")
    def set_maintenance(self, name: str, maintenance: bool) -> None:
        with self.transaction() as c:
            if c.execute(update(H).where(H.c.name == name).values(maintenance=maintenance)).rowcount != 1:
                raise NotFound(f"unknown host {name!r}", host=name)

    def hosts(self) -> list[HostRegistration]:
        with self.read() as c:
            return [_registration(r) for r in c.execute(select(H).order_by(H.c.name)).all()]

    def host(self, name: str) -> HostRegistration:
        with self.read() as c:
            row = c.execute(GET_HOST, {"name": name}).first()
        if row is None:
            raise NotFound(f"unknown host {name!r}", host=name)
        return _registration(row)

    def hosts_named(self, names: Iterable[str]) -> dict[str, HostRegistration]:
        found: dict[str, HostRegistration] = {}
        with self.read() as c:
            for chunk in _chunks(sorted(set(names))):
                found.update({r.name: _registration(r) for r in c.execute(HOSTS_NAMED, {"names": chunk}).all()})
        return found

    def capacity(self, name: str) -> HostCapacity:
        with self.read() as c:
            row = c.execute(GET_HOST, {"name": name}).first()
        if row is None:
            raise NotFound(f"unknown host {name!r}", host=name)
        return _capacity(row)

    def capacities(self, *, in_service: bool = False) -> list[HostCapacity]:
        """Every host's inventory (columns only, no documents), by name."""
        query = select(H.c.name, H.c.memory_mib, H.c.placed_mib, H.c.reported_used_mib, H.c.free_mib,
                       H.c.maintenance).order_by(H.c.name)  # fmt: skip
        if in_service:
            query = query.where(H.c.maintenance.is_(False))
        with self.read() as c:
            return [HostCapacity(r.name, r.memory_mib, r.placed_mib, r.reported_used_mib, r.free_mib, r.maintenance)
                    for r in c.execute(query).all()]  # fmt: skip

    def budgets(self, hosts: Iterable[str]) -> dict[str, int]:
        """Each host's migration bandwidth budget (MiB/s, each way)."""
        with self.read() as c:
            return _budgets(c, hosts)

    # ------------------------------------------------------------------ VMs
    @sync_point("lmo.store.add_vm")
    def add_vm(self, spec: VmSpec, host: str) -> None:
        """Record a VM on ``host`` (counted in its placed memory; no capacity check)."""
        try:
            with self.transaction() as c:
                if c.execute(GET_VM, {"name": spec.name}).first() is not None:
                    raise Conflict(f"VM name {spec.name!r} is already taken", vm=spec.name)
                c.execute(insert(V).values(name=spec.name, host=host, spec_json=spec.model_dump_json(),
                                           memory_mib=spec.memory_mib, created_at=utcnow()))  # fmt: skip
                c.execute(MOVE_PLACED, {"host": host, "delta": spec.memory_mib})
        except IntegrityError as exc:
            raise Conflict(f"VM name {spec.name!r} is already taken", vm=spec.name) from exc

    @sync_point("lmo.store.place_vm")
    def place_vm(self, spec: VmSpec, wanted: str | None = None, exclude: Iterable[str] = ()) -> HostRegistration:
        """Claim the memory for a new VM and record it, atomically: on ``wanted``, or on the
        in-service host with the most free memory (not in ``exclude``). Returns the host's
        registration (the claim's own row: the caller calls that host next).

        The claim is a conditional update of the host's inventory, so concurrent requests and
        replicas never overfill a host; a host whose capacity was never reported is placed on only
        when asked for by name (its hostd still checks). On PostgreSQL the claim and the insert are
        one statement, sent on its own (one round trip: busy cores made each cost milliseconds, and
        creating a VM once made eleven, ``docs/fleet.md``); SQLite runs them in one transaction."""
        memory = spec.memory_mib
        record = {"vm": spec.name, "spec_json": spec.model_dump_json(), "created_at": utcnow()}
        try:
            with self.statement() as c:
                try:
                    row = self._claim_room(c, memory, wanted, sorted(set(exclude)), record if self.postgres else {})
                except (CapacityError, Conflict, NotFound):
                    if c.execute(GET_VM, {"name": spec.name}).first() is not None:  # the likelier mistake
                        raise Conflict(f"VM name {spec.name!r} is already taken", vm=spec.name) from None
                    raise
                if not self.postgres:  # a taken name fails here, and the claim is rolled back with it
                    c.execute(insert(V).values(name=spec.name, host=row.name, spec_json=record["spec_json"],
                                               memory_mib=memory, created_at=record["created_at"]))  # fmt: skip
                return _registration(row)
        except IntegrityError as exc:
            raise Conflict(f"VM name {spec.name!r} is already taken", vm=spec.name) from exc

    @staticmethod
    def _claim_room(c: Connection, memory: int, wanted: str | None, exclude: list[str],
                    record: dict[str, Any]) -> Row[Any]:  # fmt: skip
        """The claimed host's row, after the claim (and, given the new VM's ``record``, its insert
        in the same statement): other statements only to explain a refusal."""
        named_claim, best_claim = (PLACE_NAMED, PLACE_BEST) if record else (CLAIM_NAMED, CLAIM_BEST)
        if wanted is not None:
            claimed = c.execute(named_claim, {"host": wanted, "delta": memory} | record).first()
            if claimed is not None:
                return claimed
            row = c.execute(GET_HOST, {"name": wanted}).first()
            if row is None:
                raise NotFound(f"unknown host {wanted!r}", host=wanted)
            if row.maintenance:
                raise Conflict(f"host {wanted} is in maintenance: no new VMs")
            raise CapacityError(f"no host can hold {memory} MiB: host {wanted} has {row.free_mib} MiB free",
                                host=wanted, free_mib=row.free_mib, needed_mib=memory)  # fmt: skip
        while True:
            claimed = c.execute(best_claim, {"memory": memory, "delta": memory, "exclude": exclude} | record).first()
            if claimed is not None:
                return claimed
            if c.execute(BEST_HOST, {"memory": memory, "exclude": exclude}).first() is None:
                most = c.execute(select(func.max(H.c.free_mib)).where(H.c.maintenance.is_(False))).scalar()
                raise CapacityError(f"no host can hold {memory} MiB (most free: {most or 0} MiB)")
            # another replica filled the host it chose between its choice and its claim: again

    @sync_point("lmo.store.set_vm")
    def set_vm(self, name: str, *, host: str | None = None, spec: VmSpec | None = None) -> None:
        if host is None and spec is not None:  # the spec alone (a created VM's, resolved): one statement
            with self.statement() as c:
                if c.execute(SET_SPEC, {"b_name": name, "b_spec": spec.model_dump_json()}).rowcount != 1:
                    raise NotFound(f"unknown VM {name!r}", vm=name)
            return
        with self.transaction() as c:
            row = c.execute(GET_VM, {"name": name}).first()
            if row is None:
                raise NotFound(f"unknown VM {name!r}", vm=name)
            values: dict[str, object] = {}
            if host is not None and host != row.host:
                c.execute(MOVE_PLACED, {"host": row.host, "delta": -row.memory_mib})
                c.execute(MOVE_PLACED, {"host": host, "delta": row.memory_mib})
                values["host"] = host
            if spec is not None:
                values["spec_json"] = spec.model_dump_json()
            if values:
                c.execute(update(V).where(V.c.name == name).values(**values))

    @sync_point("lmo.store.move_vm")
    def move_vm(self, name: str, destination: str) -> None:
        """A migration's cut-over: the VM now belongs to ``destination``, whose memory its migration
        already reserved; the source's is released. Idempotent."""
        with self.transaction() as c:
            row = c.execute(GET_VM, {"name": name}).first()
            if row is None:
                raise NotFound(f"unknown VM {name!r}", vm=name)
            if row.host == destination:
                return
            c.execute(MOVE_PLACED, {"host": row.host, "delta": -row.memory_mib})
            c.execute(update(V).where(V.c.name == name).values(host=destination))

    @sync_point("lmo.store.remove_vm")
    def remove_vm(self, name: str) -> None:
        with self.transaction() as c:
            row = c.execute(GET_VM, {"name": name}).first()
            if row is not None:
                c.execute(MOVE_PLACED, {"host": row.host, "delta": -row.memory_mib})
                c.execute(delete(V).where(V.c.name == name))

    def vm(self, name: str) -> tuple[VmSpec, str]:
        with self.read() as c:
            return _vm(c, name)

    def move_facts(self, vm: str, destination: str) -> MoveFacts:
        """The VM, both hosts and the VM's active migrations on one connection: one checkout
        (each a liveness ping on PostgreSQL) instead of five, for the API's busiest call at scale.
        NotFound for an unknown VM, then for an unknown destination."""
        with self.read() as c:
            spec, source = _vm(c, vm)
            rows = {row.name: row for row in c.execute(HOSTS_NAMED, {"names": sorted({source, destination})})}
            active = [_load(r.doc, r.cancel_requested) for r in c.execute(_migrations_query(active_only=True, vm=vm))]
        for name in (destination, source):
            if name not in rows:
                raise NotFound(f"unknown host {name!r}", host=name)
        return MoveFacts(spec, source, _registration(rows[source]), _registration(rows[destination]),
                         _capacity(rows[destination]), active)  # fmt: skip

    def vms_named(self, names: Iterable[str]) -> dict[str, tuple[VmSpec, str]]:
        found: dict[str, tuple[VmSpec, str]] = {}
        with self.read() as c:
            for chunk in _chunks(sorted(set(names))):
                for row in c.execute(VMS_NAMED, {"names": chunk}).all():
                    found[row.name] = (VmSpec.model_validate_json(row.spec_json), row.host)
        return found

    def vms(self, host: str | None = None) -> list[tuple[VmSpec, str]]:
        query = select(V.c.spec_json, V.c.host).order_by(V.c.name)
        if host is not None:
            query = query.where(V.c.host == host)
        with self.read() as c:
            rows = c.execute(query).all()
        return [(VmSpec.model_validate_json(r.spec_json), r.host) for r in rows]

    def vm_facts(self, hosts: Iterable[str]) -> list[VmFacts]:
        """The VMs on ``hosts``: size and last known dirty rate (no spec parsed)."""
        facts: list[VmFacts] = []
        with self.read() as c:
            for chunk in _chunks(sorted(set(hosts))):
                facts.extend(
                    VmFacts(r.name, r.host, r.memory_mib, r.dirty_rate_mib_s, r.dirty_rate_at, r.dirty_rate_source)
                    for r in c.execute(VM_FACTS, {"hosts": chunk}).all()
                )
        return sorted(facts, key=lambda f: f.name)

    def record_dirty_rates(self, rates: Sequence[DirtyRate]) -> None:
        """Remember VMs' dirty rates (newest wins), for the wave planner: one statement for many."""
        if not rates:
            return
        with self.transaction() as c:
            c.execute(RECORD_DIRTY_RATE, [{"b_vm": r.vm, "b_rate": r.mib_s, "b_at": r.at, "b_source": r.source}
                                          for r in rates])  # fmt: skip

    # ------------------------------------------------------------------ migrations
    @sync_point("lmo.store.add_migration")
    def add_migration(self, migration: Migration) -> None:
        """Insert a migration, claiming its VM (at most one active migration per VM) and reserving
        the VM's memory on the destination (CapacityError if the inventory says it has no room)."""
        self.add_migrations([migration])

    @sync_point("lmo.store.add_migration")
    def add_migrations(self, migrations: Sequence[Migration]) -> None:
        """Insert migrations in one transaction: all or none (an evacuation wave)."""
        vms = [m.vm for m in migrations]
        try:
            with self.transaction() as c:
                memory: dict[str, int] = {}
                for chunk in _chunks(vms):
                    busy = c.execute(select(M.c.vm, M.c.id, M.c.phase)
                                     .where(M.c.vm.in_(chunk), M.c.active.is_(True))).first()  # fmt: skip
                    if busy is not None:
                        raise Conflict(f"VM {busy.vm!r} is already migrating ({busy.id}, {busy.phase})",
                                       vm=busy.vm, migration=busy.id)  # fmt: skip
                    memory.update(
                        (r.name, r.memory_mib)
                        for r in c.execute(select(V.c.name, V.c.memory_mib).where(V.c.name.in_(chunk)))
                    )
                needed: dict[str, int] = {}
                for m in migrations:
                    needed[m.destination] = needed.get(m.destination, 0) + memory.get(m.vm, 0)
                for destination, mib in sorted(needed.items()):
                    _reserve(c, destination, mib)
                now = utcnow()
                rows = [{"id": m.id, "vm": m.vm, "phase": m.phase.value, "active": True, "doc": m.model_dump_json(),
                         "cancel_requested": False, "owner": None, "lease_until": 0.0, "created_at": now,
                         "source": m.source, "destination": m.destination, "reserved_mib_s": None,
                         "memory_mib": memory.get(m.vm, 0), "evacuation": m.evacuation, "version": 0}
                        for m in migrations]  # fmt: skip
                if rows:
                    c.execute(insert(M), rows)
        except IntegrityError as exc:  # another replica claimed a VM between our check and insert
            raise Conflict(f"VM {vms[0]!r} is already migrating", vm=vms[0]) from exc

    @sync_point("lmo.store.acquire")
    def acquire(self, migration_id: str, owner: str, ttl_s: float) -> bool:
        """Take an active migration for ``owner`` and renew ``owner``'s lease (``ttl_s`` from
        now); False if another replica in lease drives it."""
        now = time.time()
        with self.transaction() as c:
            self._heartbeat(c, owner, now, ttl_s)
            taken = update(M).where(M.c.id == migration_id, M.c.active.is_(True), or_(M.c.owner == owner, _free(now)))
            return c.execute(taken.values(owner=owner)).rowcount == 1

    @sync_point("lmo.store.claim")
    def claim(self, owner: str, ttl_s: float, capacity: int, pace: tuple[float, int] | None = None) -> list[Claim]:
        """Renew this replica's lease and take its fair part of the active migrations: the
        replicas in lease share them evenly (each at most ``capacity``). A replica holding more
        than its part lets the excess go (queued ones first, newest first), so a replica that
        joins gets work at its next pass. Returns what it holds, oldest first.

        The lease is one row, the replica's (``ttl_s`` from now), however many migrations it holds;
        ``pace``, when the replica measured one (ended per second, held), goes in it too."""
        now = time.time()
        with self.transaction() as c:
            self._heartbeat(c, owner, now, ttl_s, capacity, pace)
            live = c.execute(select(func.count()).select_from(R).where(R.c.alive_until > now)).scalar() or 1
            active = c.execute(select(func.count()).select_from(M).where(M.c.active.is_(True))).scalar() or 0
            share = min(capacity, math.ceil(active / live))
            mine = M.c.owner == owner
            rows = c.execute(MINE, {"owner": owner}).all()
            held = len(rows)
            if held > share:
                queued_first = case((M.c.phase == Phase.PENDING.value, 0), else_=1)
                excess = list(
                    c.execute(
                        select(M.c.id)
                        .where(mine, M.c.active.is_(True))
                        .order_by(queued_first, M.c.created_at.desc())
                        .limit(held - share)
                    ).scalars()
                )
                c.execute(update(M).where(M.c.id.in_(excess), mine).values(owner=None))
                rows = c.execute(MINE, {"owner": owner}).all()
            elif held < share:
                free = _free(now)
                candidates = (select(M.c.id).where(M.c.active.is_(True), free)
                              .order_by(M.c.created_at, M.c.id).limit(share - held))  # fmt: skip
                if self.postgres:
                    candidates = candidates.with_for_update(skip_locked=True)
                ids = list(c.execute(candidates).scalars())
                if ids:
                    c.execute(update(M).where(M.c.id.in_(ids), M.c.active.is_(True), free).values(owner=owner))
                    rows = c.execute(MINE, {"owner": owner}).all()
            return [Claim(r.id, r.version, bool(r.cancel_requested)) for r in rows]

    def _heartbeat(self, c: Connection, owner: str, now: float, ttl_s: float, capacity: int | None = None,
                   pace: tuple[float, int] | None = None) -> None:  # fmt: skip
        upsert = postgresql_insert if self.postgres else sqlite_insert
        beat: dict[str, float | int] = {"seen_at": now, "alive_until": now + ttl_s}
        if capacity is not None:
            beat["capacity"] = capacity
        if pace is not None:
            beat.update(pace_per_s=pace[0], pace_held=pace[1], pace_at=now)
        c.execute(upsert(R).values(id=owner, **beat).on_conflict_do_update(index_elements=[R.c.id], set_=beat))

    def driving_capacity(self) -> int:
        """The most migrations the replicas in lease drive at once (their capacities summed)."""
        with self.read() as c:
            total = c.execute(select(func.sum(R.c.capacity)).where(R.c.alive_until > time.time())).scalar()
        return int(total or 0)

    def lmo_pace(self, max_age_s: float) -> LmoPace | None:
        """The LMO's latest measured pace (within ``max_age_s``), scaled to the replicas that drive
        now: the measuring replica may be gone (a wave is often driven by replicas started for
        it), and replicas alike step alike. None: no replica measured one lately."""
        now = time.time()
        with self.read() as c:
            latest = select(R.c.id, R.c.pace_per_s, R.c.pace_held, R.c.pace_at).where(R.c.pace_at > now - max_age_s)
            row = c.execute(latest.order_by(R.c.pace_at.desc()).limit(1)).first()
            driving = c.execute(
                select(func.count()).select_from(R).where(R.c.alive_until > now, R.c.capacity > 0)
            ).scalar()
        if row is None or not row.pace_per_s:
            return None
        replicas = max(int(driving or 0), 1)
        return LmoPace(ended_per_s=round(row.pace_per_s * replicas, 2), held=int(row.pace_held or 0) * replicas,
                       replica=row.id, age_s=round(now - row.pace_at, 1))  # fmt: skip

    def replicas(self) -> dict[str, float]:
        """Replicas in lease (the ones ``claim`` shares the migrations among), with when each was
        last seen."""
        with self.read() as c:
            rows = c.execute(select(R.c.id, R.c.seen_at).where(R.c.alive_until > time.time())).all()
        return {row.id: row.seen_at for row in rows}

    def load_migrations(self, ids: Sequence[str]) -> dict[str, tuple[int, Migration]]:
        """Migrations by id, each with its version."""
        found: dict[str, tuple[int, Migration]] = {}
        with self.read() as c:
            for chunk in _chunks(list(ids)):
                for row in c.execute(MIGRATIONS_NAMED, {"ids": chunk}).all():
                    found[row.id] = (row.version, _load(row.doc, row.cancel_requested))
        return found

    @sync_point("lmo.store.save_migration")
    def save_migration(self, migration: Migration, owner: str | None = None) -> bool:
        """Save; with ``owner``, only while that replica still holds the lease (False if lost)."""
        with self.transaction() as c:
            return _save(c, migration, owner) is not None

    def save_migrations(self, migrations: Sequence[Migration], owner: str) -> list[int | None]:
        """Save many (a controller pass's results), SAVE_BATCH to a transaction: each one's new
        version, or None where ``owner`` no longer holds its lease. (Batches, so that SQLite's one
        writer is never held long by the controller while an API request waits.) The fault point
        ``lmo.store.save_migration`` fires once per migration, scoped to it."""
        if REGISTRY.armed:
            for m in migrations:
                REGISTRY.fire_sync("lmo.store.save_migration", vm=m.vm, migration=m.id)
        versions: list[int | None] = []
        for start in range(0, len(migrations), SAVE_BATCH):
            with self.transaction() as c:
                versions.extend(_save_many(c, migrations[start : start + SAVE_BATCH], owner))
        return versions

    @sync_point("lmo.store.save_migration")
    def save_migration_versioned(self, migration: Migration, owner: str) -> int | None:
        """Save while ``owner`` holds the lease; the new version, or None if the lease was lost."""
        with self.transaction() as c:
            return _save(c, migration, owner)

    def migration(self, migration_id: str) -> Migration:
        with self.read() as c:
            row = c.execute(GET_MIGRATION, {"id": migration_id}).first()
        if row is None:
            raise NotFound(f"unknown migration {migration_id!r}", migration=migration_id)
        return _load(row.doc, row.cancel_requested)

    @sync_point("lmo.store.request_cancel")
    def request_cancel(self, migration_id: str) -> None:
        with self.transaction() as c:
            if c.execute(update(M).where(M.c.id == migration_id).values(cancel_requested=True)).rowcount != 1:
                raise NotFound(f"unknown migration {migration_id!r}", migration=migration_id)

    def migrations(self, *, active_only: bool = False, vm: str | None = None, evacuation: str | None = None,
                   limit: int | None = None) -> list[Migration]:  # fmt: skip
        with self.read() as c:
            rows = c.execute(_migrations_query(active_only=active_only, vm=vm, evacuation=evacuation,
                                               limit=limit)).all()  # fmt: skip
        return [_load(r.doc, r.cancel_requested) for r in rows]

    def finished(self, limit: int) -> list[Migration]:
        """The most recent successful migrations, newest first (the wave planner learns from them)."""
        query = (select(M.c.doc, M.c.cancel_requested).where(M.c.phase == Phase.SUCCEEDED.value)
                 .order_by(M.c.created_at.desc()).limit(limit))  # fmt: skip
        with self.read() as c:
            rows = c.execute(query).all()
        return [_load(r.doc, r.cancel_requested) for r in rows]

    def active_vms(self, vms: Iterable[str]) -> set[str]:
        """Which of ``vms`` have an active migration."""
        busy: set[str] = set()
        with self.read() as c:
            for chunk in _chunks(sorted(set(vms))):
                busy.update(c.execute(select(M.c.vm).where(M.c.vm.in_(chunk), M.c.active.is_(True))).scalars())
        return busy

    def counts(self) -> dict[str, int]:
        """How many migrations are in each phase."""
        with self.read() as c:
            rows = c.execute(select(M.c.phase, func.count()).group_by(M.c.phase)).all()
        return {str(phase): int(n) for phase, n in rows}

    # ------------------------------------------------------------------ admission
    @contextmanager
    def admission(self) -> Iterator[Admissions]:
        """One admission round: what is reserved now, and saves of newly admitted migrations, in
        one transaction that replicas take in turn (PostgreSQL: an advisory lock), so two replicas
        never both hand out the last share of a host's bandwidth."""
        with self.transaction() as c:
            if self.postgres:
                c.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK})
            yield Admissions(c)

    # ------------------------------------------------------------------ attachments
    @sync_point("lmo.store.add_attachment")
    def add_attachment(self, vm: str, host: str, device: str, export: NbdExport) -> None:
        with self.transaction() as c:
            c.execute(insert(A).values(id=export.attachment, vm=vm, host=host, device=device,
                                       export_json=export.model_dump_json(), active=True))  # fmt: skip

    def attachments(self, vm: str, host: str | None = None) -> dict[str, NbdExport]:
        """Active attachments of ``vm`` (on ``host``), keyed by device id."""
        query = select(A.c.device, A.c.export_json).where(A.c.vm == vm, A.c.active.is_(True))
        if host is not None:
            query = query.where(A.c.host == host)
        with self.read() as c:
            return {r.device: NbdExport.model_validate_json(r.export_json) for r in c.execute(query).all()}

    @sync_point("lmo.store.deactivate_attachment")
    def deactivate_attachment(self, attachment: str) -> None:
        with self.transaction() as c:
            c.execute(update(A).where(A.c.id == attachment).values(active=False))

    # ------------------------------------------------------------------ transfers
    def add_transfer(self, transfer_id: str, volume: str, doc: str, expires_at: float) -> None:
        with self.transaction() as c:
            c.execute(insert(TR).values(id=transfer_id, volume=volume, doc=doc, expires_at=expires_at))

    def transfer(self, transfer_id: str) -> str:
        with self.read() as c:
            doc = c.execute(select(TR.c.doc).where(TR.c.id == transfer_id)).scalar()
        if doc is None:
            raise NotFound(f"no transfer {transfer_id!r} (finished, or expired and detached)", transfer=transfer_id)
        return str(doc)

    def transfers(self, *, volume: str | None = None, expired_before: float | None = None) -> list[str]:
        query = select(TR.c.doc)
        if volume is not None:
            query = query.where(TR.c.volume == volume)
        if expired_before is not None:
            query = query.where(TR.c.expires_at < expired_before)
        with self.read() as c:
            return [str(doc) for doc in c.execute(query).scalars().all()]

    def update_transfer(self, transfer_id: str, doc: str, expires_at: float) -> None:
        with self.transaction() as c:
            updated = c.execute(update(TR).where(TR.c.id == transfer_id).values(doc=doc, expires_at=expires_at))
        if updated.rowcount != 1:
            raise NotFound(f"no transfer {transfer_id!r} (finished, or expired and detached)", transfer=transfer_id)

    def remove_transfer(self, transfer_id: str) -> None:
        with self.transaction() as c:
            c.execute(delete(TR).where(TR.c.id == transfer_id))

    # ------------------------------------------------------------------ VCN objects
    @sync_point("lmo.store.put_netobject")
    def put_netobject(self, kind: str, object_id: str, doc: str) -> None:
        with self.transaction() as c:
            where = (N.c.kind == kind) & (N.c.id == object_id)
            if c.execute(update(N).where(where).values(doc=doc)).rowcount == 0:
                c.execute(insert(N).values(kind=kind, id=object_id, doc=doc))

    def netobjects(self, kind: str) -> list[str]:
        with self.read() as c:
            return list(c.execute(select(N.c.doc).where(N.c.kind == kind).order_by(N.c.id)).scalars())

    @sync_point("lmo.store.delete_netobject")
    def delete_netobject(self, kind: str, object_id: str) -> None:
        with self.transaction() as c:
            if c.execute(delete(N).where(N.c.kind == kind, N.c.id == object_id)).rowcount == 0:
                raise NotFound(f"unknown {kind.rstrip('s')} {object_id!r}")

    # ------------------------------------------------------------------ evacuations
    @sync_point("lmo.store.add_evacuation")
    def add_evacuation(self, evacuation_id: str, doc: str) -> None:
        with self.transaction() as c:
            c.execute(insert(E).values(id=evacuation_id, doc=doc, created_at=utcnow()))

    def evacuation(self, evacuation_id: str) -> str:
        with self.read() as c:
            doc = c.execute(select(E.c.doc).where(E.c.id == evacuation_id)).scalar()
        if doc is None:
            raise NotFound(f"unknown evacuation {evacuation_id!r}")
        return str(doc)

    # ------------------------------------------------------------------ tokens
    def add_token(self, token_id: str, name: str, role: str, digest: str) -> TokenRecord:
        record = TokenRecord(token_id, name, role, utcnow(), None)
        with self.transaction() as c:
            c.execute(insert(T).values(id=token_id, name=name, role=role, digest=digest, created_at=record.created_at))
        return record

    def token_by_digest(self, digest: str) -> TokenRecord | None:
        """The live (not revoked) token with this digest."""
        with self.read() as c:
            row = c.execute(select(T).where(T.c.digest == digest, T.c.revoked_at.is_(None))).first()
        return None if row is None else _token(row)

    def tokens(self) -> list[TokenRecord]:
        with self.read() as c:
            return [_token(r) for r in c.execute(select(T).order_by(T.c.created_at)).all()]

    def revoke_token(self, token_id: str) -> TokenRecord:
        """Revoke a token (idempotent: revoking it again keeps the first time)."""
        with self.transaction() as c:
            c.execute(update(T).where(T.c.id == token_id, T.c.revoked_at.is_(None)).values(revoked_at=utcnow()))
            row = c.execute(select(T).where(T.c.id == token_id)).first()
        if row is None:
            raise NotFound(f"unknown token {token_id!r}", token=token_id)
        return _token(row)


def _token(row: Row[Any]) -> TokenRecord:
    return TokenRecord(row.id, row.name, row.role, row.created_at, row.revoked_at)


class Admissions:
    """Inside :meth:`Store.admission`: read the reservations, save what was admitted."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def reservations(self) -> list[Reservation]:
        rows = self._conn.execute(select(M.c.id, M.c.source, M.c.destination, M.c.reserved_mib_s)
                                  .where(M.c.active.is_(True), M.c.reserved_mib_s.is_not(None))).all()  # fmt: skip
        return [Reservation(r.id, r.source, r.destination, int(r.reserved_mib_s)) for r in rows]

    def budgets(self, hosts: Iterable[str]) -> dict[str, int]:
        return _budgets(self._conn, hosts)

    def save_many(self, migrations: Sequence[Migration], owner: str) -> list[int | None]:
        """The round's admitted migrations saved together (one round trip, not one each: a pass
        at scale admits dozens, and the round holds the admission lock while it saves)."""
        return _save_many(self._conn, migrations, owner) if migrations else []


def _budgets(c: Connection, hosts: Iterable[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for chunk in _chunks(sorted(set(hosts))):
        rows = c.execute(select(H.c.name, H.c.migration_bandwidth_mib_s).where(H.c.name.in_(chunk))).all()
        found.update({r.name: int(r.migration_bandwidth_mib_s) for r in rows})
    return found


def _reserve(c: Connection, destination: str, mib: int) -> None:
    if mib <= 0:
        return
    if c.execute(CLAIM_ROOM, {"host": destination, "delta": mib}).rowcount != 1:
        row = c.execute(GET_HOST, {"name": destination}).first()
        if row is not None:  # an unknown host keeps no inventory (and fails later, with a reason)
            raise CapacityError(f"destination {destination} has {row.free_mib} MiB free, {mib} MiB needed",
                                host=destination, free_mib=row.free_mib, needed_mib=mib)  # fmt: skip


def _save_values(migration: Migration, owner: str | None) -> dict[str, Any]:
    """The bound values of a save (stamping the document's ``updated_at`` first)."""
    migration.updated_at = utcnow()
    return {
        "b_id": migration.id,
        "b_owner": owner,
        "b_phase": migration.phase.value,
        "b_doc": migration.model_dump_json(),
        "b_active": migration.phase not in TERMINAL_PHASES,
        "b_reserved": migration.reserved_mib_s,
    }


def _save_many(c: Connection, migrations: Sequence[Migration], owner: str) -> list[int | None]:
    """:func:`_save` for a batch held by ``owner``: the ones that stay active in one executemany
    (one pipelined round trip on PostgreSQL, not one per migration) and one read of the versions
    that took; the ones that end in :func:`_end_many`."""
    live = [m for m in migrations if m.phase not in TERMINAL_PHASES]
    versions: dict[str, int | None] = {}
    if live:
        c.execute(SAVE_OWNED_MANY, [_save_values(m, owner) for m in live])
        ids = [m.id for m in live]
        versions = {row.id: row.version for row in c.execute(OWNED_VERSIONS, {"ids": ids, "owner": owner})}
    if len(live) < len(migrations):
        versions.update(_end_many(c, [m for m in migrations if m.phase in TERMINAL_PHASES], owner))
    return [versions.get(m.id) for m in migrations]


def _end_many(c: Connection, ending: Sequence[Migration], owner: str | None) -> dict[str, int]:
    """Save migrations that end (held by ``owner``, or by anyone when None) in a few statements
    whatever their number (a pass at scale ends dozens: four round trips each were a third of its
    saving); the new version of each that was saved.

    Their rows are read first (locked on PostgreSQL, in id order), so which saves take is known
    before writing: those are ended in one executemany, and each destination's memory
    reservation is released once, by the save that turns the migration from active to ended,
    unless its VM now lives there (the reservation is then its placement). Hosts are updated in
    name order (another writer of the same rows never waits for us while we wait for it)."""
    query = ENDING_MANY.with_for_update() if c.dialect.name == "postgresql" else ENDING_MANY
    rows = {row.id: row for row in c.execute(query, {"ids": [m.id for m in ending]})}
    owned = [m for m in ending if m.id in rows and (owner is None or rows[m.id].owner == owner)]
    if not owned:
        return {}
    c.execute(END_MANY if owner is None else END_OWNED_MANY, [_save_values(m, owner) for m in owned])
    releasing = [m for m in owned if rows[m.id].active and rows[m.id].memory_mib]
    if releasing:
        names = sorted({m.vm for m in releasing})
        where = {row.name: row.host for row in c.execute(HOSTS_OF_VMS, {"names": names})}
        released: dict[str, int] = {}
        for m in releasing:
            if where.get(m.vm) != m.destination:
                released[m.destination] = released.get(m.destination, 0) + rows[m.id].memory_mib
        if released:
            c.execute(MOVE_PLACED, [{"host": host, "delta": -mib} for host, mib in sorted(released.items())])
    return {m.id: rows[m.id].version + 1 for m in owned}


def _save(c: Connection, migration: Migration, owner: str | None) -> int | None:
    """One migration's save; the new version, or None when ``owner`` no longer holds its lease.
    A save that ends the migration is :func:`_end_many`'s (it releases the destination's
    reservation exactly once)."""
    values = _save_values(migration, owner)
    if values["b_active"]:
        return c.execute(SAVE if owner is None else SAVE_OWNED, values).scalar()
    version = _end_many(c, [migration], owner).get(migration.id)
    if version is None and owner is None:
        raise NotFound(f"unknown migration {migration.id!r}")
    return version


def _vm(c: Connection, name: str) -> tuple[VmSpec, str]:
    row = c.execute(GET_VM, {"name": name}).first()
    if row is None:
        raise NotFound(f"unknown VM {name!r}", vm=name)
    return VmSpec.model_validate_json(row.spec_json), str(row.host)


def _capacity(row: Row[Any]) -> HostCapacity:
    return HostCapacity(row.name, row.memory_mib, row.placed_mib, row.reported_used_mib, row.free_mib,
                        row.maintenance)  # fmt: skip


def _migrations_query(*, active_only: bool = False, vm: str | None = None, evacuation: str | None = None,
                      limit: int | None = None) -> Select[Any]:  # fmt: skip
    query = select(M.c.doc, M.c.cancel_requested).order_by(M.c.created_at, M.c.id)
    if active_only:
        query = query.where(M.c.active.is_(True))
    if vm is not None:
        query = query.where(M.c.vm == vm)
    if evacuation is not None:
        query = query.where(M.c.evacuation == evacuation)
    if limit is not None:
        query = query.limit(limit)
    return query


def _registration(row: Row[Any]) -> HostRegistration:
    doc = json.loads(row.doc)
    doc.update(maintenance=row.maintenance, memory_mib=row.memory_mib, memory_used_mib=row.reported_used_mib)
    return HostRegistration.model_validate(doc)


def _load(doc: str, cancel_requested: bool | None) -> Migration:
    migration = Migration.model_validate_json(doc)
    migration.cancel_requested = migration.cancel_requested or bool(cancel_requested)
    return migration


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _literal(value: object, engine: Engine) -> str:
    if isinstance(value, bool):
        return ("true" if value else "false") if engine.dialect.name == "postgresql" else str(int(value))
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def _upgrade(engine: Engine) -> None:
    """Bring a store written by an older livemig up to this schema: add the columns and indexes
    it lacks and fill them from the documents (the inventory from the VMs it holds)."""
    inspector = inspect(engine)
    added: dict[str, set[str]] = {}
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = (
                    getattr(column.default, "arg", None)
                    if column.default is not None and column.default.is_scalar
                    else None
                )
                clause = "" if default is None else f" DEFAULT {_literal(default, engine)}"
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}{clause}'))
                added.setdefault(table.name, set()).add(column.name)
        for table in Base.metadata.sorted_tables:
            if table.name in added:
                for index in table.indexes:
                    index.create(conn, checkfirst=True)
        if "vms" in added:
            for name, spec_json in conn.execute(select(V.c.name, V.c.spec_json)).all():
                memory = VmSpec.model_validate_json(spec_json).memory_mib
                conn.execute(update(V).where(V.c.name == name).values(memory_mib=memory))
        if "migrations" in added:
            for row_id, doc in conn.execute(select(M.c.id, M.c.doc)).all():
                m = Migration.model_validate_json(doc)
                conn.execute(
                    update(M)
                    .where(M.c.id == row_id)
                    .values(
                        source=m.source,
                        destination=m.destination,
                        evacuation=m.evacuation,
                        reserved_mib_s=m.reserved_mib_s if m.phase is not Phase.PENDING else None,
                    )
                )
        if "hosts" in added:
            for name, doc in conn.execute(select(H.c.name, H.c.doc)).all():
                placed = conn.scalar(select(func.coalesce(func.sum(V.c.memory_mib), 0)).where(V.c.host == name))
                bandwidth = int(json.loads(doc).get("migration_bandwidth_mib_s", 1024))
                conn.execute(
                    update(H)
                    .where(H.c.name == name)
                    .values(placed_mib=placed, reported_used_mib=0, migration_bandwidth_mib_s=bandwidth)
                )
