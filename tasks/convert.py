"""Stage 4, ``convert-to-device``: arrays + validated manifest + dtype/device → state dict.

Each target tensor is read from its memory-mapped source, transformed (views where possible)
and written into a safetensors file whose header was planned from the manifest. By default
worker threads convert one tensor each, a cache-sized block of rows at a time (a block of a
transposed matrix: its columns gathered, then transposed in cache), and write each block with
``pwrite`` while it is still in cache, which on the benchmark VM costs a fraction of writing a
whole tensor from memory; this thread folds each finished tensor into the file's sha256 in file
order, read back from the page cache (the cache entry is never re-read from disk to hash it),
and starts its write-back, so the one ``fsync`` before the rename waits only for the tail.
Memory stays at one block per worker whatever the model size. The file's blocks are allocated up front
(``fallocate``). ``NP2TORCH_CONVERT_WRITE=map`` converts whole tensors in parallel straight into
a shared map of the file instead, and ``NP2TORCH_WRITEBACK`` selects when write-back starts; both
are kept to compare (bench/README.md). Per-tensor digests of the written bytes are not computed:
the export links this very file, and only a copy (another file system) re-reads both to compare
them. The file is then loaded into the model (built on ``meta``) on the
configured device with ``strict=True`` semantics: nothing missing, nothing unexpected, every
shape equal, and tied weights still tied.
"""

from __future__ import annotations

import hashlib
import os
import mmap
import threading
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from np2torch.tasks import transforms as T
from np2torch.tasks import bytework
from np2torch.tasks.bytework import WriteError, pwrite_all, reserve, start_writeback
from np2torch.tasks.errors import ConvertError
from np2torch.tasks.fingerprint import remember
from np2torch.tasks.readers.access import ArrayRecord, open_array
from np2torch.tasks.manifest import ManifestRow, target_rows
from np2torch.tasks.model import build_model, describe_targets, materialize_missing
from np2torch.tasks.progress import track
from np2torch.tasks.st_io import MappedSafetensors, np_dtype_for, plan_header
from np2torch.tasks.state_dict import check_device, load_into_model  # noqa: F401  (re-exported: tests and callers use them here)

__all__ = ["source_tensor", "write_converted", "load_into_model", "check_device", "convert_to_device"]


def source_tensor(row: ManifestRow, records: dict[str, ArrayRecord]) -> np.ndarray:
    """The row's source array(s) after the transform: a view of the memory map where possible."""
    spec, sources = row.transform_spec, row.sources
    if row.status == "zeros":
        return np.zeros(row.target_shape, dtype=np.float32)
    parts = [T.apply(open_array(records[s]), spec) for s in sources]
    if row["concat"] != "":
        return np.concatenate([_native(p) for p in parts], axis=int(row["concat"]))
    return parts[0]


def _native(a: np.ndarray) -> np.ndarray:
    return a if a.dtype.isnative or a.dtype.byteorder == "|" else a.astype(a.dtype.newbyteorder("="))


def _cast_to(dst_dtype: str, src: np.ndarray, out: torch.Tensor) -> int:
    """One pass: byte order, strides (transposes) and dtype, straight into ``out`` (a uint8
    tensor over the tensor's bytes in the output file's map); returns the byte size the result
    has, and writes nothing when that is not ``out``'s size (the caller reports it)."""
    np_dt = np_dtype_for(dst_dtype)
    t_dt = getattr(torch, dst_dtype)
    itemsize = np_dt.itemsize if np_dt is not None else torch.empty(0, dtype=t_dt).element_size()
    nbytes = int(np.prod(src.shape, dtype=np.int64)) * itemsize
    if nbytes == 0 or nbytes != out.numel():
        return nbytes
    if out.data_ptr() % itemsize:  # a tensor after an odd-sized one is not aligned for its dtype: cast beside, then copy
        tmp = torch.empty(nbytes, dtype=torch.uint8)
        _cast_to(dst_dtype, src, tmp)
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


_BLOCK = 512 << 10  # bytes of output converted and written at a time (fits a core's L2 cache)
_SMALL_COPY = 2 << 20  # up to this size, a copy without a cast runs in NumPy
_TORCH_BLOCK = 32767  # elements: a cast block below torch's grain size stays on one thread
_LOCAL = threading.local()


def _tmp(dtype: np.dtype, shape: tuple[int, int]) -> np.ndarray:
    """This thread's reusable small matrix for the two-step transpose."""
    key = (dtype, shape)
    cache = getattr(_LOCAL, "tmp", None)
    if cache is None or cache[0] != key:
        cache = _LOCAL.tmp = (key, np.empty(shape, dtype=dtype))
    return cache[1]


def _writeback_mode() -> str:
    """When the written bytes start going to disk (``NP2TORCH_WRITEBACK``).

    ``early`` (default): a helper thread starts write-back of each tensor once it is written
    and hashed, so the disk works while the next tensors are converted and the final ``fsync``
    waits only for the tail. ``final``: everything stays in the page cache until that ``fsync``.
    ``per-tensor``: the writing thread itself starts write-back after each tensor (the first
    way, kept for comparison). All three give the same guarantee: nobody sees the file before
    its rename, and the rename follows the ``fsync``. Measured in bench/README.md.
    """
    mode = os.environ.get("NP2TORCH_WRITEBACK", "early")
    return mode if mode in ("early", "final", "per-tensor") else "early"


def _default_workers() -> int:
    """One tensor per worker: a transpose is single-threaded (torch's thread pool costs more than
    it gives on cache-sized blocks), so tensors in parallel use the cores. 3 at most: the
    writes into the page cache, not the cores, bound it beyond that on the benchmark VM."""
    return max(2, min(3, os.cpu_count() or 2))


def _convert_row(row: dict[str, Any], by_key: dict[str, dict[str, Any]], records: dict[str, ArrayRecord],
                 missing_values: dict[str, torch.Tensor], out: torch.Tensor) -> None:
    """Convert one manifest row into ``out`` (its bytes in the output), or raise a ConvertError."""
    key = row["target_key"]
    src_row = by_key[row["tied_to"]] if row["how"] == "tied" else row
    try:
        if row["status"] == "allowed_missing":
            t = missing_values[key].to(getattr(torch, row["target_dtype"])).contiguous().reshape(-1)
            n = t.numel() * t.element_size()
            if n == out.numel() and n:
                out.copy_(t.view(torch.uint8))
        else:
            n = _cast_to(row["target_dtype"], source_tensor(src_row, records), out)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise ConvertError(f"converting failed: {type(exc).__name__}: {exc}", key=key, fix="check this row in `np2torch plan`") from None
    if n != out.numel():
        raise ConvertError("converted tensor has the wrong byte size", key=key, expected=out.numel(), actual=n)


_POOL_MIN_BYTES = 1 << 20  # without a map, tensors at least this large reuse a few scratch buffers
_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault a range in, writable, in one call (older kernels: EINVAL, ignored)


def _map_output(fd: int, total: int) -> mmap.mmap | None:
    """A shared writable map of the output file; None where the file system cannot give one."""
    try:
        return mmap.mmap(fd, total)
    except (OSError, ValueError):
        return None


class _Output:
    """The output file's bytes as a shared writable map: workers convert each tensor straight into
    its place (no scratch buffer, no ``pwrite`` copy), this thread hashes each finished tensor
    from the map in file order, starts its write-back and drops its pages from the process (they
    stay in the page cache, dirty, until written). Where the file cannot be mapped writable (or
    with ``NP2TORCH_CONVERT_WRITE=pwrite``, kept to compare: measured slower at 1.6 GB, see
    bench/README.md) each tensor is converted into a reused scratch buffer and written with ``pwrite``."""

    def __init__(self, fd: int, total: int, header: bytes, largest: int) -> None:
        self.fd, self.sha, self.writeback = fd, hashlib.sha256(header), _writeback_mode()
        self.mm = _map_output(fd, total) if os.environ.get("NP2TORCH_CONVERT_WRITE") == "map" else None
        self.largest, self._free, self._lock = largest, [], threading.Lock()

    def region(self, a: int, b: int) -> torch.Tensor:
        if self.mm is None and b - a >= _POOL_MIN_BYTES:
            with self._lock:
                buf = self._free.pop() if self._free else None
            return (buf if buf is not None else torch.empty(self.largest, dtype=torch.uint8))[: b - a]
        if self.mm is None or b <= a:
            return torch.empty(b - a, dtype=torch.uint8)
        try:  # the pages in one call instead of one fault per page (the same kernel work, fewer traps)
            start = a - a % mmap.PAGESIZE
            self.mm.madvise(_MADV_POPULATE_WRITE, start, b - start)
        except OSError:
            pass
        return torch.frombuffer(self.mm, dtype=torch.uint8, count=b - a, offset=a)

    def finish(self, out: torch.Tensor, a: int, b: int, flusher: ThreadPoolExecutor) -> None:
        """``out`` (from :meth:`region`) holds the tensor's bytes: hash, write, start write-back, release."""
        if b <= a:
            return
        if self.mm is None:
            view = out.numpy().data
            pwrite_all(self.fd, view, a)
            self.sha.update(view)
            if b - a >= _POOL_MIN_BYTES:
                with self._lock:
                    self._free.append(out._base if out._base is not None else out)
        else:
            with memoryview(self.mm) as whole, whole[a:b] as view:
                self.sha.update(view)  # from the page cache: what the file holds
        if self.writeback == "per-tensor":
            start_writeback(self.fd, a, b - a)
        elif self.writeback == "early":  # on its own thread: this one never waits for the disk queue
            flusher.submit(start_writeback, self.fd, a, b - a)
        if self.mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            start = a - a % mmap.PAGESIZE  # a page shared with the next tensor faults back in if it is still written
            self.mm.madvise(mmap.MADV_DONTNEED, start, b - start)

    def close(self, *, flush: bool = True) -> None:
        if self.mm is not None:
            try:
                if flush:
                    self.mm.flush()  # msync: the POSIX way to hand mapped writes to the file (fsync follows)
                self.mm.close()
            except BufferError:  # a view still alive (an error's traceback): unmapped when collected
                pass


def _emit_array(dst_dtype: str, src: np.ndarray, w: Any, views: dict[int, torch.Tensor]) -> int:
    """Convert ``src`` into the file's next bytes, block by block (rows of the result at a
    time, each block cast into a buffer of ``w`` and written while still in cache); returns the
    byte size the result has, having written nothing when that is not what the plan expects."""
    np_dt = np_dtype_for(dst_dtype)
    itemsize = np_dt.itemsize if np_dt is not None else torch.empty(0, dtype=getattr(torch, dst_dtype)).element_size()
    nbytes = int(np.prod(src.shape, dtype=np.int64)) * itemsize
    block = w.block if np_dt is not None and src.dtype == np_dt else min(w.block, _TORCH_BLOCK * itemsize)
    if nbytes <= block or src.ndim == 0:
        return _emit_block(dst_dtype, src, w, views, nbytes)
    rows = src.shape[0]
    rowbytes = nbytes // rows
    if rowbytes > block:  # a row larger than a block: each row on its own, in blocks
        return sum(_emit_array(dst_dtype, src[i], w, views) for i in range(rows))
    step = block // rowbytes
    return sum(_emit_block(dst_dtype, src[r : r + step], w, views, rowbytes * min(step, rows - r)) for r in range(0, rows, step))


def _emit_bytes(data: np.ndarray, w: Any) -> None:
    """Write these bytes (uint8) as the file's next ones, through the writer's buffers."""
    for i in range(0, data.size, w.block):
        buf = w.get()
        piece = data[i : i + w.block]
        memoryview(buf)[: piece.size] = piece.data
        w.put(buf, piece.size)


def _emit_block(dst_dtype: str, part: np.ndarray, w: Any, views: dict[int, torch.Tensor], n: int) -> int:
    if n > w.block:  # a scalar larger than a block (only with tiny test blocks): cast beside, then copy
        tmp = torch.empty(n, dtype=torch.uint8)
        got = _cast_to(dst_dtype, part, tmp)
        if got == n:
            _emit_bytes(tmp.numpy(), w)
        return got
    buf = w.get()
    out = views.get(id(buf))
    if out is None:
        out = views[id(buf)] = torch.frombuffer(buf, dtype=torch.uint8)
    try:
        got = _cast_to(dst_dtype, part, out[:n])
    except BaseException:
        w.put(buf, 0)
        raise
    w.put(buf, n if got == n else 0)
    return got


def _emit_row(row: dict[str, Any], by_key: dict[str, dict[str, Any]], records: dict[str, ArrayRecord],
              missing_values: dict[str, torch.Tensor], w: Any, views: dict[int, torch.Tensor], size: int) -> None:
    """Write one manifest row's tensor as the file's next ``size`` bytes, or raise a ConvertError."""
    key = row["target_key"]
    src_row = by_key[row["tied_to"]] if row["how"] == "tied" else row
    start = w.pos
    try:
        if row["status"] == "allowed_missing":
            t = missing_values[key].to(getattr(torch, row["target_dtype"])).contiguous().reshape(-1)
            n = t.numel() * t.element_size()
            if n == size and n:
                _emit_bytes(t.view(torch.uint8).numpy(), w)
        else:
            n = _emit_array(row["target_dtype"], source_tensor(src_row, records), w, views)
    except WriteError:
        raise  # the disk, not this tensor: reported as a storage error
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise ConvertError(f"converting failed: {type(exc).__name__}: {exc}", key=key, fix="check this row in `np2torch plan`") from None
    if n != size or w.pos - start != size:
        raise ConvertError("converted tensor has the wrong byte size", key=key, expected=size, actual=n)


class _Cursor:
    """One tensor's bytes, written front to back from a cache-sized block of this thread's."""

    def __init__(self, fd: int, pos: int) -> None:
        self.fd, self.pos, self.block = fd, pos, _BLOCK
        local = getattr(_LOCAL, "block", None)
        if local is None or len(local[0]) != _BLOCK:
            buf = bytearray(_BLOCK)
            local = _LOCAL.block = (buf, {id(buf): torch.frombuffer(buf, dtype=torch.uint8)})
        self._buf, self.views = local

    def get(self) -> bytearray:
        return self._buf

    def put(self, buf: bytearray, n: int) -> None:
        if n:
            try:
                bytework.pwrite_all(self.fd, memoryview(buf)[:n], self.pos)
            except OSError as exc:
                raise WriteError(exc.errno, exc.strerror) from exc
            self.pos += n


def _hash_range(fd: int, sha: Any, a: int, b: int, buf: bytearray) -> None:
    """Fold bytes ``a:b`` of the file into ``sha``, read back from the page cache in cache-sized pieces."""
    while a < b:
        n = os.preadv(fd, [memoryview(buf)[: min(len(buf), b - a)]], a)
        if not n:
            raise OSError(f"the converted file ends at {a} bytes, before {b}")
        with memoryview(buf) as view, view[:n] as piece:
            sha.update(piece)
        a += n


def _write_streamed(fd: int, header: bytes, rows: list[dict[str, Any]], offsets: dict[str, tuple[int, int]], by_key: dict[str, dict[str, Any]],
                    records: dict[str, ArrayRecord], missing_values: dict[str, torch.Tensor], workers: int,
                    progress: Callable[[int], None] | None) -> str:
    """The default write: worker threads convert one tensor each, a block of rows at a time, and
    write each block at once (while it is still in cache); this thread hashes each finished
    tensor in file order, read back from the page cache, and starts its write-back. Returns the sha256."""
    sha, writeback, buf = hashlib.sha256(header), _writeback_mode(), bytearray(_BLOCK)

    def produce(row: dict[str, Any]) -> None:
        a, b = offsets[row["target_key"]]
        cur = _Cursor(fd, a)
        _emit_row(row, by_key, records, missing_values, cur, cur.views, b - a)

    with ThreadPoolExecutor(max_workers=workers) as pool, ThreadPoolExecutor(max_workers=1) as flusher:
        window: deque = deque()  # tensors in flight, in file order
        for row in [*rows, None]:
            if row is not None:
                window.append((pool.submit(produce, row), offsets[row["target_key"]]))
            while window and (len(window) > 2 * workers or row is None):
                fut, (a, b) = window.popleft()
                fut.result()
                _hash_range(fd, sha, a, b, buf)
                if writeback == "early":
                    flusher.submit(start_writeback, fd, a, b - a)
                elif writeback == "per-tensor":
                    start_writeback(fd, a, b - a)
                if progress is not None:
                    progress(b - a)
    return sha.hexdigest()


def _write_mapped(fd: int, total: int, header: bytes, rows: list[dict[str, Any]], offsets: dict[str, tuple[int, int]],
                  by_key: dict[str, dict[str, Any]], records: dict[str, ArrayRecord], missing_values: dict[str, torch.Tensor],
                  workers: int, progress: Callable[[int], None] | None) -> str:
    """``NP2TORCH_CONVERT_WRITE=map|pwrite``: whole tensors in parallel, straight into a map of the
    output (or into scratch buffers, then ``pwrite``), hashed in file order. Returns the sha256."""
    output = _Output(fd, total, header, max([b - a for a, b in offsets.values()], default=0))

    def convert_one(row: dict[str, Any]) -> torch.Tensor:
        out = output.region(*offsets[row["target_key"]])
        _convert_row(row, by_key, records, missing_values, out)
        return out

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool, ThreadPoolExecutor(max_workers=1) as flusher:
            window: deque = deque()  # conversions in flight, in file order; bounded so memory stays bounded
            for row in [*rows, None]:
                if row is not None:
                    window.append((pool.submit(convert_one, row), offsets[row["target_key"]]))
                while window and (len(window) > workers or row is None):
                    fut, (a, b) = window.popleft()
                    output.finish(fut.result(), a, b, flusher)
                    del fut  # it holds the tensor over the map until dropped
                    if progress is not None:
                        progress(b - a)
        output.close()
    except BaseException:
        output.close(flush=False)
        raise
    return output.sha.hexdigest()


def write_converted(rows: list[dict[str, Any]], records: dict[str, ArrayRecord], out_path: Path, *,
                    missing_values: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None,
                    workers: int | None = None, progress: Callable[[int], None] | None = None) -> dict[str, dict[str, Any]]:
    """Write every target of the manifest into ``out_path`` (safetensors); return per-tensor info
    (``progress`` gets each tensor's bytes once written)."""
    rows = target_rows(rows)
    by_key = {r["target_key"]: r for r in rows}
    plan = [(r.target_key, r.target_dtype, tuple(r.target_shape)) for r in rows]
    header, offsets = plan_header(plan, metadata or {})
    total = max([b for _, b in offsets.values()], default=len(header))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    workers = workers or _default_workers()

    how = os.environ.get("NP2TORCH_CONVERT_WRITE", "stream")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        reserve(fd, total)  # blocks allocated in one call (bytework)
        pwrite_all(fd, header, 0)  # the tensors follow the header back to back, in plan order
        if how in ("map", "pwrite"):
            digest = _write_mapped(fd, total, header, rows, offsets, by_key, records, missing_values or {}, workers, progress)
        else:
            digest = _write_streamed(fd, header, rows, offsets, by_key, records, missing_values or {}, workers, progress)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, out_path)
        remember(out_path, "sha256", digest, own=True)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return {k: {"dtype": dt, "shape": list(shape), "offsets": list(offsets[k])} for k, dt, shape in plan}


def _target_bytes(row: dict[str, Any]) -> int:
    itemsize = torch.empty(0, dtype=getattr(torch, row["target_dtype"])).element_size()
    return int(np.prod(row.target_shape, dtype=np.int64)) * itemsize


def convert_to_device(rows: list[dict[str, Any]], records: list[ArrayRecord], *, model_target: str, model_kwargs: dict[str, Any],
                      device: str, out_path: Path, metadata: dict[str, str] | None = None, allow_unsafe_load: bool = False,
                      progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the converted tensors and prove they load strictly into the model on ``device``.

    ``progress`` gets the bytes written, tensor by tensor (a terminal bar and the run's UI
    progress artifact follow the same count, see :mod:`np2torch.tasks.progress`).
    """
    dev = check_device(device)
    rec_by_key = {r.key: r for r in records}
    missing_keys = [r["target_key"] for r in target_rows(rows) if r["status"] == "allowed_missing"]
    missing_values = materialize_missing(model_target, model_kwargs, missing_keys, allow_unsafe_load=allow_unsafe_load)
    total = sum(_target_bytes(r) for r in target_rows(rows))
    with track("convert-to-device", "convert-to-device", total, unit="B", progress=progress) as cb:
        tensors = write_converted(rows, rec_by_key, out_path, missing_values=missing_values, metadata=metadata, progress=cb)
    model = build_model(model_target, model_kwargs, allow_unsafe_load=allow_unsafe_load)
    targets = describe_targets(model)
    mapped = MappedSafetensors(out_path)
    transfer: dict[str, Any] = {}
    state = mapped.state
    if dev.type == "cuda":
        state, transfer = to_cuda_pinned(mapped, dev)
    elif dev.type != "cpu":
        state = {k: v.to(dev) for k, v in state.items()}
    load_into_model(model, state, targets)
    placed = {str(p.device) for p in model.state_dict().values()}
    del model, state, mapped
    return {"path": str(out_path), "bytes": out_path.stat().st_size, "device": str(dev), "placed_on": sorted(placed), "tensors": tensors,
            "n_tensors": len(tensors), **transfer}


def to_cuda_pinned(mapped: MappedSafetensors, dev: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Copy every tensor to the GPU through two reused pinned buffers (bounded host memory).

    Pinning the whole state dict would double its host footprint; here one buffer is filled
    from the memory map while the other's asynchronous copy runs.
    """
    import time

    sizes = [t.numel() * t.element_size() for t in mapped.state.values()]
    biggest = max(sizes, default=0)
    staging = [torch.empty(biggest, dtype=torch.uint8, pin_memory=True) for _ in range(2)] if biggest else []
    done = [torch.cuda.Event(), torch.cuda.Event()]
    used = [False, False]
    stream = torch.cuda.Stream(dev)
    out: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for i, (k, t) in enumerate(mapped.state.items()):
        n = t.numel() * t.element_size()
        if n == 0:
            out[k] = torch.empty(t.shape, dtype=t.dtype, device=dev)
            continue
        j = i % 2
        if used[j]:
            done[j].synchronize()  # the copy that last read this buffer has finished
        host = staging[j][:n]
        host.copy_(t.reshape(-1).view(torch.uint8))
        mapped.release([k])
        with torch.cuda.stream(stream):
            gpu = torch.empty(n, dtype=torch.uint8, device=dev)
            gpu.copy_(host, non_blocking=True)
            done[j].record(stream)
        used[j] = True
        out[k] = gpu.view(t.dtype).view(t.shape)
    stream.synchronize()
    seconds = time.perf_counter() - t0
    total = sum(sizes)
    return out, {"h2d_seconds": round(seconds, 4), "h2d_gb_per_s": round(total / 1e9 / seconds, 3) if seconds > 0 else None}
