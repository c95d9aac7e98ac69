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
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from tasks.fingerprint import sha256_file, cached_by_stat
from tasks.paths import atomic_write_text, cache_dir

__all__ = ["stage_key", "code_version", "run_cached", "StageResult"]


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


def run_cached(stage: str, key: str, compute: Callable[[Path], dict[str, Any]], *, refresh: bool = False,
               root: Path | None = None, still_valid: Callable[[dict[str, Any]], bool] | None = None) -> StageResult:
    """Return the stage's record from the cache, or compute it into a fresh entry.

    ``compute(workdir)`` writes its big artifacts into ``workdir`` and returns a small
    JSON-serialisable record; the entry appears atomically (rename of a complete folder).
    """
    base = (root or cache_dir()) / stage
    entry = base / key
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with FileLock(str(base / f"{key}.lock")):
        if not refresh:
            rec = _valid(entry)
            if rec is not None and still_valid is not None and not still_valid(rec):
                rec = None  # e.g. the exported files were deleted or edited since
            if rec is not None:
                rec.pop("_artifacts", None)
                out = StageResult(rec)
                out.update(_cached=True, _seconds=time.perf_counter() - t0, _entry=str(entry), _key=key)
                return out
        work = base / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        work.mkdir(parents=True)
        try:
            rec = compute(work)
            stored = dict(rec, _artifacts=_artifact_hashes(work))
            atomic_write_text(work / "record.json", json.dumps(stored, sort_keys=True, default=str))
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            work.rename(entry)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    out = StageResult(rec)
    out.update(_cached=False, _seconds=time.perf_counter() - t0, _entry=str(entry), _key=key)
    return out
