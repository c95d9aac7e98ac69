"""Locks the operating system releases when their holder dies.

Every lock np2torch takes (a stage cache key, the audit log, a Prefect transaction record) is a
``flock`` on a lock file: the kernel drops it the moment the holding process exits, however it
exits (``kill -9`` included), so a killed run never leaves a lock that makes the next run wait.
There is no expiry to tune and no holder to ping.

The lock file itself only exists while the lock is held: the holder unlinks it, still holding
the lock, before releasing it. A waiter that had opened the old file notices (its open file is
no longer the one at the path) and starts over on the new one, so the unlink never lets two
holders in. A file left by a killed holder is not held by anyone: the next taker simply gets it
(and removes it when done); :func:`is_held` tells a stale file from a held one.

:class:`FlockLockManager` is the same lock behind Prefect's ``LockManager`` protocol (the
``SERIALIZABLE`` isolation of the stage tasks); it replaces ``FileSystemLockManager``, whose
lock files have no expiry and no liveness check.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["acquire", "release", "held_lock", "is_held", "LockTimeout", "FlockLockManager"]

_POLL = 0.02  # seconds between tries while waiting; capped at _POLL_MAX
_POLL_MAX = 0.25


class LockTimeout(TimeoutError):
    """The lock stayed held by a live process for longer than the caller would wait."""


def _try_open_locked(path: Path) -> int | None:
    """An fd holding an exclusive flock on the file now at ``path``, or None if it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        same = False
    if not same:  # the holder before us unlinked it on release: take the new file instead
        os.close(fd)
        return -1
    with contextlib.suppress(OSError):  # who holds it, for a human looking at the folder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def acquire(path: str | Path, timeout: float | None = None) -> int:
    """Block until the flock on ``path`` is ours (or ``timeout`` seconds pass); return its fd."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = _POLL
    while True:
        fd = _try_open_locked(path)
        if fd is not None and fd >= 0:
            return fd
        if fd == -1:
            continue  # raced with a release: retry at once
        if deadline is not None and time.monotonic() >= deadline:
            raise LockTimeout(f"{path} is held by a running process (pid {_holder_pid(path)}); gave up after {timeout}s")
        time.sleep(delay)  # a plain sleep: SIGINT/SIGTERM interrupt it at once
        delay = min(delay * 2, _POLL_MAX)


def release(path: str | Path, fd: int) -> None:
    """Remove the lock file (still holding it) and let go."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def held_lock(path: str | Path, timeout: float | None = None) -> Iterator[None]:
    fd = acquire(path, timeout)
    try:
        yield
    finally:
        release(path, fd)


def is_held(path: str | Path) -> bool:
    """True while a live process holds the lock; a file left by a dead one is removed."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return True
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            os.unlink(path)  # stale (its holder died): ours now, so removing it is safe
    except FileNotFoundError:
        pass
    os.close(fd)
    return False


def _holder_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


class FlockLockManager:
    """Prefect ``LockManager`` (prefect.locking.protocol) on :func:`acquire`/:func:`release`.

    ``hold_timeout`` is not needed and ignored: a lock lives exactly as long as the process that
    holds it. Locks are per (key, holder) in this process; another thread or process asking for
    the same key waits, as with Prefect's own managers.
    """

    def __init__(self, lock_files_directory: str | Path) -> None:
        self.lock_files_directory = Path(lock_files_directory).expanduser().resolve()
        self._held: dict[str, tuple[str, int]] = {}
        self._mutex = threading.Lock()

    def __getstate__(self) -> dict:  # travels to Dask workers without this process's fds
        return {"lock_files_directory": self.lock_files_directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["lock_files_directory"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlockLockManager) and other.lock_files_directory == self.lock_files_directory

    def __hash__(self) -> int:
        return hash(self.lock_files_directory)

    def _path(self, key: str) -> Path:
        return self.lock_files_directory / f"{key}.lock"

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        with self._mutex:
            mine = self._held.get(key)
        if mine is not None and mine[0] == holder:
            return True
        try:
            fd = acquire(self._path(key), acquire_timeout)
        except LockTimeout:
            return False
        with self._mutex:
            self._held[key] = (holder, fd)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(lambda: self.acquire_lock(key, holder, acquire_timeout, hold_timeout), abandon_on_cancel=True)

    def release_lock(self, key: str, holder: str) -> None:
        with self._mutex:
            mine = self._held.get(key)
            if mine is None:
                # already released: Prefect commits a finished child transaction again when its
                # parent commits (a failed conversion's flow does), and releasing twice is no error
                return
            if mine[0] != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            del self._held[key]
        release(self._path(key), mine[1])

    def is_locked(self, key: str) -> bool:
        with self._mutex:
            if key in self._held:
                return True
        return is_held(self._path(key))

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with self._mutex:
            mine = self._held.get(key)
        return mine is not None and mine[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(lambda: self.wait_for_lock(key, timeout), abandon_on_cancel=True)
