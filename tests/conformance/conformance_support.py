"""What every conformance case does once the source framework has written its files.

A case writes the arrays exactly as the source framework stores them, an input and the source
framework's own output for it (the reference), then a config such as a README reader would
write: source, model, ``preset`` + ``strategy``, verify; no rules. Then:

1. ``plan`` without the reference: the rows only a reference can settle must be unverified and
   name their candidates;
2. the whole pipeline (six stages, plain functions) must exit cleanly and reproduce the reference;
3. the exported ``model.safetensors`` must load with a plain ``strict=True`` into a fresh model
   (another seed) and reproduce the reference there too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

RESULTS: dict[str, tuple[float, float, int]] = {}  # case → (verify max abs error, fresh-load max abs error, unverified rows)
EXPORT_RESULTS: dict[str, float] = {}  # Keras cases (keras_support): case → max abs error of the export loaded strictly into the torch port


def write_case(root: Path, *, name: str, arrays: dict[str, np.ndarray] | np.ndarray | bytes, inputs: np.ndarray,
               reference: list[np.ndarray], target: str, kwargs: dict[str, Any], preset: str, strategy: str = "auto", fmt: str = "auto",
               rtol: float = 1e-4, atol: float = 1e-5) -> Path:
    """The files a user has (weights, input, reference) and the config they would write."""
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(arrays, bytes):  # a Flax checkpoint: flax.serialization.to_bytes(variables)
        (root / "weights.msgpack").write_bytes(arrays)
        weights = "weights.msgpack"
    elif isinstance(arrays, np.ndarray):
        np.save(root / "weights.npy", arrays)
        weights = "weights.npy"
    else:
        np.savez(root / "weights.npz", **arrays)
        weights = "weights.npz"
    np.save(root / "input.npy", inputs)
    np.savez(root / "reference.npz", *reference)
    cfg = {
        "name": name,
        "source": {"path": weights, "format": fmt},
        "model": {"target": target, "kwargs": kwargs},
        "mapping": {"strategy": strategy, "preset": preset},
        "convert": {"dtype": "float32", "device": "cpu"},
        "verify": {"input": "input.npy", "reference_output": "reference.npz", "rtol": rtol, "atol": atol},
        "export": {"dir": "out", "formats": ["safetensors"]},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def plan_without_reference(config: Path) -> list[dict[str, Any]]:
    """What ``np2torch plan`` shows when the user has no reference output."""
    from np2torch.tasks import infer_mapping, load_arrays
    from np2torch.tasks.config import load_config

    cfg = load_config(config, ["verify.reference_output=null"])
    src = cfg.source
    records = load_arrays.scan_source(src.path, fmt=src.format, allow_pickle=src.allow_pickle, key_prefix=src.key_prefix)
    return infer_mapping.build_manifest(cfg, records)


def unverified(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {r["target_key"]: r["candidates"] for r in rows if r["target_key"] and r["status"] == "mapped" and not r["verified"]}


def check_case(config: Path, *, ambiguous: Callable[[str, tuple[int, ...]], bool], fresh_model: Callable[[], torch.nn.Module]) -> None:
    """Steps 1-3 above; ``ambiguous(target_key, target_shape)`` says which rows only a reference settles."""
    from safetensors.torch import load_file

    from np2torch.tasks.config import load_config
    from np2torch.tasks.stages import run_all

    rows = plan_without_reference(config)
    open_rows = unverified(rows)
    must = [r["target_key"] for r in rows
            if r["target_key"] and r["status"] == "mapped" and ambiguous(r["target_key"], tuple(r["target_shape"]))]
    assert must, "the case has no row that only a reference can settle: it tests nothing about layouts"
    settled_silently = [k for k in must if k not in open_rows]
    assert not settled_silently, f"rows only a reference can settle are marked verified without one: {settled_silently[:5]}"
    assert all(len(open_rows[k]) >= 2 for k in must), (
        f"an unverified row names fewer than two candidates: {[(k, open_rows[k]) for k in must if len(open_rows[k]) < 2][:3]}")

    cfg = load_config(config)
    recs = run_all(cfg)
    metrics = recs["verify-forward-pass"].metrics
    assert metrics["passed"] and metrics["reference"], metrics["problems"]
    state = load_file(Path(cfg.export.dir) / "model.safetensors")
    model = fresh_model()
    model.load_state_dict(state, strict=True)
    model.eval()
    x = torch.from_numpy(np.load(cfg.verify.input))
    with torch.no_grad():
        out = model(x)
    outs = _tensors(out)
    with np.load(cfg.verify.reference_output) as z:
        refs = [z[f"arr_{i}"] for i in range(len(z.files))]
    assert len(outs) == len(refs)
    fresh_err = max(float(np.abs(o.double().numpy() - r).max()) for o, r in zip(outs, refs))
    for o, r in zip(outs, refs):
        np.testing.assert_allclose(o.double().numpy(), r, rtol=cfg.verify.rtol, atol=cfg.verify.atol)
    RESULTS[cfg.name] = (float(metrics["max_abs_error"]), fresh_err, len(open_rows))


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return [t for v in out for t in _tensors(v)] if isinstance(out, (list, tuple)) else []
