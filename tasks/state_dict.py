"""Putting a state dict into a model: the device check and the strict, tie-keeping load.

A domain module below the stages: both ``convert-to-device`` (which proves the converted file
loads) and ``verify-forward-pass`` (which rebuilds the model from that file) use it, and
neither stage imports the other.
"""

from __future__ import annotations

import torch
from torch import nn

from np2torch.tasks.errors import ConvertError, Problem
from np2torch.tasks.model import TargetInfo, finish_load

__all__ = ["check_device", "load_into_model"]


def check_device(device: str) -> torch.device:
    """The torch device, or a ConvertError saying why it is not available here."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConvertError("CUDA is not available on this machine", key="convert.device", expected="a visible CUDA GPU", actual="none",
                               fix="use --set convert.device=cpu, or run on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConvertError(f"there is no {device}", key="convert.device",
                               expected=f"cuda:0..cuda:{torch.cuda.device_count() - 1}", actual=device)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConvertError("MPS is not available on this machine", key="convert.device", fix="use --set convert.device=cpu")
    return dev


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
        raise ConvertError(f"the converted state dict does not load strictly ({len(problems)} problem(s))", key=problems[0]["key"],
                           problems=problems, fix=problems[0]["fix"])
    sd = {k: v for k, v in state.items() if k not in tied}
    result = model.load_state_dict(sd, strict=False, assign=True)
    left = [k for k in result.missing_keys if k not in tied]
    if left or result.unexpected_keys:
        raise ConvertError("load_state_dict reported problems", key=(left + result.unexpected_keys)[0],
                           expected="no missing/unexpected keys", actual={"missing": left, "unexpected": result.unexpected_keys})
    for key, first in tied.items():
        mod_path, _, name = key.rpartition(".")
        src_path, _, src_name = first.rpartition(".")
        target_mod = model.get_submodule(mod_path) if mod_path else model
        src_mod = model.get_submodule(src_path) if src_path else model
        setattr(target_mod, name, getattr(src_mod, src_name))
    # the constructor's non-persistent buffers join the loaded tensors' device; nothing stays on meta
    return finish_load(model, next(iter(state.values())).device if state else "cpu")
