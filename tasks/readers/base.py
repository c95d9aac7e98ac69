"""What every reader shares: the array record, the numeric-dtype check, the key check and caps.

A reader turns one source file (or folder) into :class:`ArrayRecord` rows without loading the
arrays: key, file, byte offset, shape, dtype with byte order, fingerprint and value statistics.
Hostile input is refused here with one :class:`LoadError` naming the file or key, what was
expected and found, and the fix, before anything large is allocated.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks.dtypes import FLOAT_LIMITS
from np2torch.tasks.errors import LoadError, Problem, short

__all__ = ["ArrayRecord", "Reader", "ScanContext", "FLOAT_LIMITS", "NUMERIC_KINDS", "MAX_ARRAYS", "MAX_NDIM", "check_dtype",
           "nbytes_of", "check_keys", "with_key", "bad_key_char", "natural_key", "OPT_IN"]

# dtypes a parameter or buffer can have; anything else cannot be a tensor of a model
NUMERIC_KINDS = "fiub"
# A source with more arrays than this is not a model checkpoint (the largest real ones hold a
# few tens of thousands); refusing it early keeps a hostile archive from costing minutes.
MAX_ARRAYS = 100_000
MAX_NDIM = 32  # numpy's own limit is 64; no layer has more than 6
OPT_IN = "set `source.allow_pickle: true` in the config (or pass --allow-pickle) if you trust this file"

# Keys end up in tables, CSV files and terminals: a C0/C1 control character (ESC, newline, CSI)
# or an invisible format character that reorders or hides text (bidi overrides and isolates,
# zero-width joiners, the BOM) in one is hostile or broken, never a parameter name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]")


def bad_key_char(key: str) -> str | None:
    """The first character of ``key`` that must not reach a terminal, or None."""
    m = _CONTROL.search(key)
    if m:
        return m.group()
    if key.isascii():
        return None
    for ch in key:  # any other format (Cf) or unassigned-surrogate character
        if unicodedata.category(ch) in ("Cf", "Cs", "Co"):
            return ch
    return None


@dataclass(frozen=True)
class ArrayRecord:
    """One source array, described without its bytes."""

    key: str  # source key, after key_prefix is stripped
    file: str  # absolute path of the file holding it
    member: str | None  # npz member name (or HDF5 dataset path), when inside a container
    index: int | None  # position in a pickled list
    offset: int  # byte offset of the data in ``file``; -1 when it cannot be memory-mapped
    shape: tuple[int, ...]
    dtype: str  # numpy dtype string with byte order, e.g. '<f4', '>f8'
    fortran_order: bool
    nbytes: int
    fingerprint: str  # from the file's sha256 and the array's place in it, or the sha256 of its decoded bytes (stats.fingerprint_of)
    n_nonfinite: int = 0  # NaN/Inf count (validate refuses them unless allowed)
    absmax: float = 0.0  # largest |x| among finite values (dtype overflow check before casting)
    absmin_nonzero: float = 0.0  # smallest nonzero |x| (underflow check); 0 when all zero
    # per float dtype of FLOAT_LIMITS: [count that overflows, count of nonzeros that underflow to 0];
    # only dtypes with a nonzero count are listed
    n_out_of_range: dict[str, list[int]] = field(default_factory=dict)
    reader: str = ""  # the format whose reader opens it when it cannot be memory-mapped (set by scan_source)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def byte_order(self) -> str:
        return {"<": "little", ">": "big", "|": "n/a", "=": "little"}[np.dtype(self.dtype).str[0]]


@dataclass
class ScanContext:
    """What every reader's ``scan(path, ctx)`` gets besides the path."""

    allow_pickle: bool = False  # pickled arrays load only when true (source.allow_pickle)
    progress: Callable[[int], None] | None = None  # called with the number of source bytes read, as they are read
    problems: list[Problem] = field(default_factory=list)  # arrays that cannot be parameters, reported together
    # what a reader recognised and left out on purpose (optimizer state), one line per kind, not per array
    notes: list[str] = field(default_factory=list)


def _one_file(path: Path) -> list[Path]:
    return [path]


@dataclass(frozen=True)
class Reader:
    """One row of the readers table (:mod:`np2torch.tasks.readers`): everything np2torch knows
    about a ``source.format``.

    - ``scan(path, ctx)``: the source's arrays as :class:`ArrayRecord` rows, from headers plus
      ONE read of each file (its sha256, every array's value statistics; see ``stats.layout_infos``).
    - ``suffixes``: a file with one of these suffixes is this format (``source.format: auto``);
      ``sniff(head, size)``: else, is a file whose first 16 bytes are ``head`` this format.
    - ``claims(path)``: a last say after ``sniff`` (or alone, for a folder or a file no magic
      tells): is this file or folder this format, looking inside it (a zip that holds a
      ``model.weights.h5``, a folder that holds an index).
    - ``folder``: the source is a folder (``auto`` picks the first folder reader that claims a
      folder); None: either, a folder or a file in it (an index file).
    - ``files(path)``: the files that make up the source, the ones its cache key hashes.
    - ``open(record)``: an array the reader could not describe as a byte range (``offset < 0``);
      every other array is memory-mapped from its file.
    """

    name: str
    scan: Callable[[Path, ScanContext], list[ArrayRecord]]
    about: str  # what it reads, for help texts and errors
    suffixes: tuple[str, ...] = ()
    sniff: Callable[[bytes, int], bool] | None = None
    folder: bool | None = False
    files: Callable[[Path], list[Path]] = _one_file
    open: Callable[[ArrayRecord], Any] | None = None
    claims: Callable[[Path], bool] | None = None


def with_key(r: ArrayRecord, key: str) -> ArrayRecord:
    return replace(r, key=key)


_KIND_NAMES = {"c": "complex", "U": "string", "S": "bytes", "M": "datetime", "m": "timedelta", "V": "void/struct", "O": "object"}


def check_dtype(dtype: np.dtype, where: str, problems: list[Problem]) -> None:
    """Add a problem when ``dtype`` cannot be a model parameter (complex, string, object …)."""
    if dtype.kind not in NUMERIC_KINDS:
        kind = _KIND_NAMES.get(dtype.kind, dtype.kind)
        problems.append(
            Problem(
                where,
                f"has {kind} dtype {dtype.str}, which cannot be a model parameter",
                expected="a real numeric dtype (float, int, bool)",
                actual=dtype.str,
                fix="convert the array to a float dtype before saving, or ignore this key with mapping.ignore",
            )
        )


def nbytes_of(shape: tuple[int, ...], dtype: np.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def check_keys(records: list[ArrayRecord], where: str) -> None:
    """Every key printable and unique (one linear pass)."""
    seen: set[str] = set()
    dups: set[str] = set()
    for r in records:
        ch = bad_key_char(r.key)
        if ch is not None:
            code = "" if ord(ch) < 0x20 or ch == "\x7f" else f" (U+{ord(ch):04X})"  # C0 and DEL show in the repr already
            raise LoadError(f"key {short(r.key)!r} contains control characters{code}; refusing to use it as a parameter name",
                            key=where, fix="rename the array (member or file name) to printable characters")
        if r.key in seen:
            dups.add(r.key)
        seen.add(r.key)
    if dups:
        shown = sorted(dups)
        raise LoadError(f"source keys are not unique after stripping key_prefix: {[short(k) for k in shown[:20]]}"
                        + (f" and {len(shown) - 20} more" if len(shown) > 20 else ""), key=where, fix="change source.key_prefix")


def as_int_shape(shape: Any, where: str) -> tuple[int, ...]:
    """A declared shape as a tuple of non-negative ints, each (and their product, zeros aside)
    fitting a signed 64-bit int as torch and the safetensors library require, or a LoadError."""
    if not isinstance(shape, (tuple, list)) or len(shape) > MAX_NDIM or any(type(d) is not int or d < 0 for d in shape):
        raise LoadError(f"header declares an invalid shape {short(repr(shape), 200)}", key=where, fix="re-export the file")
    n = 1
    for d in shape:
        n *= max(d, 1)
    if n >= 1 << 63:
        raise LoadError(f"header declares shape {short(repr(list(shape)), 200)}, whose dimensions do not fit a signed 64-bit integer",
                        key=where, expected="every dimension (and their product) below 2**63", actual=short(repr(list(shape)), 200),
                        fix="re-export the file; no real tensor has such a shape")
    return tuple(shape)


def natural_key(text: str) -> list[str | int]:
    """Sort key reading digit runs as numbers: ``dense < dense_1 < dense_2 < dense_10``, ``w2.npy < w10.npy``.

    Splitting on digit runs alternates text and digits, so two keys never compare a number with text.
    """
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", text))]


def no_dup_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook`` for untrusted headers: a name given twice is refused, not silently overwritten."""
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate name {short(k)!r}")
        d[k] = v
    return d
