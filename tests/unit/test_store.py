import pytest

from livemig.control.store import Store
from livemig.errors import Conflict, NotFound
from livemig.model import HostRegistration, Migration, Phase, VmSpec


@pytest.fixture
def store(tmp_path):
    return Store(f"sqlite:///{tmp_path / 'lmo.db'}")


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
