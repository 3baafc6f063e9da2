"""The one envelope for flow state that moves between hosts (bulk, deltas, anything added later).

Why one: a migration hands conntrack from one vswitch to another through REST bodies, files and
retries; every such blob must be recognisable, versioned and self-checking, so a truncated or
corrupted transfer is refused loudly instead of importing half a table. The layout follows
Firecracker's snapshot header idea — magic, version, length, checksum — in 16 bytes::

    offset  size  field
    0       4     magic  b"LMFS" (livemig flow state)
    4       1     format version (1)
    5       1     kind   (1: FlowBatch as JSON)
    6       2     flags  (0; reserved)
    8       4     payload length (big-endian)
    12      4     CRC-32 of the header (with this field zero) followed by the payload
    16      n     payload (UTF-8 JSON of the record named by ``kind``)

CRC-32 guards against accidents (truncation, bit flips, a wrong file), not against an attacker:
the transport between vswitches is the operator's own network.
"""

from __future__ import annotations

import struct
import zlib
from enum import IntEnum

from pydantic import BaseModel, ValidationError

from livemig.errors import InvalidRequest
from livemig.network.model import FlowBatch

MAGIC = b"LMFS"
FORMAT_VERSION = 1
MAX_PAYLOAD = 256 * 1024 * 1024
_HEADER = struct.Struct("!4sBBHII")
HEADER_SIZE = _HEADER.size
MEDIA_TYPE = "application/vnd.livemig.flow-envelope"
#: HTTP header carrying the exporting table's version: the ``since`` of the next delta
FLOW_VERSION_HEADER = "X-Livemig-Flow-Version"


class Kind(IntEnum):
    FLOW_BATCH = 1


class EnvelopeError(InvalidRequest):
    """Bytes that are not a complete, intact envelope of a version and kind we understand."""


def _crc(header_without_crc: bytes, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(header_without_crc)) & 0xFFFFFFFF


def seal(kind: Kind, payload: bytes) -> bytes:
    """Wrap ``payload`` in an envelope."""
    if len(payload) > MAX_PAYLOAD:
        raise EnvelopeError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    blank = _HEADER.pack(MAGIC, FORMAT_VERSION, int(kind), 0, len(payload), 0)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, int(kind), 0, len(payload), _crc(blank, payload)) + payload


def unseal(data: bytes, expect: Kind | None = None) -> tuple[Kind, bytes]:
    """Check and unwrap an envelope; raises :class:`EnvelopeError` saying what is wrong."""
    if len(data) < HEADER_SIZE:
        raise EnvelopeError(f"envelope truncated: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    magic, version, kind, flags, length, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise EnvelopeError(f"not a livemig flow-state envelope (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise EnvelopeError(f"envelope format version {version} is not supported (this build reads {FORMAT_VERSION})")
    payload = data[HEADER_SIZE:]
    if len(payload) != length:
        what = "truncated" if len(payload) < length else "has trailing bytes"
        raise EnvelopeError(f"envelope {what}: header says {length} payload bytes, got {len(payload)}")
    if _crc(_HEADER.pack(magic, version, kind, flags, length, 0), payload) != crc:
        raise EnvelopeError("envelope checksum mismatch (corrupted in transit or storage)")
    try:
        known = Kind(kind)
    except ValueError:
        raise EnvelopeError(f"envelope kind {kind} is unknown") from None
    if expect is not None and known is not expect:
        raise EnvelopeError(f"envelope holds {known.name}, expected {expect.name}")
    return known, bytes(payload)


def seal_model(kind: Kind, record: BaseModel) -> bytes:
    return seal(kind, record.model_dump_json().encode())


def seal_flows(batch: FlowBatch) -> bytes:
    """A flow batch, ready to move to another host."""
    return seal_model(Kind.FLOW_BATCH, batch)


def open_flows(data: bytes) -> FlowBatch:
    """The flow batch inside an envelope (checked end to end)."""
    _kind, payload = unseal(data, Kind.FLOW_BATCH)
    try:
        return FlowBatch.model_validate_json(payload)
    except ValidationError as exc:
        raise EnvelopeError(f"envelope payload is not a flow batch: {exc.errors()[0].get('msg', exc)}") from None
