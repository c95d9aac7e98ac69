"""Fast byte work below the stages: reserving a file's blocks, writing at offsets, starting
write-back early. Standard library only (``ctypes`` for the two Linux calls Python lacks).

Measured on the 2-core benchmark VM (bench/README.md, "where the seconds go"): writing 0.4 GB
into a fresh file that was only ``ftruncate``-d cost 0.62-0.66 s of CPU (ext4 reserving
delayed-allocation blocks page by page); the same writes after one ``fallocate`` cost 0.11 s.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["reserve", "pwrite_all", "start_writeback", "BlockWriter", "WriteError"]


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
_WRITEBACK_STEP = 32 << 20  # BlockWriter starts write-back every this many bytes


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


class BlockWriter:
    """Write a file front to back in small blocks, hashing the same bytes in order beside it.

    The producer takes a buffer (:meth:`get`), fills it with the next bytes of the file and
    hands it back (:meth:`put`): it is written at once with ``pwrite`` (while the bytes are
    still in this core's cache, where the kernel copies them several times faster than from a
    large cold buffer), then a helper thread folds them into ``sha`` and, in ``early`` mode,
    starts their write-back every few MiB. A few buffers circulate, so memory stays at
    ``n_buffers`` blocks whatever the file size.
    """

    def __init__(self, fd: int, start: int, sha: Any, *, block: int = 512 << 10, n_buffers: int = 8, writeback: str = "early") -> None:
        self.fd, self.pos, self.sha, self.block, self.writeback = fd, start, sha, block, writeback
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._full: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(n_buffers):
            self._free.put(bytearray(block))
        self._flushed = start
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="np2torch-writeback")
        self._hasher = threading.Thread(target=self._hash_loop, name="np2torch-sha256", daemon=True)
        self._hasher.start()

    def get(self) -> bytearray:
        return self._free.get()

    def put(self, buf: bytearray, n: int) -> None:
        """Write ``buf[:n]`` as the file's next bytes (``n`` may be 0: the buffer just goes back)."""
        if n:
            try:
                pwrite_all(self.fd, memoryview(buf)[:n], self.pos)
            except OSError as exc:
                self._free.put(buf)
                raise WriteError(exc.errno, exc.strerror) from exc
            self.pos += n
        self._full.put((buf, n, self.pos))

    def _hash_loop(self) -> None:
        while True:
            item = self._full.get()
            if item is None:
                return
            buf, n, end = item
            if n:
                with memoryview(buf) as view, view[:n] as piece:
                    self.sha.update(piece)
            self._free.put(buf)
            if self.writeback == "early" and end - self._flushed >= _WRITEBACK_STEP:
                self._flusher.submit(start_writeback, self.fd, self._flushed, end - self._flushed)
                self._flushed = end

    def close(self) -> None:
        """Wait until every byte put is hashed and its write-back started."""
        self._full.put(None)
        self._hasher.join()
        if self.writeback == "early" and self.pos > self._flushed:
            self._flusher.submit(start_writeback, self.fd, self._flushed, self.pos - self._flushed)
        self._flusher.shutdown(wait=True)
