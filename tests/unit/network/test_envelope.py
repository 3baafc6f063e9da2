"""The flow-state envelope: round trip, and every kind of damage refused with a clear message."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.network.envelope import HEADER_SIZE, EnvelopeError, Kind, open_flows, seal, seal_flows, unseal
from livemig.network.model import FlowBatch, FlowRecord

BATCH = FlowBatch(
    vnic="web",
    version=7,
    since=3,
    full=False,
    records=[
        FlowRecord(proto=6, src="10.0.1.10", sport=40000, dst="10.0.2.20", dport=80, state="ESTABLISHED",
                   expires_in=431999.5, version=5),
        FlowRecord(proto=17, src="10.0.1.10", sport=5000, dst="10.0.2.20", dport=53, state="CLOSE",
                   expires_in=0, version=7, deleted=True),
    ],
)  # fmt: skip


def test_round_trip():
    data = seal_flows(BATCH)
    assert data[:4] == b"LMFS" and data[4] == 1 and data[5] == Kind.FLOW_BATCH
    assert open_flows(data) == BATCH


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda d: d[:10], "truncated: 10 bytes"),
        (lambda d: d[:-1], "truncated: header says"),
        (lambda d: d + b"x", "trailing bytes"),
        (lambda d: b"XXXX" + d[4:], "not a livemig flow-state envelope"),
        (lambda d: d[:4] + b"\x02" + d[5:], "format version 2 is not supported"),
        (lambda d: d[:-3] + bytes([d[-3] ^ 0x01]) + d[-2:], "checksum mismatch"),
        (lambda d: d[:5] + b"\x07" + d[6:], "checksum mismatch"),  # the header is covered too
    ],
)
def test_damage_is_refused(damage, needle):
    with pytest.raises(EnvelopeError, match=needle):
        open_flows(damage(seal_flows(BATCH)))


def test_valid_envelope_with_wrong_content_is_refused():
    with pytest.raises(EnvelopeError, match="not a flow batch"):
        open_flows(seal(Kind.FLOW_BATCH, b'{"vnic": 1}'))
    header = struct.pack("!4sBBHII", b"LMFS", 1, 9, 0, 0, 0)
    import zlib

    forged = header[:12] + struct.pack("!I", zlib.crc32(header) & 0xFFFFFFFF)
    with pytest.raises(EnvelopeError, match="kind 9 is unknown"):
        unseal(forged)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 400), st.integers(0, 255))
def test_any_single_byte_change_is_caught(position, value):
    data = bytearray(seal_flows(BATCH))
    position %= len(data)
    if data[position] == value:
        return
    data[position] = value
    with pytest.raises(EnvelopeError):
        open_flows(bytes(data))
    assert HEADER_SIZE == 16
