"""Streaming safetensors I/O: plan a file's header up front (the writer is :mod:`st_write`),
check a file's layout from its header alone, and read tensors back as zero-copy views of memory
maps, one map per file of a checkpoint (a single file, or the shards an index names).

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

__all__ = ["ST_DTYPES", "TORCH_DTYPES", "INDEX_NAME", "plan_header", "read_header", "check_layout", "checkpoint_files", "shard_name",
           "tensor_bytes", "MappedSafetensors", "np_dtype_for"]

# torch dtype name → safetensors dtype code
ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32",
             "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
TORCH_DTYPES = {v: getattr(torch, k) for k, v in ST_DTYPES.items()}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's index, as transformers names it


def shard_name(i: int, n: int) -> str:
    """The ``i``-th (from 0) of ``n`` shards, as transformers and accelerate name them."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def tensor_bytes(torch_name: str, shape: Iterable[int]) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64)) * _ITEMSIZE[ST_DTYPES[torch_name]]


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


def check_layout(header: dict[str, Any], base: int, file_size: int) -> list[str]:
    """What a strict safetensors parser would reject in this header, from the header alone (no
    data read, nothing mapped): unknown dtypes, a byte range that does not match its shape,
    overlaps, gaps, or data that does not end where the file does. Empty when the layout is sound."""
    problems, spans = [], []
    for k, v in header.items():
        if k == "__metadata__":
            if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                problems.append("__metadata__ is not a map of strings")
            continue
        try:
            a, b = (int(x) for x in v["data_offsets"])
            want = int(np.prod([int(d) for d in v["shape"]], dtype=np.int64)) * _ITEMSIZE[v["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"{k}: malformed entry ({type(exc).__name__}: {exc})")
            continue
        if b - a != want or a < 0:
            problems.append(f"{k}: bytes {a}..{b} do not hold a {v['dtype']} tensor of shape {v['shape']} ({want} bytes)")
        spans.append((a, b, k))
    pos = 0
    for a, b, k in sorted(spans):
        if a != pos:
            problems.append(f"{k}: starts at {a}, expected {pos} (a gap or an overlap)")
        pos = max(pos, b)
    if base + pos != file_size:
        problems.append(f"the data ends at byte {base + pos}, the file at {file_size}")
    return problems


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, or the shards its index names, in order."""
    path = Path(path)
    if not path.name.endswith(".index.json"):
        return [path]
    weight_map = json.loads(path.read_text())["weight_map"]
    return [path.with_name(n) for n in sorted(set(weight_map.values()))]


class MappedSafetensors:
    """A checkpoint (a safetensors file, or an index and its shards) as zero-copy CPU tensors
    over one read-only memory map per file.

    Pages a tensor touched count in this process's RSS until the map goes away; ``release``
    drops them (``MADV_DONTNEED``: the pages stay in the page cache and fault back in, same
    bytes, if read again), so a pass over a model larger than RAM needs one layer resident.
    """

    def __init__(self, path: str | Path, *, keys: Iterable[str] | None = None) -> None:
        self.ranges: dict[str, tuple[int, int]] = {}
        self._maps: dict[str, mmap.mmap] = {}  # tensor key → the map it lives in
        self.state: dict[str, torch.Tensor] = {}
        wanted = set(keys) if keys is not None else None
        for f in checkpoint_files(path):
            header, base = read_header(f)
            with open(f, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self.state.update(self._tensors(mm, header, base, wanted))

    def release(self, keys: Iterable[str]) -> None:
        """Drop these tensors' pages from the process (their values stay readable)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        for k in keys:
            a, b = self.ranges.get(k, (0, 0))
            start = a - a % page  # a page shared with a neighbour is dropped too: it refaults if needed
            if b > start and k in self._maps:
                self._maps[k].madvise(mmap.MADV_DONTNEED, start, b - start)

    def __enter__(self) -> MappedSafetensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.state, self._maps = {}, {}  # a map closes when the last tensor over it is gone

    def _tensors(self, mm: mmap.mmap, header: dict[str, Any], base: int, wanted: set[str] | None) -> dict[str, torch.Tensor]:
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
            self._maps[name] = mm
        return out
