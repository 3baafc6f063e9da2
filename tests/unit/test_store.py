import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from livemig.control import store as store_module
from livemig.control.store import DirtyRate, Store
from livemig.errors import CapacityError, Conflict, NotFound
from livemig.model import HostRegistration, Migration, Phase, VmSpec


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """Every store test runs on both backends (PostgreSQL when `make test` provides one)."""
    if request.param == "sqlite":
        return Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    return Store(request.getfixturevalue("postgres_url"))


def test_vm_names_are_unique(store):
    store.add_vm(VmSpec(name="vm", memory_mib=256), "A")
    with pytest.raises(Conflict, match="taken"):
        store.add_vm(VmSpec(name="vm", memory_mib=512), "B")
    assert store.vm("vm")[1] == "A"


def test_unknown_things_are_not_found(store):
    with pytest.raises(NotFound):
        store.vm("nope")
    with pytest.raises(NotFound):
        store.host("nope")
    with pytest.raises(NotFound):
        store.migration("nope")


def test_host_registration_is_an_upsert(store):
    store.upsert_host(HostRegistration(name="A", api_url="http://a:1", migration_address="10.0.0.1"))
    store.upsert_host(HostRegistration(name="A", api_url="http://a:2", migration_address="10.0.0.1"))
    assert [h.api_url for h in store.hosts()] == ["http://a:2"]


def test_the_claim_is_released_on_a_terminal_phase(store):
    first = Migration(id="m1", vm="vm", source="A", destination="B")
    store.add_migration(first)
    with pytest.raises(Conflict, match="already migrating"):
        store.add_migration(Migration(id="m2", vm="vm", source="A", destination="B"))
    first.phase = Phase.FAILED
    store.save_migration(first)
    store.add_migration(Migration(id="m2", vm="vm", source="A", destination="B"))
    assert [m.id for m in store.migrations(active_only=True)] == ["m2"]


def test_a_controller_save_never_erases_a_cancel_request(store):
    m = Migration(id="m1", vm="vm", source="A", destination="B")
    store.add_migration(m)
    loaded = store.migration("m1")  # the controller holds this copy...
    store.request_cancel("m1")  # ...while the API records the cancel
    loaded.phase = Phase.PRECOPY
    store.save_migration(loaded)
    assert store.migration("m1").cancel_requested is True


def test_store_survives_a_reopen(tmp_path):
    url = f"sqlite:///{tmp_path / 'lmo.db'}"
    Store(url).add_migration(Migration(id="m1", vm="vm", source="A", destination="B"))
    assert Store(url).migration("m1").vm == "vm"


def test_a_lease_gives_each_migration_one_driver(store):
    store.add_migration(Migration(id="m1", vm="vm", source="A", destination="B"))
    assert store.acquire("m1", "lmo-1", ttl_s=30)
    assert not store.acquire("m1", "lmo-2", ttl_s=30), "a live lease cannot be taken"
    assert store.acquire("m1", "lmo-1", ttl_s=30), "the holder renews"
    assert store.acquire("m1", "lmo-2", ttl_s=30) is False
    m = store.migration("m1")
    m.phase = Phase.VALIDATING
    assert store.save_migration(m, owner="lmo-1")
    assert not store.save_migration(m, owner="lmo-2"), "a replica without the lease cannot write"


def test_an_expired_lease_is_taken_over(store):
    store.add_migration(Migration(id="m1", vm="vm", source="A", destination="B"))
    assert store.acquire("m1", "dead-replica", ttl_s=-1)  # already expired
    assert store.acquire("m1", "survivor", ttl_s=30)
    stale = store.migration("m1")
    assert not store.save_migration(stale, owner="dead-replica"), "the old owner is fenced out"


def test_terminal_migrations_cannot_be_leased(store):
    m = Migration(id="m1", vm="vm", source="A", destination="B")
    store.add_migration(m)
    m.phase = Phase.SUCCEEDED
    store.save_migration(m)
    assert not store.acquire("m1", "lmo-1", ttl_s=30)


def host(name: str, memory: int | None = 4096, used: int | None = 0) -> HostRegistration:
    return HostRegistration(name=name, api_url=f"http://{name.lower()}:1", migration_address="10.0.0.1",
                            memory_mib=memory, memory_used_mib=used)  # fmt: skip


def test_placement_takes_the_most_free_host_and_never_overfills_one(store):
    store.upsert_host(host("A", 1024))
    store.upsert_host(host("B", 2048))
    placed = [store.place_vm(VmSpec(name=f"vm{i}", memory_mib=512)).name for i in range(6)]
    assert placed == ["B", "B", "B", "A", "B", "A"]  # most free each time (a tie: the later name)
    assert {c.name: (c.placed_mib, c.free_mib) for c in store.capacities()} == {"A": (1024, 0), "B": (2048, 0)}
    with pytest.raises(CapacityError, match="no host can hold 512 MiB"):
        store.place_vm(VmSpec(name="full", memory_mib=512))
    with pytest.raises(NotFound):
        store.vm("full")  # nothing recorded
    store.remove_vm("vm0")
    assert store.capacity("B").free_mib == 512


def test_creating_a_vm_costs_the_store_few_statements(store):
    """The claim (the most free host chosen inside it, its row returned for the call to it), the
    insert (on PostgreSQL inside the claim's statement), and the resolved spec afterwards: each
    round trip to PostgreSQL costs milliseconds on busy cores. A taken name is still told as such,
    even where no host has room."""
    store.upsert_host(host("A", 1024))
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement.split()[0].upper())

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        assert store.place_vm(VmSpec(name="vm", memory_mib=512)).api_url == "http://a:1"
        store.set_vm("vm", spec=VmSpec(name="vm", memory_mib=512, machine="pc-q35-7.2"))
        named = store.place_vm(VmSpec(name="vm2", memory_mib=256), "A")
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    writes = [s for s in statements if s in ("SELECT", "UPDATE", "INSERT", "WITH")]
    if store.postgres:  # the claim and the insert are one statement
        assert writes == ["WITH", "UPDATE", "WITH"]
    else:
        assert writes == ["UPDATE", "INSERT", "UPDATE", "UPDATE", "INSERT"]
    assert named.name == "A" and store.vm("vm")[0].machine == "pc-q35-7.2"
    with pytest.raises(Conflict, match="already taken"):
        store.place_vm(VmSpec(name="vm", memory_mib=4096))  # no room anywhere, but the name is the mistake
    with pytest.raises(Conflict, match="already taken"):
        store.place_vm(VmSpec(name="vm", memory_mib=128))
    assert store.capacity("A").placed_mib == 768  # the refused claims rolled back
    with pytest.raises(NotFound):
        store.set_vm("nope", spec=VmSpec(name="nope", memory_mib=128))


def test_placement_on_a_named_host_checks_it(store):
    store.upsert_host(host("A", 1024))
    store.upsert_host(host("M", None))  # an older hostd: capacity never reported
    with pytest.raises(CapacityError, match="no host can hold 2048 MiB: host A has 1024 MiB free"):
        store.place_vm(VmSpec(name="big", memory_mib=2048), "A")
    assert store.place_vm(VmSpec(name="big", memory_mib=2048), "M").name == "M"  # only when named: its hostd checks
    with pytest.raises(CapacityError):
        store.place_vm(VmSpec(name="other", memory_mib=2048))  # never chosen by itself
    store.set_maintenance("A", True)
    with pytest.raises(Conflict, match="maintenance"):
        store.place_vm(VmSpec(name="vm", memory_mib=256), "A")
    with pytest.raises(NotFound):
        store.place_vm(VmSpec(name="vm", memory_mib=256), "Z")


def test_what_a_host_reports_counts_when_it_exceeds_what_the_lmo_placed(store):
    store.upsert_host(host("A", 4096, used=3000))  # VMs the LMO does not know use memory there
    assert store.capacity("A").free_mib == 1096
    store.place_vm(VmSpec(name="vm", memory_mib=1024), "A")
    store.upsert_host(host("A", None, None))  # re-registration without capacity: keeps what is known
    assert store.capacity("A").memory_mib == 4096 and store.capacity("A").free_mib == 1096
    store.set_maintenance("A", True)
    store.upsert_host(host("A", 8192, used=512))  # now what the LMO placed is the larger
    after = store.capacity("A")
    assert (after.memory_mib, after.reported_used_mib, after.placed_mib, after.free_mib) == (8192, 512, 1024, 7168)
    assert after.maintenance  # a host's registration never lifts what the LMO set


def test_a_migration_reserves_the_destination_until_it_ends_or_moves_the_vm(store):
    store.upsert_host(host("A", 4096))
    store.upsert_host(host("B", 1024))
    store.add_vm(VmSpec(name="vm", memory_mib=1024), "A")
    store.add_vm(VmSpec(name="vm2", memory_mib=1024), "A")
    failed = Migration(id="m1", vm="vm", source="A", destination="B")
    store.add_migration(failed)
    assert store.capacity("B").free_mib == 0
    with pytest.raises(CapacityError, match="destination B has 0 MiB free"):
        store.add_migration(Migration(id="m2", vm="vm2", source="A", destination="B"))
    failed.phase = Phase.FAILED
    store.save_migration(failed)
    store.save_migration(failed)  # a second save of an ended migration releases nothing again
    assert store.capacity("B").free_mib == 1024 and store.capacity("A").placed_mib == 2048
    moved = Migration(id="m3", vm="vm", source="A", destination="B")
    store.add_migration(moved)
    store.move_vm("vm", "B")  # the cut-over
    moved.phase = Phase.SUCCEEDED
    store.save_migration(moved)
    assert store.capacity("B").placed_mib == 1024 and store.capacity("A").placed_mib == 1024
    assert store.vm("vm")[1] == "B"


def test_replicas_share_the_active_migrations_fairly(store):
    for i in range(9):
        store.add_migration(Migration(id=f"m{i}", vm=f"vm{i}", source="A", destination="B"))
    first = store.claim("lmo-1", ttl_s=30, capacity=100)
    assert len(first) == 9, "alone, a replica takes all"
    store.claim("lmo-2", ttl_s=30, capacity=100)  # seen: the next passes share
    store.claim("lmo-3", ttl_s=30, capacity=100)
    for _ in range(2):
        held = {r: len(store.claim(r, ttl_s=30, capacity=100)) for r in ("lmo-1", "lmo-2", "lmo-3")}
    assert held == {"lmo-1": 3, "lmo-2": 3, "lmo-3": 3}
    owners = {c.id for r in ("lmo-1", "lmo-2", "lmo-3") for c in store.claim(r, ttl_s=30, capacity=100)}
    assert owners == {f"m{i}" for i in range(9)}, "every migration has exactly one driver"


def test_a_replica_whose_lease_ran_out_loses_what_it_drove_and_a_renewed_one_keeps_it(store):
    """The lease is the replica's: claiming renews it in one row, and every migration of a
    replica out of lease is free at once (the survivor takes them all, the old owner is fenced)."""
    for i in range(4):
        store.add_migration(Migration(id=f"m{i}", vm=f"vm{i}", source="A", destination="B"))
    assert len(store.claim("lmo-1", ttl_s=30, capacity=100)) == 4
    held_by_lmo2 = store.claim("lmo-2", ttl_s=30, capacity=100)
    assert held_by_lmo2 == [], "lmo-1 is in lease and within its share (it lets go of the excess next pass)"
    stale = store.migration("m0")
    store.claim("lmo-1", ttl_s=-1, capacity=100)  # lmo-1 renews no more: its lease has run out
    survivor = store.claim("lmo-2", ttl_s=30, capacity=100)
    assert [c.id for c in survivor] == ["m0", "m1", "m2", "m3"], "every one taken over in one pass"
    assert not store.save_migration(stale, owner="lmo-1"), "the old owner is fenced out"
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    assert len(store.claim("lmo-2", ttl_s=30, capacity=100)) == 4
    writes = [s for s in statements if not s.lstrip().upper().startswith("SELECT")]
    assert len(writes) == 1 and "replicas" in writes[0], f"renewing wrote more than the replica's row: {writes}"


def test_a_replica_takes_no_more_than_its_capacity(store):
    for i in range(5):
        store.add_migration(Migration(id=f"m{i}", vm=f"vm{i}", source="A", destination="B"))
    assert [c.id for c in store.claim("lmo-1", ttl_s=30, capacity=2)] == ["m0", "m1"]  # oldest first


def test_saves_bump_the_version_and_a_lost_lease_is_reported(store):
    store.add_migration(Migration(id="m1", vm="vm", source="A", destination="B"))
    (claim,) = store.claim("lmo-1", ttl_s=30, capacity=10)
    m = store.migration("m1")
    assert store.save_migrations([m], "lmo-1") == [claim.version + 1]
    assert store.save_migrations([m], "lmo-2") == [None]


def four_migrations_three_held(store):
    """Four VMs of 1 GiB on A, each with a migration to B (both hosts 8 GiB); replica lmo-1 holds
    m0, m1 and m2, m3 stays free. Returns lmo-1's claims by migration id."""
    store.upsert_host(host("A", 8192))
    store.upsert_host(host("B", 8192))
    for i in range(4):
        store.add_vm(VmSpec(name=f"vm{i}", memory_mib=1024), "A")
        store.add_migration(Migration(id=f"m{i}", vm=f"vm{i}", source="A", destination="B"))
    return {c.id: c for c in store.claim("lmo-1", ttl_s=30, capacity=3)}


def test_a_batch_save_reports_each_migration_its_own_outcome(store):
    """One batch (one statement for the ones that stay active): held ones get their new version
    and their document, one held by another replica gets None and is left alone, one that ends
    releases its reservation; dirty rates of many VMs land in one statement, newest wins."""
    claims = four_migrations_three_held(store)
    assert sorted(claims) == ["m0", "m1", "m2"]
    batch = [store.migration(i) for i in ("m0", "m1", "m2", "m3")]
    batch[0].phase = batch[1].phase = Phase.PRECOPY
    batch[1].reason = "kept"
    batch[2].phase = Phase.FAILED
    assert store.save_migrations(batch, "lmo-1") == [claims["m0"].version + 1, claims["m1"].version + 1,
                                                     claims["m2"].version + 1, None]  # fmt: skip
    assert store.migration("m1").phase is Phase.PRECOPY and store.migration("m1").reason == "kept"
    assert store.migration("m3").phase is Phase.PENDING, "a migration this replica does not hold is not written"
    assert store.capacity("B").free_mib == 8192 - 3 * 1024, "only the ended one released its room"
    earlier, later = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    store.record_dirty_rates([DirtyRate("vm0", 5.0, later, "migration"), DirtyRate("vm1", 7.0, later, "probe")])
    store.record_dirty_rates([DirtyRate("vm0", 99.0, earlier, "probe")])  # older: ignored
    facts = {f.name: f for f in store.vm_facts(["A"])}
    assert (facts["vm0"].dirty_rate_mib_s, facts["vm1"].dirty_rate_mib_s) == (5.0, 7.0)


def test_migrations_ending_in_one_batch_release_what_each_reserved_once(store):
    """A pass's endings saved together: one that failed releases its reservation on B; one that
    succeeded after its VM moved to B keeps it (the reservation became the VM's placement); one
    held by another replica is not written; saving an end again releases nothing more."""
    claims = four_migrations_three_held(store)
    assert store.capacity("B").free_mib == 8192 - 4 * 1024
    store.move_vm("vm1", "B")  # m1's cut-over
    batch = [store.migration(i) for i in ("m0", "m1", "m2", "m3")]
    batch[0].phase, batch[1].phase, batch[2].phase, batch[3].phase = (
        Phase.FAILED, Phase.SUCCEEDED, Phase.PRECOPY, Phase.ABORTED)  # fmt: skip
    versions = store.save_migrations(batch, "lmo-1")
    assert versions == [claims["m0"].version + 1, claims["m1"].version + 1, claims["m2"].version + 1, None]
    assert [store.migration(i).phase for i in ("m0", "m1", "m2", "m3")] == [
        Phase.FAILED, Phase.SUCCEEDED, Phase.PRECOPY, Phase.PENDING]  # fmt: skip
    assert store.capacity("B").free_mib == 8192 - 3 * 1024, "m0's room freed; m1's is now vm1's"
    assert store.capacity("A").free_mib == 8192 - 3 * 1024, "vm1 left A"
    assert store.save_migrations([store.migration("m0")], "lmo-1") == [None], "an ended one is no longer held"
    assert store.capacity("B").free_mib == 8192 - 3 * 1024


def test_an_older_store_is_upgraded_with_its_inventory(tmp_path):
    """A store written before hosts carried inventory: columns added, placed memory counted."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE hosts (name VARCHAR(64) PRIMARY KEY, doc TEXT NOT NULL, maintenance BOOLEAN NOT NULL,
                                registered_at DATETIME NOT NULL);
            CREATE TABLE vms (name VARCHAR(64) PRIMARY KEY, host VARCHAR(64) NOT NULL, spec_json TEXT NOT NULL,
                              created_at DATETIME NOT NULL);
        """)
        db.execute("INSERT INTO hosts VALUES ('A', ?, 0, '2025-01-01')",
                   (host("A", None, None).model_dump_json(exclude={"maintenance"}),))  # fmt: skip
        db.execute(
            "INSERT INTO vms VALUES ('vm', 'A', ?, '2025-01-01')",
            (VmSpec(name="vm", memory_mib=768).model_dump_json(),),
        )
    store = Store(f"sqlite:///{path}")
    assert store.capacity("A").placed_mib == 768
    store.upsert_host(host("A", 1024))
    assert store.capacity("A").free_mib == 256


def test_the_replicas_in_lease_say_how_many_migrations_they_drive_at_once(store):
    """The wave planner's bound on the LMO's own pace: each replica's capacity, renewed with its lease."""
    assert store.driving_capacity() == 0
    store.claim("lmo-a", 30.0, 100)
    store.claim("lmo-b", 30.0, 250)
    store.claim("api", 30.0, 0)
    assert store.driving_capacity() == 350
    store.claim("lmo-b", -1.0, 250)  # its lease ran out: it drives nothing
    assert store.driving_capacity() == 100


@contextmanager
def round_trips(store: Store, tmp_path: Path) -> Iterator[list[str]]:
    """The requests libpq sends to PostgreSQL while the block runs, each one a round trip (a
    simple ``Query``, or an extended query's ``Sync``), from libpq's own protocol trace; BEGIN,
    COMMIT and the pool's pings included, which statement events do not show."""
    trace = (tmp_path / "libpq.trace").open("w")

    def traced(connection: Any, *_: Any) -> None:
        connection.pgconn.trace(trace.fileno())

    def untraced(connection: Any, *_: Any) -> None:
        connection.pgconn.untrace()

    event.listen(store.engine, "checkout", traced)
    event.listen(store.engine, "checkin", untraced)
    sent: list[str] = []
    try:
        yield sent
    finally:
        event.remove(store.engine, "checkout", traced)
        event.remove(store.engine, "checkin", untraced)
        trace.close()
        for line in (tmp_path / "libpq.trace").read_text().splitlines():
            fields = line.split("\t")
            if len(fields) > 3 and fields[1] == "F" and fields[3].split()[0] in ("Query", "Sync"):
                sent.append(fields[3].split()[0])


def test_creating_a_vm_on_postgresql_is_two_round_trips(postgres_url, tmp_path):
    """Placing a VM (claim and insert in one statement) and saving its resolved spec, each sent on
    its own: no BEGIN, no COMMIT, no ping of a connection in use. It was nine round trips. A
    host's report of its memory, an API replica's most frequent write, is one (it was five)."""
    store = Store(postgres_url)
    store.upsert_host(host("A", 4096))
    store.place_vm(VmSpec(name="warm", memory_mib=256))  # the pool holds a connection now
    with round_trips(store, tmp_path) as sent:
        store.place_vm(VmSpec(name="vm", memory_mib=512))
        store.set_vm("vm", spec=VmSpec(name="vm", memory_mib=512, machine="pc-q35-7.2"))
    assert len(sent) == 2
    assert store.vm("vm")[0].machine == "pc-q35-7.2" and store.capacity("A").placed_mib == 768
    with round_trips(store, tmp_path) as sent:
        store.upsert_host(host("A", 8192, used=1024))
    assert len(sent) == 1
    assert store.capacity("A").free_mib == 8192 - 1024


def _end_every_connection_of(url: str) -> None:
    """What a restarted PostgreSQL does to the store's pooled connections."""
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) {others}"))
        for _ in range(100):  # the signal is sent; the backends end a moment later
            if not conn.execute(text(f"SELECT count(*) {others}")).scalar():
                return
            time.sleep(0.05)
    raise AssertionError("the store's connections outlived pg_terminate_backend")


def test_an_idle_pooled_connection_is_pinged_and_replaced_when_the_server_ended_it(postgres_url, monkeypatch):
    """A connection idle past PING_IDLE_S is pinged before use: one the server ended is replaced
    without a failed request. One used more recently is not pinged (a round trip saved on every
    busy path): it fails its one statement, and the pool then replaces its older connections."""
    store = Store(postgres_url)
    store.upsert_host(host("A", 4096))
    pings: list[int] = []
    ping = store.engine.dialect.do_ping
    monkeypatch.setattr(store.engine.dialect, "do_ping", lambda c: pings.append(1) or ping(c))
    store.capacity("A")
    store.capacity("A")
    assert pings == []  # in use a moment ago: not pinged

    monkeypatch.setattr(store_module, "PING_IDLE_S", 0.0)
    _end_every_connection_of(postgres_url)
    assert store.capacity("A").memory_mib == 4096  # pinged, found dead, replaced
    assert pings

    monkeypatch.setattr(store_module, "PING_IDLE_S", 3600.0)
    recent = Store(postgres_url)  # a pool of one connection, just used
    recent.capacity("A")
    _end_every_connection_of(postgres_url)
    with pytest.raises(OperationalError):
        recent.capacity("A")
    assert recent.capacity("A").memory_mib == 4096  # the next one gets a new connection


def test_the_lmos_pace_is_kept_after_its_replica_and_scaled_to_the_replicas_driving(store):
    """A wave is often driven by replicas started for it: the pace the last busy replica measured
    stays in the store when it stops, and counts once for each replica that drives now."""
    store.claim("busy", ttl_s=0.0, capacity=2000, pace=(54.0, 940))  # measured, then its lease ended
    store.claim("wave-1", ttl_s=30, capacity=2000)
    pace = store.lmo_pace(3600)
    assert pace is not None and (pace.ended_per_s, pace.held, pace.replica) == (54.0, 940, "busy")
    assert pace.age_s >= 0
