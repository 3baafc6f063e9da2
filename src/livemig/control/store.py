"""The LMO's durable store (SQLAlchemy; SQLite by default).

Records are stored as their pydantic JSON next to the few columns queries need (phase, vm), so the
typed model stays the single definition and the schema stays small. The store is the only writer
of desired state; everything it says about hosts is re-observed before the controller acts.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import Boolean, DateTime, Float, Index, String, Text, create_engine, event, or_, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from livemig.errors import Conflict, NotFound
from livemig.model.host import HostRegistration
from livemig.model.migration import TERMINAL_PHASES, Migration, utcnow
from livemig.model.vm import NbdExport, VmSpec


class Base(DeclarativeBase):
    pass


class HostRow(Base):
    __tablename__ = "hosts"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    doc: Mapped[str] = mapped_column(Text)  # HostRegistration as JSON
    # set by the LMO (evacuation), never by the host's own registration
    maintenance: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VmRow(Base):
    __tablename__ = "vms"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(64))
    spec_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


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
    # the lease: which LMO replica drives this migration, until when (epoch seconds)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


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


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()  # one writer at a time inside this process

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._lock, self._sessions.begin() as session:
            yield session

    # ------------------------------------------------------------------ hosts
    def upsert_host(self, host: HostRegistration) -> None:
        with self.session() as s:
            row = s.get(HostRow, host.name)
            doc = host.model_dump_json(exclude={"maintenance"})
            if row is None:
                s.add(HostRow(name=host.name, doc=doc, maintenance=False))
            else:
                row.doc = doc

    def set_maintenance(self, name: str, maintenance: bool) -> None:
        with self.session() as s:
            row = s.get(HostRow, name)
            if row is None:
                raise NotFound(f"unknown host {name!r}", host=name)
            row.maintenance = maintenance

    def hosts(self) -> list[HostRegistration]:
        with self.session() as s:
            rows = s.scalars(select(HostRow).order_by(HostRow.name)).all()
            return [HostRegistration.model_validate({**json.loads(r.doc), "maintenance": r.maintenance})
                    for r in rows]  # fmt: skip

    def host(self, name: str) -> HostRegistration:
        for host in self.hosts():
            if host.name == name:
                return host
        raise NotFound(f"unknown host {name!r}", host=name)

    # ------------------------------------------------------------------ VMs
    def add_vm(self, spec: VmSpec, host: str) -> None:
        with self.session() as s:
            if s.get(VmRow, spec.name) is not None:
                raise Conflict(f"VM name {spec.name!r} is already taken", vm=spec.name)
            s.add(VmRow(name=spec.name, host=host, spec_json=spec.model_dump_json()))

    def set_vm(self, name: str, *, host: str | None = None, spec: VmSpec | None = None) -> None:
        with self.session() as s:
            row = s.get(VmRow, name)
            if row is None:
                raise NotFound(f"unknown VM {name!r}", vm=name)
            if host is not None:
                row.host = host
            if spec is not None:
                row.spec_json = spec.model_dump_json()

    def remove_vm(self, name: str) -> None:
        with self.session() as s:
            row = s.get(VmRow, name)
            if row is not None:
                s.delete(row)

    def vm(self, name: str) -> tuple[VmSpec, str]:
        with self.session() as s:
            row = s.get(VmRow, name)
            if row is None:
                raise NotFound(f"unknown VM {name!r}", vm=name)
            return VmSpec.model_validate_json(row.spec_json), row.host

    def vms(self) -> list[tuple[VmSpec, str]]:
        with self.session() as s:
            rows = s.scalars(select(VmRow).order_by(VmRow.name)).all()
            return [(VmSpec.model_validate_json(r.spec_json), r.host) for r in rows]

    # ------------------------------------------------------------------ migrations
    def add_migration(self, migration: Migration) -> None:
        """Insert a migration, claiming its VM: at most one active migration per VM."""
        with self.session() as s:
            busy = s.scalars(select(MigrationRow).where(MigrationRow.vm == migration.vm,
                                                        MigrationRow.active.is_(True))).first()  # fmt: skip
            if busy is not None:
                raise Conflict(f"VM {migration.vm!r} is already migrating ({busy.id}, {busy.phase})",
                               vm=migration.vm, migration=busy.id)  # fmt: skip
        try:
            with self.session() as s:
                s.add(MigrationRow(id=migration.id, vm=migration.vm, phase=migration.phase.value,
                                   active=True, doc=migration.model_dump_json()))  # fmt: skip
        except IntegrityError as exc:  # another replica claimed the VM between our check and insert
            raise Conflict(f"VM {migration.vm!r} is already migrating", vm=migration.vm) from exc

    def acquire(self, migration_id: str, owner: str, ttl_s: float) -> bool:
        """Take or renew the lease on an active migration; False if another live replica holds it."""
        now = time.time()
        with self.session() as s:
            result = s.execute(
                update(MigrationRow)
                .where(MigrationRow.id == migration_id, MigrationRow.active.is_(True),
                       or_(MigrationRow.owner == owner, MigrationRow.owner.is_(None), MigrationRow.lease_until < now))
                .values(owner=owner, lease_until=now + ttl_s)
            )  # fmt: skip
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def save_migration(self, migration: Migration, owner: str | None = None) -> bool:
        """Save; with ``owner``, only while that replica still holds the lease (False if lost)."""
        migration.updated_at = utcnow()
        with self.session() as s:
            query = update(MigrationRow).where(MigrationRow.id == migration.id)
            if owner is not None:
                query = query.where(MigrationRow.owner == owner)
            values: dict[str, object] = {"phase": migration.phase.value, "doc": migration.model_dump_json(),
                                         "active": migration.phase not in TERMINAL_PHASES}  # fmt: skip
            if migration.phase in TERMINAL_PHASES:
                values["owner"] = None
            result = s.execute(query.values(**values))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                if owner is None:
                    raise NotFound(f"unknown migration {migration.id!r}")
                return False
            return True

    def migration(self, migration_id: str) -> Migration:
        with self.session() as s:
            row = s.get(MigrationRow, migration_id)
            if row is None:
                raise NotFound(f"unknown migration {migration_id!r}", migration=migration_id)
            return _load(row)

    def request_cancel(self, migration_id: str) -> None:
        with self.session() as s:
            row = s.get(MigrationRow, migration_id)
            if row is None:
                raise NotFound(f"unknown migration {migration_id!r}", migration=migration_id)
            row.cancel_requested = True

    def migrations(self, *, active_only: bool = False, vm: str | None = None) -> list[Migration]:
        with self.session() as s:
            query = select(MigrationRow).order_by(MigrationRow.created_at)
            if active_only:
                query = query.where(MigrationRow.active.is_(True))
            if vm is not None:
                query = query.where(MigrationRow.vm == vm)
            return [_load(r) for r in s.scalars(query).all()]

    # ------------------------------------------------------------------ attachments
    def add_attachment(self, vm: str, host: str, device: str, export: NbdExport) -> None:
        with self.session() as s:
            s.add(AttachmentRow(id=export.attachment, vm=vm, host=host, device=device,
                                export_json=export.model_dump_json(), active=True))  # fmt: skip

    def attachments(self, vm: str, host: str | None = None) -> dict[str, NbdExport]:
        """Active attachments of ``vm`` (on ``host``), keyed by device id."""
        with self.session() as s:
            query = select(AttachmentRow).where(AttachmentRow.vm == vm, AttachmentRow.active.is_(True))
            if host is not None:
                query = query.where(AttachmentRow.host == host)
            return {r.device: NbdExport.model_validate_json(r.export_json) for r in s.scalars(query).all()}

    def deactivate_attachment(self, attachment: str) -> None:
        with self.session() as s:
            row = s.get(AttachmentRow, attachment)
            if row is not None:
                row.active = False

    # ------------------------------------------------------------------ transfers
    def add_transfer(self, transfer_id: str, volume: str, doc: str, expires_at: float) -> None:
        with self.session() as s:
            s.add(TransferRow(id=transfer_id, volume=volume, doc=doc, expires_at=expires_at))

    def transfer(self, transfer_id: str) -> str:
        with self.session() as s:
            row = s.get(TransferRow, transfer_id)
            if row is None:
                raise NotFound(f"no transfer {transfer_id!r} (finished, or expired and detached)", transfer=transfer_id)
            return row.doc

    def transfers(self, *, volume: str | None = None, expired_before: float | None = None) -> list[str]:
        with self.session() as s:
            query = select(TransferRow)
            if volume is not None:
                query = query.where(TransferRow.volume == volume)
            if expired_before is not None:
                query = query.where(TransferRow.expires_at < expired_before)
            return [r.doc for r in s.scalars(query).all()]

    def update_transfer(self, transfer_id: str, doc: str, expires_at: float) -> None:
        with self.session() as s:
            row = s.get(TransferRow, transfer_id)
            if row is None:
                raise NotFound(f"no transfer {transfer_id!r} (finished, or expired and detached)", transfer=transfer_id)
            row.doc, row.expires_at = doc, expires_at

    def remove_transfer(self, transfer_id: str) -> None:
        with self.session() as s:
            row = s.get(TransferRow, transfer_id)
            if row is not None:
                s.delete(row)

    # ------------------------------------------------------------------ VCN objects
    def put_netobject(self, kind: str, object_id: str, doc: str) -> None:
        with self.session() as s:
            row = s.get(NetObjectRow, (kind, object_id))
            if row is None:
                s.add(NetObjectRow(kind=kind, id=object_id, doc=doc))
            else:
                row.doc = doc

    def netobjects(self, kind: str) -> list[str]:
        with self.session() as s:
            query = select(NetObjectRow).where(NetObjectRow.kind == kind).order_by(NetObjectRow.id)
            return [r.doc for r in s.scalars(query).all()]

    def delete_netobject(self, kind: str, object_id: str) -> None:
        with self.session() as s:
            row = s.get(NetObjectRow, (kind, object_id))
            if row is None:
                raise NotFound(f"unknown {kind.rstrip('s')} {object_id!r}")
            s.delete(row)

    # ------------------------------------------------------------------ evacuations
    def add_evacuation(self, evacuation_id: str, doc: str) -> None:
        with self.session() as s:
            s.add(EvacuationRow(id=evacuation_id, doc=doc))

    def evacuation(self, evacuation_id: str) -> str:
        with self.session() as s:
            row = s.get(EvacuationRow, evacuation_id)
            if row is None:
                raise NotFound(f"unknown evacuation {evacuation_id!r}")
            return row.doc


def _load(row: MigrationRow) -> Migration:
    migration = Migration.model_validate_json(row.doc)
    migration.cancel_requested = migration.cancel_requested or bool(row.cancel_requested)
    return migration


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
