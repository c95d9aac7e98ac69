"""``.npy`` files and folders of them (formats ``npy``, ``flat``, ``npy-dir``, and ``pickle-list``
for an ``np.save`` of ``get_weights()``); the header itself is parsed and checked in :mod:`.npy_header`."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks.errors import LoadError
from np2torch.tasks.fingerprint import SMALL_FILE, cached_by_stat, check_regular, open_regular, pack, stat_key
from np2torch.tasks.readers.base import MAX_ARRAYS, ArrayRecord, ScanContext, check_dtype, natural_key, nbytes_of
from np2torch.tasks.readers.npy_header import MAGIC, NpyHeader, check_fits, read_header
from np2torch.tasks.readers.pickled import scan_pickled
from np2torch.tasks.readers.stats import Layout, layout_infos

__all__ = ["scan", "scan_flat", "scan_dir", "scan_pickle_list", "sniff", "npy_files", "MAGIC"]


def _open_header(path: Path) -> tuple[NpyHeader, int, bytes | None, dict[str, Any]]:
    """Header, file size, the whole file when small (one open and one read for a tiny array), and its stat."""
    with open_regular(path) as fh:
        st = os.fstat(fh.fileno())
        data = fh.read(SMALL_FILE + 1) if st.st_size <= SMALL_FILE else None
        if data is not None and len(data) != st.st_size:
            data = None  # it is being written: leave it to the streaming read
        h = read_header(io.BytesIO(data) if data is not None else (fh.seek(0), fh)[1], where=str(path))
        return h, st.st_size, data, stat_key(path, st)


def _record_info(path: Path, progress=None) -> dict[str, Any]:
    """What the stat cache keeps of one ``.npy``: its header and its array's fingerprint and
    statistics, from one read; an unchanged file is then described without being opened."""
    h, size, data, version = _open_header(path)
    if h.dtype.hasobject:
        return {"pickle": h.hlen}
    check_fits(h, size, str(path))
    (info,) = layout_infos(path, [Layout(path.name, h.shape, h.dtype, h.hlen, fortran=h.fortran)], progress, data=data, version=version)
    return {"hlen": h.hlen, "shape": list(h.shape), "dtype": h.dtype.str, "fortran": h.fortran, "info": info}


def _scan_one(path: Path, key: str, ctx: ScanContext) -> list[ArrayRecord]:
    check_regular(path)
    rec = cached_by_stat(path, "npy-record2", lambda: _record_info(path, ctx.progress))
    if "pickle" in rec:
        return scan_pickled(path, allow_pickle=ctx.allow_pickle, payload_offset=rec["pickle"], problems=ctx.problems)
    dtype, shape = np.dtype(rec["dtype"]), tuple(rec["shape"])
    check_dtype(dtype, key, ctx.problems)
    return [ArrayRecord(key, str(path), None, None, rec["hlen"], shape, rec["dtype"], rec["fortran"], nbytes_of(shape, dtype),
                        **rec["info"])]


def scan(path: Path, ctx: ScanContext) -> list[ArrayRecord]:
    """Format ``npy``: one array (or, with ``allow_pickle``, the arrays of a pickled object array)."""
    return _scan_one(path, path.stem, ctx)


def scan_flat(path: Path, ctx: ScanContext) -> list[ArrayRecord]:
    """Format ``flat``: one 1-D vector holding every parameter, to be split by the mapping."""
    records = scan(path, ctx)
    if len(records) != 1 or len(records[0].shape) != 1:
        raise LoadError("format flat needs one 1-D vector", key=str(path), expected="1 array of shape (N,)",
                        actual=[list(r.shape) for r in records], fix="set source.format: npy")
    return records


def scan_pickle_list(path: Path, ctx: ScanContext) -> list[ArrayRecord]:
    """Format ``pickle-list``: an ``np.save`` of ``get_weights()`` or a ``.pkl`` list/dict of arrays."""
    with open_regular(path) as fh:
        is_npy = fh.read(6) == MAGIC
    if is_npy:
        return scan(path, ctx)
    return scan_pickled(path, allow_pickle=ctx.allow_pickle, problems=ctx.problems)


def sniff(head: bytes, size: int) -> bool:
    return head[:6] == MAGIC


def npy_files(path: Path) -> list[Path]:
    """The ``.npy`` files under a folder, in natural order; anything else named ``*.npy`` is refused."""
    out: list[tuple[tuple, Path]] = []
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.name.endswith(".npy"):
                    if not e.is_file():  # follows links: a link to /dev/zero or a FIFO is refused, not skipped
                        check_regular(e.path)
                    rel = os.path.relpath(e.path, path).replace(os.sep, "/")
                    out.append((natural_key(rel), Path(e.path)))
                    if len(out) > MAX_ARRAYS:
                        raise LoadError(f"folder holds more than {MAX_ARRAYS} .npy files; this is not a checkpoint", key=str(path),
                                        expected=f"at most {MAX_ARRAYS}", actual=f"more than {MAX_ARRAYS}",
                                        fix="point source.path at the checkpoint's own folder")
    out.sort(key=lambda t: t[0])
    return [p for _, p in out]


def scan_dir(path: Path, ctx: ScanContext) -> list[ArrayRecord]:
    """Format ``npy-dir``: a folder of ``.npy`` files (nested folders), keyed by their relative paths."""
    files = npy_files(path)
    if not files:
        raise LoadError("folder holds no .npy files", key=str(path),
                        fix="point source.path at the folder of .npy files, or set source.format")
    records: list[ArrayRecord] = []
    root = str(path) + os.sep
    with pack(files):
        for f in files:
            key = str(f)[len(root):].replace(os.sep, "/")[: -len(".npy")]
            records += _scan_one(f, key, ctx)
    return records
