"""The guest workload's disk log, read and written from the host.

Why this exists: in disk mode the guest workload (``workload.c``) appends numbered, checksummed
4 KiB records to a raw block device, and its ``diskcheck`` command verifies them from inside the
VM. The same volume can be inspected from outside once the VM is gone (a test's raw file, a
blockd volume after a failed migration): this module reads that format with :func:`zlib.crc32`,
so a bug in the guest's own checker cannot hide a bug in its writer. It also builds records, which
lets unit tests cover the format without QEMU.

Format (little-endian; block = 4096 bytes; see the comment at the top of ``workload.c``):

* block 0, header: ``LMDISKLG``, u32 version 1, u32 record size 4096, u64 log id, u64 first record
  block (1), zeros, u32 CRC-32 of bytes 0..4091.
* block ``s``, record ``s`` (1, 2, 3, ...): ``LMRECORD``, u64 log id, u64 seq, 508 u64 payload
  words ``base(log id, seq) + i * STEP``, u32 version 1, u32 CRC-32 of bytes 0..4091.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "BLOCK",
    "FORMAT_VERSION",
    "HEADER_MAGIC",
    "RECORD_MAGIC",
    "DiskLog",
    "build_header",
    "build_record",
    "classify_record",
    "header_log_id",
    "parse_disk_log",
    "read_disk_log",
]

BLOCK = 4096
SECTOR = 512
FORMAT_VERSION = 1
HEADER_MAGIC = b"LMDISKLG"
RECORD_MAGIC = b"LMRECORD"
_STEP = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1
_PAYLOAD_OFF = 24
_PAYLOAD_WORDS = 508
_VERSION_OFF = 4088
_CRC_OFF = 4092
_PAYLOAD_STEPS = tuple(i * _STEP for i in range(_PAYLOAD_WORDS))
_ZERO_SECTOR = bytes(SECTOR)


def _record_base(log_id: int, seq: int) -> int:
    """splitmix64's finalizer over ``log_id ^ seq * STEP`` (the same arithmetic as the guest's)."""
    x = (log_id ^ (seq * _STEP)) & _MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    return x


def _payload(log_id: int, seq: int) -> bytes:
    base = _record_base(log_id, seq)
    return struct.pack(f"<{_PAYLOAD_WORDS}Q", *((base + step) & _MASK for step in _PAYLOAD_STEPS))


def _seal(body: bytearray) -> bytes:
    struct.pack_into("<I", body, _CRC_OFF, zlib.crc32(bytes(body[:_CRC_OFF])))
    return bytes(body)


def build_header(log_id: int) -> bytes:
    """Block 0 of a log with this id (what the guest writes when it formats a fresh volume)."""
    body = bytearray(BLOCK)
    struct.pack_into("<8sIIQQ", body, 0, HEADER_MAGIC, FORMAT_VERSION, BLOCK, log_id, 1)
    return _seal(body)


def build_record(log_id: int, seq: int) -> bytes:
    """Record ``seq`` of log ``log_id``, byte for byte as the guest writes it."""
    body = bytearray(BLOCK)
    struct.pack_into("<8sQQ", body, 0, RECORD_MAGIC, log_id, seq)
    body[_PAYLOAD_OFF:_VERSION_OFF] = _payload(log_id, seq)
    struct.pack_into("<I", body, _VERSION_OFF, FORMAT_VERSION)
    return _seal(body)


def header_log_id(block: bytes) -> int | None:
    """The log id of a valid header block, else None (never formatted, damaged, other format)."""
    if len(block) < BLOCK or block[:8] != HEADER_MAGIC:
        return None
    (crc,) = struct.unpack_from("<I", block, _CRC_OFF)
    if crc != zlib.crc32(block[:_CRC_OFF]):
        return None
    version, record_size, log_id, first = struct.unpack_from("<IIQQ", block, 8)
    if version != FORMAT_VERSION or record_size != BLOCK or first != 1 or log_id == 0:
        return None
    return int(log_id)


def classify_record(block: bytes, log_id: int, seq: int) -> str:
    """``"ok"`` if ``block`` is record ``seq`` of log ``log_id``, else the guest's word for why not.

    Checked in the guest's order: ``zero`` (never written), ``torn`` (some 512-byte sector is all
    zero, which no valid record has: the device wrote it partly), ``magic``, ``crc``, ``version``,
    ``logid``, ``seq``, ``payload``.
    """
    if len(block) != BLOCK:
        raise ValueError(f"a record is {BLOCK} bytes, got {len(block)}")
    if not any(block):
        return "zero"
    if any(block[off : off + SECTOR] == _ZERO_SECTOR for off in range(0, BLOCK, SECTOR)):
        return "torn"
    if block[:8] != RECORD_MAGIC:
        return "magic"
    if struct.unpack_from("<I", block, _CRC_OFF)[0] != zlib.crc32(block[:_CRC_OFF]):
        return "crc"
    if struct.unpack_from("<I", block, _VERSION_OFF)[0] != FORMAT_VERSION:
        return "version"
    found_id, found_seq = struct.unpack_from("<QQ", block, 8)
    if found_id != log_id:
        return "logid"
    if found_seq != seq:
        return "seq"
    if block[_PAYLOAD_OFF:_VERSION_OFF] != _payload(log_id, seq):
        return "payload"
    return "ok"


@dataclass(frozen=True)
class DiskLog:
    """What a volume holds: the longest run of valid records from seq 1, and what ended it.

    ``end`` is ``"zero"`` (the next block was never written: a clean end), ``"end"`` (the device is
    full), ``"header"`` (no valid header: ``log_id`` is None and ``records`` 0), or the
    :func:`classify_record` word of the block that stopped the run (``crc``, ``torn``, ...).
    """

    log_id: int | None
    records: int
    end: str

    def holds(self, acked: int) -> bool:
        """True when the log holds every record up to ``acked`` (what the guest acknowledged).

        What follows may be missing or torn: those records were never acknowledged, so a crash
        (or a kill -9 of QEMU) may lose them without breaking any promise."""
        return self.log_id is not None and self.records >= acked


def _scan(log_id: int, blocks: Iterable[bytes]) -> DiskLog:
    seq = 1
    for block in blocks:
        why = classify_record(block, log_id, seq)
        if why != "ok":
            return DiskLog(log_id=log_id, records=seq - 1, end=why)
        seq += 1
    return DiskLog(log_id=log_id, records=seq - 1, end="end")


def parse_disk_log(data: bytes) -> DiskLog:
    """Read the log from a volume's bytes (only whole blocks count, like the guest's capacity)."""
    log_id = header_log_id(data[:BLOCK])
    if log_id is None:
        return DiskLog(log_id=None, records=0, end="header")
    whole = len(data) // BLOCK * BLOCK
    return _scan(log_id, (data[off : off + BLOCK] for off in range(BLOCK, whole, BLOCK)))


def read_disk_log(path: str | os.PathLike[str]) -> DiskLog:
    """:func:`parse_disk_log` of a raw image file or block device, reading only up to the log's end."""

    def blocks(f: BinaryIO) -> Iterator[bytes]:
        while len(chunk := f.read(256 * BLOCK)) >= BLOCK:
            yield from (chunk[off : off + BLOCK] for off in range(0, len(chunk) - BLOCK + 1, BLOCK))

    with Path(path).open("rb") as f:
        log_id = header_log_id(f.read(BLOCK))
        if log_id is None:
            return DiskLog(log_id=None, records=0, end="header")
        return _scan(log_id, blocks(f))
