"""Value statistics and fingerprints of arrays, folded over their bytes as they stream past.

Per array: NaN/Inf count, largest finite |x|, smallest nonzero |x| and, per float dtype a cast
could go to, how many values would overflow or underflow (``FLOAT_LIMITS``). They are computed
in the same read that computes the file's sha256 (:func:`np2torch.tasks.fingerprint.file_digests`),
so each source byte is read once, and an array's fingerprint is derived from that sha256 and the
array's place in the file (:func:`fingerprint_of`), not from a second hash of its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks import fingerprint
from np2torch.tasks.dtypes import FLOAT_LIMITS
from np2torch.tasks.fingerprint import Region, cached_by_stat, remember, stat_key
from np2torch.tasks.readers.base import ArrayRecord, ScanContext, nbytes_of

__all__ = ["StatsFeed", "Layout", "layout_infos", "scan_layouts", "array_info", "fingerprint_of", "fold"]

# value statistics are folded over pieces of this many bytes: small enough to stay in L2 cache
# across the few passes each piece needs
_STATS_CHUNK = 1 << 20
_UINT_OF_SIZE = {2: np.uint16, 4: np.uint32, 8: np.uint64}
# the bit pattern of +Inf per float size: every pattern at or above it (sign cleared) is Inf or NaN
_INF_BITS = {n: int(np.array([np.inf], dtype=f"f{n}").view(u)[0]) for n, u in _UINT_OF_SIZE.items()}


def fold(flat: np.ndarray, acc: dict[str, Any]) -> None:
    """Fold one chunk's NaN/Inf count and finite |x| range into ``acc``."""
    if flat.size and flat.dtype.kind == "f" and flat.dtype.itemsize in _UINT_OF_SIZE and _stats_finite_float(flat, acc):
        return
    if flat.size == 0 or flat.dtype.kind not in "fc":
        if flat.size and flat.dtype.kind in "iu":
            a = np.abs(flat.astype(np.float64))
            acc["absmax"] = max(acc["absmax"], float(a.max()))
            nz = a[a > 0]
            if nz.size:
                acc["absmin_nonzero"] = float(nz.min()) if acc["absmin_nonzero"] == 0 else min(acc["absmin_nonzero"], float(nz.min()))
                _count_out_of_range(a, float(a.max()), float(nz.min()), acc)
        return
    finite = np.isfinite(flat)
    n_bad = int(flat.size - np.count_nonzero(finite))
    acc["n_nonfinite"] += n_bad
    a = np.abs(flat[finite] if n_bad else flat)
    if a.size:
        acc["absmax"] = max(acc["absmax"], float(a.max()))
        nz = a[a > 0]
        if nz.size:
            m = float(nz.min())
            acc["absmin_nonzero"] = m if acc["absmin_nonzero"] == 0 else min(acc["absmin_nonzero"], m)
            _count_out_of_range(a, float(a.max()), m, acc)


def _count_out_of_range(a: np.ndarray, hi: float, lo: float, acc: dict[str, Any]) -> None:
    """Add the chunk's overflow/underflow counts per FLOAT_LIMITS dtype (``a`` is finite |x|).

    Counted only when the chunk's range crosses a limit, so ordinary weights cost two compares.
    """
    for name, (big, tiny) in FLOAT_LIMITS.items():
        if hi <= big and lo > tiny / 2:
            continue
        over = int(np.count_nonzero(a > big)) if hi > big else 0
        under = int(np.count_nonzero((a > 0) & (a <= tiny / 2))) if lo <= tiny / 2 else 0
        if over or under:
            o, u = acc.setdefault("n_out_of_range", {}).get(name, [0, 0])
            acc["n_out_of_range"][name] = [o + over, u + under]


_LOCAL = threading.local()


def _scratch(utype: type, n: int) -> np.ndarray:
    """This thread's reusable scratch array of ``n`` unsigned integers (no allocation per piece)."""
    key = f"s{np.dtype(utype).itemsize}"
    buf = getattr(_LOCAL, key, None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, _STATS_CHUNK // np.dtype(utype).itemsize), dtype=utype)
        setattr(_LOCAL, key, buf)
    return buf[:n]


def _stats_finite_float(flat: np.ndarray, acc: dict[str, Any]) -> bool:
    """The fast path for an all-finite float chunk (False, having done nothing, otherwise).

    Four passes over cache-resident data into a reused scratch array, no masks: the bit
    patterns with the sign cleared, whose unsigned integer order is the order of |x| (NaN and
    Inf sort above every finite value, so their maximum is the largest |x| and tells
    finiteness), then minus one, which wraps zero to the top, so their minimum plus one is the
    smallest nonzero |x|.
    """
    a = flat if flat.dtype.isnative else flat.astype(flat.dtype.newbyteorder("="))
    utype = _UINT_OF_SIZE[a.dtype.itemsize]
    bits = _scratch(utype, a.size)
    np.bitwise_and(a.view(utype), utype(np.iinfo(utype).max >> 1), out=bits)
    top = bits.max()
    if top >= _INF_BITS[a.dtype.itemsize]:
        return False  # a NaN or Inf: the slow path counts them
    np.subtract(bits, utype(1), out=bits)
    with np.errstate(over="ignore"):
        smallest = bits.min() + utype(1)  # wraps back to 0 when every value is zero
    big = float(np.array([top], dtype=utype).view(a.dtype)[0])
    m = float(np.array([smallest], dtype=utype).view(a.dtype)[0]) if smallest else 0.0
    if any(big > top_ or 0 < m <= tiny / 2 for top_, tiny in FLOAT_LIMITS.values()):
        return False  # values a cast would lose: the slow path counts them per dtype
    acc["absmax"] = max(acc["absmax"], big)
    if smallest:
        acc["absmin_nonzero"] = m if acc["absmin_nonzero"] == 0 else min(acc["absmin_nonzero"], m)
    return True


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_PARALLEL_MIN = 4 << 20  # pieces at least this large are folded on several cores


def _pool() -> ThreadPoolExecutor | None:
    """Threads for value statistics (NumPy's reductions release the GIL); None on one or two cores."""
    global _POOL
    cores = os.cpu_count() or 1
    if cores < 3:
        return None
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=min(cores - 1, 16), thread_name_prefix="np2torch-stats")
        return _POOL


def _fold_new(arr: np.ndarray) -> dict[str, Any]:
    acc: dict[str, Any] = {"n_nonfinite": 0, "absmax": 0.0, "absmin_nonzero": 0.0}
    fold(arr, acc)
    return acc


def _merge(acc: dict[str, Any], part: dict[str, Any]) -> None:
    acc["n_nonfinite"] += part["n_nonfinite"]
    acc["absmax"] = max(acc["absmax"], part["absmax"])
    m = part["absmin_nonzero"]
    if m:
        acc["absmin_nonzero"] = m if acc["absmin_nonzero"] == 0 else min(acc["absmin_nonzero"], m)
    for name, (o, u) in part.get("n_out_of_range", {}).items():
        a, b = acc.setdefault("n_out_of_range", {}).get(name, [0, 0])
        acc["n_out_of_range"][name] = [a + o, b + u]


class StatsFeed:
    """Value statistics of an array whose bytes stream past in pieces of any size.

    A large piece is folded in cache-sized steps on the stats threads: the call returns their
    futures (the caller keeps the piece's buffer until they finish) and :attr:`acc` merges
    their partial results when read.
    """

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self._acc: dict[str, Any] = {"n_nonfinite": 0, "absmax": 0.0, "absmin_nonzero": 0.0}
        self._rest = b""  # a value split between two pieces
        self._step = max(1, _STATS_CHUNK // dtype.itemsize)
        self._parts: list[Future] = []

    @property
    def acc(self) -> dict[str, Any]:
        for f in self._parts:
            _merge(self._acc, f.result())
        self._parts = []
        return self._acc

    def __call__(self, piece: memoryview) -> list[Future]:
        size = self.dtype.itemsize
        if self._rest:
            need = size - len(self._rest)
            self._rest += bytes(piece[:need])
            piece = piece[need:]
            if len(self._rest) < size:
                return []
            fold(np.frombuffer(self._rest, dtype=self.dtype), self._acc)
            self._rest = b""
        n = len(piece) // size
        futures: list[Future] = []
        if n:
            arr = np.frombuffer(piece, dtype=self.dtype, count=n)
            pool = _pool() if n * size >= _PARALLEL_MIN else None
            for i in range(0, n, self._step):
                if pool is None:
                    fold(arr[i : i + self._step], self._acc)
                else:
                    futures.append(pool.submit(_fold_new, arr[i : i + self._step]))
        self._rest = bytes(piece[n * size :])
        self._parts += futures
        return futures


@dataclass(frozen=True)
class Layout:
    """Where an array's bytes lie in its file, as the reader found them in the file's headers."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    member: str | None = None  # the archive member or dataset holding it, when it has a name
    fortran: bool = False

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)


def fingerprint_of(place: list[Any]) -> str:
    """An array's fingerprint from what identifies its bytes, without reading them again:
    ``["file", file sha256, member, offset, length, dtype with byte order, shape, fortran]`` for
    bytes stored as they are, ``["data", sha256 of the decoded bytes, dtype, shape, fortran]``
    for bytes that were inflated or unpickled."""
    return hashlib.sha256(json.dumps(place).encode()).hexdigest()


def layout_infos(path: Path, layouts: list[Layout], progress=None, *, data: bytes | None = None,
                 version: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Fingerprint and value statistics of arrays stored as byte ranges of one file, from ONE
    read of it that also yields the file's sha256 (remembered for the audit record's inputs).

    ``data``: the whole file as the caller read it, when ``version`` (its stat before that read)
    is still the file's: hashed without reading again.
    """
    now = stat_key(path)
    if data is not None and version != now:
        data = None  # it changed since the caller read it: read it afresh
    version = version if data is not None else now
    feeds = [StatsFeed(lay.dtype) for lay in layouts]
    regions = [Region(lay.offset, lay.nbytes, digest=False, on_chunk=f) for lay, f in zip(layouts, feeds)]
    sha, _ = fingerprint.file_digests(path, regions, progress=progress, data=data)
    remember(path, "sha256", sha, version=version)
    return [{**f.acc, "fingerprint": fingerprint_of(["file", sha, lay.member, lay.offset, lay.nbytes, lay.dtype.str, list(lay.shape),
                                                      lay.fortran])} for lay, f in zip(layouts, feeds)]


def scan_layouts(path: Path, layouts: list[Layout], ctx: ScanContext) -> list[ArrayRecord]:
    """The records of arrays stored as byte ranges of one file (memory-mapped later), their
    fingerprints and statistics from one read, remembered by the file's stat for the next run."""
    what = "layouts1-" + hashlib.sha256(json.dumps([[lay.key, lay.offset, lay.dtype.str, lay.shape, lay.member, lay.fortran]
                                                    for lay in layouts]).encode()).hexdigest()[:16]
    infos = cached_by_stat(path, what, lambda: layout_infos(path, layouts, ctx.progress))
    return [ArrayRecord(lay.key, str(path), lay.member, None, lay.offset, lay.shape, lay.dtype.str, lay.fortran, lay.nbytes, **info)
            for lay, info in zip(layouts, infos)]


def array_info(arr: np.ndarray) -> dict[str, Any]:
    """Fingerprint and statistics of an array already in memory (pickles, inflated datasets)."""
    data = np.ascontiguousarray(arr)
    acc: dict[str, Any] = {"n_nonfinite": 0, "absmax": 0.0, "absmin_nonzero": 0.0}
    fold(data.reshape(-1), acc)
    sha = hashlib.sha256(data.view(np.uint8).reshape(-1).data if data.size else b"").hexdigest()
    acc["fingerprint"] = fingerprint_of(["data", sha, arr.dtype.str, list(arr.shape), False])
    return acc
