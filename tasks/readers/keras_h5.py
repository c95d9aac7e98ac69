"""Keras HDF5 weights (format ``h5``): Keras 3 ``.weights.h5`` and legacy Keras ``.h5``.

- Keras 3 (``model.save_weights("x.weights.h5")``) stores each layer's variables by position
  under the layer's attribute path, ``layers/<class name>/vars/<i>`` (nested models and
  sub-layers add segments: ``layers/sequential/layers/dense/vars/0``,
  ``layers/bidirectional/forward_layer/cell/vars/1``), with the layer's real name as the
  ``name`` attribute of each ``vars`` group; variable names are not stored. Keys are Keras's
  own variable paths without the model's name: the real names of the owning layers, then the
  variable's name by position for the layer's class (:data:`_VAR_NAMES`; else from the shapes;
  else the position), so a Dense named ``head`` gives ``head/kernel``, ``head/bias`` and an LSTM
  ``lstm/lstm_cell/kernel``. Layers come in the order they were saved (their groups' order in
  the file), not the alphabetical order HDF5 lists them in.
- Legacy Keras (``save_weights("x.h5")`` / ``model.save("x.h5")``): attribute ``layer_names``
  on the root (or on ``model_weights``), ``weight_names`` on each layer group, datasets at
  ``<layer>/<weight name>``; keys are the weight names (``dense/kernel:0``; the keras preset
  strips ``:0``), in the model's layer order.

HDF5 is read with h5py, never following soft or external links, refusing virtual datasets and
external storage (they would read other files). Contiguous datasets are memory-mapped in place
at their file offset and hashed in one read of the file; chunked or compressed ones are read
through h5py after a check that their declared size is plausible for their stored size.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks.errors import LoadError, Problem, short
from np2torch.tasks.fingerprint import cached_by_stat, open_regular
from np2torch.tasks.readers.base import MAX_ARRAYS, NUMERIC_KINDS, ArrayRecord, ScanContext, check_dtype, nbytes_of
from np2torch.tasks.readers.stats import Layout, array_info, layout_infos

__all__ = ["scan", "sniff", "open_dataset", "H5_MAGIC"]

H5_MAGIC = b"\x89HDF\r\n\x1a\n"
MAX_COMPRESSION_RATIO = 200
_MAX_DEPTH = 32
_FIX = "re-save the weights with Keras (model.save_weights) or re-copy the file"

# Keras layer kinds (from the default layer name, ``dense_3`` → ``dense``) → names of the
# variables at positions 0, 1, … (trainable first, then non-trainable, as Keras saves them)
_VAR_NAMES: dict[str, tuple[str, ...]] = {
    "dense": ("kernel", "bias"), "einsum_dense": ("kernel", "bias"),
    "conv1d": ("kernel", "bias"), "conv2d": ("kernel", "bias"), "conv3d": ("kernel", "bias"),
    "conv1d_transpose": ("kernel", "bias"), "conv2d_transpose": ("kernel", "bias"), "conv3d_transpose": ("kernel", "bias"),
    # Keras 3 calls a depthwise kernel ``kernel`` (Keras 2 said ``depthwise_kernel``)
    "depthwise_conv1d": ("kernel", "bias"), "depthwise_conv2d": ("kernel", "bias"),
    "separable_conv1d": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "separable_conv2d": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "layer_normalization": ("gamma", "beta"), "group_normalization": ("gamma", "beta"),
    "embedding": ("embeddings",),
    "lstm_cell": ("kernel", "recurrent_kernel", "bias"), "gru_cell": ("kernel", "recurrent_kernel", "bias"),
    "simple_rnn_cell": ("kernel", "recurrent_kernel", "bias"),
    "prelu": ("alpha",),
}


def _h5py():
    import h5py

    return h5py


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    """The HDF5 file, read through a handle np2torch opened itself (a regular file, checked
    before a byte is read), so that HDF5 never opens a path on its own."""
    with open_regular(path) as fh:
        if fh.read(8) != H5_MAGIC:
            raise LoadError("not an HDF5 file (no HDF5 signature at its start)", key=str(path), fix=_FIX)
        fh.seek(0)
        try:
            f = _h5py().File(fh, "r")
        except (OSError, ValueError, RuntimeError) as exc:
            raise LoadError(f"HDF5 file is truncated or corrupt: {short(str(exc))}", key=str(path), fix=_FIX) from None
        with f:
            yield f


def _walk(group, prefix: list[str], where: str, out: list[tuple[list[str], Any]], depth: int = 0) -> None:
    """Every dataset under ``group`` (hard links only), in name order."""
    h5py = _h5py()
    if depth > _MAX_DEPTH:
        raise LoadError(f"HDF5 groups nest deeper than {_MAX_DEPTH}", key=where, fix=_FIX)
    for name in group:  # HDF5 lists names in byte order
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise LoadError(f"HDF5 entry {short('/'.join(prefix + [name]))!r} is {kind}; links to other objects or files are not followed",
                            key=where, fix=_FIX)
        obj = group[name]
        if isinstance(obj, h5py.Group):
            _walk(obj, prefix + [name], where, out, depth + 1)
        else:
            out.append((prefix + [name], obj))
            if len(out) > MAX_ARRAYS:
                raise LoadError(f"HDF5 file holds more than {MAX_ARRAYS} datasets", key=where, fix=_FIX)


def _attr_list(group, name: str) -> list[str]:
    """A Keras name-list attribute, also when split into ``name0``, ``name1`` … chunks."""
    if name in group.attrs:
        raw = list(group.attrs[name])
    else:
        raw, i = [], 0
        while f"{name}{i}" in group.attrs:
            raw += list(group.attrs[f"{name}{i}"])
            i += 1
    return [n.decode("utf-8", errors="replace") if isinstance(n, bytes) else str(n) for n in raw]


def _legacy(f, where: str) -> list[tuple[str, Any]]:
    root = f["model_weights"] if "model_weights" in f and "layer_names" not in f.attrs else f
    out = []
    for layer in _attr_list(root, "layer_names"):
        g = root.get(layer)
        if g is None:
            raise LoadError(f"layer {short(layer)!r} is listed in layer_names but has no group", key=where, fix=_FIX)
        for w in _attr_list(g, "weight_names"):
            ds = g.get(w)
            if ds is None:
                raise LoadError(f"weight {short(w)!r} of layer {short(layer)!r} is listed but missing", key=where, fix=_FIX)
            out.append((w, ds))
    return out


def _kind(segment: str, name: str) -> str:
    """The layer kind of a Keras 3 variable group: its attribute path segment is the class's
    snake_case name (``dense``, ``dense_1``), whatever the layer is called; a recurrent cell's
    segment is ``cell`` and its default name says which (``lstm_cell``)."""
    return re.sub(r"_\d+$", "", name if segment == "cell" else segment)


def _by_shape(ndims: list[int]) -> tuple[str, ...] | None:
    patterns = {(2, 1): ("kernel", "bias"), (3, 1): ("kernel", "bias"), (4, 1): ("kernel", "bias"), (5, 1): ("kernel", "bias"),
                (1, 1, 1, 1): ("gamma", "beta", "moving_mean", "moving_variance"),
                (2, 2, 1): ("kernel", "recurrent_kernel", "bias"), (2, 2, 2): ("kernel", "recurrent_kernel", "bias")}
    if len(ndims) == 2 and ndims[0] > ndims[1] >= 1:
        return "kernel", "bias"  # EinsumDense (MultiHeadAttention's _query_dense …): (d, heads, head_dim) kernel, (heads, head_dim) bias
    return patterns.get(tuple(ndims))


def _var_names(segment: str, name: str, ndims: list[int]) -> tuple[str, ...]:
    names = _VAR_NAMES.get(_kind(segment, name))
    if names is None or len(names) != len(ndims):
        names = _by_shape(ndims)
    return names if names is not None and len(names) == len(ndims) else tuple(str(i) for i in range(len(ndims)))


def _keras3(f, datasets: list[tuple[list[str], Any]], where: str) -> list[tuple[str, Any]]:
    """Keys ``<layer name>/…/<variable name>`` (Keras's own variable paths without the model's
    name), in the order the layers were saved (the order of their groups in the file)."""
    h5py = _h5py()
    groups: dict[tuple[str, ...], list[tuple[str, Any]]] = {}
    for parts, ds in datasets:
        if len(parts) < 3 or parts[-2] != "vars" or not parts[-1].isdigit():
            continue  # the model's own (empty) vars, or not a variable
        groups.setdefault(tuple(parts[:-2]), []).append((parts[-1], ds))

    def layer_name(prefix: tuple[str, ...]) -> str | None:
        g = f.get("/".join(prefix + ("vars",)))
        if g is None:
            return None
        n = g.attrs.get("name", prefix[-1])
        return n.decode("utf-8", errors="replace") if isinstance(n, bytes) else str(n)

    out = []
    # HDF5 lists names alphabetically and tracks no creation order; the variables' object
    # headers are allocated as Keras writes them, layer by layer, so their addresses give it
    for owner, items in sorted(groups.items(), key=lambda kv: min(h5py.h5o.get_info(ds.id).addr for _, ds in kv[1])):
        if sorted(int(i) for i, _ in items) != list(range(len(items))):
            raise LoadError(f"variables of {short('/'.join(owner))!r} are not numbered 0..{len(items) - 1}", key=where, fix=_FIX)
        items.sort(key=lambda t: int(t[0]))
        names = [n for n in (layer_name(owner[:i]) for i in range(1, len(owner) + 1)) if n is not None]
        var_names = _var_names(owner[-1], names[-1] if names else owner[-1], [len(ds.shape or ()) for _, ds in items])
        prefix = "/".join(names)
        out += [(f"{prefix}/{v}" if prefix else v, ds) for v, (_, ds) in zip(var_names, items)]
    return out


def _check_dataset(ds, key: str, where: str, size: int, problems: list[Problem]) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, file offset or -1) of a dataset, refusing anything that reads elsewhere or too much."""
    dtype, shape = ds.dtype, tuple(int(d) for d in ds.shape or ())
    if ds.is_virtual or ds.id.get_create_plist().get_external_count():
        raise LoadError("HDF5 dataset reads its data from other files (virtual or external storage); refused", key=where, fix=_FIX)
    check_dtype(dtype, key, problems)
    nbytes = nbytes_of(shape, dtype)
    offset = ds.id.get_offset()
    if offset is not None and dtype.kind in NUMERIC_KINDS:
        if offset + nbytes > size:
            raise LoadError(f"file is truncated: dataset declares shape {list(shape)} {dtype.str} ({nbytes} bytes) at byte {offset} "
                            f"but the file ends at {size}", key=where, expected=nbytes, actual=max(0, size - offset),
                            fix="re-copy or re-export the file; it was cut short")
        return dtype, shape, offset
    stored = ds.id.get_storage_size()
    if nbytes > max(stored, 1) * MAX_COMPRESSION_RATIO and nbytes > (64 << 20):
        raise LoadError(f"dataset would expand to {nbytes} bytes from {stored} stored (ratio > {MAX_COMPRESSION_RATIO}); "
                        "refusing to read a likely compression bomb", key=where, fix=_FIX)
    return dtype, shape, -1


def scan(path: Path, ctx: ScanContext) -> list[ArrayRecord]:
    problems: list[Problem] = []  # reported here, with the file: a dataset that cannot be a parameter is not read
    size = os.stat(path).st_size
    with _open(path) as f:
        legacy = "layer_names" in f.attrs or ("model_weights" in f and "layer_names" in f["model_weights"].attrs)
        if legacy:
            named = _legacy(f, str(path))
        else:
            datasets: list[tuple[list[str], Any]] = []
            _walk(f, [], str(path), datasets)
            named = _keras3(f, datasets, str(path))
        if not named:
            raise LoadError("HDF5 file holds no Keras weights (neither layers/<name>/vars/<i> nor layer_names)", key=str(path), fix=_FIX)
        rows = []
        for key, ds in named:
            where = f"{path}::{ds.name}"
            rows.append((key, ds.name, *_check_dataset(ds, key, where, size, problems)))
        if problems:
            raise LoadError(f"{len(problems)} array(s) cannot be model parameters", key=str(path), problems=problems, fix=problems[0]["fix"])
        infos = cached_by_stat(path, "h5-info2", lambda: _infos(path, f, rows, ctx.progress))
    return [ArrayRecord(key, str(path), name, None, off, shape, dtype.str, False, nbytes_of(shape, dtype), **info)
            for (key, name, dtype, shape, off), info in zip(rows, infos)]


def _infos(path: Path, f, rows, progress) -> list[dict[str, Any]]:
    mapped = [i for i, r in enumerate(rows) if r[4] >= 0]
    infos: list[Any] = [None] * len(rows)
    got = layout_infos(path, [Layout(rows[i][0], rows[i][3], rows[i][2], rows[i][4], member=rows[i][1]) for i in mapped], progress)
    for i, info in zip(mapped, got):
        infos[i] = info
    for i, (key, name, dtype, shape, off) in enumerate(rows):
        if off < 0:
            infos[i] = array_info(_read(f, name, f"{path}::{name}"))
    return infos


def _read(f, name: str, where: str) -> np.ndarray:
    try:
        return np.asarray(f[name][()])
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise LoadError(f"HDF5 dataset is corrupt: {short(str(exc))}", key=where, fix=_FIX) from None


def open_dataset(rec: ArrayRecord) -> np.ndarray:
    """A chunked or compressed dataset's values (contiguous ones are memory-mapped instead)."""
    with _open(Path(rec.file)) as f:
        return _read(f, rec.member, f"{rec.file}::{rec.member}")


def sniff(head: bytes, size: int) -> bool:
    return head[:8] == H5_MAGIC
