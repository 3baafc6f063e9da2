"""Conntrack: TCP state transitions, timeouts under an injected clock, export / delta / import."""

from __future__ import annotations

import pytest

from livemig.errors import InvalidRequest
from livemig.network.conntrack import Conntrack, ConntrackTable, FlowState, TableFull
from livemig.network.model import FlowRecord
from livemig.network.packets import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    FlowInfo,
    ip_to_int,
)

VM = ip_to_int("10.0.1.10")
PEER = ip_to_int("10.0.2.20")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def out(flags: int, sport: int = 40000, dport: int = 80) -> FlowInfo:
    return FlowInfo(IPPROTO_TCP, VM, PEER, sport, dport, tcp_flags=flags)


def back(flags: int, sport: int = 40000, dport: int = 80) -> FlowInfo:
    return FlowInfo(IPPROTO_TCP, PEER, VM, dport, sport, tcp_flags=flags)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock) -> ConntrackTable:
    return ConntrackTable(clock)


def state(table: ConntrackTable) -> FlowState:
    (entry,) = table.entries()
    return entry.state


def test_tcp_handshake_data_and_orderly_close(table):
    assert table.create(out(TCP_SYN)) is not None and state(table) is FlowState.SYN_SENT
    assert table.track(back(TCP_SYN | TCP_ACK)) and state(table) is FlowState.SYN_RECV
    assert table.track(out(TCP_ACK)) and state(table) is FlowState.ESTABLISHED
    assert table.track(back(TCP_ACK)) and table.track(out(TCP_ACK)) and state(table) is FlowState.ESTABLISHED
    assert table.track(out(TCP_FIN | TCP_ACK)) and state(table) is FlowState.FIN_WAIT
    assert table.track(back(TCP_ACK)) and state(table) is FlowState.FIN_WAIT
    assert table.track(back(TCP_FIN | TCP_ACK)) and state(table) is FlowState.LAST_ACK
    assert table.track(out(TCP_ACK)) and state(table) is FlowState.TIME_WAIT


def test_rst_closes_and_a_new_syn_reopens(table):
    table.create(out(TCP_SYN))
    table.track(back(TCP_SYN | TCP_ACK))
    table.track(out(TCP_ACK))
    assert table.track(back(TCP_RST)) and state(table) is FlowState.CLOSE
    assert table.track(out(TCP_SYN)) and state(table) is FlowState.SYN_SENT


def test_invalid_segments_are_not_tracked(table):
    table.create(out(TCP_SYN))
    assert not table.track(back(TCP_ACK))  # a bare ACK cannot answer a SYN
    assert not table.track(back(TCP_ACK, dport=81))  # another flow entirely
    table.track(back(TCP_SYN | TCP_ACK))
    table.track(out(TCP_ACK))
    assert not table.track(back(TCP_SYN))  # a SYN from the server inside an established flow


def test_timeouts_follow_the_state(clock, table):
    table.create(out(TCP_SYN))
    clock.now += 119
    assert table.track(back(TCP_SYN | TCP_ACK))  # SYN_SENT lives 120 s
    clock.now += 59
    assert table.track(out(TCP_ACK))  # SYN_RECV lives 60 s
    clock.now += 432000 - 1
    assert table.track(back(TCP_ACK))  # ESTABLISHED: five days, refreshed by traffic
    table.track(back(TCP_RST))
    clock.now += 10
    assert not table.track(out(TCP_ACK)) and len(table) == 0  # CLOSE: 10 s, then gone


def test_udp_and_icmp_echo(clock, table):
    udp_out = FlowInfo(IPPROTO_UDP, VM, PEER, 5000, 53)
    udp_back = FlowInfo(IPPROTO_UDP, PEER, VM, 53, 5000)
    table.create(udp_out)
    assert state(table) is FlowState.UDP_UNREPLIED
    clock.now += 29
    assert table.track(udp_back) and state(table) is FlowState.UDP_REPLIED
    clock.now += 119
    assert table.track(udp_out)
    clock.now += 121
    assert not table.track(udp_back)

    req = FlowInfo(IPPROTO_ICMP, VM, PEER, 7, 7, icmp_type=ICMP_ECHO_REQUEST, icmp_code=0)
    rep = FlowInfo(IPPROTO_ICMP, PEER, VM, 7, 7, icmp_type=ICMP_ECHO_REPLY, icmp_code=0)
    spoof = FlowInfo(IPPROTO_ICMP, PEER, VM, 7, 7, icmp_type=ICMP_ECHO_REQUEST, icmp_code=0)
    table.create(req)
    assert not table.track(spoof)  # a request the other way is not a reply of our ping
    assert table.track(rep)
    clock.now += 31
    assert not table.track(rep)


def test_loose_pickup_and_untracked_openers(table):
    assert table.create(out(TCP_ACK)).state is FlowState.ESTABLISHED
    assert table.create(out(TCP_RST, sport=1)) is None
    assert table.create(FlowInfo(IPPROTO_ICMP, VM, PEER, 0, 0, icmp_type=3, icmp_code=1)) is None


def test_full_table_refuses_new_flows_but_frees_expired_ones(clock):
    table = ConntrackTable(clock, max_entries=2)
    table.create(out(TCP_SYN, sport=1))
    table.create(out(TCP_SYN, sport=2))
    with pytest.raises(TableFull):
        table.create(out(TCP_SYN, sport=3))
    clock.now += 121
    assert table.create(out(TCP_SYN, sport=3)) is not None


def test_export_delta_import_moves_a_table(clock):
    source, destination = Conntrack(clock), Conntrack(clock)
    src = source.table("web")
    src.create(out(TCP_SYN, sport=1))
    src.create(FlowInfo(IPPROTO_UDP, VM, PEER, 5000, 53))
    bulk = source.export_delta("web", 0)
    assert bulk.full and len(bulk.records) == 2
    assert destination.import_batch(bulk) == (2, 0)

    src.track(back(TCP_SYN | TCP_ACK, sport=1))  # state change -> in the delta
    src.create(out(TCP_SYN, sport=2))  # new flow -> in the delta
    clock.now += 31  # the UDP flow expires -> a tombstone in the delta
    delta = source.export_delta("web", bulk.version)
    assert not delta.full
    kinds = {(r.sport, r.deleted, r.state) for r in delta.records}
    assert kinds == {(1, False, "SYN_RECV"), (2, False, "SYN_SENT"), (5000, True, "CLOSE")}
    destination.import_batch(delta)
    moved = {(e.key[2], e.state) for e in destination.table("web").entries()}
    assert moved == {(1, FlowState.SYN_RECV), (2, FlowState.SYN_SENT)}
    assert source.export_delta("web", delta.version).records == []

    # the imported entry keeps tracking on the new host: the handshake completes there
    assert destination.table("web").track(out(TCP_ACK, sport=1))
    assert {e.state for e in destination.table("web").entries() if e.key[2] == 1} == {FlowState.ESTABLISHED}


def test_refresh_only_reaches_deltas_when_it_matters(clock):
    ct = Conntrack(clock)
    table = ct.table("web")
    table.create(out(TCP_ACK))
    version = table.version
    clock.now += 10
    table.track(out(TCP_ACK))  # 10 s of a 5-day timeout: not worth a delta
    assert ct.export_delta("web", version).records == []


def test_full_import_replaces_and_delta_from_forgotten_past_is_full(clock):
    ct = Conntrack(clock)
    table = ConntrackTable(clock, max_tombstones=4)
    for port in range(10):
        table.create(out(TCP_SYN, sport=port))
    first = table.version
    table.clear()
    assert table.floor > first
    full, _ = table.export_delta(first)
    assert full  # tombstones from then are gone: only a full export is correct

    ct.table("db").create(out(TCP_SYN, sport=99))
    record = FlowRecord(
        proto=6, src="10.0.1.10", sport=1, dst="10.0.2.20", dport=80, state="ESTABLISHED", expires_in=50, version=1
    )
    assert ct.import_records("db", [record], full=True) == (1, 1)
    assert [e.key[2] for e in ct.table("db").entries()] == [1]
    clock.now += 51
    assert ct.export("db") == []  # the remaining time travelled with the record
    ct.remove_vnic("db")
    assert "db" not in ct.vnics()


def test_unimportable_records_are_refused():
    bad = FlowRecord(
        proto=6, src="10.0.1.999", sport=1, dst="10.0.2.20", dport=80, state="ESTABLISHED", expires_in=5, version=1
    )
    with pytest.raises(InvalidRequest, match="not importable"):
        Conntrack().import_records("web", [bad])
    odd = bad.model_copy(update={"src": "10.0.1.9", "state": "DANCING"})
    with pytest.raises(InvalidRequest, match="not importable"):
        Conntrack().import_records("web", [odd])


# -- what the vswitch's flow cache relies on --------------------------------------------------


def test_an_entry_a_lookup_can_no_longer_find_is_marked_not_live(clock):
    ct = Conntrack(clock)
    table = ct.table("web")
    expired = table.create(FlowInfo(IPPROTO_UDP, VM, PEER, 5000, 53))
    removed = table.create(out(TCP_SYN, sport=1))
    replaced = table.create(out(TCP_SYN, sport=2))
    ping = table.create(FlowInfo(IPPROTO_ICMP, VM, PEER, 7, 7, icmp_type=ICMP_ECHO_REQUEST, icmp_code=0))
    dropped = ct.table("db").create(out(TCP_SYN, sport=3))
    assert all(e is not None and e.live for e in (expired, removed, replaced, ping, dropped))
    clock.now += 31
    table.sweep()
    gone = FlowRecord(proto=6, src="10.0.1.10", sport=1, dst="10.0.2.20", dport=80, state="CLOSE", expires_in=0,
                      version=1, deleted=True)  # fmt: skip
    again = gone.model_copy(update={"sport": 2, "state": "ESTABLISHED", "expires_in": 50, "deleted": False})
    table.import_records([gone, again], full=False)
    # the peer pings us with our ping's identifier: its flow is filed under both of our ping's keys
    assert table.create(FlowInfo(IPPROTO_ICMP, PEER, VM, 7, 7, icmp_type=ICMP_ECHO_REQUEST, icmp_code=0))
    ct.remove_vnic("db")
    assert not any(e is not None and e.live for e in (expired, removed, replaced, ping, dropped))
    assert {e.key[2] for e in table.entries() if e.live} == {2, 7}


def test_inserts_count_every_entry_put_in(table):
    table.create(out(TCP_SYN))
    table.track(back(TCP_SYN | TCP_ACK))  # an update, not an insert
    record = FlowRecord(proto=6, src="10.0.1.10", sport=9, dst="10.0.2.20", dport=80, state="ESTABLISHED",
                        expires_in=50, version=1)  # fmt: skip
    table.import_records([record], full=False)
    assert table.inserts == 2


def test_touch_is_track_for_a_packet_that_changes_no_state(clock):
    tracked, touched = ConntrackTable(clock), ConntrackTable(clock)
    for t in (tracked, touched):
        t.create(out(TCP_ACK))
    (entry,) = touched.entries()
    for step in (10.0, 200_000.0, 1.0, 150_000.0):
        clock.now += step
        assert tracked.advance(back(TCP_ACK)) is not None
        touched.touch(entry, clock.now)
        (other,) = tracked.entries()
        assert (entry.deadline, entry.version, entry.exported_deadline) == (
            other.deadline,
            other.version,
            other.exported_deadline,
        )
        assert touched.version == tracked.version
