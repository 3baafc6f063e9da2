"""File I/O for exports: positional writes, hole punching, zeroing, and errno mapping.

Why a module of its own: these are the only places blockd touches the volume files' bytes, and
``fallocate(2)`` needs ctypes (Python's ``os.posix_fallocate`` cannot punch holes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from livemig.storage.nbd import protocol as p

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
ZERO_CHUNK = bytes(1024 * 1024)


def _try_fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) via libc; False if the file system (or platform) does not support ``mode``."""
    if _fallocate is None:
        return False
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def write_zeroes(fd: int, offset: int, length: int, *, may_punch: bool) -> None:
    """Make [offset, offset+length) read as zeroes: punch a hole if allowed, else allocate zeroes."""
    if may_punch and _try_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        return
    if _try_fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
        return
    end = offset + length
    while offset < end:
        n = min(len(ZERO_CHUNK), end - offset)
        offset += os.pwrite(fd, ZERO_CHUNK[:n] if n < len(ZERO_CHUNK) else ZERO_CHUNK, offset)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """TRIM: give the blocks back. Advisory, so a file system without hole punching is fine."""
    _try_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite until done (a regular file rarely writes short, but it may)."""
    n = os.pwrite(fd, data, offset)
    if n == len(data):
        return
    view = memoryview(data)[n:]
    offset += n
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def nbd_errno(exc: OSError) -> p.Errno:
    """Map a host errno to the few values NBD allows."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return p.Errno.ENOSPC
    if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return p.Errno.EPERM
    if exc.errno == errno.ENOMEM:
        return p.Errno.ENOMEM
    return p.Errno.EIO


def write_sync(fd: int, data: bytes, offset: int, fua: bool) -> None:
    pwrite_all(fd, data, offset)
    if fua:
        os.fdatasync(fd)


def trim_sync(fd: int, offset: int, length: int, fua: bool) -> None:
    punch_hole(fd, offset, length)
    if fua:
        os.fdatasync(fd)


def zero_sync(fd: int, offset: int, length: int, may_punch: bool, fua: bool) -> None:
    write_zeroes(fd, offset, length, may_punch=may_punch)
    if fua:
        os.fdatasync(fd)
