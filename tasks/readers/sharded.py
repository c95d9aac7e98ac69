"""Sharded safetensors checkpoints (format ``safetensors-sharded``): a folder of
``model-0000K-of-0000N.safetensors`` shards with the ``model.safetensors.index.json`` that
``save_pretrained`` and the model hubs write (``{"metadata": …, "weight_map": {key: shard}}``).

The source path is the folder or its index file. The index is read as size-capped JSON and
checked whole before any shard is opened: every shard it names is a plain file name in the
index's own folder (no path, no ``..``, no link out of the folder, not the index itself) and
exists; every numbered shard of the series is listed. Then each shard is read by the
safetensors reader (header, one hashing pass, memory-mapped tensors), one at a time, and must
hold exactly the keys the index assigns to it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import np2torch.tasks.readers.safetensors_file as safetensors_file
from np2torch.tasks.errors import LoadError, short
from np2torch.tasks.fingerprint import open_regular
from np2torch.tasks.readers.base import MAX_ARRAYS, ArrayRecord, ScanContext, no_dup_keys

__all__ = ["scan", "claims", "shard_files", "INDEX_SUFFIX"]

INDEX_SUFFIX = ".safetensors.index.json"
_SERIES = re.compile(r"(.+)-(\d+)-of-(\d+)\.safetensors")
_FIX = "re-save the checkpoint (save_pretrained) or re-copy the whole folder"


def _index_path(path: Path) -> Path:
    if not path.is_dir():
        return path
    found = sorted(p for p in path.iterdir() if p.name.endswith(INDEX_SUFFIX))
    if len(found) != 1:
        raise LoadError(f"folder holds {len(found)} *{INDEX_SUFFIX} files; a sharded checkpoint has exactly one", key=str(path),
                        actual=short(", ".join(p.name for p in found) or "none"), fix="point source.path at the index file itself")
    return found[0]


def _weight_map(index: Path) -> dict[str, str]:
    with open_regular(index) as fh:
        text = fh.read(safetensors_file.MAX_HEADER + 1)
    if len(text) > safetensors_file.MAX_HEADER:
        raise LoadError(f"index is larger than {safetensors_file.MAX_HEADER} bytes", key=str(index), fix=_FIX)
    try:
        doc = json.loads(text.decode("utf-8"), object_pairs_hook=no_dup_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LoadError(f"index is not valid JSON: {short(str(exc))}", key=str(index), fix=_FIX) from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise LoadError("index has no weight_map {key: shard file name}", key=str(index), fix=_FIX)
    if len(wm) > MAX_ARRAYS:
        raise LoadError(f"index lists {len(wm)} tensors, more than {MAX_ARRAYS}", key=str(index), fix=_FIX)
    return wm


def _shards(index: Path) -> tuple[dict[str, list[str]], Path]:
    """shard file name → the keys the index puts in it (shards in their series order), all checked."""
    folder = index.parent
    real = os.path.realpath(folder)
    by_shard: dict[str, list[str]] = {}
    for key, shard in _weight_map(index).items():
        where = f"{index}::{key}"
        if not shard or shard in (".", "..") or "/" in shard or "\\" in shard or os.path.isabs(shard):
            raise LoadError(f"index points outside its folder: shard {short(shard)!r} is not a file name in {folder}", key=where, fix=_FIX)
        if shard == index.name:
            raise LoadError("index points at itself as a shard", key=where, fix=_FIX)
        if shard not in by_shard:
            p = folder / shard
            if not p.exists():
                raise LoadError(f"index points at a missing shard {short(shard)!r}", key=where, fix=_FIX)
            if os.path.dirname(os.path.realpath(p)) != real:
                raise LoadError(f"index points outside its folder: shard {short(shard)!r} links to {short(os.path.realpath(p))}",
                                key=where, fix="copy the shard into the checkpoint's folder")
        by_shard.setdefault(shard, []).append(key)
    if not by_shard:
        raise LoadError("index lists no tensors", key=str(index), fix=_FIX)
    series = {m.group(1, 3) for m in map(_SERIES.fullmatch, by_shard) if m}
    for prefix, total in series:  # every numbered shard of the series listed, and none beside it
        want = {f"{prefix}-{k:0{len(total)}d}-of-{total}.safetensors" for k in range(1, int(total) + 1)}
        on_disk = {n for n in os.listdir(folder) if (m := _SERIES.fullmatch(n)) and m.group(1, 3) == (prefix, total)}
        extra = sorted((want | on_disk) - set(by_shard))
        if extra:
            state = "is on disk but" if extra[0] in on_disk else "is"
            raise LoadError(f"shard {short(extra[0])!r} {state} not listed in the index ({len(extra)} such)", key=str(index),
                            expected=f"{int(total)} shards listed", actual=len([s for s in by_shard if s in want]), fix=_FIX)
    order = sorted(by_shard, key=lambda n: (int(m.group(2)) if (m := _SERIES.fullmatch(n)) else 0, n))
    return {s: by_shard[s] for s in order}, folder


def shard_files(path: Path) -> list[Path]:
    """The index and every shard: the files the source's cache key hashes."""
    index = _index_path(path)
    shards, folder = _shards(index)
    return [index, *(folder / s for s in shards)]


def scan(path: Path, ctx: ScanContext) -> list[ArrayRecord]:
    index = _index_path(path)
    shards, folder = _shards(index)
    out: list[ArrayRecord] = []
    for shard, keys in shards.items():  # one shard at a time: its header, then one read of its bytes
        recs = safetensors_file.scan(folder / shard, ctx)
        have = {r.key for r in recs}
        lacking = [k for k in keys if k not in have]
        if lacking:
            raise LoadError(f"index puts key {short(lacking[0])!r} in shard {short(shard)!r}, which lacks it ({len(lacking)} such)",
                            key=f"{index}::{lacking[0]}", fix=_FIX)
        listed = set(keys)
        unlisted = [r.key for r in recs if r.key not in listed]
        if unlisted:
            raise LoadError(f"shard holds key {short(unlisted[0])!r}, which the index does not list in it ({len(unlisted)} such)",
                            key=f"{folder / shard}::{unlisted[0]}", fix=_FIX)
        out += recs
    return out


def claims(path: Path) -> bool:
    """An index file, or a folder holding one."""
    if path.is_dir():
        return any(p.name.endswith(INDEX_SUFFIX) for p in path.iterdir())
    return path.name.endswith(INDEX_SUFFIX)
