"""``.npy`` files and folders of them (formats ``npy``, ``flat``, ``npy-dir``).

:func:`read_header` is the one place an ``.npy`` header is parsed and checked (magic, version,
a literal dict, a valid shape and dtype); :func:`check_fits` is the one place a declared size is
compared with the bytes that are really there, before anything is allocated or mapped.
"""

from __future__ import annotations

import functools
import io
import os
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks.errors import LoadError, Problem, short
from np2torch.tasks.fingerprint import SMALL_FILE, cached_by_stat, check_regular, open_regular, pack, stat_key
from np2torch.tasks.readers.base import MAX_ARRAYS, ArrayRecord, as_int_shape, check_dtype, nbytes_of
from np2torch.tasks.readers.stats import region_info

__all__ = ["NpyHeader", "read_header", "check_fits", "scan_npy_file", "scan_dir", "prime_npy", "MAGIC"]

MAGIC = b"\x93NUMPY"
_MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    hlen: int  # bytes from the start of the header to the data
    nbytes: int  # data bytes the header declares


# The header NumPy writes for a plain numeric array, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
# padded with spaces and a newline. Parsed by this pattern in microseconds; anything else goes
# through NumPy's own parser (a literal_eval, ~0.3 ms: minutes over a folder of 20,000 files).
_PLAIN = re.compile(r"\{'descr': '([<>|=][fiub][1-9][0-9]?)', 'fortran_order': (True|False), "
                    r"'shape': \(((?:(?:0|[1-9][0-9]*), )*(?:0|[1-9][0-9]*),?|)\), \} *\n?")
_LEN = {1: "<H", 2: "<I", 3: "<I"}


@functools.lru_cache(maxsize=64)
def _plain_dtype(descr: str) -> np.dtype:
    return np.dtype(descr)


def _fast_header(fh, start: int) -> NpyHeader | None:
    """The common case, parsed without NumPy's literal_eval; None to fall back to NumPy."""
    head = fh.read(10)
    if len(head) < 10 or head[:6] != MAGIC or head[6] not in _LEN or head[7] != 0:
        return None
    fmt = _LEN[head[6]]
    if fmt == "<H":
        n, pre = struct.unpack_from("<H", head, 8)[0], b""
    else:
        more = fh.read(2)
        if len(more) < 2:
            return None
        n, pre = struct.unpack("<I", head[8:] + more)[0], b""
    if n > 4096:
        return None
    text = fh.read(n)
    if len(text) != n:
        return None
    m = _PLAIN.fullmatch(text.decode("latin1"))
    if m is None:
        return None
    try:
        dtype = _plain_dtype(m.group(1))
    except TypeError:
        return None
    shape = tuple(int(d) for d in m.group(3).replace(",", " ").split())
    return NpyHeader(shape, m.group(2) == "True", dtype, fh.tell() - start, nbytes_of(shape, dtype))


def read_header(fh, *, where: str) -> NpyHeader:
    """Parse and check an ``.npy`` header at the file position (file, archive member or buffer)."""
    start = fh.tell()
    if fh.seekable():
        try:
            fast = _fast_header(fh, start)
        except (zipfile.BadZipFile, zlib.error, OSError, ValueError, struct.error):
            fast = None
        if fast is not None:
            return fast
        fh.seek(start)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=_MAX_HEADER)
        elif version in ((2, 0), (3, 0)):  # 3.0 differs only in allowing utf-8 field names
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=_MAX_HEADER)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (zipfile.BadZipFile, zlib.error) as exc:  # reading an archive member checks its CRC/stream
        raise LoadError(f"archive member is corrupt: {exc}", key=where, fix="re-copy or re-create the .npz") from None
    except Exception as exc:  # numpy raises ValueError, EOFError, SyntaxError… on garbage
        raise LoadError(f"not a valid .npy header: {short(str(exc))}", key=where,
                        fix="the file is truncated or not written by np.save; re-export it") from None
    shape = as_int_shape(shape, where)
    return NpyHeader(shape, bool(fortran), dtype, fh.tell() - start, nbytes_of(shape, dtype))


def check_fits(h: NpyHeader, available: int, where: str, *, member: bool = False) -> None:
    """The declared data must be there (a member: exactly), or one clear error before any allocation."""
    have = available - h.hlen
    if member and have != h.nbytes:
        raise LoadError(f"archive member's header declares shape {list(h.shape)} {h.dtype.str} ({h.nbytes} bytes) "
                        f"but the member holds {have} data bytes", key=where, expected=h.nbytes, actual=have,
                        fix="re-create the .npz; this member is truncated or its header was edited")
    if not member and have < h.nbytes:
        raise LoadError(f"file is truncated: the header declares shape {list(h.shape)} {h.dtype.str} "
                        f"({h.nbytes} bytes) but only {have} bytes follow it", key=where, expected=h.nbytes, actual=have,
                        fix="re-copy or re-export the file; it was cut short")


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
    info = region_info(path, h.hlen, h.nbytes, h.dtype, h.shape, progress, data=data, version=version)
    return {"hlen": h.hlen, "shape": list(h.shape), "dtype": h.dtype.str, "fortran": h.fortran, "info": info}


def scan_npy_file(path: Path, key: str, *, allow_pickle: bool, problems: list[Problem], progress=None) -> list[ArrayRecord]:
    check_regular(path)
    rec = cached_by_stat(path, "npy-record1", lambda: _record_info(path, progress))
    if "pickle" in rec:
        from np2torch.tasks.readers.pickled import scan_pickled

        return scan_pickled(path, allow_pickle=allow_pickle, payload_offset=rec["pickle"], problems=problems)
    dtype, shape = np.dtype(rec["dtype"]), tuple(rec["shape"])
    check_dtype(dtype, key, problems)
    return [ArrayRecord(key, str(path), None, None, rec["hlen"], shape, rec["dtype"], rec["fortran"], nbytes_of(shape, dtype), **rec["info"])]


def prime_npy(path: Path) -> None:
    """Compute what :func:`scan_npy_file` needs in the read that hashes the file (errors are left to the scan)."""
    cached_by_stat(path, "npy-record1", lambda: _record_info(path))


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def npy_files(path: Path) -> list[Path]:
    """The ``.npy`` files under a folder, in natural order; anything else named ``*.npy`` is refused."""
    out: list[tuple[list[Any], Path]] = []
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
                    out.append((_natural_key(rel), Path(e.path)))
                    if len(out) > MAX_ARRAYS:
                        raise LoadError(f"folder holds more than {MAX_ARRAYS} .npy files; this is not a checkpoint", key=str(path),
                                        expected=f"at most {MAX_ARRAYS}", actual=f"more than {MAX_ARRAYS}",
                                        fix="point source.path at the checkpoint's own folder")
    out.sort(key=lambda t: t[0])
    return [p for _, p in out]


def scan_dir(path: Path, *, allow_pickle: bool, problems: list[Problem], progress=None) -> list[ArrayRecord]:
    files = npy_files(path)
    if not files:
        raise LoadError("folder holds no .npy files", key=str(path), fix="point source.path at the folder of .npy files, or set source.format")
    records: list[ArrayRecord] = []
    root = str(path) + os.sep
    with pack(files):
        for f in files:
            key = str(f)[len(root):].replace(os.sep, "/")[: -len(".npy")]
            records += scan_npy_file(f, key, allow_pickle=allow_pickle, problems=problems, progress=progress)
    return records
