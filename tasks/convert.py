"""Stage 4, ``convert-to-device``: arrays + validated manifest + dtype/device → state dict.

Every target tensor is read from its memory-mapped source, transformed and cast into a
safetensors file (or a set of shards above ``export.max_shard_size``) by the streamed writer
(:mod:`np2torch.tasks.st_write`), with the export's header planned up front so that export links
these very files. The checkpoint is then loaded into the model (built on ``meta``) on the
configured device with ``strict=True`` semantics: nothing missing, nothing unexpected, every
shape equal, and tied weights still tied.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from np2torch.tasks.manifest import ManifestRow, target_rows
from np2torch.tasks.model import build_model, describe_targets, materialize_missing
from np2torch.tasks.progress import track
from np2torch.tasks.readers.access import ArrayRecord
from np2torch.tasks.st_io import MappedSafetensors, checkpoint_files, tensor_bytes
from np2torch.tasks.st_write import write_converted
from np2torch.tasks.state_dict import check_device, load_into_model

__all__ = ["convert_to_device", "to_cuda_pinned"]


def convert_to_device(rows: list[ManifestRow], records: list[ArrayRecord], *, model_target: str, model_kwargs: dict[str, Any],
                      device: str, out_path: Path, metadata: dict[str, str] | None = None, allow_unsafe_load: bool = False,
                      max_shard_size: int = 0, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the converted tensors and prove they load strictly into the model on ``device``.

    Above ``max_shard_size`` bytes (0: never) the tensors go into shards beside ``out_path`` and
    the record's ``path`` is their index (``model.safetensors.index.json``), ``files`` the shards.

    ``progress`` gets the bytes written, tensor by tensor (a terminal bar and the run's UI
    progress artifact follow the same count, see :mod:`np2torch.tasks.progress`).
    """
    dev = check_device(device)
    rec_by_key = {r.key: r for r in records}
    missing_keys = [r.target_key for r in target_rows(rows) if r.status == "allowed_missing"]
    missing_values = materialize_missing(model_target, model_kwargs, missing_keys, allow_unsafe_load=allow_unsafe_load)
    total = sum(tensor_bytes(r.target_dtype, r.target_shape) for r in target_rows(rows))
    with track("convert-to-device", "convert-to-device", total, unit="B", progress=progress) as cb:
        path, tensors = write_converted(rows, rec_by_key, out_path, missing_values=missing_values, metadata=metadata,
                                        max_shard_size=max_shard_size, progress=cb)
    files = checkpoint_files(path)
    model = build_model(model_target, model_kwargs, allow_unsafe_load=allow_unsafe_load)
    targets = describe_targets(model)
    mapped = MappedSafetensors(path)
    transfer: dict[str, Any] = {}
    state = mapped.state
    if dev.type == "cuda":
        state, transfer = to_cuda_pinned(mapped, dev)
    elif dev.type != "cpu":
        state = {k: v.to(dev) for k, v in state.items()}
    load_into_model(model, state, targets)
    placed = {str(p.device) for p in model.state_dict().values()}
    del model, state, mapped
    return {"path": str(path), "bytes": sum(f.stat().st_size for f in files), "device": str(dev), "placed_on": sorted(placed),
            "tensors": tensors, "n_tensors": len(tensors), **({"files": [f.name for f in files]} if path != out_path else {}), **transfer}


def to_cuda_pinned(mapped: MappedSafetensors, dev: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Copy every tensor to the GPU through two reused pinned buffers (bounded host memory).

    Pinning the whole state dict would double its host footprint; here one buffer is filled
    from the memory map while the other's asynchronous copy runs.
    """
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
