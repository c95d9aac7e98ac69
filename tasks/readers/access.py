"""Array access for every stage: describe a source's arrays (:func:`scan_source`) and read one
array's values (:func:`open_array`), whatever the format. A domain module below the stages:
load-arrays builds its table with it, and convert, verify and the mapping read arrays with it,
so no stage imports another.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from np2torch.tasks.errors import LoadError, Problem
from np2torch.tasks.fingerprint import check_regular
from np2torch.tasks.readers import FORMATS, flax_msgpack, keras_h5, npy, npz, pickled, safetensors_file
from np2torch.tasks.readers.base import ArrayRecord, check_keys, with_key
from np2torch.tasks.readers.detect import detect_format

__all__ = ["ArrayRecord", "scan_source", "open_array", "SCANNERS"]

Progress = Callable[[int], None] | None
SCANNERS = {"h5": keras_h5.scan_h5, "msgpack": flax_msgpack.scan_msgpack, "safetensors": safetensors_file.scan_safetensors}


def _scan_file(path: Path, fmt: str, allow_pickle: bool, problems: list[Problem], progress: Progress) -> list[ArrayRecord]:
    if path.is_dir():
        raise LoadError(f"format {fmt} needs a file, got a folder", key=str(path), fix="set source.format: npy-dir")
    check_regular(path)
    if fmt == "npz":
        return npz.scan_npz(path, allow_pickle=allow_pickle, problems=problems, progress=progress)
    if fmt in ("npy", "flat"):
        records = npy.scan_npy_file(path, path.stem, allow_pickle=allow_pickle, problems=problems, progress=progress)
        if fmt == "flat" and (len(records) != 1 or len(records[0].shape) != 1):
            raise LoadError("format flat needs one 1-D vector", key=str(path), expected="1 array of shape (N,)",
                            actual=[list(r.shape) for r in records], fix="set source.format: npy")
        return records
    if fmt == "pickle-list":
        with open(path, "rb") as fh:  # a regular file (checked above)
            is_npy = fh.read(6) == npy.MAGIC
        if is_npy:
            return npy.scan_npy_file(path, path.stem, allow_pickle=allow_pickle, problems=problems, progress=progress)
        return pickled.scan_pickled(path, allow_pickle=allow_pickle, problems=problems)
    if fmt in SCANNERS:
        return SCANNERS[fmt](path, progress)
    raise LoadError(f"unknown format {fmt}", key=str(path), fix=f"set source.format to one of {' | '.join(FORMATS)}")


def scan_source(path: str | Path, *, fmt: str = "auto", allow_pickle: bool = False, key_prefix: str = "",
                progress: Progress = None) -> list[ArrayRecord]:
    """Describe every array of a source (headers and fingerprints only), in source order.

    ``progress`` is called with the number of source bytes read, as they are read.
    """
    path = Path(path)
    if not path.exists():
        raise LoadError("source path does not exist", key=str(path), fix="check source.path (relative paths are relative to the config file)")
    fmt = detect_format(path, fmt)
    problems: list[Problem] = []
    try:
        if fmt == "npy-dir":
            if not path.is_dir():
                raise LoadError("format npy-dir needs a folder", key=str(path), fix="point source.path at a folder or change source.format")
            records = npy.scan_dir(path, allow_pickle=allow_pickle, problems=problems, progress=progress)
        else:
            records = _scan_file(path, fmt, allow_pickle, problems, progress)
    except PermissionError as exc:
        raise LoadError(f"cannot read: {exc.strerror}", key=exc.filename or str(path), fix="check the file's permissions") from None
    if problems:
        raise LoadError(f"{len(problems)} array(s) cannot be model parameters", key=str(path), problems=problems, fix=problems[0]["fix"])
    check_keys(records, str(path))  # printable (before stripping: the message must not carry an ESC either)
    if key_prefix:
        records = [with_key(r, r.key[len(key_prefix):]) if r.key.startswith(key_prefix) else r for r in records]
        check_keys(records, str(path))
    return records


def open_array(rec: ArrayRecord) -> np.ndarray:
    """The array's values: a read-only memory map where the format allows, else read once.

    Pickled records were checked against ``allow_pickle`` by :func:`scan_source`; they are
    re-read through the same restricted unpickler.
    """
    dtype = np.dtype(rec.dtype)
    if rec.index is not None:
        items = pickled.load_pickled(rec.file, rec.member, pickled.payload_offset(rec), os.stat(rec.file).st_mtime_ns)
        return items[rec.index][1]
    if rec.offset >= 0:
        if rec.nbytes == 0:
            return np.empty(rec.shape, dtype=dtype)
        size = check_regular(rec.file).st_size
        if rec.offset + rec.nbytes > size:  # touching a mapping past the end of a file is SIGBUS, not an error
            raise LoadError("file is shorter than when it was scanned (it changed or was cut short)", key=f"{rec.file}::{rec.key}",
                            expected=rec.offset + rec.nbytes, actual=size, fix="rerun with --refresh")
        return np.memmap(rec.file, dtype=dtype, mode="r", offset=rec.offset, shape=rec.shape, order="F" if rec.fortran_order else "C")
    if _is_hdf5(rec.file):
        return keras_h5.read_dataset(rec.file, rec.member)
    return npz.open_member(rec.file, rec.member)


def _is_hdf5(path: str) -> bool:
    with open(path, "rb") as fh:  # regular: the record was scanned from it
        return fh.read(8) == keras_h5.H5_MAGIC


