"""One manifest row's source tensor: the source array(s) read and transformed, as both the
convert stage (which casts it into the output file) and the mapping's evidence step (which tries
it in a float64 copy of the model) see it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from np2torch.tasks import transforms as T
from np2torch.tasks.readers.access import ArrayRecord, open_array

if TYPE_CHECKING:
    from np2torch.tasks.manifest import ManifestRow

__all__ = ["source_tensor"]


def source_tensor(row: ManifestRow, records: dict[str, ArrayRecord]) -> np.ndarray:
    """The row's source array(s) after its transform: a view of the memory map where possible
    (several sources are joined on the row's ``concat`` axis, in native byte order)."""
    if row.status == "zeros":
        return np.zeros(row.target_shape, dtype=np.float32)
    spec = row.transform_spec
    parts = [T.apply(open_array(records[s]), spec) for s in row.sources]
    if row.concat != "":
        return np.concatenate([_native(p) for p in parts], axis=int(row.concat))
    return parts[0]


def _native(a: np.ndarray) -> np.ndarray:
    return a if a.dtype.isnative or a.dtype.byteorder == "|" else a.astype(a.dtype.newbyteorder("="))
