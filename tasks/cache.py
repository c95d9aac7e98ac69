"""Content-addressed stage cache.

Each stage's artifact lives under ``<cache>/<stage>/<key>/`` where the key is a sha256 of
exactly what the stage depends on: the stage's name and code version, the key of the stage
before it, the config section it reads and the fingerprints of the files it reads. A hit is
only trusted after every artifact file's hash matches the one recorded when it was written
(a corrupt or deleted entry is recomputed), and a per-key file lock makes two identical
conversions started at once compute once: the second waits, then reuses.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from np2torch.tasks.fingerprint import cached_by_stat, remember, sha256_file
from np2torch.tasks.paths import atomic_write_text, cache_dir

log = logging.getLogger(__name__)

__all__ = ["stage_key", "code_version", "lookup", "run_cached", "StageResult"]


def code_version(*objs: Any) -> str:
    """sha256 of the source of the given modules/functions: a code change invalidates the stage."""
    h = hashlib.sha256()
    for o in objs:
        try:
            h.update(inspect.getsource(o).encode())
        except (OSError, TypeError):
            h.update(repr(o).encode())
    return h.hexdigest()[:16]


def stage_key(stage: str, **parts: Any) -> str:
    blob = json.dumps({"stage": stage, **parts}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class StageResult(dict):
    """A stage's small JSON record plus how it was obtained (``cached``, ``seconds``)."""


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
               root: Path | None = None, still_valid: Callable[[dict[str, Any]], bool] | None = None) -> StageResult:
    """Return the stage's record from the cache, or compute it into a fresh entry.

    ``compute(workdir)`` writes its big artifacts into ``workdir`` and returns a small
    JSON-serialisable record; the entry appears atomically (rename of a complete folder), with
    the sha256 of every artifact in its ``record.json`` so a later hit can prove it is intact.
    The per-key lock is held from the lookup to the rename: two identical runs started at once
    compute once, the second waits and then reuses the first one's entry (serializable).
    """
    base = (root or cache_dir()) / stage
    entry = base / key
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with FileLock(str(base / f"{key}.lock")):
        if not refresh:
            rec = lookup(stage, key, root=root, still_valid=still_valid)
            if rec is not None:
                out = StageResult(rec)
                out.update(_cached=True, _seconds=time.perf_counter() - t0, _entry=str(entry), _key=key)
                return out
            if entry.exists():
                log.warning("%s: cache entry %s is not valid any more (an artifact or exported file changed); recomputing", stage, key[:12])
        work = base / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        work.mkdir(parents=True)
        try:
            rec = compute(work)
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
    out = StageResult(json.loads(json.dumps(rec, default=str)))  # what a later hit returns, exactly
    out.update(_cached=False, _seconds=time.perf_counter() - t0, _entry=str(entry), _key=key)
    return out
