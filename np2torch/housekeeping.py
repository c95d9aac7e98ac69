"""``np2torch cache du`` and ``np2torch cache prune``: what the stage cache holds, and making room.

The cache layout (:mod:`np2torch.tasks.cache`): ``<cache>/<stage>/<key>/`` holds one entry
(``record.json`` plus artifacts), ``<key>.lock`` its lock, ``.<key>.*.tmp``/``.old`` work
folders of runs in progress (or killed ones, swept by the cache itself); ``<cache>/stat`` the
stat cache of file hashes; ``<cache>/prefect`` Prefect's result records and locks.

Exports hard-link the converted file of the cache (one inode, two names), so an entry's bytes
are shared with an export folder. Pruning never removes an entry that a current export needs:

- every stage entry of the latest successful audit record per export folder whose outputs
  are still on disk (so rerunning that conversion stays a cache hit), and
- every entry holding a file whose inode is one of those exported files, or that has another
  name at all (deleting this name would free nothing and lose the cache), and
- every entry whose lock is held right now (a run is using it).

Removing one name of a hard link never changes the other, so no prune can alter an exported
file; ``du`` counts each inode once and shows how much of the cache is shared with exports.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from np2torch.flows.reporting import fmt3
from np2torch.tasks.audit import read_records
from np2torch.tasks.errors import ConfigError
from np2torch.tasks.paths import cache_dir

__all__ = ["Entry", "scan_cache", "protected", "disk_usage", "prune", "parse_age"]

_NOT_STAGES = {"stat", "prefect"}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class Entry:
    """One stage cache entry: where, how big, when last written or used."""

    stage: str
    key: str
    path: Path
    bytes: int = 0  # bytes only this entry holds (inodes with no other name)
    shared_bytes: int = 0  # bytes of files that also have another name (an export's hard link)
    inodes: set[tuple[int, int]] = field(default_factory=set)
    last_used: float = 0.0


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``45m``, ``90s``, ``2w`` (a bare number is days) → seconds."""
    m = _AGE.match(text or "")
    if not m:
        raise ConfigError(f"--older-than {text!r} is not an age", key="--older-than", expected="e.g. 7d, 12h, 30m, 2w", actual=text,
                          fix="give a number with a unit: s, m, h, d or w")
    return float(m[1]) * _UNIT_S[m[2]]


def _walk_files(d: Path) -> list[Path]:
    out = []
    for root, _, files in os.walk(d):
        out.extend(Path(root, f) for f in files)
    return out


def scan_cache(root: Path | None = None) -> list[Entry]:
    """Every complete entry of every stage (work folders and locks excluded)."""
    root = root or cache_dir()
    entries = []
    if not root.is_dir():
        return entries
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in _NOT_STAGES):
        for d in sorted(stage_dir.iterdir()):
            if not d.is_dir() or d.name.startswith("."):
                continue
            e = Entry(stage_dir.name, d.name, d)
            for f in _walk_files(d):
                try:
                    st = f.lstat()
                except OSError:
                    continue
                e.inodes.add((st.st_dev, st.st_ino))
                if st.st_nlink > 1:
                    e.shared_bytes += st.st_size
                else:
                    e.bytes += st.st_size
                e.last_used = max(e.last_used, st.st_mtime)
            entries.append(e)
    return entries


def protected(entries: list[Entry], *, log: Path | None = None) -> dict[tuple[str, str], str]:
    """(stage, key) → why it must stay: what current exports need, from the audit log and the inodes."""
    records, _ = read_records(log)
    latest: dict[str, dict[str, Any]] = {}  # export folder → its latest successful record
    for r in records:
        if r.get("status") != "success" or not r.get("outputs"):
            continue
        latest[str(Path(r["outputs"][0]["path"]).parent)] = r
    export_inodes: set[tuple[int, int]] = set()
    keep: dict[tuple[str, str], str] = {}
    for folder, r in latest.items():
        present = []
        for o in r["outputs"]:
            try:
                st = os.stat(o["path"])
            except OSError:
                continue
            present.append(o["path"])
            export_inodes.add((st.st_dev, st.st_ino))
        if not present:
            continue  # that export is gone: nothing of it to keep
        for stage, s in (r.get("stages") or {}).items():
            if s.get("key"):
                keep[(stage, s["key"])] = f"used by the current export in {folder} ({r.get('name')})"
    for e in entries:
        # a file with another name is an export's hard link (found by its inode, or by its link
        # count when the audit log does not know the export): deleting this name frees nothing
        if (e.stage, e.key) not in keep and (e.inodes & export_inodes or e.shared_bytes):
            keep[(e.stage, e.key)] = "holds a file an export links to"
    return keep


def _last_used_from_audit(entries: list[Entry], log: Path | None) -> None:
    """An entry hit by a later run counts as used then (the entry's files keep their first mtime)."""
    records, _ = read_records(log)
    when: dict[tuple[str, str], float] = {}
    for r in records:
        t = _timestamp(r.get("finished_at"))
        for stage, s in (r.get("stages") or {}).items():
            if s.get("key") and t:
                when[(stage, s["key"])] = max(when.get((stage, s["key"]), 0.0), t)
    for e in entries:
        e.last_used = max(e.last_used, when.get((e.stage, e.key), 0.0))


def _timestamp(text: Any) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _tree_bytes(d: Path) -> int:
    total = 0
    for f in _walk_files(d) if d.is_dir() else []:
        try:
            total += f.lstat().st_size
        except OSError:
            pass
    return total


def _du_row(stage: str) -> dict[str, Any]:
    return {"stage": stage, "entries": 0, "bytes": 0, "shared_with_exports": 0, "protected": 0, "work_folders": 0}


def disk_usage(root: Path | None = None, *, log: Path | None = None) -> dict[str, Any]:
    """Per stage: entries, bytes held only by the cache, bytes shared with exports, protected entries."""
    root = root or cache_dir()
    entries = scan_cache(root)
    keep = protected(entries, log=log)
    rows: dict[str, dict[str, Any]] = {}
    for e in entries:
        r = rows.setdefault(e.stage, _du_row(e.stage))
        r["entries"] += 1
        r["bytes"] += e.bytes
        r["shared_with_exports"] += e.shared_bytes
        r["protected"] += (e.stage, e.key) in keep
    for stage_dir in (p for p in root.iterdir() if p.is_dir() and p.name not in _NOT_STAGES) if root.is_dir() else []:
        work = [p for p in stage_dir.iterdir() if p.is_dir() and p.name.startswith(".")]
        if work:
            r = rows.setdefault(stage_dir.name, _du_row(stage_dir.name))
            r["work_folders"] += len(work)
            r["bytes"] += sum(_tree_bytes(p) for p in work)
    other = {"stat cache": _tree_bytes(root / "stat"), "prefect records": _tree_bytes(root / "prefect")}
    total = sum(r["bytes"] for r in rows.values()) + sum(other.values())
    return {"root": str(root), "stages": list(rows.values()), "other": other, "total_bytes": total,
            "shared_bytes": sum(r["shared_with_exports"] for r in rows.values())}


def _in_use(e: Entry) -> bool:
    from filelock import FileLock, Timeout

    lock = FileLock(str(e.path.parent / f"{e.key}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def prune(*, older_than: float = 0.0, root: Path | None = None, log: Path | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Remove entries not used for ``older_than`` seconds that no current export needs; never one in use."""
    root = root or cache_dir()
    entries = scan_cache(root)
    keep = protected(entries, log=log)
    _last_used_from_audit(entries, log)
    now = time.time()
    removed, kept, freed = [], [], 0
    for e in entries:
        why = keep.get((e.stage, e.key))
        if why is None and now - e.last_used < older_than:
            why = "used recently"
        if why is None and _in_use(e):
            why = "in use by a running conversion"
        if why is not None:
            kept.append({"stage": e.stage, "key": e.key[:12], "why": why})
            continue
        if not dry_run:
            trash = e.path.with_name(f".{e.key}.prune.old")  # one rename: never a half-deleted entry under its name
            try:
                e.path.rename(trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
        removed.append({"stage": e.stage, "key": e.key[:12], "bytes": e.bytes + e.shared_bytes})
        freed += e.bytes
    if not dry_run:
        _drop_orphan_prefect_records(root)
    return {"removed": removed, "kept": kept, "freed_bytes": freed, "dry_run": dry_run}


def _drop_orphan_prefect_records(root: Path) -> None:
    """Prefect's result records that point at a pruned entry would only be dropped on next use; drop them now."""
    results = root / "prefect" / "results"
    if not results.is_dir():
        return
    for f in results.iterdir():
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        m = re.search(r'"entry":\s*"([^"]+)"', text)
        if m and not Path(m[1]).exists():
            f.unlink(missing_ok=True)


def human(n: float) -> str:
    """Bytes at 3 significant digits: ``512 B``, ``1.5 kB``, ``25.8 GB``."""
    if abs(n) < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{fmt3(n)} {unit}"
    return f"{fmt3(n / 1000)} TB"


def cache_cli(args: Any) -> int:
    """``np2torch cache du`` / ``np2torch cache prune [--older-than D] [--dry-run]``."""
    if args.action == "du":
        du = disk_usage()
        print(f"cache {du['root']}: {human(du['total_bytes'])} held by the cache; {human(du['shared_bytes'])} shared with exports "
              "(hard links: freed only when the export goes too)")
        for r in du["stages"]:
            extra = f", {r['work_folders']} work folder(s)" if r["work_folders"] else ""
            print(f"  {r['stage']:<20} {r['entries']:>4} entries  {human(r['bytes']):>9}  shared {human(r['shared_with_exports']):>9}  "
                  f"protected {r['protected']}{extra}")
        for name, b in du["other"].items():
            print(f"  {name:<20} {human(b):>24}")
        from np2torch.tasks.paths import home_line

        print(home_line())
        return 0
    age = parse_age(args.older_than) if args.older_than else 0.0
    res = prune(older_than=age, dry_run=args.dry_run)
    verb = "would remove" if res["dry_run"] else "removed"
    print(f"np2torch: {verb} {len(res['removed'])} cache entr{'y' if len(res['removed']) == 1 else 'ies'}, "
          f"freeing {human(res['freed_bytes'])}; kept {len(res['kept'])}")
    for k in res["kept"]:
        print(f"  kept {k['stage']}/{k['key']}: {k['why']}")
    return 0


def add_cache_parser(sub: Any) -> None:
    """``np2torch cache du|prune`` on the CLI's sub-parsers."""
    c = sub.add_parser("cache", help="the stage cache: disk usage, prune (never breaks a current export)",
                       description="Disk usage of the stage cache per stage, or remove entries no current export needs.",
                       epilog="example:\n  np2torch cache prune --older-than 7d --dry-run\n\n"
                              "exit status: 0 done; 1 the cache could not be read or pruned; 2 the command line is wrong",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("action", choices=["du", "prune"])
    c.add_argument("--older-than", default=None, metavar="AGE",
                   help="prune only entries unused for AGE (e.g. 7d, 12h); default: all unneeded")
    c.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    c.set_defaults(func=cache_cli)
