"""Streaming safetensors I/O: write tensors one at a time into a file whose header is computed
up front, and read tensors back as zero-copy views of a memory map.

``safetensors.torch.save_file`` needs the whole state dict in memory; a 20 GB model would need
20 GB of RAM. Here the header (names, dtypes, shapes, offsets) is known from the manifest, so
each tensor is converted into a buffer the size of that one tensor and written at its offset.
The format is the standard one: the files load with ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["ST_DTYPES", "TORCH_DTYPES", "plan_header", "read_header", "MappedSafetensors", "np_dtype_for"]

# torch dtype name → safetensors dtype code
ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32",
             "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
TORCH_DTYPES = {v: getattr(torch, k) for k, v in ST_DTYPES.items()}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def np_dtype_for(torch_name: str) -> np.dtype | None:
    """The little-endian NumPy dtype of a torch dtype name; None for bfloat16 (NumPy has none)."""
    if torch_name == "bfloat16":
        return None
    return np.dtype(torch_name).newbyteorder("<") if torch_name != "bool" else np.dtype(bool)


def plan_header(tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included) and each tensor's absolute (start, end) in the file."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in tensors:
        code = ST_DTYPES[dtype]
        n = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name] = (pos, pos + n)
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned for zero-copy views
    prefix = struct.pack("<Q", len(raw)) + raw
    base = len(prefix)
    return prefix, {k: (base + a, base + b) for k, (a, b) in offsets.items()}


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The parsed header and the absolute offset where data begins."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError("file too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ValueError(f"safetensors header length {n} is implausible")
        header = json.loads(fh.read(n))
    return header, 8 + n


class MappedSafetensors:
    """A safetensors file as zero-copy CPU tensors over one read-only memory map.

    Pages a tensor touched count in this process's RSS until the map goes away; ``release``
    drops them (``MADV_DONTNEED``: the pages stay in the page cache and fault back in, same
    bytes, if read again), so a pass over a model larger than RAM needs one layer resident.
    """

    def __init__(self, path: str | Path, *, keys: Iterable[str] | None = None) -> None:
        header, base = read_header(path)
        with open(path, "rb") as fh:
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.ranges: dict[str, tuple[int, int]] = {}
        self.state = self._tensors(header, base, set(keys) if keys is not None else None)

    def release(self, keys: Iterable[str]) -> None:
        """Drop these tensors' pages from the process (their values stay readable)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        for k in keys:
            a, b = self.ranges.get(k, (0, 0))
            start = a - a % page  # a page shared with a neighbour is dropped too: it refaults if needed
            if b > start:
                self._mm.madvise(mmap.MADV_DONTNEED, start, b - start)

    def __enter__(self) -> "MappedSafetensors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.state = {}  # the map closes when the last tensor over it is gone

    def _tensors(self, header: dict[str, Any], base: int, wanted: set[str] | None) -> dict[str, torch.Tensor]:
        mm = self._mm
        out: dict[str, torch.Tensor] = {}
        import warnings

        for name, info in header.items():
            if name == "__metadata__" or (wanted is not None and name not in wanted):
                continue
            a, b = info["data_offsets"]
            dtype = TORCH_DTYPES[info["dtype"]]
            count = (b - a) // _ITEMSIZE[info["dtype"]]
            with warnings.catch_warnings():  # the buffer is read-only; tensors are never written in place
                warnings.simplefilter("ignore", UserWarning)
                t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + a) if count else torch.empty(0, dtype=dtype)
            out[name] = t.view(info["shape"])
            self.ranges[name] = (base + a, base + b)
        return out
