"""Content fingerprints, computed once per file version and remembered by stat.

A file's sha256 (the audit record's proof) and the per-array blake3 fingerprints (the cache's
content keys) are stored in a stat cache keyed by (path, inode, size, mtime_ns), as DVC does:
an unchanged file is never re-read to be re-hashed, and any change to its bytes through the file
system changes its mtime or size, so a changed file is always noticed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3

from tasks.paths import atomic_write_text, cache_dir

__all__ = ["sha256_file", "blake3_bytes", "blake3_region", "stat_key", "cached_by_stat", "file_fingerprint"]

_CHUNK = 16 << 20
_RACY_NS = 2_000_000_000  # a stat is trusted only for files last modified more than this ago


def blake3_bytes(data: bytes | memoryview) -> str:
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()


def blake3_region(path: str | Path, offset: int, length: int) -> str:
    """blake3 of ``length`` bytes of a file from ``offset``, memory-mapped (no copy into RAM)."""
    if length == 0:
        return blake3.blake3(b"").hexdigest()
    with open(path, "rb") as fh:
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)[offset : offset + length]
            try:
                return blake3.blake3(view, max_threads=blake3.blake3.AUTO).hexdigest()
            finally:
                view.release()


def sha256_file(path: str | Path) -> str:
    """sha256 of a whole file, streamed in chunks."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def stat_key(path: str | Path) -> dict[str, Any]:
    # (device, inode, size, mtime_ns) identifies one version of one file; the path is left out
    # so that a rename (a cache entry moved into place) does not force a re-hash.
    st = os.stat(path)
    return {"dev": st.st_dev, "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached_by_stat(path: str | Path, what: str, compute: Callable[[], Any], *, root: Path | None = None) -> Any:
    """Return ``compute()`` for this version of ``path``, from the stat cache when it is unchanged."""
    key = stat_key(path)
    ident = hashlib.sha256(json.dumps([what, key], sort_keys=True).encode()).hexdigest()
    entry = (root or cache_dir()) / "stat" / ident[:2] / f"{ident}.json"
    try:
        stored = json.loads(entry.read_text())
        if stored.get("stat") == key and stored.get("what") == what:
            return stored["value"]
    except (OSError, ValueError):
        pass
    value = compute()
    # Remember only files whose mtime is safely in the past ("racy git"): file timestamps tick
    # coarsely (a few ms), so a file rewritten within the same tick as it was hashed would keep
    # its (inode, size, mtime) and its stale hash would be trusted.
    settled = time.time_ns() - key["mtime_ns"] > _RACY_NS
    if settled and stat_key(path) == key and not os.environ.get("NP2TORCH_READ_ONLY"):  # skip a file that changed meanwhile
        try:
            atomic_write_text(entry, json.dumps({"what": what, "stat": key, "value": value}))
        except OSError:
            pass  # a read-only cache only costs speed
    return value


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """path, bytes and sha256 of a file (the audit record's ``inputs``/``outputs`` entries)."""
    p = Path(path).resolve()
    return {"path": str(p), "bytes": p.stat().st_size, "sha256": cached_by_stat(p, "sha256", lambda: sha256_file(p))}
