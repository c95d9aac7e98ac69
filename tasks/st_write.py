"""The streamed safetensors writer: manifest rows + source arrays → one safetensors file, or a
set of shards and their index (``export.max_shard_size``), in the layout transformers and
accelerate load directly.

Each file's header is planned from the manifest before a byte is converted. Worker threads
convert one tensor each, a cache-sized block of rows at a time (a block of a transposed matrix:
its columns gathered, then transposed in cache), and write each block with ``pwrite`` while it
is still in cache (on the benchmark VM a fraction of the cost of writing a whole tensor from
memory). This thread folds each finished tensor into the file's sha256 in file order, read back
from the page cache, and starts its write-back on a helper thread, so the one ``fsync`` before
the rename waits only for the tail. Memory stays at one block per worker whatever the model
size; the file's blocks are reserved up front (``fallocate``). Files appear under their names
only when complete (temporary name, ``fsync``, rename), the index last.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from np2torch.tasks import bytework
from np2torch.tasks.bytework import WriteError, pwrite_all, reserve, start_writeback
from np2torch.tasks.errors import ConvertError
from np2torch.tasks.fingerprint import remember
from np2torch.tasks.manifest import target_rows
from np2torch.tasks.paths import atomic_write_text
from np2torch.tasks.readers.access import ArrayRecord
from np2torch.tasks.source_tensor import source_tensor
from np2torch.tasks.st_io import INDEX_NAME, np_dtype_for, plan_header, shard_name, tensor_bytes

__all__ = ["cast_into", "plan_shards", "write_converted"]

_BLOCK = 512 << 10  # bytes of output converted and written at a time (fits a core's L2 cache)
_SMALL_COPY = 2 << 20  # up to this size, a copy without a cast runs in NumPy
_TORCH_BLOCK = 32767  # elements: a cast block below torch's grain size stays on one thread
_LOCAL = threading.local()

Plan = list[tuple[str, str, tuple[int, ...]]]  # (key, torch dtype name, shape) in file order


def cast_into(dst_dtype: str, src: np.ndarray, out: torch.Tensor) -> int:
    """One pass: byte order, strides (transposes) and dtype, straight into ``out`` (a uint8
    tensor over the result's bytes); returns the byte size the result has, and writes nothing
    when that is not ``out``'s size (the caller reports it)."""
    np_dt = np_dtype_for(dst_dtype)
    t_dt = getattr(torch, dst_dtype)
    itemsize = np_dt.itemsize if np_dt is not None else torch.empty(0, dtype=t_dt).element_size()
    nbytes = int(np.prod(src.shape, dtype=np.int64)) * itemsize
    if nbytes == 0 or nbytes != out.numel():
        return nbytes
    if out.data_ptr() % itemsize:  # a tensor after an odd-sized one is not aligned for its dtype: cast beside, then copy
        tmp = torch.empty(nbytes, dtype=torch.uint8)
        cast_into(dst_dtype, src, tmp)
        out.copy_(tmp)
        return nbytes
    if np_dt is not None and (not src.dtype.isnative or src.dtype.kind == "b" or np_dt.kind == "b"):
        np.copyto(out.numpy().view(np_dt).reshape(src.shape), src, casting="unsafe")
        return nbytes
    if np_dt is not None and src.dtype == np_dt and nbytes <= _SMALL_COPY:
        # a block, no cast: NumPy, single-threaded (torch's thread pool costs more than it
        # gives on blocks this small: measured 10-30x slower on 2 cores)
        dst = out.numpy().view(np_dt).reshape(src.shape)
        if src.ndim == 2 and src.shape[0] > 1 and src.strides[0] == src.itemsize:
            # a block of a transposed matrix: gather its columns (contiguous runs), then transpose in cache
            tmp = _tmp(np_dt, (src.shape[1], src.shape[0]))
            np.copyto(tmp, src.T)
            np.copyto(dst, tmp.T)
        else:
            np.copyto(dst, src)
        return nbytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only memmap: torch only reads it
        s = torch.from_numpy(np.asarray(src))
    out.view(t_dt).view(tuple(src.shape)).copy_(s)  # torch's transposed copy is cache-blocked for a whole transposed matrix
    return nbytes


def _tmp(dtype: np.dtype, shape: tuple[int, int]) -> np.ndarray:
    """This thread's reusable small matrix for the two-step transpose."""
    key = (dtype, shape)
    cache = getattr(_LOCAL, "tmp", None)
    if cache is None or cache[0] != key:
        cache = _LOCAL.tmp = (key, np.empty(shape, dtype=dtype))
    return cache[1]


def _default_workers() -> int:
    """One tensor per worker: a transpose is single-threaded (torch's thread pool costs more than
    it gives on cache-sized blocks), so tensors in parallel use the cores. 3 at most: the
    writes into the page cache, not the cores, bound it beyond that on the benchmark VM."""
    return max(2, min(3, os.cpu_count() or 2))


class _Cursor:
    """One tensor's bytes, written front to back from a cache-sized block of this thread's."""

    def __init__(self, fd: int, pos: int) -> None:
        self.fd, self.pos, self.block = fd, pos, _BLOCK
        local = getattr(_LOCAL, "block", None)
        if local is None or len(local[0]) != _BLOCK:
            buf = bytearray(_BLOCK)
            local = _LOCAL.block = (buf, torch.frombuffer(buf, dtype=torch.uint8))
        self.buf, self.view = local

    def put(self, n: int) -> None:
        """Write the first ``n`` bytes of the block as the file's next ones."""
        if n:
            try:
                bytework.pwrite_all(self.fd, memoryview(self.buf)[:n], self.pos)
            except OSError as exc:
                raise WriteError(exc.errno, exc.strerror) from exc
            self.pos += n

    def emit_bytes(self, data: np.ndarray) -> None:
        """Write these bytes (uint8) as the file's next ones, a block at a time."""
        for i in range(0, data.size, self.block):
            piece = data[i : i + self.block]
            memoryview(self.buf)[: piece.size] = piece.data
            self.put(piece.size)

    def emit_array(self, dst_dtype: str, src: np.ndarray) -> int:
        """Convert ``src`` into the file's next bytes, a block of rows of the result at a time;
        returns the byte size the result has, having written nothing when that differs from plan."""
        np_dt = np_dtype_for(dst_dtype)
        itemsize = np_dt.itemsize if np_dt is not None else torch.empty(0, dtype=getattr(torch, dst_dtype)).element_size()
        nbytes = int(np.prod(src.shape, dtype=np.int64)) * itemsize
        block = self.block if np_dt is not None and src.dtype == np_dt else min(self.block, _TORCH_BLOCK * itemsize)
        if nbytes <= block or src.ndim == 0:
            return self._emit_block(dst_dtype, src, nbytes)
        rows = src.shape[0]
        rowbytes = nbytes // rows
        if rowbytes > block:  # a row larger than a block: each row on its own, in blocks
            return sum(self.emit_array(dst_dtype, src[i]) for i in range(rows))
        step = block // rowbytes
        return sum(self._emit_block(dst_dtype, src[r : r + step], rowbytes * min(step, rows - r)) for r in range(0, rows, step))

    def _emit_block(self, dst_dtype: str, part: np.ndarray, n: int) -> int:
        if n > self.block:  # a scalar larger than a block (only with tiny test blocks): cast beside, then copy
            tmp = torch.empty(n, dtype=torch.uint8)
            got = cast_into(dst_dtype, part, tmp)
            if got == n:
                self.emit_bytes(tmp.numpy())
            return got
        got = cast_into(dst_dtype, part, self.view[:n])
        self.put(n if got == n else 0)
        return got


def _emit_row(row: dict[str, Any], by_key: dict[str, dict[str, Any]], records: dict[str, ArrayRecord],
              missing_values: dict[str, torch.Tensor], cur: _Cursor, size: int) -> None:
    """Write one manifest row's tensor as the file's next ``size`` bytes, or raise a ConvertError."""
    key = row["target_key"]
    src_row = by_key[row["tied_to"]] if row["how"] == "tied" else row
    start = cur.pos
    try:
        if row["status"] == "allowed_missing":
            t = missing_values[key].to(getattr(torch, row["target_dtype"])).contiguous().reshape(-1)
            n = t.numel() * t.element_size()
            if n == size and n:
                cur.emit_bytes(t.view(torch.uint8).numpy())
        else:
            n = cur.emit_array(row["target_dtype"], source_tensor(src_row, records))
    except WriteError:
        raise  # the disk, not this tensor: reported as a storage error
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise ConvertError(f"converting failed: {type(exc).__name__}: {exc}", key=key, fix="check this row in `np2torch plan`") from None
    if n != size or cur.pos - start != size:
        raise ConvertError("converted tensor has the wrong byte size", key=key, expected=size, actual=n)


def _hash_range(fd: int, sha: Any, a: int, b: int, buf: bytearray) -> None:
    """Fold bytes ``a:b`` of the file into ``sha``, read back from the page cache in cache-sized pieces."""
    while a < b:
        n = os.preadv(fd, [memoryview(buf)[: min(len(buf), b - a)]], a)
        if not n:
            raise OSError(f"the converted file ends at {a} bytes, before {b}")
        with memoryview(buf) as view, view[:n] as piece:
            sha.update(piece)
        a += n


def _write_file(fd: int, header: bytes, rows: list[dict[str, Any]], offsets: dict[str, tuple[int, int]], by_key: dict[str, dict[str, Any]],
                records: dict[str, ArrayRecord], missing_values: dict[str, torch.Tensor], pool: ThreadPoolExecutor,
                flusher: ThreadPoolExecutor, workers: int, progress: Callable[[int], None] | None) -> str:
    """Convert ``rows`` into the open file (its header already written); return its sha256."""
    sha, buf = hashlib.sha256(header), bytearray(_BLOCK)

    def produce(row: dict[str, Any]) -> None:
        a, b = offsets[row["target_key"]]
        _emit_row(row, by_key, records, missing_values, _Cursor(fd, a), b - a)

    window: deque = deque()  # tensors in flight, in file order
    try:
        for row in [*rows, None]:
            if row is not None:
                window.append((pool.submit(produce, row), offsets[row["target_key"]]))
            while window and (len(window) > 2 * workers or row is None):
                fut, (a, b) = window.popleft()
                fut.result()
                _hash_range(fd, sha, a, b, buf)
                flusher.submit(start_writeback, fd, a, b - a)  # on its own thread: this one never waits for the disk queue
                if progress is not None:
                    progress(b - a)
    finally:
        for fut, _ in window:  # an error: no worker may still write into a file about to be closed
            if not fut.cancel():
                fut.exception()
    return sha.hexdigest()


def plan_shards(plan: Plan, max_shard_size: int) -> list[Plan]:
    """Split the tensors, in order, into shards of at most ``max_shard_size`` tensor bytes, as
    transformers' ``save_pretrained`` does (a tensor larger than that gets a shard of its own);
    one shard when ``max_shard_size`` is 0 or everything fits."""
    shards: list[Plan] = [[]]
    size = 0
    for t in plan:
        n = tensor_bytes(t[1], t[2])
        if max_shard_size and shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def write_converted(rows: list[dict[str, Any]], records: dict[str, ArrayRecord], out_path: Path, *,
                    missing_values: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None,
                    max_shard_size: int = 0, workers: int | None = None,
                    progress: Callable[[int], None] | None = None) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Write every target of the manifest into ``out_path`` (safetensors), or, when they exceed
    ``max_shard_size`` bytes (0: never), into ``model-0000K-of-0000N.safetensors`` beside it plus
    ``model.safetensors.index.json``. Returns the checkpoint's path (the file, or the index) and
    per-tensor info: dtype, shape, offsets (and ``file``, the shard, when sharded). ``progress``
    gets each tensor's bytes once written."""
    rows = target_rows(rows)
    by_key = {r["target_key"]: r for r in rows}
    plan = [(r.target_key, r.target_dtype, tuple(r.target_shape)) for r in rows]
    shards = plan_shards(plan, max_shard_size)
    names = [out_path.name] if len(shards) == 1 else [shard_name(i, len(shards)) for i in range(len(shards))]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    workers = workers or _default_workers()
    tensors: dict[str, dict[str, Any]] = {}
    done: list[tuple[Path, Path, str]] = []  # (temporary, final, sha256) of each complete file
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool, ThreadPoolExecutor(max_workers=1) as flusher:
            for name, shard in zip(names, shards, strict=True):
                header, offsets = plan_header(shard, metadata or {})
                tmp = out_path.with_name(f".{name}.{os.getpid()}.tmp")
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                done.append((tmp, out_path.with_name(name), ""))
                try:
                    reserve(fd, max([b for _, b in offsets.values()], default=len(header)))  # blocks allocated in one call
                    pwrite_all(fd, header, 0)  # the tensors follow the header back to back, in plan order
                    sel = [by_key[k] for k, _, _ in shard]
                    digest = _write_file(fd, header, sel, offsets, by_key, records, missing_values or {}, pool, flusher, workers, progress)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                done[-1] = (tmp, out_path.with_name(name), digest)
                where = {"file": name} if len(shards) > 1 else {}
                tensors.update({k: {"dtype": dt, "shape": list(shape), "offsets": list(offsets[k]), **where} for k, dt, shape in shard})
        for tmp, final, digest in done:
            os.replace(tmp, final)
            remember(final, "sha256", digest, own=True)
    except BaseException:
        for tmp, _, _ in done:
            tmp.unlink(missing_ok=True)
        raise
    if len(shards) == 1:
        return out_path, {k: tensors[k] for k, _, _ in plan}
    index = out_path.with_name(INDEX_NAME)
    weight_map = {k: names[i] for i, shard in enumerate(shards) for k, _, _ in shard}
    total = sum(tensor_bytes(dt, shape) for _, dt, shape in plan)
    atomic_write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    return index, {k: tensors[k] for k, _, _ in plan}
