import pytest

from livemig.control.store import Store
from livemig.errors import Conflict, NotFound
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
