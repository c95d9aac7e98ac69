"""Stage 4, ``convert-to-device``: arrays + validated manifest + dtype/device → state dict.

Each target tensor is read from its memory-mapped source, transformed (views where possible),
cast once into a buffer the size of that one tensor and written at its offset in a safetensors
file whose header was planned from the manifest. Peak memory is therefore a few of the largest
tensors, not the model: worker threads cast ahead (a bounded window), this thread writes in
file order, feeding the file's sha256 as it goes (so the cache never re-reads the file to hash
it) and asking the kernel to start writing back each tensor at once (so the final fsync has
little left to wait for). The file is then loaded into the model (built on ``meta``) on the
configured device with ``strict=True`` semantics: nothing missing, nothing unexpected, every
shape equal, and tied weights still tied.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import queue
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from np2torch.tasks import transforms as T
from np2torch.tasks.errors import ConvertError, Problem
from np2torch.tasks.fingerprint import blake3_bytes, remember
from np2torch.tasks.load_arrays import ArrayRecord, open_array
from np2torch.tasks.manifest import target_rows
from np2torch.tasks.model import TargetInfo, build_model, describe_targets, finish_load, materialize_missing
from np2torch.tasks.st_io import MappedSafetensors, np_dtype_for, plan_header

__all__ = ["source_tensor", "write_converted", "load_into_model", "check_device", "convert_to_device"]


def check_device(device: str) -> torch.device:
    """The torch device, or a ConvertError saying why it is not available here."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConvertError("CUDA is not available on this machine", key="convert.device", expected="a visible CUDA GPU", actual="none",
                               fix="use --set convert.device=cpu, or run on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConvertError(f"there is no {device}", key="convert.device", expected=f"cuda:0..cuda:{torch.cuda.device_count() - 1}", actual=device)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConvertError("MPS is not available on this machine", key="convert.device", fix="use --set convert.device=cpu")
    return dev


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


def _libc_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_POOL_MIN_BYTES = 1 << 20  # tensors smaller than this are cheap to allocate
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing these bytes to disk now, without waiting (Linux); fsync later waits for less."""
    if _SYNC_FILE_RANGE is not None and length:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _pwrite_all(fd: int, buf: bytes | memoryview, offset: int) -> None:
    view = memoryview(buf).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_converted(rows: list[dict[str, Any]], records: dict[str, ArrayRecord], out_path: Path, *,
                    missing_values: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None,
                    workers: int = 2) -> dict[str, dict[str, Any]]:
    """Write every target of the manifest into ``out_path`` (safetensors); return per-tensor info."""
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

    largest = max([b - a for a, b in offsets.values()], default=0)
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
        return key, buf, {"dtype": row["target_dtype"], "shape": json.loads(row["target_shape"]), "blake3": blake3_bytes(buf), "offsets": [a, b]}, scratch

    def write(key: str, buf: bytes | memoryview, meta: dict[str, Any], scratch: torch.Tensor | None) -> None:
        a, b = offsets[key]
        _pwrite_all(fd, buf, a)
        sha.update(buf)
        _start_writeback(fd, a, b - a)
        info[key] = meta
        del buf
        buffers.put(scratch)

    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)
        _pwrite_all(fd, header, 0)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
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


def load_into_model(model: nn.Module, state: dict[str, torch.Tensor], targets: list[TargetInfo]) -> nn.Module:
    """``load_state_dict(strict=True, assign=True)`` that keeps tied weights tied.

    ``assign=True`` replaces parameters instead of copying into them (no second allocation),
    which would untie shared weights; ties are restored to the first key's tensor afterwards.
    """
    tied = {t.key: t.tied_to for t in targets if t.tied_to}
    expected = {t.key: t for t in targets}
    problems = []
    for k in expected:
        if k not in state:
            problems.append(Problem(k, "missing from the converted state dict", fix="map it or allow it with mapping.allow_missing"))
    for k in state:
        if k not in expected:
            problems.append(Problem(k, "unexpected key: the model has no such tensor", fix="ignore its source with mapping.ignore"))
    for k, t in expected.items():
        if k in state and tuple(state[k].shape) != t.shape:
            problems.append(Problem(k, "shape differs from the model's", expected=list(t.shape), actual=list(state[k].shape),
                                    fix="fix the transform for this key"))
    if problems:
        raise ConvertError(f"the converted state dict does not load strictly ({len(problems)} problem(s))", key=problems[0]["key"], problems=problems,
                           fix=problems[0]["fix"])
    sd = {k: v for k, v in state.items() if k not in tied}
    result = model.load_state_dict(sd, strict=False, assign=True)
    left = [k for k in result.missing_keys if k not in tied]
    if left or result.unexpected_keys:
        raise ConvertError("load_state_dict reported problems", key=(left + result.unexpected_keys)[0], expected="no missing/unexpected keys",
                           actual={"missing": left, "unexpected": result.unexpected_keys})
    for key, first in tied.items():
        mod_path, _, name = key.rpartition(".")
        src_path, _, src_name = first.rpartition(".")
        target_mod = model.get_submodule(mod_path) if mod_path else model
        src_mod = model.get_submodule(src_path) if src_path else model
        setattr(target_mod, name, getattr(src_mod, src_name))
    # the constructor's non-persistent buffers join the loaded tensors' device; nothing stays on meta
    return finish_load(model, next(iter(state.values())).device if state else "cpu")


def convert_to_device(rows: list[dict[str, Any]], records: list[ArrayRecord], *, model_target: str, model_kwargs: dict[str, Any],
                      device: str, out_path: Path, metadata: dict[str, str] | None = None, allow_unsafe_load: bool = False) -> dict[str, Any]:
    """Write the converted tensors and prove they load strictly into the model on ``device``."""
    dev = check_device(device)
    rec_by_key = {r.key: r for r in records}
    missing_keys = [r["target_key"] for r in target_rows(rows) if r["status"] == "allowed_missing"]
    missing_values = materialize_missing(model_target, model_kwargs, missing_keys, allow_unsafe_load=allow_unsafe_load)
    tensors = write_converted(rows, rec_by_key, out_path, missing_values=missing_values, metadata=metadata)
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
