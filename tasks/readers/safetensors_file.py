"""``.safetensors`` files (format ``safetensors``), parsed from their header alone.

The format is an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`` and the data. The
header is read with a size cap and checked entry by entry (known dtype, valid shape, offsets
inside the data and matching the shape, no overlaps); the tensors are then memory-mapped in
place like ``.npy`` data. As the safetensors library requires, the tensors tile the data
exactly (no overlap, no gap, nothing after them). Nothing is read beyond the header until the one hashing pass.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks.errors import LoadError, short
from np2torch.tasks.fingerprint import open_regular
from np2torch.tasks.readers.base import MAX_ARRAYS, ArrayRecord, ScanContext, as_int_shape, nbytes_of, no_dup_keys
from np2torch.tasks.readers.stats import Layout, scan_layouts

__all__ = ["scan", "sniff", "MAX_HEADER"]

MAX_HEADER = 100 << 20  # the safetensors library's own limit
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "|i1",
           "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "|u1", "BOOL": "|b1"}
_FIX = "re-save the tensors with safetensors (save_file) or re-copy the file"


def _header(path: Path) -> tuple[dict[str, Any], int, int]:
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(8)
        if len(raw) < 8:
            raise LoadError(f"not a safetensors file: {size} bytes, shorter than the 8-byte header length", key=str(path), fix=_FIX)
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise LoadError(f"safetensors header declares {n} bytes but the file holds {size - 8} after the length"
                            + (f" (and the limit is {MAX_HEADER})" if n > MAX_HEADER else ""), key=str(path),
                            expected=f"at most {min(MAX_HEADER, size - 8)}", actual=n, fix=_FIX)
        text = fh.read(n)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=no_dup_keys)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LoadError(f"safetensors header is not valid JSON: {short(str(exc))}", key=str(path), fix=_FIX) from None
    return header, 8 + n, size


def _layout(path: Path, name: str, entry: Any, data_start: int, data_len: int) -> tuple[Layout, int, int]:
    where = f"{path}::{name}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise LoadError("safetensors entry is not {dtype, shape, data_offsets}", key=where, actual=short(repr(entry)), fix=_FIX)
    if entry["dtype"] not in _DTYPES:
        raise LoadError(f"tensor has dtype {short(str(entry['dtype']))}, which np2torch cannot read", key=where,
                        expected=" | ".join(_DTYPES), actual=short(str(entry["dtype"])),
                        fix="save the tensor as float32/float16/float64 (bfloat16 and float8 are not supported yet)")
    shape = as_int_shape(entry["shape"], where)
    dtype = np.dtype(_DTYPES[entry["dtype"]])
    offs = entry["data_offsets"]
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1] <= data_len):
        raise LoadError(f"tensor's data_offsets {short(repr(offs))} fall outside the {data_len} data bytes", key=where,
                        expected=f"0 <= begin <= end <= {data_len}", actual=short(repr(offs)), fix=_FIX)
    want = nbytes_of(shape, dtype)
    if offs[1] - offs[0] != want:
        raise LoadError(f"tensor declares shape {list(shape)} {entry['dtype']} ({want} bytes) "
                        f"but its data_offsets span {offs[1] - offs[0]}",
                        key=where, expected=want, actual=offs[1] - offs[0], fix=_FIX)
    return Layout(name, shape, dtype, data_start + offs[0]), offs[0], offs[1]


def _layouts(path: Path) -> list[Layout]:
    header, data_start, size = _header(path)
    header.pop("__metadata__", None)
    if len(header) > MAX_ARRAYS:
        raise LoadError(f"safetensors header lists {len(header)} tensors, more than {MAX_ARRAYS}", key=str(path), fix=_FIX)
    out, spans = [], []
    for name, entry in header.items():
        lay, a, b = _layout(path, name, entry, data_start, size - data_start)
        out.append(lay)
        spans.append((a, b, name))
    spans.sort()
    end = 0  # as the safetensors library checks: the tensors tile the data exactly, no overlap, no gap
    for (_a0, b0, n0), (a1, _b1, n1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise LoadError(f"tensors {short(n0)!r} and {short(n1)!r} overlap in the file", key=str(path), fix=_FIX)
    for a, b, name in spans:
        if a != end:
            raise LoadError(f"tensor {short(name)!r} starts at data byte {a}, not where the previous one ends ({end})",
                            key=str(path), expected=end, actual=a, fix=_FIX)
        end = b
    if end != size - data_start:
        raise LoadError(f"the tensors end at data byte {end} but the file holds {size - data_start} data bytes",
                        key=str(path), expected=size - data_start, actual=end, fix=_FIX)
    return out


def scan(path: Path, ctx: ScanContext) -> list[ArrayRecord]:
    layouts = _layouts(path)
    if not layouts:
        raise LoadError("safetensors file holds no tensors", key=str(path), fix=_FIX)
    return scan_layouts(path, layouts, ctx)


def sniff(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length that fits the file, then the JSON header's ``{``."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"
