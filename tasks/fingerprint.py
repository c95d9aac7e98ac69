"""Content fingerprints, computed once per file version and remembered by stat.

A file's sha256 (the audit record's proof, and what every array fingerprint of the file is derived
from) and what the readers computed in the same read are stored in a stat cache keyed by
(device, inode, size, mtime_ns, ctime_ns), as DVC does (plus ctime): an unchanged file is never
re-read to be re-hashed, and any write to its bytes changes its ctime, which no user call can set
back, so a changed file is always noticed even when its size and mtime are restored.

:func:`file_digests` reads a file ONCE and computes, from the same buffers, its sha256 (on a
helper thread: hashlib releases the GIL) and whatever a region's ``on_chunk`` callback folds in
(value statistics, a zip CRC, an inflated member); a region's own sha256 only when asked (export's
per-tensor check of a copied file). A writer that hashed the bytes as it wrote them records the
digest with :func:`remember`, so nothing is re-read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from np2torch.tasks.paths import cache_dir

__all__ = ["pack", "SMALL_FILE", "open_regular", "check_regular", "sha256_file", "stat_key", "cached_by_stat", "remember", "peek",
           "file_fingerprint", "Region", "file_digests"]

_RACY_NS = 2_000_000_000  # a stat is trusted only for files last modified more than this ago
_PIECE = 1 << 20  # read size of file_digests: a piece is hashed and folded while it is still in the cores' L2 caches (1 MiB measured
# ~20 % less CPU than 256 KiB on a 2-core EPYC: fewer hand-offs between the reading and the hashing thread)
SMALL_FILE = _SMALL_FILE = 1 << 20  # files up to this size are read in one piece and hashed on the calling thread


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


def sha256_file(path: str | Path) -> str:
    """sha256 of a whole file, streamed in chunks."""
    return str(file_digests(path)[0])


@dataclass
class Region:
    """A byte range of a file to fold into its own digest and/or a callback during one pass."""

    offset: int
    length: int
    digest: bool = True  # compute the range's own sha256 (returned in order)
    # called with the range's bytes, in order, in pieces; may return futures still reading the piece
    on_chunk: Callable[[memoryview], Any] | None = None


def file_digests(path: str | Path, regions: Sequence[Region] = (), *, sha256: bool = True,
                 progress: Callable[[int], None] | None = None, data: bytes | None = None) -> tuple[str | None, list[str | None]]:
    """One read of ``path``: sha256 of the whole file (None if not asked) and the sha256 of each region (None if not asked).

    Only a regular file is read (:func:`open_regular`). A small file is read in one piece and
    hashed on this thread (no buffers, no threads: per-file cost follows the file's size); a
    large one streams through a few large buffers while the sha256 runs on a helper thread
    (hashlib releases the GIL), so two cores are busy and memory stays bounded. ``data``: the
    whole file, already read by the caller (a small file whose header it parsed): hashed, not re-read.
    """
    if data is not None:
        if progress is not None:
            progress(len(data))
        return _digest_whole(path, memoryview(data), regions, sha256)
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
        out.append(hashlib.sha256(piece).hexdigest() if r.digest else None)
    return hashlib.sha256(view).hexdigest() if sha256 else None, out


def _digest_stream(path: str | Path, fh, regions: Sequence[Region], sha256: bool,
                   progress: Callable[[int], None] | None) -> tuple[str | None, list[str | None]]:
    """The streaming pass: ONE read of every byte. This thread reads the file in cache-sized
    pieces with ``pread`` and folds each piece into the regions it overlaps (callbacks: value
    statistics, CRCs, inflation) while a helper thread folds the same piece into the file's
    sha256 (hashlib releases the GIL), so both cores work on bytes still in cache and a piece's
    buffer is refilled only once both are done with it."""
    fd = fh.fileno()
    size = os.fstat(fd).st_size
    hashers = [hashlib.sha256() if r.digest else None for r in regions]
    order = sorted(range(len(regions)), key=lambda i: regions[i].offset)
    sha = hashlib.sha256() if sha256 else None
    helper = ThreadPoolExecutor(1, thread_name_prefix="np2torch-sha256") if sha is not None and regions else None
    bufs = [bytearray(_PIECE) for _ in range(3 if helper is not None else 1)]
    pending: list[Future | None] = [None] * len(bufs)
    lo = i = 0
    end = 0
    try:
        for a, b in [(0, size)] if sha is not None else _merged(regions):
            pos = a
            while pos < b:
                k = i % len(bufs)
                i += 1
                if pending[k] is not None:
                    pending[k].result()  # the sha256 thread is done with this buffer
                n = os.preadv(fd, [memoryview(bufs[k])[: min(_PIECE, b - pos)]], pos)
                if not n:
                    break
                view = memoryview(bufs[k])[:n]
                if helper is not None:
                    pending[k] = helper.submit(sha.update, view)
                elif sha is not None:
                    sha.update(view)
                stop = pos + n
                while lo < len(order) and regions[order[lo]].offset + regions[order[lo]].length <= pos:
                    lo += 1
                work: list = []
                j = lo
                while j < len(order) and regions[order[j]].offset < stop:
                    r = regions[order[j]]
                    x, y = max(r.offset, pos), min(r.offset + r.length, stop)
                    if x < y:
                        piece = view[x - pos : y - pos]
                        if hashers[order[j]] is not None:
                            hashers[order[j]].update(piece)
                        if r.on_chunk is not None:
                            work += r.on_chunk(piece) or ()
                    j += 1
                for f in work:  # the buffer is refilled only once everything reading it has finished
                    f.result()
                if progress is not None:
                    progress(n)
                pos = end = stop
    finally:
        for f in pending:
            if f is not None:
                f.result()
        if helper is not None:
            helper.shutdown()
    if any(r.offset + r.length > end for r in regions if r.length):
        raise OSError(f"{path} is shorter ({end} bytes) than a region to hash")
    if sha is not None and end != size:
        raise OSError(f"{path} changed size while it was read ({end} of {size} bytes)")
    return sha.hexdigest() if sha is not None else None, [h.hexdigest() if h is not None else None for h in hashers]


def _merged(regions: Sequence[Region]) -> list[tuple[int, int]]:
    spans: list[list[int]] = []
    for r in sorted(regions, key=lambda r: r.offset):
        if r.length <= 0:
            continue
        if spans and r.offset <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], r.offset + r.length)
        else:
            spans.append([r.offset, r.offset + r.length])
    return [(a, b) for a, b in spans]


def stat_key(path: str | Path, st: os.stat_result | None = None) -> dict[str, Any]:
    # (device, inode, size, mtime_ns) identifies one version of one file; the path is left out
    # so that a rename (a cache entry moved into place) does not force a re-hash.
    # ctime too: os.utime can restore a file's mtime after editing it, but not its ctime.
    st = st or os.stat(path)
    return {"dev": st.st_dev, "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


@functools.lru_cache(maxsize=8)
def _stat_root(env: tuple[str | None, str | None], cwd: str) -> str:
    return str(cache_dir() / "stat")


def _entry_path(key: dict[str, Any], what: str, root: Path | None) -> str:
    ident = hashlib.sha256(f"{what}\0{key['dev']}\0{key['inode']}\0{key['size']}\0"
                           f"{key['mtime_ns']}\0{key['ctime_ns']}".encode()).hexdigest()
    if root is not None:
        base = str(root / "stat")
    else:
        env = (os.environ.get("NP2TORCH_CACHE_DIR"), os.environ.get("NP2TORCH_DATA_DIR"))
        absolute = (env[0] or "").startswith("/") or (not env[0] and (env[1] or "").startswith("/"))
        base = _stat_root(env, "" if absolute else os.getcwd())
    return f"{base}/{ident[:2]}/{ident}.json"


def _write_entry(entry: str, text: str) -> None:
    """Write a stat-cache entry under a temporary name, then rename it into place.

    No fsync: an entry is a cache of a hash, not data. After a crash an entry may be missing or
    empty, which reads as a miss; it can never be half of one entry (the rename is atomic).
    That keeps remembering 20,000 small files to milliseconds, not minutes of fsyncs.
    """
    folder, name = os.path.split(entry)
    tmp = f"{folder}/.{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fh = open(tmp, "w")
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        fh = open(tmp, "w")
    try:
        with fh:
            fh.write(text)
        os.replace(tmp, entry)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# This process's copy of the entries it stored or read (same keys, same trust rule as the
# files): a folder of 20,000 arrays is looked up several times per run (cache key, scan, audit
# inputs), and a dict lookup costs a stat where a file costs an open and a read.
_MEMO: dict[str, Any] = {}
_MEMO_MAX = 1 << 18


def _memo(entry: str, value: Any) -> None:
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.clear()
    _MEMO[entry] = value


# Entries of a group of many small files (a folder of .npy) live in ONE file per group, not
# one per file: see :func:`pack`. While a pack is open, the entries it will hold gather here.
_PACK: dict[str, Any] | None = None
_PACK_MIN = 16  # fewer files than this keep one entry file each


@contextlib.contextmanager
def pack(paths: Sequence[str | Path]) -> Iterator[None]:
    """Keep the stat-cache entries of ``paths`` (many small files) in one file while in this block.

    On entry the group's pack is loaded into this process's memo (entries whose file changed
    no longer match its stat and are never used); on exit the entries used or computed here are
    written back as one file, once. 20,000 files then cost one read and one write, not 40,000.
    """
    global _PACK
    if _PACK is not None or len(paths) < _PACK_MIN:
        yield
        return
    folder = os.path.commonpath([os.path.abspath(p) for p in paths])
    entry = _entry_path({"dev": 0, "inode": 0, "size": 0, "mtime_ns": 0, "ctime_ns": 0}, f"pack:{folder}", None)
    try:
        with open(entry) as fh:
            loaded = json.loads(fh.read())
        for k, v in loaded.items():
            _memo(k, v)
    except (OSError, ValueError, AttributeError):
        loaded = {}
    _PACK = {}
    try:
        yield
    finally:
        used, _PACK = _PACK, None
        # merged with what was there: the hash pass and the scan of one folder each use only
        # their own kinds of entry, and neither may drop the other's
        if used and not used.keys() <= loaded.keys() and not os.environ.get("NP2TORCH_READ_ONLY"):
            with contextlib.suppress(OSError):
                _write_entry(entry, json.dumps({**loaded, **used}))


def _lookup(entry: str, what: str, key: dict[str, Any]) -> tuple[bool, Any]:
    hit = _MEMO.get(entry, _MEMO)
    if hit is not _MEMO:
        if _PACK is not None and time.time_ns() - key["mtime_ns"] > _RACY_NS:
            _PACK[entry] = hit
        return True, hit
    try:
        with open(entry) as fh:
            stored = json.loads(fh.read())
        if stored.get("stat") == key and stored.get("what") == what:
            _memo(entry, stored["value"])
            return True, stored["value"]
    except (OSError, ValueError):
        pass
    return False, None


def _store(entry: str, what: str, key: dict[str, Any], value: Any) -> None:
    # In this process, every value is remembered: one run reads each file once (its cache key,
    # scan and audit inputs all come from that read), and a file changed meanwhile has a new
    # ctime, hence a new key. On disk, only files whose mtime is safely in the past ("racy
    # git"): timestamps tick coarsely (a few ms), so a file rewritten within the same tick as it
    # was hashed would keep its (inode, size, mtime) and a later run would trust a stale hash.
    _memo(entry, value)
    if time.time_ns() - key["mtime_ns"] <= _RACY_NS or os.environ.get("NP2TORCH_READ_ONLY"):
        return
    if _PACK is not None:
        _PACK[entry] = value  # written with its group when the pack closes
        return
    try:
        _write_entry(entry, json.dumps({"what": what, "stat": key, "value": value}))
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
    return _lookup(_entry_path(key, what, root), what, key)[1]


def cached_by_stat(path: str | Path, what: str, compute: Callable[[], Any], *, root: Path | None = None,
                   st: os.stat_result | None = None) -> Any:
    """Return ``compute()`` for this version of ``path``, from the stat cache when it is unchanged.

    ``st``: the file's stat, when the caller has just taken it.
    """
    key = stat_key(path, st)
    entry = _entry_path(key, what, root)
    found, value = _lookup(entry, what, key)
    if found:
        return value
    value = compute()
    if stat_key(path) == key:  # skip a file that changed meanwhile
        _store(entry, what, key, value)
    return value


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """path, bytes and sha256 of a file (the audit record's ``inputs``/``outputs`` entries)."""
    st = check_regular(path)  # before resolving, so the message names the link
    p = _realpath(os.fspath(path))
    return {"path": p, "bytes": st.st_size, "sha256": cached_by_stat(p, "sha256", lambda: sha256_file(p), st=st)}


@functools.lru_cache(maxsize=1024)
def _real_dir(folder: str, cwd: str) -> str:
    return os.path.realpath(os.path.join(cwd, folder))


def _realpath(path: str) -> str:
    """``os.path.realpath``, with the folder's part remembered: one lstat per file, not one per component."""
    if os.path.islink(path):
        return os.path.realpath(path)
    folder, name = os.path.split(path)
    return os.path.join(_real_dir(folder, "" if folder.startswith("/") else os.getcwd()), name)
