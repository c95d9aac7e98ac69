"""Arrays stored as plain byte ranges of one file (safetensors, Flax msgpack, contiguous HDF5
datasets): their fingerprints and value statistics in ONE read of the file, with its sha256."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks import fingerprint
from np2torch.tasks.fingerprint import Region, remember, stat_key
from np2torch.tasks.readers.base import nbytes_of
from np2torch.tasks.readers.stats import StatsFeed, info_of

__all__ = ["Layout", "layout_infos"]


@dataclass(frozen=True)
class Layout:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int


def layout_infos(path: Path, layouts: list[Layout], progress=None) -> list[dict[str, Any]]:
    version = stat_key(path)
    feeds = [StatsFeed(lay.dtype) for lay in layouts]
    regions = [Region(lay.offset, nbytes_of(lay.shape, lay.dtype), on_chunk=f) for lay, f in zip(layouts, feeds)]
    sha, digests = fingerprint.file_digests(path, regions, progress=progress)
    remember(path, "sha256", sha, version=version)
    return [info_of(f, lay.dtype, lay.shape, d) for lay, f, d in zip(layouts, feeds, digests)]
