"""Content fingerprints, computed once per file version and remembered by stat.

A file's sha256 (the audit record's proof) and the per-array blake3 fingerprints (the cache's
content keys) are stored in a stat cache keyed by (device, inode, size, mtime_ns, ctime_ns), as
DVC does (plus ctime): an unchanged file is never re-read to be re-hashed, and any write to its
bytes changes its ctime, which no user call can set back, so a changed file is always noticed
even when its size and mtime are restored.

:func:`file_digests` reads a file once and computes, from the same buffers, its sha256 (on a
helper thread: hashlib releases the GIL), the blake3 of chosen byte regions and whatever a
region's ``on_chunk`` callback folds in (value statistics, a zip CRC). A writer that hashed
the bytes as it wrote them records the digest with :func:`remember`, so nothing is re-read.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from np2torch.tasks.paths import atomic_write_text, cache_dir

__all__ = ["open_regular", "check_regular", "sha256_file", "blake3_bytes", "blake3_region", "stat_key", "cached_by_stat", "remember", "peek", "file_fingerprint",
           "Region", "file_digests"]

_CHUNK = 16 << 20
_RACY_NS = 2_000_000_000  # a stat is trusted only for files last modified more than this ago
_PASS_CHUNK = 8 << 20  # read size of file_digests: large enough that hashing releases the GIL for long
_PASS_BUFFERS = 3  # buffers in flight: one being read, up to two being hashed
_SMALL_FILE = 1 << 20  # files up to this size are read in one piece and hashed on the calling thread


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: str | Path, mode: int) -> Exception:
    from np2torch.tasks.errors import LoadError

    what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    real = os.path.realpath(path)
    via = f" (a link to {real})" if real != os.path.abspath(path) else ""
    return LoadError(f"refusing to read {what}{via}: only regular files are read, since a device or pipe can be endless "
                     "or block forever", key=str(path), expected="a regular file", actual=what,
                     fix="point source.path at a regular file (copy the data into one first)")


def check_regular(path: str | Path) -> os.stat_result:
    """The stat of ``path`` (links resolved) when it is a regular file, else a LoadError; reads nothing."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st


def open_regular(path: str | Path, buffering: int = -1):
    """Open ``path`` for reading only if it is a regular file (links resolved), before any byte is read.

    Checked by ``stat`` before opening (a device is never opened) and by ``fstat`` after (a file
    swapped for a FIFO in between is still refused); ``O_NONBLOCK`` keeps opening a FIFO from
    waiting for a writer.
    """
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def blake3_bytes(data: bytes | memoryview) -> str:
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()


def blake3_region(path: str | Path, offset: int, length: int) -> str:
    """blake3 of ``length`` bytes of a file from ``offset``, memory-mapped (no copy into RAM)."""
    if length == 0:
        return blake3.blake3(b"").hexdigest()
    with open_regular(path) as fh:
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)[offset : offset + length]
            try:
                return blake3.blake3(view, max_threads=blake3.blake3.AUTO).hexdigest()
            finally:
                view.release()


def sha256_file(path: str | Path) -> str:
    """sha256 of a whole file, streamed in chunks."""
    return str(file_digests(path)[0])


@dataclass
class Region:
    """A byte range of a file to fold into its own digest and/or a callback during one pass."""

    offset: int
    length: int
    blake3: bool = True  # compute blake3 of the range (returned in order)
    on_chunk: Callable[[memoryview], None] | None = None  # called with the range's bytes, in order, in pieces


def file_digests(path: str | Path, regions: Sequence[Region] = (), *, sha256: bool = True,
                 progress: Callable[[int], None] | None = None) -> tuple[str | None, list[str | None]]:
    """One read of ``path``: sha256 of the whole file (None if not asked) and blake3 of each region (None if not asked).

    Only a regular file is read (:func:`open_regular`). A small file is read in one piece and
    hashed on this thread (no buffers, no threads: per-file cost follows the file's size); a
    large one streams through a few large buffers while the sha256 runs on a helper thread
    (hashlib releases the GIL), so two cores are busy and memory stays bounded.
    """
    with open_regular(path, buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size <= _SMALL_FILE:
            data = fh.read(_SMALL_FILE + 1)
            if progress is not None:
                progress(len(data))
            return _digest_whole(path, memoryview(data), regions, sha256)
        return _digest_stream(path, fh, regions, sha256, progress)


def _digest_whole(path: str | Path, view: memoryview, regions: Sequence[Region], sha256: bool) -> tuple[str | None, list[str | None]]:
    out: list[str | None] = []
    for r in regions:
        if r.offset + r.length > len(view):
            raise OSError(f"{path} is shorter ({len(view)} bytes) than a region to hash")
        piece = view[r.offset : r.offset + r.length]
        if r.on_chunk is not None and r.length:
            r.on_chunk(piece)
        out.append(blake3.blake3(piece).hexdigest() if r.blake3 else None)
    return hashlib.sha256(view).hexdigest() if sha256 else None, out


def _digest_stream(path: str | Path, fh, regions: Sequence[Region], sha256: bool,
                   progress: Callable[[int], None] | None) -> tuple[str | None, list[str | None]]:
    order = sorted(range(len(regions)), key=lambda i: regions[i].offset)
    # with the sha256 on the helper thread, one blake3 thread here keeps two cores busy, not oversubscribed
    threads = 1 if sha256 else blake3.blake3.AUTO
    hashers = [blake3.blake3(max_threads=threads) if r.blake3 else None for r in regions]
    sha = hashlib.sha256()
    bufs = [bytearray(_PASS_CHUNK) for _ in range(_PASS_BUFFERS)]
    pending: deque = deque()
    lo = 0
    pos = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        k = 0
        while True:
            if len(pending) == _PASS_BUFFERS:
                pending.popleft().result()  # the buffer about to be refilled has been hashed
            buf = bufs[k % _PASS_BUFFERS]
            k += 1
            n = fh.readinto(buf)
            if not n:
                break
            view = memoryview(buf)[:n]
            if sha256:
                pending.append(pool.submit(sha.update, view))
            end = pos + n
            while lo < len(order) and regions[order[lo]].offset + regions[order[lo]].length <= pos:
                lo += 1
            j = lo
            while j < len(order) and regions[order[j]].offset < end:
                i = order[j]
                r = regions[i]
                a, b = max(r.offset, pos), min(r.offset + r.length, end)
                if a < b:
                    piece = view[a - pos : b - pos]
                    if hashers[i] is not None:
                        hashers[i].update(piece)
                    if r.on_chunk is not None:
                        r.on_chunk(piece)
                j += 1
            pos = end
            if progress is not None:
                progress(n)
        for f in pending:
            f.result()
    if any(r.offset + r.length > pos for r in regions):
        raise OSError(f"{path} is shorter ({pos} bytes) than a region to hash")
    return sha.hexdigest() if sha256 else None, [h.hexdigest() if h is not None else None for h in hashers]


def stat_key(path: str | Path) -> dict[str, Any]:
    # (device, inode, size, mtime_ns) identifies one version of one file; the path is left out
    # so that a rename (a cache entry moved into place) does not force a re-hash.
    # ctime too: os.utime can restore a file's mtime after editing it, but not its ctime.
    st = os.stat(path)
    return {"dev": st.st_dev, "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _entry_path(key: dict[str, Any], what: str, root: Path | None) -> Path:
    ident = hashlib.sha256(json.dumps([what, key], sort_keys=True).encode()).hexdigest()
    return (root or cache_dir()) / "stat" / ident[:2] / f"{ident}.json"


def _store(entry: Path, what: str, key: dict[str, Any], value: Any) -> None:
    if os.environ.get("NP2TORCH_READ_ONLY"):
        return
    # Remember only files whose mtime is safely in the past ("racy git"): file timestamps tick
    # coarsely (a few ms), so a file rewritten within the same tick as it was hashed would keep
    # its (inode, size, mtime) and its stale hash would be trusted.
    if time.time_ns() - key["mtime_ns"] <= _RACY_NS:
        return
    try:
        atomic_write_text(entry, json.dumps({"what": what, "stat": key, "value": value}))
    except OSError:
        pass  # a read-only cache only costs speed


def remember(path: str | Path, what: str, value: Any, *, version: dict[str, Any] | None = None, root: Path | None = None,
             own: bool = False) -> None:
    """Record ``value`` (computed from the bytes just read or written) for this version of ``path``.

    With ``version`` (a :func:`stat_key` taken before the bytes were read), nothing is recorded
    if the file changed since. ``own``: np2torch just wrote this file itself; its mtime is set a
    few seconds back so the entry is not racy (any later write sets mtime to now, which differs).
    """
    if own:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, time.time_ns() - 2 * _RACY_NS))
        version = None
    key = stat_key(path)
    if version is None or version == key:
        _store(_entry_path(key, what, root), what, key, value)


def peek(path: str | Path, what: str, *, root: Path | None = None) -> Any:
    """The stat cache's value for this version of ``path``, or ``None`` when there is none."""
    key = stat_key(path)
    try:
        stored = json.loads(_entry_path(key, what, root).read_text())
        if stored.get("stat") == key and stored.get("what") == what:
            return stored["value"]
    except (OSError, ValueError):
        pass
    return None


def cached_by_stat(path: str | Path, what: str, compute: Callable[[], Any], *, root: Path | None = None) -> Any:
    """Return ``compute()`` for this version of ``path``, from the stat cache when it is unchanged."""
    key = stat_key(path)
    entry = _entry_path(key, what, root)
    try:
        stored = json.loads(entry.read_text())
        if stored.get("stat") == key and stored.get("what") == what:
            return stored["value"]
    except (OSError, ValueError):
        pass
    value = compute()
    if stat_key(path) == key:  # skip a file that changed meanwhile
        _store(entry, what, key, value)
    return value


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """path, bytes and sha256 of a file (the audit record's ``inputs``/``outputs`` entries)."""
    size = check_regular(path).st_size  # before resolving, so the message names the link
    p = Path(path).resolve()
    return {"path": str(p), "bytes": size, "sha256": cached_by_stat(p, "sha256", lambda: sha256_file(p))}
