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
import hashlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks.errors import LoadError, Problem, short
from np2torch.tasks.fingerprint import cached_by_stat, open_regular
from np2torch.tasks.readers.base import MAX_ARRAYS, NUMERIC_KINDS, ArrayRecord, ScanContext, check_dtype, nbytes_of
from np2torch.tasks.readers.stats import Layout, fingerprint_of, fold, layout_infos

__all__ = ["scan", "sniff", "open_dataset", "H5_MAGIC", "h5_file", "scan_h5", "read_dataset", "max_inflate", "Window"]

H5_MAGIC = b"\x89HDF\r\n\x1a\n"
MAX_COMPRESSION_RATIO = 200
_MAX_DEPTH = 32
_PIECE = 16 << 20  # a chunked or compressed dataset is read in C-order slabs of at most this many bytes
# the top-level group of a Keras 3 weights file that holds the optimizer's state, not the model's
OPTIMIZER = "optimizer"
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


class Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file as a read-only file, so that h5py reads
    an HDF5 file stored inside another (a ``.keras`` zip) in place, through a handle np2torch opened."""

    def __init__(self, fh, start: int, length: int) -> None:
        super().__init__()
        self.fd, self.start, self.length, self.pos = fh.fileno(), start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        got = os.preadv(self.fd, [memoryview(b)[:n]], self.start + self.pos) if n else 0
        self.pos += got
        return got


@contextlib.contextmanager
def h5_file(path: Path, start: int = 0, length: int | None = None, data: bytes | None = None) -> Iterator[Any]:
    """The HDF5 file at ``path`` (or its bytes ``[start, start + length)``, or ``data`` read from
    it), read through a handle np2torch opened itself (a regular file, checked before a byte is
    read), so that HDF5 never opens a path on its own."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        src = io.BytesIO(data) if data is not None else Window(fh, start, size - start if length is None else length)
        if src.read(8) != H5_MAGIC:
            raise LoadError("not an HDF5 file (no HDF5 signature at its start)", key=str(path), fix=_FIX)
        src.seek(0)
        try:
            f = _h5py().File(src, "r")
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise LoadError(f"HDF5 file is truncated or corrupt: {short(str(exc))}", key=str(path), fix=_FIX) from None
        with f:
            yield f


_open = h5_file


def _walk(group, prefix: list[str], where: str, out: list[tuple[list[str], Any]], depth: int = 0) -> None:
    """Every dataset under ``group`` (hard links only), in name order."""
    h5py = _h5py()
    if depth > _MAX_DEPTH:
        raise LoadError(f"HDF5 groups nest deeper than {_MAX_DEPTH}", key=where, fix=_FIX)
    for name in group:  # HDF5 lists names in byte order
        entry = "/".join(prefix + [name])
        _check_link(group.get(name, getlink=True), entry, where)
        try:
            obj = group[name]
        except (KeyError, OSError, RuntimeError, ValueError) as exc:
            raise LoadError(f"HDF5 entry {short(entry)!r} cannot be read: {short(str(exc).strip(chr(39)))}", key=where, fix=_FIX) from None
        if isinstance(obj, h5py.Group):
            _walk(obj, prefix + [name], where, out, depth + 1)
        else:
            out.append((prefix + [name], obj))
            if len(out) > MAX_ARRAYS:
                raise LoadError(f"HDF5 file holds more than {MAX_ARRAYS} datasets", key=where, fix=_FIX)


def max_inflate() -> int:
    """The most bytes one inflated array (or in-memory member) may take: the memory it will need
    must be there, since convert holds it whole. ``$NP2TORCH_MAX_INFLATE_BYTES`` sets it (tests)."""
    env = os.environ.get("NP2TORCH_MAX_INFLATE_BYTES")
    if env:
        return int(env)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _attr_list(group, name: str, where: str) -> list[str]:
    """A Keras name-list attribute, also when split into ``name0``, ``name1`` … chunks; its
    length is capped (from the attribute's shape) before a name is read."""
    parts = [name] if name in group.attrs else []
    while parts[:1] != [name] and f"{name}{len(parts)}" in group.attrs:
        parts.append(f"{name}{len(parts)}")
    n = sum(int(np.prod(group.attrs.get_id(p).shape or (1,))) for p in parts)
    if n > MAX_ARRAYS:
        raise LoadError(f"HDF5 attribute {name!r} lists {n} names, more than the {MAX_ARRAYS} arrays a checkpoint can have", key=where,
                        expected=f"at most {MAX_ARRAYS}", actual=n, fix=_FIX)
    raw = [x for p in parts for x in np.atleast_1d(group.attrs[p])]
    return [n.decode("utf-8", errors="replace") if isinstance(n, bytes) else str(n) for n in raw]


def _entry(group, path: str, where: str):
    """The object at ``path`` under ``group``, through hard links only (None when missing)."""
    h5py = _h5py()
    obj, done = group, []
    for seg in (s for s in path.split("/") if s):
        if not isinstance(obj, h5py.Group):
            return None
        link = obj.get(seg, getlink=True)
        if link is None:
            return None
        done.append(seg)
        _check_link(link, "/".join(done) if group.name == "/" else f"{group.name.strip('/')}/{'/'.join(done)}", where)
        obj = obj[seg]
    return obj


def _check_link(link, name: str, where: str) -> None:
    h5py = _h5py()
    if not isinstance(link, h5py.HardLink):
        kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
        raise LoadError(f"HDF5 entry {short(name)!r} is {kind}; links to other objects or files are not followed", key=where, fix=_FIX)


def _legacy(f, where: str, at: list[str]) -> list[tuple[str, Any]]:
    root = _entry(f, "model_weights", where) if "model_weights" in f and not {"layer_names", "layer_names0"} & set(f.attrs) else f
    out = []
    layers = _attr_list(root, "layer_names", where)
    for layer in layers:
        at[0] = layer
        g = _entry(root, layer, where)
        if g is None:
            raise LoadError(f"layer {short(layer)!r} is listed in layer_names but has no group", key=where, fix=_FIX)
        for w in _attr_list(g, "weight_names", where):
            at[0] = f"{layer}/{w}"
            ds = _entry(g, w, where)
            if ds is None:
                raise LoadError(f"weight {short(w)!r} of layer {short(layer)!r} is listed but missing", key=where, fix=_FIX)
            out.append((w, ds))
            if len(out) > MAX_ARRAYS:
                raise LoadError(f"HDF5 file lists more than {MAX_ARRAYS} weights", key=where, fix=_FIX)
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


def _keras3(f, datasets: list[tuple[list[str], Any]], where: str, order: list[str] | None, notes: list[str]) -> list[tuple[str, Any]]:
    """Keys ``<layer name>/…/<variable name>`` (Keras's own variable paths without the model's
    name), in the layer order of the model's config when there is one (``order``: layer name
    paths, a ``.keras`` file's ``config.json``), else in the order the layers were saved (the
    order of their groups in the file). The optimizer's state (``optimizer/vars/<i>``) is left
    out, with one note."""
    h5py = _h5py()
    groups: dict[tuple[str, ...], list[tuple[str, Any]]] = {}
    n_opt = 0
    for parts, ds in datasets:
        if parts[0] == OPTIMIZER:
            n_opt += 1
            continue
        if len(parts) < 3 or parts[-2] != "vars" or not parts[-1].isdigit():
            continue  # the model's own (empty) vars, or not a variable
        groups.setdefault(tuple(parts[:-2]), []).append((parts[-1], ds))
    if n_opt:
        notes.append(f"optimizer state left out: {n_opt} arrays under {OPTIMIZER}/vars/ (training state, not model weights)")
    pos = {name: i for i, name in enumerate(order or [])}

    def layer_name(prefix: tuple[str, ...]) -> str | None:
        g = f.get("/".join(prefix + ("vars",)))
        if g is None:
            return None
        n = g.attrs.get("name", prefix[-1])
        return n.decode("utf-8", errors="replace") if isinstance(n, bytes) else str(n)

    named = {owner: [n for n in (layer_name(owner[:i]) for i in range(1, len(owner) + 1)) if n is not None] for owner in groups}

    def place(kv) -> tuple[int, int]:
        # the config's position of the layer (or of the nearest layer holding it); HDF5 lists
        # names alphabetically and tracks no creation order, but the variables' object headers
        # are allocated as Keras writes them, layer by layer, so their addresses give it otherwise
        names = named[kv[0]]
        at = next((pos[p] for p in ("/".join(names[:i]) for i in range(len(names), 0, -1)) if p in pos), len(pos))
        return at, min(h5py.h5o.get_info(ds.id).addr for _, ds in kv[1])

    out = []
    for owner, items in sorted(groups.items(), key=place):
        if sorted(int(i) for i, _ in items) != list(range(len(items))):
            raise LoadError(f"variables of {short('/'.join(owner))!r} are not numbered 0..{len(items) - 1}", key=where, fix=_FIX)
        items.sort(key=lambda t: int(t[0]))
        names = named[owner]
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
    if nbytes > (bound := max_inflate()):
        raise LoadError(f"dataset would need {nbytes} bytes of memory once inflated ({stored} stored), more than the {bound} available",
                        key=where, expected=f"at most {bound} bytes", actual=nbytes,
                        fix="store the weights uncompressed (contiguous datasets are read in place), "
                            "or convert on a machine with more memory")
    return dtype, shape, -1


def scan(path: Path, ctx: ScanContext) -> list[ArrayRecord]:
    with h5_file(path) as f:
        return scan_h5(f, path, ctx, base=0, size=os.stat(path).st_size)


def scan_h5(f, path: Path, ctx: ScanContext, *, base: int | None, size: int, order: list[str] | None = None,
            what: str = "h5-info3") -> list[ArrayRecord]:
    """The records of an open Keras weights file ``f`` that lies in ``path`` at byte ``base``
    (``size`` bytes; ``base`` None: read into memory, so nothing can be memory-mapped). Every
    h5py error is one LoadError naming the file and the entry being read."""
    at = [""]
    try:
        return _scan(f, path, ctx, base, size, order, what, at)
    except (KeyError, OSError, RuntimeError, ValueError, TypeError) as exc:
        if isinstance(exc, PermissionError):
            raise
        raise LoadError(f"HDF5 entry {short(at[0].lstrip('/'))!r} cannot be read: {short(str(exc).strip(chr(39)))}", key=str(path),
                        fix=_FIX) from None


def _scan(f, path: Path, ctx: ScanContext, base: int | None, size: int, order, what: str, at: list[str]) -> list[ArrayRecord]:
    problems: list[Problem] = []  # reported here, with the file: a dataset that cannot be a parameter is not read
    def lists(attrs) -> bool:
        return "layer_names" in attrs or "layer_names0" in attrs

    legacy = lists(f.attrs) or ("model_weights" in f and lists(f["model_weights"].attrs))
    if legacy:
        named = _legacy(f, str(path), at)
    else:
        datasets: list[tuple[list[str], Any]] = []
        _walk(f, [], str(path), datasets)
        named = _keras3(f, datasets, str(path), order, ctx.notes)
    if not named:
        raise LoadError("HDF5 file holds no Keras weights (neither layers/<name>/vars/<i> nor layer_names)", key=str(path), fix=_FIX)
    rows = []
    for key, ds in named:
        at[0] = ds.name
        where = f"{path}::{ds.name}"
        dtype, shape, off = _check_dataset(ds, key, where, size, problems)
        rows.append((key, ds.name, dtype, shape, off + base if off >= 0 and base is not None else -1))
    if problems:
        raise LoadError(f"{len(problems)} array(s) cannot be model parameters", key=str(path), problems=problems, fix=problems[0]["fix"])
    infos = cached_by_stat(path, what, lambda: _infos(path, f, rows, ctx.progress, at))
    return [ArrayRecord(key, str(path), name, None, off, shape, dtype.str, False, nbytes_of(shape, dtype), **info)
            for (key, name, dtype, shape, off), info in zip(rows, infos)]


def _infos(path: Path, f, rows, progress, at: list[str]) -> list[dict[str, Any]]:
    mapped = [i for i, r in enumerate(rows) if r[4] >= 0]
    infos: list[Any] = [None] * len(rows)
    got = layout_infos(path, [Layout(rows[i][0], rows[i][3], rows[i][2], rows[i][4], member=rows[i][1]) for i in mapped], progress)
    for i, info in zip(mapped, got):
        infos[i] = info
    for i, (_key, name, dtype, shape, off) in enumerate(rows):
        if off < 0:
            at[0] = name
            sha, acc = hashlib.sha256(), {"n_nonfinite": 0, "absmax": 0.0, "absmin_nonzero": 0.0}
            for piece in _slabs(f[name], f"{path}::{name}"):  # bounded memory, however large the dataset inflates
                sha.update(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))
                fold(piece.reshape(-1), acc)
            infos[i] = {**acc, "fingerprint": fingerprint_of(["data", sha.hexdigest(), dtype.str, list(shape), False])}
    return infos


def _slabs(ds, where: str) -> Iterator[np.ndarray]:
    """A dataset's values in C order, as slabs of at most ``_PIECE`` bytes (one row of the
    innermost axes that fit, at least): an inflated dataset is never held whole to be hashed."""
    shape, itemsize = tuple(ds.shape or ()), ds.dtype.itemsize
    k = 0
    while k < len(shape) and nbytes_of(shape[k:], ds.dtype) > _PIECE:
        k += 1
    try:
        if k == 0:
            yield np.asarray(ds[()])
            return
        block = max(nbytes_of(shape[k:], ds.dtype), itemsize)
        step = max(1, _PIECE // block)
        for idx in np.ndindex(*shape[: k - 1]):
            for i in range(0, shape[k - 1], step):
                yield np.asarray(ds[idx + (slice(i, min(i + step, shape[k - 1])),)])
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise LoadError(f"HDF5 dataset is corrupt: {short(str(exc))}", key=where, fix=_FIX) from None


def read_dataset(f, name: str, where: str) -> np.ndarray:
    """A chunked or compressed dataset's values, read slab by slab into one array (peak: the array plus one slab)."""
    ds = f[name]
    out = np.empty(tuple(ds.shape or ()), dtype=ds.dtype)
    flat = out.reshape(-1)
    pos = 0
    for piece in _slabs(ds, where):
        flat[pos : pos + piece.size] = piece.reshape(-1)
        pos += piece.size
    return out


def open_dataset(rec: ArrayRecord) -> np.ndarray:
    """A chunked or compressed dataset's values (contiguous ones are memory-mapped instead)."""
    with h5_file(Path(rec.file)) as f:
        return read_dataset(f, rec.member, f"{rec.file}::{rec.member}")


def sniff(head: bytes, size: int) -> bool:
    return head[:8] == H5_MAGIC
