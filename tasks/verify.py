"""Stage 5, ``verify-forward-pass``: model + converted weights + verify spec → metrics.

The model is rebuilt on ``meta`` and given the converted tensors as zero-copy views of the
converted checkpoint (one file, or its shards) on the configured device, then run in ``eval()`` under ``no_grad`` on the
configured input. With a reference output the result is compared elementwise
(``|out - ref| <= atol + rtol * |ref|``, NumPy's ``allclose``); without one, only output shapes
and finiteness are checked. A forward pass that raises is a verify-stage error, not a traceback.

The weights are read through np2torch's own reader (:class:`MappedSafetensors`, not the
``safetensors`` library, which failed with ``Cannot allocate memory`` on a 25.8 GB file on a
23 GiB machine): shared, read-only maps of each file (each shard on its own), and each module's
pages leave this process once its forward has run, so about one layer is resident whatever the
model size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from np2torch.tasks.config import VerifySpec
from np2torch.tasks.diagnose import explain
from np2torch.tasks.errors import VerifyError
from np2torch.tasks.forward import compare, load_activations, load_reference, localise, make_inputs, run_forward
from np2torch.tasks.model import build_model, describe_targets
from np2torch.tasks.st_io import MappedSafetensors
from np2torch.tasks.state_dict import check_device, load_into_model

__all__ = ["make_inputs", "load_reference", "compare", "run_forward", "verify_forward_pass", "load_model_from_file"]


def load_model_from_file(model_target: str, model_kwargs: dict[str, Any], weights: Path, device: torch.device, *,
                         allow_unsafe_load: bool = False, stream_pages: bool = False) -> nn.Module:
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
    inputs, refs = make_inputs(spec.input), load_reference(spec.reference_output)
    why = {"rtol": spec.rtol, "atol": spec.atol, "activations": load_activations(spec.reference_activations), "error": VerifyError}
    try:
        outputs = run_forward(model, inputs, dev)
    except VerifyError:
        explain(model, inputs, refs, **why)  # a difference of meaning (e.g. a channels-last input) is named first
        raise
    metrics = compare(outputs, refs, rtol=spec.rtol, atol=spec.atol)
    if not metrics["passed"]:
        explain(model, inputs, refs, **why)  # raises when a known difference of meaning reproduces the reference
        # localisation: the first layer whose output diverges (from reference activations when given)
        where = localise(model, inputs, load_activations(spec.reference_activations), rtol=spec.rtol, atol=spec.atol, device=dev)
        metrics["first_divergence"] = where
        if where:
            err = "" if where["max_abs_error"] is None else f", max abs error {where['max_abs_error']:.3g}"
            metrics["problems"].append(f"first diverging layer: {where['module']} ({where['by']}{err})")
        elif not spec.reference_activations:
            metrics["problems"].append("give verify.reference_activations (module outputs of the source model) "
                                       "to localise the first diverging layer")
    del model
    if not metrics["passed"]:
        raise VerifyError("the converted model does not reproduce the reference: " + "; ".join(metrics["problems"]),
                          key="verify.reference_output" if metrics["reference"] else "forward",
                          expected=f"max abs error ≤ atol={spec.atol} + rtol={spec.rtol}·|ref|",
                          actual=f"max abs error {metrics['max_abs_error']}" if metrics["reference"] else "non-finite output",
                          fix="run `np2torch plan` and check low-confidence/unverified rows (layout: transpose vs reshape, flatten order); "
                              "loosen verify.rtol/atol only if the error is float rounding")
    return metrics
