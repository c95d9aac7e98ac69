"""Content-addressed stage cache.

Each stage's artifact lives under ``<cache>/<stage>/<key>/`` where the key is a sha256 of
exactly what the stage depends on: the stage's name and code version, the key of the stage
before it, the config section it reads and the fingerprints of the files it reads. A hit is
only trusted after every artifact file's hash matches the one recorded when it was written
(a corrupt or deleted entry is recomputed), and a per-key file lock makes two identical
conversions started at once compute once: the second waits, then reuses.

Faults. The per-key lock is a ``flock`` (:mod:`np2torch.tasks.locks`): a killed run's lock dies
with it. A stage computes into a work folder ``.<key>.<id>.tmp`` that only the key's lock
holder creates, so a work folder whose key is not locked belongs to a dead run: it is swept
(those of the key being computed at once, every other stale one on a process's first cache
write). A full, over-quota or read-only disk is a :class:`~np2torch.tasks.storage.StorageError`
naming the folder. ``NP2TORCH_TEST_PAUSE_AT=<stage>`` (tests only) parks a run inside the
stage's work, lock held, so a test can kill it there.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from np2torch.tasks import locks
from np2torch.tasks.fingerprint import cached_by_stat, remember, sha256_file
from np2torch.tasks.paths import atomic_write_text, cache_dir
from np2torch.tasks.storage import storage_errors

log = logging.getLogger(__name__)

__all__ = ["CacheResult", "code_version", "lookup", "pause_point", "run_cached", "stage_key", "sweep_once", "sweep_stale"]


def code_version(*objs: Any) -> str:
    """sha256 of the source of the given modules (objects, dotted names or source files) or functions.

    A code change invalidates the stage. A module given by name or file is hashed from its file
    without importing it, so a run whose every stage is a cache hit never imports torch or pandera.
    """
    h = hashlib.sha256()
    for o in objs:
        h.update(_source_bytes(o))
    return h.hexdigest()[:16]


_SOURCE_CACHE: dict[str, bytes] = {}


def _source_bytes(o: Any) -> bytes:
    if isinstance(o, Path):
        if str(o) not in _SOURCE_CACHE:
            _SOURCE_CACHE[str(o)] = o.read_bytes()
        return _SOURCE_CACHE[str(o)]
    if isinstance(o, str):
        if o not in _SOURCE_CACHE:
            import importlib.util

            spec = importlib.util.find_spec(o)
            if spec is None or not spec.origin or not Path(spec.origin).is_file():
                raise ModuleNotFoundError(f"no source file for module {o!r}")
            _SOURCE_CACHE[o] = Path(spec.origin).read_bytes()
        return _SOURCE_CACHE[o]
    if inspect.ismodule(o) and getattr(o, "__file__", None) and Path(o.__file__).is_file() and o.__file__.endswith(".py"):
        return _source_bytes(o.__name__)
    try:
        return inspect.getsource(o).encode()
    except (OSError, TypeError):
        return repr(o).encode()


def stage_key(stage: str, **parts: Any) -> str:
    blob = json.dumps({"stage": stage, **parts}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class CacheResult:
    """A stage's small JSON record (as its entry stores it) and how it was obtained."""

    record: dict[str, Any]
    cached: bool
    seconds: float
    entry: Path


def _artifact_hashes(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): cached_by_stat(p, "sha256", lambda p=p: sha256_file(p))
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "record.json"}


def _own_artifact_hashes(d: Path) -> dict[str, str]:
    """Hashes of the artifacts a stage just wrote, remembered as ours (no re-read on a hit)."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != "record.json":
            out[p.relative_to(d).as_posix()] = h = cached_by_stat(p, "sha256", lambda p=p: sha256_file(p))
            remember(p, "sha256", h, own=True)
    return out


def _valid(entry: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((entry / "record.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        if _artifact_hashes(entry) != rec.get("_artifacts", {}):
            return None
    except OSError:
        return None
    return rec


def lookup(stage: str, key: str, *, root: Path | None = None,
           still_valid: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
    """The stage's stored record if its entry exists and every artifact still hashes as recorded.

    Read-only and lock-free: a ``None`` means "must be (re)computed" (missing, corrupt, edited,
    or ``still_valid`` rejects it, e.g. exported files deleted since).
    """
    rec = _valid((root or cache_dir()) / stage / key)
    if rec is None or (still_valid is not None and not still_valid(rec)):
        return None
    rec.pop("_artifacts", None)
    return rec


def run_cached(stage: str, key: str, compute: Callable[[Path], dict[str, Any]], *, refresh: bool = False,
               root: Path | None = None, still_valid: Callable[[dict[str, Any]], bool] | None = None) -> CacheResult:
    """Return the stage's record from the cache, or compute it into a fresh entry.

    ``compute(workdir)`` writes its big artifacts into ``workdir`` and returns a small
    JSON-serialisable record; the entry appears atomically (rename of a complete folder), with
    the sha256 of every artifact in its ``record.json`` so a later hit can prove it is intact.
    The per-key lock is held from the lookup to the rename: two identical runs started at once
    compute once, the second waits and then reuses the first one's entry (serializable).
    """
    base = (root or cache_dir()) / stage
    entry = base / key
    t0 = time.perf_counter()
    with storage_errors(base, what=f"write the {stage} cache entry", stage=stage):
        base.mkdir(parents=True, exist_ok=True)
        sweep_once(base.parent)
        with locks.held_lock(base / f"{key}.lock"):
            if not refresh:
                rec = lookup(stage, key, root=root, still_valid=still_valid)
                if rec is not None:
                    return CacheResult(rec, True, time.perf_counter() - t0, entry)
                if entry.exists():
                    log.warning("%s: cache entry %s is not valid any more (an artifact or exported file changed); recomputing",
                                stage, key[:12])
            _remove_leftovers(base, key)  # we hold the key's lock: any work folder of it is a dead run's
            rec = _compute_entry(stage, base, entry, key, compute)
    # what a later hit returns, exactly
    return CacheResult(json.loads(json.dumps(rec, default=str)), False, time.perf_counter() - t0, entry)


def _compute_entry(stage: str, base: Path, entry: Path, key: str, compute: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Compute into a work folder, then rename it over the entry (caller holds the key's lock)."""
    work = base / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    work.mkdir(parents=True)
    try:
        rec = compute(work)
        pause_point(stage)
        stored = dict(rec, _artifacts=_own_artifact_hashes(work))
        atomic_write_text(work / "record.json", json.dumps(stored, sort_keys=True, default=str))
        if entry.exists():
            # move the old entry aside first: a crash between the two renames leaves no entry
            # (recomputed next time), never a half-deleted one under the final name
            trash = base / f".{key}.{uuid.uuid4().hex[:8]}.old"
            entry.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        work.rename(entry)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return rec


# ---------------------------------------------------------------------------------------------
# faults: work folders of dead runs, and the test-only pause

_LEFTOVER = re.compile(r"^\.(?P<key>[0-9a-f]{64})\.[0-9a-f]{8}\.(tmp|old)$")
_swept: dict[Path, float] = {}
SWEEP_EVERY = 60.0  # seconds: a long-lived process (serve) sweeps again now and then
_swept_mutex = threading.Lock()


def _remove_leftovers(base: Path, key: str) -> None:
    for p in base.glob(f".{key}.*"):
        if _LEFTOVER.match(p.name):
            log.info("removing %s, left by a run that was killed while computing it", p)
            shutil.rmtree(p, ignore_errors=True)


def sweep_stale(root: Path | None = None) -> list[Path]:
    """Remove every work folder whose run is dead (its key's lock is not held); return them.

    A live run holds its key's lock for as long as its work folder exists, so the check cannot
    remove a folder in use, however old or new it is.
    """
    removed = []
    root = root or cache_dir()
    bases = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if (root / "prefect" / "locks").is_dir():
        bases.append(root / "prefect" / "locks")  # Prefect's transaction locks (FlockLockManager)
    for base in bases:
        for p in base.iterdir():
            if p.suffix == ".lock" and p.is_file():
                locks.is_held(p)  # a lock file whose holder died is removed (a held one is kept)
                continue
            m = _LEFTOVER.match(p.name)
            if not m:
                continue
            try:
                fd = locks.acquire(base / f"{m['key']}.lock", timeout=0)
            except locks.LockTimeout:
                continue  # a live run is computing it
            try:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            finally:
                locks.release(base / f"{m['key']}.lock", fd)
    return removed


def sweep_once(root: Path) -> None:
    """:func:`sweep_stale`, at most once a minute per cache folder and process (a run starts with it)."""
    with _swept_mutex:
        if time.monotonic() - _swept.get(root, -SWEEP_EVERY) < SWEEP_EVERY:
            return
        _swept[root] = time.monotonic()
    try:
        for p in sweep_stale(root):
            log.info("removed %s, left by a killed run", p)
    except OSError as exc:  # a sweep never fails a run
        log.warning("could not sweep %s: %s", root, exc)


def pause_point(stage: str) -> None:
    """Test hook: with ``NP2TORCH_TEST_PAUSE_AT=<stage>`` the run stops here (its work written,
    its locks held), says so on stderr and sleeps until killed. Unset, this does nothing."""
    if os.environ.get("NP2TORCH_TEST_PAUSE_AT") != stage:
        return
    print(f"np2torch-test: paused at {stage} (pid {os.getpid()})", file=sys.stderr, flush=True)
    while True:
        time.sleep(0.1)
