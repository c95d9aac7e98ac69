"""Fast byte work below the stages: reserving a file's blocks, writing at offsets, starting
write-back early. Standard library only (``ctypes`` for the two Linux calls Python lacks).

Measured on the 2-core benchmark VM (bench/README.md, "where the seconds go"): ``pwrite`` of
0.4 GB into a fresh file costs 0.6-0.7 s of CPU from a 64 MiB buffer but 0.1-0.15 s from a
256 KiB buffer still in the core's cache (after one ``fallocate``), so the convert stage writes
each block as soon as it is produced.
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["reserve", "pwrite_all", "start_writeback", "WriteError"]


class WriteError(OSError):
    """Writing the output failed (a full disk, a quota, an I/O error): not a conversion error of
    the tensor being written, so callers let it through to the storage error handling."""


def _libc(name: str, argtypes: list) -> object | None:
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _libc("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
_SYNC_FILE_RANGE = _libc("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2


def reserve(fd: int, size: int) -> None:
    """Make the file ``size`` bytes long with its blocks allocated up front where the file system can.

    ``fallocate(2)`` (mode 0: allocate, extend the size) in one call; where it is missing or
    unsupported (another OS, some network file systems) the file is just extended with
    ``ftruncate``, which is correct everywhere, only slower to write into. Never glibc's
    ``posix_fallocate`` emulation, which would write every block once more. A full disk is
    reported here, before any tensor is converted.
    """
    if _FALLOCATE is not None and size > 0:
        if _FALLOCATE(fd, 0, 0, size) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))
    os.ftruncate(fd, size)


def pwrite_all(fd: int, buf: bytes | memoryview, offset: int) -> None:
    """Write all of ``buf`` at ``offset`` (``pwrite`` may write less than asked)."""
    view = memoryview(buf).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing these bytes to disk now, without waiting for it (Linux); a later fsync waits for less."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

