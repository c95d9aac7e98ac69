"""``.npz`` archives (``np.savez`` / ``np.savez_compressed``).

Stored members are memory-mapped in place (their data offset inside the zip); deflated members
(``np.savez_compressed``) are inflated as their bytes stream past, after a ratio check against
zip bombs. ONE read of the archive computes its sha256, checks every member's CRC, and folds
every array's values into its statistics (and an inflated array's bytes into their sha256, its
fingerprint). The member count is read from the end-of-archive record and capped before the
directory is parsed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks import fingerprint
from np2torch.tasks.errors import LoadError, short
from np2torch.tasks.fingerprint import Region, cached_by_stat, open_regular, remember, stat_key
from np2torch.tasks.readers.base import MAX_ARRAYS, NUMERIC_KINDS, ArrayRecord, ScanContext, bad_key_char, check_dtype
from np2torch.tasks.readers.npy_header import NpyHeader, check_fits, read_header
from np2torch.tasks.readers.pickled import scan_pickled
from np2torch.tasks.readers.stats import StatsFeed, array_info, fingerprint_of

__all__ = ["scan", "sniff", "open_member", "MAX_COMPRESSION_RATIO", "MAX_MEMBERS"]

# Refuse to inflate a compressed member beyond this many bytes per compressed byte: a zip bomb
# declares a tiny compressed size and a huge file size. Real float weights compress ~1.1-3x.
MAX_COMPRESSION_RATIO = 200
MAX_MEMBER_BYTES = 1 << 40
MAX_MEMBERS = MAX_ARRAYS
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_INFO = "npz-members4"  # stat-cache entry: {member: fingerprint and statistics} for the whole archive


def _open_zip(fh, path: Path, what: str = ".npz", fix: str = "re-create it with np.savez") -> zipfile.ZipFile:
    try:
        end = zipfile._EndRecData(fh)  # the end record only: refuse a huge directory before parsing it
    except (OSError, struct.error, ValueError):
        end = None
    if end and end[zipfile._ECD_ENTRIES_TOTAL] > MAX_MEMBERS:
        raise LoadError(f"archive declares {end[zipfile._ECD_ENTRIES_TOTAL]} members, more than the {MAX_MEMBERS} "
                        "a checkpoint can have; refusing to read its directory", key=str(path),
                        expected=f"at most {MAX_MEMBERS} members", actual=end[zipfile._ECD_ENTRIES_TOTAL],
                        fix="this is not a weights archive; check where it came from")
    try:
        return zipfile.ZipFile(fh)
    except Exception as exc:  # noqa: BLE001 - zipfile raises BadZipFile, NotImplementedError, ValueError… on garbage
        if isinstance(exc, PermissionError):
            raise
        raise LoadError(f"not a readable {what} (zip) archive: {short(str(exc))}", key=str(path), fix=fix) from None


def _check_names(infos: list[zipfile.ZipInfo], path: Path) -> None:
    seen: set[str] = set()
    dups: set[str] = set()
    for i in infos:
        # checked first: every later message names the member, and must not carry an ESC to the terminal
        if bad_key_char(i.filename) is not None:
            raise LoadError(f"member name {short(i.filename)!r} contains control characters; refusing to use it as a parameter name",
                            key=str(path), fix="re-create the archive with printable member names")
        if i.filename in seen:
            dups.add(i.filename)
        seen.add(i.filename)
    if dups:
        raise LoadError(f"archive holds duplicate member names {[short(d) for d in sorted(dups)[:20]]}: which one is meant is ambiguous",
                        key=str(path), fix="re-create the archive with unique names")


def _data_offset(fh, info: zipfile.ZipInfo, where: str) -> int:
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
                        expected=short(info.orig_filename), actual=short(name.decode("utf-8", errors="replace")), fix="re-create the .npz")
    return info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]


def _crc_error(where: str, want: int, got: int) -> LoadError:
    return LoadError("archive member fails its CRC check: the bytes are corrupt", key=where, expected=f"{want:08x}", actual=f"{got:08x}",
                     fix="re-copy or re-create the file")


def _crc_of(fh, offset: int, length: int) -> int:
    fh.seek(offset)
    crc = 0
    while length > 0:
        chunk = fh.read(min(length, 16 << 20))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        length -= len(chunk)
    return crc & 0xFFFFFFFF


def _stored_header(fh, info: zipfile.ZipInfo, where: str, size: int) -> tuple[int, NpyHeader]:
    data_start = _data_offset(fh, info, where)
    if data_start + info.file_size > size:
        raise LoadError("archive member is truncated", key=where, expected=info.file_size, actual=max(0, size - data_start),
                        fix="re-copy the file")
    fh.seek(data_start)
    try:
        return data_start, read_header(fh, where=where)
    except LoadError:
        # a flipped bit in the header is corruption of the archive, not a foreign file
        crc = _crc_of(fh, data_start, info.file_size)
        if crc != info.CRC:
            raise _crc_error(where, info.CRC, crc) from None
        raise


def _compressed_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> NpyHeader:
    limit = max(info.compress_size, 1) * MAX_COMPRESSION_RATIO
    if info.file_size > min(limit, MAX_MEMBER_BYTES) and info.file_size > (64 << 20):
        raise LoadError(f"compressed member would expand to {info.file_size} bytes from {info.compress_size} "
                        f"(ratio > {MAX_COMPRESSION_RATIO}); refusing to inflate a likely zip bomb", key=where,
                        fix="store weights uncompressed (np.savez) or check where this file came from")
    try:
        with zf.open(info) as mf:
            return read_header(mf, where=where)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        raise LoadError(f"archive member is corrupt or unsupported: {short(str(exc))}", key=where, fix="re-create the .npz") from None


def _plan(path: Path, fh, zf: zipfile.ZipFile, size: int) -> list[tuple[zipfile.ZipInfo, int, NpyHeader]]:
    """(member, data offset or -1 when compressed, header) for every member, in archive order, all checked."""
    infos = [i for i in zf.infolist() if not i.is_dir()]
    _check_names(infos, path)
    plan = []
    for info in infos:
        where = f"{path}::{info.filename}"
        if info.flag_bits & 0x61:  # bit 0 encrypted, 5 patched data, 6 strong encryption
            raise LoadError("archive member is encrypted or patched; only plain members can be read", key=where,
                            fix="re-create the archive with np.savez / np.savez_compressed")
        if info.compress_type == zipfile.ZIP_STORED:
            data_start, h = _stored_header(fh, info, where, size)
            offset = data_start + h.hlen
        else:
            h, offset = _compressed_header(zf, info, where), -1
        if not h.dtype.hasobject:
            check_fits(h, info.file_size, where, member=True)
        plan.append((info, offset, h))
    return plan


class _Inflate:
    """A deflated member, inflated as its compressed bytes stream past in the archive's one read:
    its CRC over everything inflated, its sha256 and value statistics over the array data that
    follows the ``.npy`` header; never more than the size its directory entry declares."""

    _STEP = 1 << 20  # inflated bytes per step: memory stays bounded whatever the ratio

    def __init__(self, info: zipfile.ZipInfo, h: NpyHeader) -> None:
        self.z, self.info, self.h = zlib.decompressobj(-15), info, h
        self.skip, self.left, self.crc = h.hlen, info.file_size, 0
        self.sha, self.feed, self.error = hashlib.sha256(), StatsFeed(h.dtype), ""

    def __call__(self, piece: memoryview) -> list:
        futures: list = []
        try:
            data = self.z.decompress(piece, self._STEP)
            while not self.error:
                futures += self._take(data)
                if not self.z.unconsumed_tail:
                    break
                data = self.z.decompress(self.z.unconsumed_tail, self._STEP)
        except zlib.error as exc:
            self.error = self.error or str(exc)
        return futures

    def _take(self, out: bytes) -> list:
        if len(out) > self.left:
            self.error = f"it inflates to more than the {self.info.file_size} bytes its directory entry declares"
            return []
        self.left -= len(out)
        self.crc = zlib.crc32(out, self.crc)
        cut = min(self.skip, len(out))
        self.skip -= cut
        if cut == len(out):
            return []
        self.sha.update(memoryview(out)[cut:])
        return self.feed(memoryview(out)[cut:])

    def info_of(self, where: str) -> dict[str, Any]:
        if not self.error:
            self._take(self.z.flush())
        if self.error or not self.z.eof or self.left:
            raise LoadError(f"archive member is corrupt: {self.error or 'its deflate stream ends early'}", key=where,
                            fix="re-create the .npz")
        if self.crc & 0xFFFFFFFF != self.info.CRC:
            raise _crc_error(where, self.info.CRC, self.crc & 0xFFFFFFFF)
        h = self.h
        return {**self.feed.acc, "fingerprint": fingerprint_of(["data", self.sha.hexdigest(), h.dtype.str, list(h.shape), h.fortran])}


def _member_infos(path: Path, fh, zf: zipfile.ZipFile, plan, progress=None) -> dict[str, Any]:
    """Fingerprint and statistics of every numeric member, in one read of the archive."""
    version = stat_key(path)
    size = os.fstat(fh.fileno()).st_size
    todo = [(info, off, h) for info, off, h in plan if not h.dtype.hasobject and h.dtype.kind in NUMERIC_KINDS]
    regions: list[Region] = []
    feeds: dict[str, Any] = {}  # member → its StatsFeed (stored) or _Inflate (deflated)
    crcs: dict[str, list[int]] = {}  # stored member → [its CRC so far]
    later = []  # compressed by something other than deflate: read through zipfile afterwards
    for info, off, h in todo:
        where = f"{path}::{info.filename}"
        if off >= 0:
            crc = crcs[info.filename] = [0]
            feeds[info.filename] = StatsFeed(h.dtype)
            regions.append(Region(off - h.hlen, info.file_size, digest=False,
                                  on_chunk=lambda piece, crc=crc: crc.__setitem__(0, zlib.crc32(piece, crc[0]))))
            regions.append(Region(off, h.nbytes, digest=False, on_chunk=feeds[info.filename]))
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            start = _data_offset(fh, info, where)
            if start + info.compress_size > size:
                raise LoadError("archive member is truncated", key=where, expected=info.compress_size, actual=max(0, size - start),
                                fix="re-copy the file")
            feeds[info.filename] = _Inflate(info, h)
            regions.append(Region(start, info.compress_size, digest=False, on_chunk=feeds[info.filename]))
        else:
            later.append((info, where))
    sha, _ = fingerprint.file_digests(path, regions, progress=progress)
    out: dict[str, Any] = {}
    for info, off, h in todo:
        where = f"{path}::{info.filename}"
        feed = feeds.get(info.filename)
        if isinstance(feed, _Inflate):
            out[info.filename] = feed.info_of(where)
        elif feed is not None:
            got = crcs[info.filename][0] & 0xFFFFFFFF
            if got != info.CRC:
                raise _crc_error(where, info.CRC, got)
            out[info.filename] = {**feed.acc, "fingerprint": fingerprint_of(["file", sha, info.filename, off, h.nbytes, h.dtype.str,
                                                                             list(h.shape), h.fortran])}
    for info, where in later:
        out[info.filename] = array_info(_read_compressed(zf, info, where))
    remember(path, "sha256", sha, version=version)
    return out


def _read_compressed(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    try:
        with zf.open(info) as mf:
            return np.lib.format.read_array(mf, allow_pickle=False)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise LoadError(f"archive member is corrupt: {short(str(exc))}", key=where, fix="re-create the .npz") from None


def scan(path: Path, ctx: ScanContext) -> list[ArrayRecord]:
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        with _open_zip(fh, path) as zf:
            plan = _plan(path, fh, zf, size)
            for info, _, h in plan:
                if not h.dtype.hasobject:
                    check_dtype(h.dtype, info.filename[:-4] if info.filename.endswith(".npy") else info.filename, ctx.problems)
            infos = cached_by_stat(path, _INFO, lambda: _member_infos(path, fh, zf, plan, ctx.progress))
    records: list[ArrayRecord] = []
    for info, offset, h in plan:
        if h.dtype.hasobject:
            records += scan_pickled(path, allow_pickle=ctx.allow_pickle, member=info.filename, problems=ctx.problems)
            continue
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if info.filename in infos:
            records.append(ArrayRecord(key, str(path), info.filename, None, offset, h.shape, h.dtype.str, h.fortran, h.nbytes,
                                       **infos[info.filename]))
    return records


def sniff(head: bytes, size: int) -> bool:
    return head[:4] == b"PK\x03\x04"


@functools.lru_cache(maxsize=4)
def _zip(path: str, version: tuple) -> zipfile.ZipFile:
    return zipfile.ZipFile(open_regular(path))


def open_member(rec: ArrayRecord) -> np.ndarray:
    """A compressed member's array, through an archive whose directory is parsed once, not per member."""
    st = os.stat(rec.file)
    zf = _zip(rec.file, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    with zf.open(rec.member) as mf:
        return np.lib.format.read_array(mf, allow_pickle=False)
