"""``source.format: auto``: which reader a path needs, from its kind, suffix and first bytes."""

from __future__ import annotations

import struct
from pathlib import Path

from np2torch.tasks.errors import LoadError
from np2torch.tasks.fingerprint import open_regular
from np2torch.tasks.readers.flax_msgpack import looks_like_msgpack
from np2torch.tasks.readers.keras_h5 import H5_MAGIC
from np2torch.tasks.readers.npy_header import MAGIC, read_header

__all__ = ["detect_format"]

_PICKLE_SUFFIXES = (".pkl", ".pickle")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "npy-dir"
    if path.suffix in _PICKLE_SUFFIXES:
        return "pickle-list"
    with open_regular(path) as fh:
        head = fh.read(9)
        size = fh.seek(0, 2)
        if head[:4] == b"PK\x03\x04" or path.suffix == ".npz":
            return "npz"
        if head[:6] == MAGIC:
            fh.seek(0)
            return "pickle-list" if read_header(fh, where=str(path)).dtype.hasobject else "npy"
    if head[:8] == H5_MAGIC or path.suffix in (".h5", ".hdf5", ".keras5"):
        return "h5"
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        return "safetensors"
    if path.suffix == ".msgpack" or looks_like_msgpack(head):
        return "msgpack"
    raise LoadError(
        "cannot tell the format of this file (not .npy, .npz, pickle, HDF5, safetensors, msgpack or a folder)",
        key=str(path),
        fix="set `source.format` to one of npz | npy | npy-dir | pickle-list | flat | h5 | msgpack | safetensors",
    )
