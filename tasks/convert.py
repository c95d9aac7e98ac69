"""Stage 4, ``convert-to-device``: arrays + validated manifest + dtype/device → state dict.

Each target tensor is read from its memory-mapped source, transformed (views where possible),
cast once into a buffer the size of that one tensor and written at its offset in a safetensors
file whose header was planned from the manifest. Peak memory is therefore a few of the largest
tensors, not the model: worker threads cast ahead (a bounded window), this thread writes in
file order while a helper thread feeds the same bytes into the file's sha256 (so the cache
never re-reads the file to hash it). The file's blocks are allocated up front (``fallocate``),
write-back of each tensor starts as soon as it is written, and one ``fsync`` before the rename
makes the file durable (``NP2TORCH_WRITEBACK`` selects the other ways, measured in
bench/README.md). Per-tensor digests of the written bytes are not computed here: the export
links this very file, and only a copy (another file system) re-reads both to compare them. The file is then loaded into the model (built on ``meta``) on the
configured device with ``strict=True`` semantics: nothing missing, nothing unexpected, every
shape equal, and tied weights still tied.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from np2torch.tasks import transforms as T
from np2torch.tasks.bytework import pwrite_all, reserve, start_writeback
from np2torch.tasks.errors import ConvertError
from np2torch.tasks.fingerprint import remember
from np2torch.tasks.readers.access import ArrayRecord, open_array
from np2torch.tasks.manifest import target_rows
from np2torch.tasks.model import build_model, describe_targets, materialize_missing
from np2torch.tasks.progress import track
from np2torch.tasks.st_io import MappedSafetensors, np_dtype_for, plan_header
from np2torch.tasks.state_dict import check_device, load_into_model  # noqa: F401  (re-exported: tests and callers use them here)

__all__ = ["source_tensor", "write_converted", "load_into_model", "check_device", "convert_to_device"]


def source_tensor(row: dict[str, Any], records: dict[str, ArrayRecord]) -> np.ndarray:
    """The row's source array(s) after the transform: a view of the memory map where possible."""
    spec = json.loads(row["transform_spec"])
    sources = json.loads(row["sources"])
    if row["status"] == "zeros":
        return np.zeros(json.loads(row["target_shape"]), dtype=np.float32)
    parts = [T.apply(open_array(records[s]), spec) for s in sources]
    if row["concat"] != "":
        return np.concatenate([_native(p) for p in parts], axis=int(row["concat"]))
    return parts[0]


def _native(a: np.ndarray) -> np.ndarray:
    return a if a.dtype.isnative or a.dtype.byteorder == "|" else a.astype(a.dtype.newbyteorder("="))


def _cast_into(dst_dtype: str, src: np.ndarray, scratch: torch.Tensor | None = None) -> bytes | memoryview:
    """One pass: byte order, strides (transposes) and dtype, into a C-contiguous buffer.

    ``scratch`` (a uint8 tensor at least as large as the result) is reused instead of a fresh
    allocation: a fresh 64 MiB buffer costs 16k page faults, each zeroing a page in the kernel,
    which measured as most of the convert stage's time.
    """
    np_dt = np_dtype_for(dst_dtype)
    t_dt = getattr(torch, dst_dtype)
    nbytes = int(np.prod(src.shape, dtype=np.int64)) * (np_dt.itemsize if np_dt is not None else torch.empty(0, dtype=t_dt).element_size())
    if nbytes == 0:
        return b""
    raw = scratch[:nbytes] if scratch is not None and scratch.numel() >= nbytes else torch.empty(nbytes, dtype=torch.uint8)
    if np_dt is not None and (not src.dtype.isnative or src.dtype.kind == "b" or np_dt.kind == "b"):
        out = raw.numpy().view(np_dt).reshape(src.shape)
        np.copyto(out, src, casting="unsafe")
        return raw.numpy().data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only memmap: torch only reads it
        s = torch.from_numpy(np.asarray(src))
    raw.view(t_dt).view(tuple(src.shape)).copy_(s)  # torch's copy is blocked and multithreaded for transposed sources
    return raw.numpy().data


class _BufferPool:
    """A few reusable scratch buffers, each as large as the largest tensor: memory stays bounded
    by the window of tensors in flight, and pages are faulted in once, not once per tensor."""

    def __init__(self, n: int, nbytes: int):
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for _ in range(n if nbytes else 0):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8))
        self.enabled = nbytes > 0

    def get(self) -> torch.Tensor | None:
        return self._free.get() if self.enabled else None

    def put(self, buf: torch.Tensor | None) -> None:
        if buf is not None:
            self._free.put(buf)


_POOL_MIN_BYTES = 1 << 20  # tensors smaller than this are cheap to allocate


def _writeback_mode() -> str:
    """When the written bytes start going to disk (``NP2TORCH_WRITEBACK``).

    ``early`` (default): a helper thread starts write-back of each tensor once it is written,
    so the disk works while the next tensors are converted and the final ``fsync`` waits
    only for the tail. ``final``: everything stays in the page cache until that ``fsync``.
    ``per-tensor``: the writer itself starts write-back after each tensor (the first way,
    kept for comparison). All three give the same guarantee: nobody sees the file before its
    rename, and the rename follows the ``fsync``. Measured in bench/README.md.
    """
    mode = os.environ.get("NP2TORCH_WRITEBACK", "early")
    return mode if mode in ("early", "final", "per-tensor") else "early"


def _default_workers() -> int:
    """One tensor per worker: torch's transposed copy is already cache-blocked (single-threaded),
    so tensors in parallel use the cores (measured faster than tiling one tensor over threads).
    3 at most: memory is (workers + 2) buffers of the largest tensor."""
    return max(2, min(3, os.cpu_count() or 2))


def write_converted(rows: list[dict[str, Any]], records: dict[str, ArrayRecord], out_path: Path, *,
                    missing_values: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None,
                    workers: int | None = None, progress: Callable[[int], None] | None = None) -> dict[str, dict[str, Any]]:
    """Write every target of the manifest into ``out_path`` (safetensors); return per-tensor info
    (``progress`` gets each tensor's bytes once written)."""
    rows = target_rows(rows)
    by_key = {r["target_key"]: r for r in rows}
    missing_values = missing_values or {}
    plan = [(r["target_key"], r["target_dtype"], tuple(json.loads(r["target_shape"]))) for r in rows]
    header, offsets = plan_header(plan, metadata or {})
    total = max([b for _, b in offsets.values()], default=len(header))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    info: dict[str, dict[str, Any]] = {}
    sha = hashlib.sha256(header)  # the tensors follow the header back to back, in plan order
    writeback = _writeback_mode()

    largest = max([b - a for a, b in offsets.values()], default=0)
    workers = workers or _default_workers()
    window_size = max(1, workers)
    # casts in flight (window_size + 1) plus the one being written; small tensors skip the pool
    buffers = _BufferPool(window_size + 2, largest if largest >= _POOL_MIN_BYTES else 0)

    def cast(row: dict[str, Any]) -> tuple[str, bytes | memoryview, dict[str, Any], torch.Tensor | None]:
        key = row["target_key"]
        src_row = by_key[row["tied_to"]] if row["how"] == "tied" else row
        a, b = offsets[key]
        scratch = buffers.get() if b - a >= _POOL_MIN_BYTES else None
        try:
            if row["status"] == "allowed_missing":
                t = missing_values[key].to(getattr(torch, row["target_dtype"])).contiguous()
                buf = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
            else:
                buf = _cast_into(row["target_dtype"], source_tensor(src_row, records), scratch)
        except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
            buffers.put(scratch)
            raise ConvertError(f"converting failed: {type(exc).__name__}: {exc}", key=key, fix="check this row in `np2torch plan`") from None
        if len(buf) != b - a:
            buffers.put(scratch)
            raise ConvertError("converted tensor has the wrong byte size", key=key, expected=b - a, actual=len(buf))
        return key, buf, {"dtype": row["target_dtype"], "shape": json.loads(row["target_shape"]), "offsets": [a, b]}, scratch

    def write(key: str, buf: bytes | memoryview, meta: dict[str, Any], scratch: torch.Tensor | None) -> None:
        a, b = offsets[key]
        hashed = hasher.submit(sha.update, buf)  # the file's sha256 runs while the bytes are written
        pwrite_all(fd, buf, a)
        hashed.result()
        if writeback == "per-tensor":
            start_writeback(fd, a, b - a)
        elif writeback == "early":  # on its own thread: the writer never waits for the disk queue
            flusher.submit(start_writeback, fd, a, b - a)
        info[key] = meta
        del buf
        buffers.put(scratch)
        if progress is not None:
            progress(b - a)

    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        reserve(fd, total)  # blocks allocated in one call: writing into them is then ~6x cheaper (bytework)
        pwrite_all(fd, header, 0)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, ThreadPoolExecutor(max_workers=1) as hasher, \
                ThreadPoolExecutor(max_workers=1) as flusher:
            window: deque = deque()  # casts in flight, in file order; bounded so memory stays bounded
            for row in rows:
                window.append(pool.submit(cast, row))
                if len(window) > window_size:
                    write(*window.popleft().result())
            while window:
                write(*window.popleft().result())
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, out_path)
        remember(out_path, "sha256", sha.hexdigest(), own=True)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return {k: info[k] for k, _, _ in plan}


def _target_bytes(row: dict[str, Any]) -> int:
    itemsize = torch.empty(0, dtype=getattr(torch, row["target_dtype"])).element_size()
    return int(np.prod(json.loads(row["target_shape"]), dtype=np.int64)) * itemsize


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
