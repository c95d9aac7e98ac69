"""Stage 5, ``verify-forward-pass``: model + converted weights + verify spec → metrics.

The model is rebuilt on ``meta`` and given the converted tensors as zero-copy views of the
safetensors file on the configured device, then run in ``eval()`` under ``no_grad`` on the
configured input. With a reference output the result is compared elementwise
(``|out - ref| <= atol + rtol * |ref|``, NumPy's ``allclose``); without one, only output shapes
and finiteness are checked. A forward pass that raises is a verify-stage error, not a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from np2torch.tasks.config import InputSpec, VerifySpec
from np2torch.tasks.errors import LoadError, VerifyError
from np2torch.tasks.readers.access import open_array, scan_source
from np2torch.tasks.model import build_model, describe_targets
from np2torch.tasks.st_io import MappedSafetensors
from np2torch.tasks.state_dict import check_device, load_into_model

__all__ = ["make_inputs", "load_reference", "compare", "run_forward", "verify_forward_pass", "load_model_from_file"]


def _load_arrays_file(path: Path, what: str) -> list[np.ndarray]:
    if not path.is_file():
        raise VerifyError(f"{what} file does not exist", key=str(path), fix=f"check verify.{what} (relative to the config file)")
    # through the source reader: the same checks (truncation, zip bombs, no pickles) as the weights
    try:
        return [np.asarray(open_array(r)) for r in scan_source(path, fmt="npz" if path.suffix == ".npz" else "npy")]
    except LoadError as exc:
        raise VerifyError(f"cannot read verify.{what}: {exc.message}", key=exc.key or str(path), expected=exc.expected, actual=exc.actual,
                          fix="save it with np.save / np.savez (numeric arrays, no pickles)", problems=exc.problems) from None


def make_inputs(spec: InputSpec | Path | None) -> list[np.ndarray]:
    """The forward pass's positional inputs, generated reproducibly or read from a file."""
    if spec is None:
        raise VerifyError("no verify.input given", key="verify.input", fix="add verify.input: {shape: [...], dtype: float32, seed: 0} or a .npy path")
    if isinstance(spec, Path):
        return _load_arrays_file(spec, "input")
    rng = np.random.default_rng(spec.seed)
    if spec.dtype.startswith("int"):
        return [rng.integers(0, 2, size=spec.shape).astype(spec.dtype)]
    x = rng.standard_normal(spec.shape)
    return [x.astype("float32" if spec.dtype == "bfloat16" else spec.dtype)]


def load_reference(path: Path | None) -> list[np.ndarray] | None:
    return None if path is None else _load_arrays_file(path, "reference_output")


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten_outputs(v)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return _flatten_outputs(out.to_tuple())
    return []


def _model_float_dtype(model: nn.Module) -> torch.dtype | None:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def run_forward(model: nn.Module, inputs: list[np.ndarray], device: torch.device) -> list[np.ndarray]:
    """Run the model once in eval mode; float inputs take the model's float dtype."""
    fdt = _model_float_dtype(model)
    xs = []
    for x in inputs:
        t = torch.from_numpy(np.array(x, dtype=x.dtype.newbyteorder("="), order="C"))  # native, writable copy (inputs are small)
        if t.is_floating_point() and fdt is not None:
            t = t.to(fdt)
        xs.append(t.to(device))
    model.eval()
    try:
        with torch.no_grad():
            out = model(*xs)
    except Exception as exc:
        shapes = [list(x.shape) for x in xs]
        raise VerifyError(f"the forward pass raised {type(exc).__name__}: {exc}", key="forward", expected="the model to accept the verify input",
                          actual=f"inputs of shape {shapes}", fix="check verify.input's shape and the model's forward (e.g. a missing Flatten)") from None
    outs = _flatten_outputs(out)
    if not outs:
        raise VerifyError(f"forward returned {type(out).__name__}, with no tensors to check", key="forward", fix="return a tensor (or tuple/dict of tensors)")
    return [o.detach().to("cpu", torch.float64).numpy() for o in outs]


def compare(outputs: list[np.ndarray], refs: list[np.ndarray] | None, *, rtol: float, atol: float) -> dict[str, Any]:
    """Elementwise comparison metrics; ``passed`` only when every output is within tolerance."""
    metrics: dict[str, Any] = {
        "n_outputs": len(outputs),
        "output_shapes": [list(o.shape) for o in outputs],
        "finite": bool(all(np.isfinite(o).all() for o in outputs)),
        "rtol": rtol,
        "atol": atol,
        "reference": refs is not None,
    }
    problems = []
    if not metrics["finite"]:
        problems.append("output holds NaN/Inf")
    if refs is None:
        metrics.update(max_abs_error=None, max_rel_error=None, mismatched=None)
    else:
        if len(refs) != len(outputs):
            problems.append(f"{len(outputs)} output(s) but {len(refs)} reference array(s)")
        max_abs = max_rel = 0.0
        mismatched = 0
        for i, (o, r) in enumerate(zip(outputs, refs)):
            r = np.asarray(r, dtype=np.float64)
            if o.shape != r.shape:
                problems.append(f"output {i} has shape {list(o.shape)}, reference {list(r.shape)}")
                continue
            diff = np.abs(o - r)
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            max_rel = max(max_rel, float((diff / np.maximum(np.abs(r), np.finfo(np.float64).tiny)).max(initial=0.0)))
            mismatched += int((~(diff <= atol + rtol * np.abs(r))).sum())
        metrics.update(max_abs_error=max_abs, max_rel_error=max_rel, mismatched=mismatched)
        if mismatched:
            problems.append(f"{mismatched} element(s) outside atol={atol} + rtol={rtol}·|ref| (max abs error {max_abs:.3g})")
    metrics["passed"] = not problems
    metrics["problems"] = problems
    return metrics


def load_model_from_file(model_target: str, model_kwargs: dict[str, Any], weights: Path, device: torch.device, *, allow_unsafe_load: bool = False,
                         stream_pages: bool = False) -> nn.Module:
    """The model on ``device`` with the converted weights (zero-copy on the CPU).

    With ``stream_pages`` (CPU), each module's weights leave this process's resident memory once
    its forward has run, so a forward pass over a model bigger than RAM keeps about one layer
    resident; the values are re-read from the page cache if a module runs again.
    """
    model = build_model(model_target, model_kwargs, allow_unsafe_load=allow_unsafe_load)
    mapped = MappedSafetensors(weights)
    state = mapped.state
    if device.type != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
        mapped.release(list(mapped.ranges))
    model = load_into_model(model, state, describe_targets(model))
    if stream_pages and device.type == "cpu":
        _release_after_forward(model, mapped)
    return model


def _release_after_forward(model: nn.Module, mapped: MappedSafetensors) -> None:
    for name, mod in model.named_modules():
        own = [f"{name}.{k}" if name else k for k, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))]
        own = [k for k in own if k in mapped.ranges]
        if own:
            mod.register_forward_hook(lambda _m, _i, _o, keys=tuple(own): mapped.release(keys))


def verify_forward_pass(*, model_target: str, model_kwargs: dict[str, Any], weights: Path, spec: VerifySpec, device: str,
                        allow_unsafe_load: bool = False) -> dict[str, Any]:
    """Metrics of the forward pass against the reference; raises VerifyError when it fails."""
    dev = check_device(device)
    model = load_model_from_file(model_target, model_kwargs, weights, dev, allow_unsafe_load=allow_unsafe_load, stream_pages=True)
    inputs = make_inputs(spec.input)
    outputs = run_forward(model, inputs, dev)
    metrics = compare(outputs, load_reference(spec.reference_output), rtol=spec.rtol, atol=spec.atol)
    if not metrics["passed"]:
        from np2torch.tasks.evidence import load_activations, localise

        # localisation: the first layer whose output diverges (from reference activations when given)
        where = localise(model, inputs, load_activations(spec.reference_activations), rtol=spec.rtol, atol=spec.atol, device=dev)
        metrics["first_divergence"] = where
        if where:
            err = "" if where["max_abs_error"] is None else f", max abs error {where['max_abs_error']:.3g}"
            metrics["problems"].append(f"first diverging layer: {where['module']} ({where['by']}{err})")
        elif not spec.reference_activations:
            metrics["problems"].append("give verify.reference_activations (module outputs of the source model) to localise the first diverging layer")
    del model
    if not metrics["passed"]:
        raise VerifyError("the converted model does not reproduce the reference: " + "; ".join(metrics["problems"]),
                          key="verify.reference_output" if metrics["reference"] else "forward",
                          expected=f"max abs error ≤ atol={spec.atol} + rtol={spec.rtol}·|ref|",
                          actual=f"max abs error {metrics['max_abs_error']}" if metrics["reference"] else "non-finite output",
                          fix="run `np2torch plan` and check low-confidence/unverified rows (layout: transpose vs reshape, flatten order); "
                              "loosen verify.rtol/atol only if the error is float rounding")
    return metrics
