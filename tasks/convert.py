"""Stage 4, ``convert-to-device``: arrays + validated manifest + dtype/device → state dict.

Each target tensor is read from its memory-mapped source, transformed (views where possible),
cast once into a buffer the size of that one tensor and written at its offset in a safetensors
file whose header was planned from the manifest. Peak memory is therefore about the largest
tensor, not the model. The file is then loaded into the model (built on ``meta``) on the
configured device with ``strict=True`` semantics: nothing missing, nothing unexpected, every
shape equal, and tied weights still tied.
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks import transforms as T
from tasks.errors import ConvertError, Problem
from tasks.fingerprint import blake3_bytes
from tasks.load_arrays import ArrayRecord, open_array
from tasks.manifest import target_rows
from tasks.model import TargetInfo, build_model, describe_targets, materialize_missing
from tasks.st_io import mmap_state_dict, np_dtype_for, plan_header

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


def _cast_into(dst_dtype: str, src: np.ndarray) -> bytes | memoryview:
    """One pass: byte order, strides (transposes) and dtype, into a fresh C-contiguous buffer."""
    np_dt = np_dtype_for(dst_dtype)
    if np_dt is not None and (not src.dtype.isnative or src.dtype.kind == "b" or np_dt.kind == "b"):
        out = np.empty(src.shape, dtype=np_dt)
        np.copyto(out, src, casting="unsafe")
        return memoryview(out).cast("B") if out.size else b""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only memmap: torch only reads it
        s = torch.from_numpy(np.asarray(src))
    out_t = torch.empty(tuple(src.shape), dtype=getattr(torch, dst_dtype))
    out_t.copy_(s)  # torch's copy is blocked and multithreaded for transposed sources
    return out_t.reshape(-1).view(torch.uint8).numpy().data if out_t.numel() else b""


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

    def one(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        key = row["target_key"]
        src_row = by_key[row["tied_to"]] if row["how"] == "tied" else row
        try:
            if row["status"] == "allowed_missing":
                t = missing_values[key].to(getattr(torch, row["target_dtype"])).contiguous()
                buf = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
            else:
                buf = _cast_into(row["target_dtype"], source_tensor(src_row, records))
        except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
            raise ConvertError(f"converting failed: {type(exc).__name__}: {exc}", key=key, fix="check this row in `np2torch plan`") from None
        a, b = offsets[key]
        if len(buf) != b - a:
            raise ConvertError("converted tensor has the wrong byte size", key=key, expected=b - a, actual=len(buf))
        os.pwrite(fd, buf, a)
        return key, {"dtype": row["target_dtype"], "shape": json.loads(row["target_shape"]), "blake3": blake3_bytes(buf), "offsets": [a, b]}

    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)
        os.pwrite(fd, header, 0)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for key, meta in pool.map(one, rows):
                info[key] = meta
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, out_path)
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
    return model


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
    state = mmap_state_dict(out_path)
    if dev.type != "cpu":
        state = {k: v.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else v.to(dev) for k, v in state.items()}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    load_into_model(model, state, targets)
    placed = {str(p.device) for p in model.state_dict().values()}
    del model, state
    return {"path": str(out_path), "bytes": out_path.stat().st_size, "device": str(dev), "placed_on": sorted(placed), "tensors": tensors,
            "n_tensors": len(tensors)}
