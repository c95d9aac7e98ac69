"""Stage 1, ``load-arrays``: source spec → array table.

Reads headers, not data: every array becomes a small :class:`ArrayRecord` (key, file, byte
offset, shape, dtype with byte order, Fortran order, fingerprint). The bytes stay on disk and
are memory-mapped later by :func:`open_array`, so a 20 GB checkpoint costs no RAM here.

Supported sources (SPEC ``source.format``):

- ``npy``: one ``.npy`` file holding one array (key = file stem);
- ``flat``: one ``.npy`` holding a flat vector of all parameters (sliced by the mapping stage);
- ``npy-dir``: a folder of ``.npy`` files, nested folders allowed (``dense/kernel.npy`` → key
  ``dense/kernel``), in natural order (``layer_2`` before ``layer_10``);
- ``npz``: an ``np.savez``/``np.savez_compressed`` archive; stored members are memory-mapped in
  place (their data offset inside the zip), compressed ones are inflated on demand;
- ``pickle-list``: ``np.save`` of ``model.get_weights()`` (an object array of arrays) or a
  ``.pkl`` list/dict of arrays. Only with ``allow_pickle: true``, and then through a restricted
  unpickler that can rebuild arrays and nothing else.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks.dtypes import FLOAT_LIMITS
from np2torch.tasks.errors import LoadError, Problem
from np2torch.tasks.fingerprint import Region, blake3_bytes, cached_by_stat, file_digests, file_fingerprint, peek, remember, stat_key
from np2torch.tasks.safe_pickle import UnsafePickleError, safe_loads

__all__ = ["ArrayRecord", "scan_source", "open_array", "read_table", "write_table", "detect_format", "fingerprint_files"]

# Refuse to inflate a compressed member beyond this many bytes per compressed byte: a zip bomb
# declares a tiny compressed size and a huge file size. Real float weights compress ~1.1-3x.
MAX_COMPRESSION_RATIO = 200
MAX_MEMBER_BYTES = 1 << 40
_MAX_HEADER = 1 << 20
_PICKLE_SUFFIXES = (".pkl", ".pickle")
# dtypes a parameter or buffer can have; anything else cannot be a tensor of a model
_NUMERIC_KINDS = "fiub"
_OPT_IN = "set `source.allow_pickle: true` in the config (or pass --allow-pickle) if you trust this file"
# value statistics are folded over pieces of this many bytes: small enough to stay in L2 cache
# across the few passes each piece needs
_STATS_CHUNK = 1 << 20
_UINT_OF_SIZE = {2: np.uint16, 4: np.uint32, 8: np.uint64}
# Keys end up in tables, CSV files and terminals: a control character (ESC, newline) in one is
# hostile or broken, never a parameter name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ArrayRecord:
    """One source array, described without its bytes."""

    key: str  # source key, after key_prefix is stripped
    file: str  # absolute path of the file holding it
    member: str | None  # npz member name, when in an archive
    index: int | None  # position in a pickled list
    offset: int  # byte offset of the data in ``file``; -1 when it cannot be memory-mapped
    shape: tuple[int, ...]
    dtype: str  # numpy dtype string with byte order, e.g. '<f4', '>f8'
    fortran_order: bool
    nbytes: int
    fingerprint: str  # blake3 of dtype, shape and data bytes
    n_nonfinite: int = 0  # NaN/Inf count (validate refuses them unless allowed)
    absmax: float = 0.0  # largest |x| among finite values (dtype overflow check before casting)
    absmin_nonzero: float = 0.0  # smallest nonzero |x| (underflow check); 0 when all zero
    # per float dtype of FLOAT_LIMITS: [count that overflows, count of nonzeros that underflow to 0];
    # only dtypes with a nonzero count are listed
    n_out_of_range: dict[str, list[int]] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def byte_order(self) -> str:
        return {"<": "little", ">": "big", "|": "n/a"}[np.dtype(self.dtype).str[0]]


# ---------------------------------------------------------------------------------------------
# format detection


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "npy-dir"
    if path.suffix in _PICKLE_SUFFIXES:
        return "pickle-list"
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head[:4] == b"PK\x03\x04" or path.suffix == ".npz":
        return "npz"
    if head == b"\x93NUMPY":
        with open(path, "rb") as fh:
            shape, _, dtype, _ = _read_npy_header(fh, where=str(path))
        return "pickle-list" if dtype.hasobject else "npy"
    raise LoadError(
        "cannot tell the format of this file (not .npy, .npz, pickle or a folder)",
        key=str(path),
        fix="set `source.format` to one of npz | npy | npy-dir | pickle-list | flat",
    )


# ---------------------------------------------------------------------------------------------
# headers


def _read_npy_header(fh, *, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Parse an .npy header at the file position; return shape, fortran, dtype, header length."""
    start = fh.tell()
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
        raise LoadError(
            f"not a valid .npy header: {exc}",
            key=where,
            fix="the file is truncated or not written by np.save; re-export it",
        ) from None
    if any((not isinstance(d, int)) or d < 0 for d in shape):
        raise LoadError(f"header declares an invalid shape {shape}", key=where, fix="re-export the file")
    return tuple(int(d) for d in shape), bool(fortran), dtype, fh.tell() - start


def _check_dtype(dtype: np.dtype, where: str, problems: list[Problem]) -> None:
    if dtype.kind not in _NUMERIC_KINDS:
        kind = {"c": "complex", "U": "string", "S": "bytes", "M": "datetime", "m": "timedelta", "V": "void/struct", "O": "object"}.get(
            dtype.kind, dtype.kind
        )
        problems.append(
            Problem(
                where,
                f"has {kind} dtype {dtype.str}, which cannot be a model parameter",
                expected="a real numeric dtype (float, int, bool)",
                actual=dtype.str,
                fix="convert the array to a float dtype before saving, or ignore this key with mapping.ignore",
            )
        )


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


# ---------------------------------------------------------------------------------------------
# scanning each format


def _scan_npy_file(path: Path, key: str, *, allow_pickle: bool, problems: list[Problem]) -> list[ArrayRecord]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        shape, fortran, dtype, hlen = _read_npy_header(fh, where=str(path))
    if dtype.hasobject:
        return _scan_pickled(path, allow_pickle=allow_pickle, payload_offset=hlen, problems=problems)
    _check_dtype(dtype, key, problems)
    nbytes = _nbytes(shape, dtype)
    if hlen + nbytes > size:
        raise LoadError(
            f"file is truncated: the header declares shape {list(shape)} {dtype.str} "
            f"({nbytes} bytes) but only {size - hlen} bytes follow it",
            key=str(path),
            expected=nbytes,
            actual=size - hlen,
            fix="re-copy or re-export the file; it was cut short",
        )
    info = cached_by_stat(path, f"array-info2@{hlen}", lambda: _region_info(path, hlen, nbytes, dtype, shape))
    return [ArrayRecord(key, str(path), None, None, hlen, shape, dtype.str, fortran, nbytes, **info)]


def _stats(flat: np.ndarray, acc: dict[str, Any]) -> None:
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


def _stats_finite_float(flat: np.ndarray, acc: dict[str, Any]) -> bool:
    """The fast path for an all-finite float chunk (False, having done nothing, otherwise).

    Four passes over cache-resident data and no masks: max and min (NaN propagates into them,
    so finiteness falls out), then the bit patterns with the sign cleared, whose unsigned
    integer order is the order of |x|: minus one wraps zero to the top, so their minimum plus
    one is the smallest nonzero |x|.
    """
    a = flat if flat.dtype.isnative else flat.astype(flat.dtype.newbyteorder("="))
    hi, lo = a.max(), a.min()
    if not (np.isfinite(hi) and np.isfinite(lo)):
        return False
    utype = _UINT_OF_SIZE[a.dtype.itemsize]
    bits = np.bitwise_and(a.view(utype), utype(np.iinfo(utype).max >> 1))
    bits -= utype(1)
    with np.errstate(over="ignore"):
        smallest = bits.min() + utype(1)  # wraps back to 0 when every value is zero
    big = float(max(abs(hi), abs(lo)))
    m = float(np.array([smallest], dtype=utype).view(a.dtype)[0]) if smallest else 0.0
    if any(big > top or 0 < m <= tiny / 2 for top, tiny in FLOAT_LIMITS.values()):
        return False  # values a cast would lose: the slow path counts them per dtype
    acc["absmax"] = max(acc["absmax"], big)
    if smallest:
        acc["absmin_nonzero"] = m if acc["absmin_nonzero"] == 0 else min(acc["absmin_nonzero"], m)
    return True


class _StatsFeed:
    """Value statistics of an array whose bytes stream past in pieces of any size."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.acc: dict[str, Any] = {"n_nonfinite": 0, "absmax": 0.0, "absmin_nonzero": 0.0}
        self._rest = b""  # a value split between two pieces
        self._step = max(1, _STATS_CHUNK // dtype.itemsize)

    def __call__(self, piece: memoryview) -> None:
        size = self.dtype.itemsize
        if self._rest:
            need = size - len(self._rest)
            self._rest += bytes(piece[:need])
            piece = piece[need:]
            if len(self._rest) < size:
                return
            _stats(np.frombuffer(self._rest, dtype=self.dtype), self.acc)
            self._rest = b""
        n = len(piece) // size
        if n:
            arr = np.frombuffer(piece, dtype=self.dtype, count=n)
            for i in range(0, n, self._step):
                _stats(arr[i : i + self._step], self.acc)
        self._rest = bytes(piece[n * size :])


def _region_info(path: Path, offset: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> dict[str, Any]:
    """Fingerprint and value statistics of an array stored at ``offset``, in one read of the file.

    The same pass yields the file's sha256, which is remembered for the audit record's inputs.
    """
    version = stat_key(path)
    feed = _StatsFeed(dtype)
    sha, (data_fp,) = file_digests(path, [Region(offset, nbytes, on_chunk=feed)])
    remember(path, "sha256", sha, version=version)
    return _info(feed, dtype, shape, data_fp)


def _info(feed: _StatsFeed, dtype: np.dtype, shape: tuple[int, ...], data_fp: str) -> dict[str, Any]:
    return {**feed.acc, "fingerprint": blake3_bytes(f"{dtype.str}|{list(shape)}|".encode() + bytes.fromhex(data_fp))}


def _array_info(arr: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(arr)
    acc: dict[str, Any] = {"n_nonfinite": 0, "absmax": 0.0, "absmin_nonzero": 0.0}
    _stats(data.reshape(-1), acc)
    raw = data.view(np.uint8).reshape(-1).data if data.size else b""
    acc["fingerprint"] = blake3_bytes(f"{arr.dtype.str}|{list(arr.shape)}|".encode() + bytes.fromhex(blake3_bytes(raw)))
    return acc


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def _member_data_offset(fh, info: zipfile.ZipInfo, where: str) -> int:
    if info.header_offset < 0:  # a corrupt directory entry (zipfile does not check it)
        raise LoadError("archive member has a corrupt directory entry (negative offset)", key=where, fix="re-create the .npz")
    fh.seek(info.header_offset)
    raw = fh.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
        raise LoadError("archive member has a corrupt local header", key=where, fix="re-create the .npz")
    fields = _LOCAL_HEADER.unpack(raw)
    name = fh.read(fields[10])
    # as zipfile does when it opens a member: the local name must be the directory's name
    if name.decode("utf-8" if fields[3] & 0x800 else "cp437", errors="replace") != info.orig_filename:
        raise LoadError("archive member's local header names another file than its directory entry", key=where,
                        expected=info.orig_filename, actual=name.decode("utf-8", errors="replace"), fix="re-create the .npz")
    return info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]


def _scan_npz(path: Path, *, allow_pickle: bool, problems: list[Problem]) -> list[ArrayRecord]:
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:  # noqa: BLE001 - zipfile raises BadZipFile, NotImplementedError, ValueError… on garbage
        if isinstance(exc, PermissionError):
            raise
        raise LoadError(f"not a readable .npz (zip) archive: {exc}", key=str(path), fix="re-create it with np.savez") from None
    records: list[ArrayRecord] = []
    with zf, open(path, "rb") as fh:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        names = [i.filename for i in infos]
        odd = [n for n in names if _CONTROL.search(n)]
        if odd:  # checked first: every later message names the member, and must not carry an ESC to the terminal
            raise LoadError(f"member name {odd[0]!r} contains control characters; refusing to use it as a parameter name", key=str(path),
                            fix="re-create the archive with printable member names")
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise LoadError(
                f"archive holds duplicate member names {dups}: which one is meant is ambiguous",
                key=str(path),
                fix="re-create the archive with unique names",
            )
        size = path.stat().st_size
        _prime_npz(path, fh, infos, size)
        for info in infos:
            where = f"{path}::{info.filename}"
            if info.flag_bits & 0x61:  # bit 0 encrypted, 5 patched data, 6 strong encryption
                raise LoadError("archive member is encrypted or patched; only plain members can be read", key=where,
                                fix="re-create the archive with np.savez / np.savez_compressed")
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if info.compress_type == zipfile.ZIP_STORED:
                data_start = _member_data_offset(fh, info, where)
                if data_start + info.file_size > size:
                    raise LoadError("archive member is truncated", key=where, expected=info.file_size, actual=max(0, size - data_start), fix="re-copy the file")
                fh.seek(data_start)
                try:
                    shape, fortran, dtype, hlen = _read_npy_header(fh, where=where)
                except LoadError:
                    # a flipped bit in the header is corruption of the archive, not a foreign file
                    crc = _crc_region(path, data_start, info.file_size)
                    if crc != info.CRC:
                        raise LoadError("archive member fails its CRC check: the bytes are corrupt", key=where, expected=f"{info.CRC:08x}",
                                        actual=f"{crc:08x}", fix="re-copy or re-create the file") from None
                    raise
                offset = data_start + hlen
                if dtype.hasobject:
                    records += _scan_pickled(path, allow_pickle=allow_pickle, member=info.filename, problems=problems)
                    continue
            else:
                limit = max(info.compress_size, 1) * MAX_COMPRESSION_RATIO
                if info.file_size > min(limit, MAX_MEMBER_BYTES) and info.file_size > (64 << 20):
                    raise LoadError(
                        f"compressed member would expand to {info.file_size} bytes from {info.compress_size} "
                        f"(ratio > {MAX_COMPRESSION_RATIO}); refusing to inflate a likely zip bomb",
                        key=where,
                        fix="store weights uncompressed (np.savez) or check where this file came from",
                    )
                try:
                    with zf.open(info) as mf:
                        shape, fortran, dtype, hlen = _read_npy_header(mf, where=where)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
                    raise LoadError(f"archive member is corrupt or unsupported: {exc}", key=where, fix="re-create the .npz") from None
                offset = -1
                if dtype.hasobject:
                    records += _scan_pickled(path, allow_pickle=allow_pickle, member=info.filename, problems=problems)
                    continue
            _check_dtype(dtype, key, problems)
            nbytes = _nbytes(shape, dtype)
            if hlen + nbytes != info.file_size:
                raise LoadError(
                    f"archive member's header declares shape {list(shape)} {dtype.str} ({nbytes} bytes) "
                    f"but the member holds {info.file_size - hlen} data bytes",
                    key=where,
                    expected=nbytes,
                    actual=info.file_size - hlen,
                    fix="re-create the .npz; this member is truncated or its header was edited",
                )
            minfo = cached_by_stat(
                path,
                f"npz-member-info2:{info.filename}",
                functools.partial(_member_info, path, zf_path=path, info=info, offset=offset, nbytes=nbytes, dtype=dtype, shape=shape, where=where),
            )
            records.append(ArrayRecord(key, str(path), info.filename, None, offset, shape, dtype.str, fortran, nbytes, **minfo))
    return records


def _prime_npz(path: Path, fh, infos: list[zipfile.ZipInfo], size: int) -> None:
    """Hash and check every stored member in one read of the archive (with the file's sha256).

    Fills the stat cache that the per-member loop of :func:`_scan_npz` reads; a member that
    looks wrong in any way is left out, so that the loop reports it exactly as it would have.
    """
    todo = []
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or peek(path, f"npz-member-info2:{info.filename}") is not None:
            continue
        try:
            data_start = _member_data_offset(fh, info, str(path))
            fh.seek(data_start)
            shape, _, dtype, hlen = _read_npy_header(fh, where=str(path))
        except LoadError:
            continue
        nbytes = _nbytes(shape, dtype)
        if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS or hlen + nbytes != info.file_size or data_start + info.file_size > size:
            continue
        todo.append((info, data_start, data_start + hlen, nbytes, dtype, shape))
    if not todo:
        return
    version = stat_key(path)
    regions, feeds, crcs = [], [], []
    for info, data_start, offset, nbytes, dtype, _ in todo:
        crc = [0]
        crcs.append(crc)
        feeds.append(_StatsFeed(dtype))
        regions.append(Region(data_start, info.file_size, blake3=False, on_chunk=lambda piece, crc=crc: crc.__setitem__(0, zlib.crc32(piece, crc[0]))))
        regions.append(Region(offset, nbytes, on_chunk=feeds[-1]))
    sha, digests = file_digests(path, regions)
    remember(path, "sha256", sha, version=version)
    for i, (info, _, _, _, dtype, shape) in enumerate(todo):
        if crcs[i][0] & 0xFFFFFFFF == info.CRC:
            remember(path, f"npz-member-info2:{info.filename}", _info(feeds[i], dtype, shape, digests[2 * i + 1]), version=version)


def _member_info(path: Path, *, zf_path: Path, info: zipfile.ZipInfo, offset: int, nbytes: int, dtype: np.dtype, shape, where: str) -> dict[str, Any]:
    if offset >= 0:
        # stored member: check its CRC (a flipped bit must not pass silently), then hash in place
        crc = _crc_region(path, offset - (info.file_size - nbytes), info.file_size)
        if crc != info.CRC:
            raise LoadError("archive member fails its CRC check: the bytes are corrupt", key=where, expected=f"{info.CRC:08x}", actual=f"{crc:08x}", fix="re-copy or re-create the file")
        return _region_info(path, offset, nbytes, dtype, shape)
    with zipfile.ZipFile(zf_path) as zf:
        try:
            with zf.open(info) as mf:
                arr = np.lib.format.read_array(mf, allow_pickle=False)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
            raise LoadError(f"archive member is corrupt: {exc}", key=where, fix="re-create the .npz") from None
    return _array_info(arr)


def _crc_region(path: Path, offset: int, length: int) -> int:
    crc = 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length
        while left > 0:
            chunk = fh.read(min(left, 16 << 20))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return crc & 0xFFFFFFFF


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _scan_dir(path: Path, *, allow_pickle: bool, problems: list[Problem]) -> list[ArrayRecord]:
    files = [p for p in path.rglob("*.npy") if p.is_file()]
    if not files:
        raise LoadError("folder holds no .npy files", key=str(path), fix="point source.path at the folder of .npy files, or set source.format")
    files.sort(key=lambda p: _natural_key(p.relative_to(path).as_posix()))
    records: list[ArrayRecord] = []
    for f in files:
        key = f.relative_to(path).as_posix()[: -len(".npy")]
        records += _scan_npy_file(f, key, allow_pickle=allow_pickle, problems=problems)
    return records


# ---------------------------------------------------------------------------------------------
# pickles


def _pickle_payload(path: Path, member: str | None, payload_offset: int | None) -> bytes:
    if member is not None:
        with zipfile.ZipFile(path) as zf, zf.open(member) as mf:
            _read_npy_header(mf, where=f"{path}::{member}")
            return mf.read()
    with open(path, "rb") as fh:
        if payload_offset is not None:
            fh.seek(payload_offset)
        return fh.read()


def _flatten_pickled(obj: Any, where: str) -> list[tuple[str, np.ndarray]]:
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        obj = list(obj.ravel()) if obj.ndim else [obj.item()]
    if isinstance(obj, np.ndarray):
        return [(str(i), np.asarray(a)) for i, a in enumerate(obj)] if obj.ndim > 0 else [("0", obj)]
    if isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        raise LoadError(f"pickle holds a {type(obj).__name__}, not a list or dict of arrays", key=where, fix="save the weights as a list of arrays (np.save of model.get_weights())")
    out = []
    for k, v in items:
        if not isinstance(v, np.ndarray):
            try:
                v = np.asarray(v)
            except Exception:
                raise LoadError(f"item {k} is a {type(v).__name__}, not an array", key=where) from None
            if v.dtype.hasobject:
                raise LoadError(f"item {k} is a nested object, not a numeric array", key=where, fix="save a flat list of arrays")
        out.append((k, v))
    return out


@functools.lru_cache(maxsize=8)
def _load_pickled(path: str, member: str | None, payload_offset: int | None, mtime_ns: int) -> tuple[tuple[str, np.ndarray], ...]:
    where = f"{path}::{member}" if member else path
    data = _pickle_payload(Path(path), member, payload_offset)
    try:
        obj = safe_loads(data)
    except UnsafePickleError as exc:
        raise LoadError(
            f"refused to unpickle: {exc}. Nothing from the file was run",
            key=where,
            fix="this file is not a plain pickle of arrays; do not load it, or re-export the weights as .npz",
        ) from None
    except Exception as exc:
        raise LoadError(f"pickle is corrupt or truncated: {type(exc).__name__}: {exc}", key=where, fix="re-export the file") from None
    return tuple(_flatten_pickled(obj, where))


def _scan_pickled(path: Path, *, allow_pickle: bool, member: str | None = None, payload_offset: int | None = None, problems: list[Problem]) -> list[ArrayRecord]:
    where = f"{path}::{member}" if member else str(path)
    if not allow_pickle:
        raise LoadError(
            "holds pickled Python objects (an object array or a pickled list of arrays); "
            "pickles can run code, so they load only when you opt in",
            key=where,
            fix=_OPT_IN,
        )
    items = _load_pickled(str(path), member, payload_offset, path.stat().st_mtime_ns)
    records = []
    prefix = (member[:-4] + "/" if member.endswith(".npy") else member + "/") if member else ""
    for i, (k, arr) in enumerate(items):
        _check_dtype(arr.dtype, f"{where}[{k}]", problems)
        records.append(
            ArrayRecord(prefix + k, str(path), member, i, -1, tuple(arr.shape), arr.dtype.str, bool(arr.flags.f_contiguous and not arr.flags.c_contiguous), arr.nbytes, **_array_info(arr))
        )
    return records


# ---------------------------------------------------------------------------------------------
# public API


def scan_source(path: str | Path, *, fmt: str = "auto", allow_pickle: bool = False, key_prefix: str = "") -> list[ArrayRecord]:
    """Describe every array of a source (headers and fingerprints only), in source order."""
    path = Path(path)
    if not path.exists():
        raise LoadError("source path does not exist", key=str(path), fix="check source.path (relative paths are relative to the config file)")
    fmt = detect_format(path, fmt)
    problems: list[Problem] = []
    try:
        if fmt == "npy-dir":
            if not path.is_dir():
                raise LoadError("format npy-dir needs a folder", key=str(path), fix="point source.path at a folder or change source.format")
            records = _scan_dir(path, allow_pickle=allow_pickle, problems=problems)
        elif path.is_dir():
            raise LoadError(f"format {fmt} needs a file, got a folder", key=str(path), fix="set source.format: npy-dir")
        elif fmt == "npz":
            records = _scan_npz(path, allow_pickle=allow_pickle, problems=problems)
        elif fmt in ("npy", "flat"):
            records = _scan_npy_file(path, path.stem, allow_pickle=allow_pickle, problems=problems)
            if fmt == "flat" and (len(records) != 1 or len(records[0].shape) != 1):
                raise LoadError("format flat needs one 1-D vector", key=str(path), expected="1 array of shape (N,)", actual=[list(r.shape) for r in records], fix="set source.format: npy")
        elif fmt == "pickle-list":
            with open(path, "rb") as fh:
                is_npy = fh.read(6) == b"\x93NUMPY"
            if is_npy:
                with open(path, "rb") as fh:
                    _, _, dtype, hlen = _read_npy_header(fh, where=str(path))
                if not dtype.hasobject:
                    records = _scan_npy_file(path, path.stem, allow_pickle=allow_pickle, problems=problems)
                else:
                    records = _scan_pickled(path, allow_pickle=allow_pickle, payload_offset=hlen, problems=problems)
            else:
                records = _scan_pickled(path, allow_pickle=allow_pickle, problems=problems)
        else:  # pragma: no cover - the config model restricts fmt
            raise LoadError(f"unknown format {fmt}", key=str(path))
    except PermissionError as exc:
        raise LoadError(f"cannot read: {exc.strerror}", key=exc.filename or str(path), fix="check the file's permissions") from None
    if problems:
        raise LoadError(f"{len(problems)} array(s) cannot be model parameters", key=str(path), problems=problems, fix=problems[0]["fix"])
    bad = [r.key for r in records if _CONTROL.search(r.key)]
    if bad:
        raise LoadError(f"key {bad[0]!r} contains control characters; refusing to use it as a parameter name", key=str(path),
                        fix="rename the array (member or file name) to printable characters")
    if key_prefix:
        records = [r if not r.key.startswith(key_prefix) else _replace_key(r, r.key[len(key_prefix):]) for r in records]
    keys = [r.key for r in records]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise LoadError(f"source keys are not unique after stripping key_prefix: {dup}", key=str(path), fix="change source.key_prefix")
    return records


def _replace_key(r: ArrayRecord, key: str) -> ArrayRecord:
    d = asdict(r)
    d["key"] = key
    d["shape"] = tuple(d["shape"])
    return ArrayRecord(**d)


def open_array(rec: ArrayRecord) -> np.ndarray:
    """The array's values: a read-only memory map where the format allows, else read once.

    Pickled records were checked against ``allow_pickle`` by :func:`scan_source`; they are
    re-read through the same restricted unpickler.
    """
    dtype = np.dtype(rec.dtype)
    if rec.index is not None:
        items = _load_pickled(rec.file, rec.member, _payload_offset(rec), os.stat(rec.file).st_mtime_ns)
        return items[rec.index][1]
    if rec.offset >= 0:
        if rec.nbytes == 0:
            return np.empty(rec.shape, dtype=dtype)
        size = os.stat(rec.file).st_size
        if rec.offset + rec.nbytes > size:  # touching a mapping past the end of a file is SIGBUS, not an error
            raise LoadError("file is shorter than when it was scanned (it changed or was cut short)", key=f"{rec.file}::{rec.key}",
                            expected=rec.offset + rec.nbytes, actual=size, fix="rerun with --refresh")
        return np.memmap(rec.file, dtype=dtype, mode="r", offset=rec.offset, shape=rec.shape, order="F" if rec.fortran_order else "C")
    with zipfile.ZipFile(rec.file) as zf, zf.open(rec.member) as mf:
        return np.lib.format.read_array(mf, allow_pickle=False)


def _payload_offset(rec: ArrayRecord) -> int | None:
    if rec.member is not None:
        return None
    with open(rec.file, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            return None
        fh.seek(0)
        return _read_npy_header(fh, where=rec.file)[3]


def write_table(records: list[ArrayRecord], path: Path) -> None:
    from np2torch.tasks.paths import atomic_write_text

    atomic_write_text(path, json.dumps([asdict(r) for r in records], indent=1))


def read_table(path: str | Path) -> list[ArrayRecord]:
    out = []
    for d in json.loads(Path(path).read_text()):
        d["shape"] = tuple(d["shape"])
        out.append(ArrayRecord(**d))
    return out


def source_files(records: list[ArrayRecord]) -> list[str]:
    return sorted({r.file for r in records})


def fingerprint_files(paths: list[Path] | list[str]) -> list[dict[str, Any]]:
    """path, bytes, sha256 per source file, each file read once.

    For a ``.npy`` or ``.npz`` the same read also computes what :func:`scan_source` needs (array
    fingerprints, value statistics, CRCs) into the stat cache, so the scan reads nothing again.
    Anything unusual about a file is left for :func:`scan_source` to report.
    """
    for p in map(Path, paths):
        try:
            _prime_file(p)
        except (LoadError, OSError, ValueError, zipfile.BadZipFile):
            pass
    return [file_fingerprint(p) for p in paths]


def _prime_file(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(6)
        if head == b"\x93NUMPY":
            fh.seek(0)
            shape, _, dtype, hlen = _read_npy_header(fh, where=str(path))
            if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS or hlen + _nbytes(shape, dtype) > path.stat().st_size:
                return
            cached_by_stat(path, f"array-info2@{hlen}", lambda: _region_info(path, hlen, _nbytes(shape, dtype), dtype, shape))
        elif head[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(path) as zf:
                _prime_npz(path, fh, [i for i in zf.infolist() if not i.is_dir()], path.stat().st_size)


def input_fingerprints(records: list[ArrayRecord]) -> list[dict[str, Any]]:
    """path, bytes, sha256 per source file (the audit record's ``inputs``)."""
    return [file_fingerprint(f) for f in source_files(records)]
