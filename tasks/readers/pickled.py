"""Pickled weights (format ``pickle-list``): ``np.save`` of ``model.get_weights()`` (an object
array of arrays) or a ``.pkl`` list/dict of arrays. Only with ``allow_pickle: true``, and then
through :mod:`np2torch.tasks.safe_pickle`, which rebuilds arrays and nothing else.
"""

from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks.errors import LoadError, Problem, short
from np2torch.tasks.fingerprint import open_regular
from np2torch.tasks.readers.base import OPT_IN, ArrayRecord, check_dtype
from np2torch.tasks.readers.npy_header import read_header
from np2torch.tasks.readers.stats import array_info
from np2torch.tasks.safe_pickle import UnsafePickleError, safe_loads

__all__ = ["scan_pickled", "open_record"]


def _payload(path: Path, member: str | None, offset: int | None) -> bytes:
    if member is not None:
        with zipfile.ZipFile(open_regular(path)) as zf, zf.open(member) as mf:
            read_header(mf, where=f"{path}::{member}")
            return mf.read()
    with open_regular(path) as fh:
        if offset is not None:
            fh.seek(offset)
        return fh.read()


def _flatten(obj: Any, where: str) -> list[tuple[str, np.ndarray]]:
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        obj = list(obj.ravel()) if obj.ndim else [obj.item()]
    if isinstance(obj, np.ndarray):
        return [(str(i), np.asarray(a)) for i, a in enumerate(obj)] if obj.ndim > 0 else [("0", obj)]
    if isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        raise LoadError(f"pickle holds a {type(obj).__name__}, not a list or dict of arrays", key=where,
                        fix="save the weights as a list of arrays (np.save of model.get_weights())")
    out = []
    for k, v in items:
        if not isinstance(v, np.ndarray):
            try:
                v = np.asarray(v)
            except Exception:
                raise LoadError(f"item {short(k)} is a {type(v).__name__}, not an array", key=where) from None
            if v.dtype.hasobject:
                raise LoadError(f"item {short(k)} is a nested object, not a numeric array", key=where, fix="save a flat list of arrays")
        out.append((k, v))
    return out


@functools.lru_cache(maxsize=8)
def load_pickled(path: str, member: str | None, payload_offset: int | None, mtime_ns: int) -> tuple[tuple[str, np.ndarray], ...]:
    where = f"{path}::{member}" if member else path
    data = _payload(Path(path), member, payload_offset)
    try:
        obj = safe_loads(data)
    except UnsafePickleError as exc:
        raise LoadError(
            f"refused to unpickle: {exc}. Nothing from the file was run",
            key=where,
            fix="this file is not a plain pickle of arrays; do not load it, or re-export the weights as .npz",
        ) from None
    except Exception as exc:
        raise LoadError(f"pickle is corrupt or truncated: {type(exc).__name__}: {short(str(exc))}", key=where,
                        fix="re-export the file") from None
    return tuple(_flatten(obj, where))


def scan_pickled(path: Path, *, allow_pickle: bool, member: str | None = None, payload_offset: int | None = None,
                 problems: list[Problem]) -> list[ArrayRecord]:
    where = f"{path}::{member}" if member else str(path)
    if not allow_pickle:
        raise LoadError(
            "holds pickled Python objects (an object array or a pickled list of arrays); "
            "pickles can run code, so they load only when you opt in",
            key=where,
            fix=OPT_IN,
        )
    items = load_pickled(str(path), member, payload_offset, os.stat(path).st_mtime_ns)
    records = []
    prefix = (member[:-4] + "/" if member.endswith(".npy") else member + "/") if member else ""
    for i, (k, arr) in enumerate(items):
        check_dtype(arr.dtype, f"{where}[{k}]", problems)
        records.append(
            ArrayRecord(prefix + k, str(path), member, i, -1, tuple(arr.shape), arr.dtype.str,
                        bool(arr.flags.f_contiguous and not arr.flags.c_contiguous), arr.nbytes, **array_info(arr), reader="pickle-list")
        )
    return records


def open_record(rec: ArrayRecord) -> np.ndarray:
    """A pickled array's values, re-read through the same restricted unpickler (the scan checked ``allow_pickle``)."""
    return load_pickled(rec.file, rec.member, _payload_offset(rec), os.stat(rec.file).st_mtime_ns)[rec.index][1]


def _payload_offset(rec: ArrayRecord) -> int | None:
    """Where the pickle starts in a record's file: after the ``.npy`` header of an object array."""
    if rec.member is not None:
        return None
    with open_regular(rec.file) as fh:
        if fh.read(6) != b"\x93NUMPY":
            return None
        fh.seek(0)
        return read_header(fh, where=rec.file).hlen
