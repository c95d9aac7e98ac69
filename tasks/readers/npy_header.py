"""The ``.npy`` header: the one place it is parsed and checked.

:func:`read_header` parses a header (magic, version, a literal dict, a valid shape and dtype)
from a file, an archive member or a buffer; :func:`check_fits` is the one place a declared size
is compared with the bytes that are really there, before anything is allocated or mapped.
"""

from __future__ import annotations

import functools
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from np2torch.tasks.errors import LoadError, short
from np2torch.tasks.readers.base import as_int_shape, nbytes_of

__all__ = ["NpyHeader", "read_header", "check_fits", "MAGIC"]

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
        n = struct.unpack_from("<H", head, 8)[0]
    else:
        more = fh.read(2)
        if len(more) < 2:
            return None
        n = struct.unpack("<I", head[8:] + more)[0]
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
