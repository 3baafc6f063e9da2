"""Volume-file I/O helpers: zeroing with and without fallocate, errno mapping."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig.storage.nbd import fileio
from livemig.storage.nbd.protocol import Errno

MIB = 1 << 20


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "f"
    path.write_bytes(b"\xff" * 3 * MIB)
    handle = os.open(path, os.O_RDWR)
    yield handle
    os.close(handle)


@pytest.mark.parametrize("may_punch", [True, False])
@pytest.mark.parametrize("have_fallocate", [True, False])
def test_write_zeroes(fd: int, monkeypatch: pytest.MonkeyPatch, may_punch: bool, have_fallocate: bool) -> None:
    if not have_fallocate:  # a platform or file system without fallocate: zeroes are written
        monkeypatch.setattr(fileio, "_fallocate", None)
    fileio.write_zeroes(fd, 100, 2 * MIB + 7, may_punch=may_punch)
    data = os.pread(fd, 3 * MIB, 0)
    assert data[:100] == b"\xff" * 100
    assert data[100 : 100 + 2 * MIB + 7] == bytes(2 * MIB + 7)
    assert data[100 + 2 * MIB + 7 :] == b"\xff" * (MIB - 107)
    assert os.fstat(fd).st_size == 3 * MIB


def test_trim_without_fallocate_is_a_no_op(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileio, "_fallocate", None)
    fileio.punch_hole(fd, 0, MIB)  # advisory: nothing happens, nothing fails
    assert os.pread(fd, 4, 0) == b"\xff" * 4


@pytest.mark.parametrize(
    ("host", "nbd"),
    [(errno.ENOSPC, Errno.ENOSPC), (errno.EDQUOT, Errno.ENOSPC), (errno.EFBIG, Errno.ENOSPC),
     (errno.EROFS, Errno.EPERM), (errno.EACCES, Errno.EPERM), (errno.ENOMEM, Errno.ENOMEM), (errno.EBADF, Errno.EIO)],
)  # fmt: skip
def test_errno_mapping(host: int, nbd: Errno) -> None:
    assert fileio.nbd_errno(OSError(host, "x")) == nbd
