"""Flax checkpoints (format ``msgpack``): ``flax.serialization.to_bytes`` of a params tree.

The file is walked by a small MessagePack parser written for this purpose: nothing in it is
ever executed or turned into an object by a library hook. Maps become key paths joined by
``/`` (``params/Dense_0/kernel``); an array leaf is Flax's extension type 1 (or 3, a NumPy
scalar) whose payload is ``[shape, dtype name, raw C-order bytes]``. Only the position of
those bytes is recorded, so arrays are memory-mapped like ``.npy`` data and the walk touches
nothing but the structure. Every length is checked against the bytes really left, nesting is
capped, and dtype names come from a fixed list.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks.errors import LoadError, short
from np2torch.tasks.fingerprint import open_regular
from np2torch.tasks.readers.base import MAX_ARRAYS, MAX_NDIM, ArrayRecord, ScanContext, nbytes_of
from np2torch.tasks.readers.stats import Layout, scan_layouts

__all__ = ["scan", "sniff"]

_MAX_DEPTH = 64
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
# Flax writes ``arr.dtype.name``; little-endian on every platform JAX runs on
_DTYPES = {n: np.dtype(n).newbyteorder("<") for n in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                                       "uint8", "uint16", "uint32", "uint64", "bool")}
_FIX = "re-save the parameters with flax.serialization.to_bytes(params)"


class _Bad(Exception):
    pass


class _Reader:
    """A cursor over the mapped bytes; every read is checked against the end."""

    def __init__(self, buf, where: str) -> None:
        self.buf, self.pos, self.end, self.where = buf, 0, len(buf), where
        self.arrays: list[tuple[str, tuple[int, ...], np.dtype, int, int]] = []

    def take(self, n: int) -> int:
        if n < 0 or n > self.end - self.pos:
            raise _Bad(f"a length of {n} bytes at byte {self.pos} runs past the end of the file ({self.end} bytes)")
        p = self.pos
        self.pos += n
        return p

    def unpack(self, fmt: str) -> Any:
        s = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self.buf, self.take(s))[0]

    def head(self) -> tuple[str, int]:
        """The next item's kind and size (count, length or value)."""
        b = self.buf[self.take(1)]
        if b <= 0x7F:
            return "int", b
        if b >= 0xE0:
            return "int", b - 0x100
        if 0x80 <= b <= 0x8F:
            return "map", b & 0x0F
        if 0x90 <= b <= 0x9F:
            return "array", b & 0x0F
        if 0xA0 <= b <= 0xBF:
            return "str", b & 0x1F
        kinds = {0xC0: ("nil", 0), 0xC2: ("bool", 0), 0xC3: ("bool", 1)}
        if b in kinds:
            return kinds[b]
        sized = {0xC4: ("bin", ">B"), 0xC5: ("bin", ">H"), 0xC6: ("bin", ">I"), 0xD9: ("str", ">B"), 0xDA: ("str", ">H"),
                 0xDB: ("str", ">I"), 0xDC: ("array", ">H"), 0xDD: ("array", ">I"), 0xDE: ("map", ">H"), 0xDF: ("map", ">I"),
                 0xC7: ("ext", ">B"), 0xC8: ("ext", ">H"), 0xC9: ("ext", ">I")}
        if b in sized:
            kind, fmt = sized[b]
            return kind, self.unpack(fmt)
        scalars = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
        if b in scalars:
            return ("float" if b in (0xCA, 0xCB) else "int"), self.unpack(scalars[b])
        if 0xD4 <= b <= 0xD8:
            return "ext", 1 << (b - 0xD4)
        raise _Bad(f"byte {b:#04x} at {self.pos - 1} is not MessagePack")

    def text(self, n: int) -> str:
        p = self.take(n)
        try:
            return bytes(self.buf[p : p + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"a string at byte {p} is not UTF-8") from None

    def skip(self, kind: str, n: int, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _Bad(f"nesting deeper than {_MAX_DEPTH}")
        if kind in ("str", "bin"):
            self.take(n)
        elif kind == "ext":
            self.take(1)
            self.take(n)
        elif kind in ("array", "map"):
            for _ in range(n * (2 if kind == "map" else 1)):
                self.skip(*self.head(), depth + 1)

    def tree(self, path: str, kind: str, n: int, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _Bad(f"nesting deeper than {_MAX_DEPTH}")
        if kind in ("map", "array"):
            for i in range(n):
                if kind == "map":
                    k_kind, k_n = self.head()
                    if k_kind == "str":
                        name = self.text(k_n)
                    elif k_kind == "int":
                        name = str(k_n)
                    else:
                        raise _Bad(f"a map key at byte {self.pos} is a {k_kind}, not a name")
                else:
                    name = str(i)
                if name == "__msgpack_chunked_array__":
                    raise _Bad(f"{short(path)!r} is a chunked array (over 1 GiB), which is not supported")
                self.tree(f"{path}/{name}" if path else name, *self.head(), depth + 1)
        elif kind == "ext":
            code = self.unpack(">b")
            if code in (_EXT_NDARRAY, _EXT_SCALAR):
                self.ndarray(path, n)
            elif code == _EXT_COMPLEX:
                self.take(n)  # a Python complex: not a parameter
            else:
                raise _Bad(f"unknown extension type {code} at {short(path)!r}")
        else:
            self.skip(kind, n, depth)  # a plain number, string or flag: not an array

    def ndarray(self, path: str, n: int) -> None:
        end = self.pos + n
        kind, count = self.head()
        if kind != "array" or count != 3:
            raise _Bad(f"array {short(path)!r} is not [shape, dtype, bytes]")
        kind, ndim = self.head()
        if kind != "array" or ndim > MAX_NDIM:
            raise _Bad(f"array {short(path)!r} has an invalid shape")
        shape = []
        for _ in range(ndim):
            kind, d = self.head()
            if kind != "int" or d < 0:
                raise _Bad(f"array {short(path)!r} has an invalid shape")
            shape.append(d)
        kind, ln = self.head()
        name = self.text(ln) if kind == "str" else None
        if name not in _DTYPES:
            raise _Bad(f"array {short(path)!r} has dtype {short(str(name))!r}; supported: {', '.join(_DTYPES)}")
        kind, ln = self.head()
        if kind != "bin":
            raise _Bad(f"array {short(path)!r} has no raw data")
        offset = self.take(ln)
        dtype = _DTYPES[name]
        want = nbytes_of(tuple(shape), dtype)
        if ln != want or self.pos != end:
            raise _Bad(f"array {short(path)!r} declares shape {shape} {name} ({want} bytes) but holds {ln} data bytes")
        if len(self.arrays) >= MAX_ARRAYS:
            raise _Bad(f"more than {MAX_ARRAYS} arrays")
        self.arrays.append((path, tuple(shape), dtype, offset, ln))


def sniff(head: bytes, size: int) -> bool:
    """A Flax checkpoint starts with a map (fixmap, map16 or map32)."""
    return bool(head) and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


def _walk(path: Path) -> list[tuple[str, tuple[int, ...], np.dtype, int, int]]:
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise LoadError("not a Flax msgpack checkpoint: the file is empty", key=str(path), fix=_FIX)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            r = _Reader(mm, str(path))
            try:
                kind, n = r.head()
                if kind != "map":
                    raise _Bad(f"it starts with a {kind}, not a map of parameters")
                r.tree("", kind, n, 0)
                if r.pos != size:
                    raise _Bad(f"{size - r.pos} bytes follow the end of the tree")
            except _Bad as exc:
                raise LoadError(f"not a valid Flax msgpack checkpoint: {exc}", key=str(path), fix=_FIX) from None
            return r.arrays


def scan(path: Path, ctx: ScanContext) -> list[ArrayRecord]:
    arrays = _walk(path)
    if not arrays:
        raise LoadError("Flax msgpack checkpoint holds no arrays", key=str(path), fix=_FIX)
    layouts = [Layout(k, shape, dtype, off) for k, shape, dtype, off, _ in arrays]
    return scan_layouts(path, layouts, ctx)
