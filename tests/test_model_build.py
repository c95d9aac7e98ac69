"""Models are built with parameters on ``meta`` and buffers for real (issue 11, item 1).

A constructor's non-persistent buffers (transformers' position_ids, rotary inv_freq, causal
masks) are in no checkpoint: they must keep the constructor's values through plan, convert and
verify. One that the constructor derives from a parameter cannot be computed: a clear error.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from np2torch.tasks.errors import ModelError
from np2torch.tasks.model import build_model, finish_load, materialize_missing

MODELS = '''
import torch
from torch import nn


class Rotary(nn.Module):
    """A Linear whose output is scaled by a constructor-computed, non-persistent buffer and masked causally."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.register_buffer("inv_freq", 1.0 / (10.0 ** (torch.arange(0, d, dtype=torch.float32) / d)), persistent=False)
        self.register_buffer("mask", torch.tril(torch.ones(d, d)), persistent=False)

    def forward(self, x):
        return (self.fc(x) * self.inv_freq) @ self.mask


class Derived(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("fc_t", self.fc.weight.detach().t().clone(), persistent=False)

    def forward(self, x):
        return self.fc(x) @ self.fc_t


class KeepsBuffer(nn.Module):
    """reset_parameters() re-draws the parameters only; the buffer is the constructor's."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(4))
        self.register_buffer("table", torch.arange(4.0) * 3)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.uniform_(self.w)


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = KeepsBuffer()
'''


@pytest.fixture
def models(tmp_path: Path) -> Path:
    p = tmp_path / "models.py"
    p.write_text(MODELS)
    return p


def test_meta_build_keeps_constructor_buffers(models: Path) -> None:
    m = build_model(f"{models}:Rotary")
    assert all(p.is_meta for p in m.parameters())
    assert not m.inv_freq.is_meta and not m.mask.is_meta
    torch.manual_seed(0)
    real = build_model(f"{models}:Rotary", device="cpu")
    assert torch.equal(m.inv_freq, real.inv_freq) and torch.equal(m.mask, real.mask)


def test_buffer_derived_from_a_parameter_is_an_error_naming_it(models: Path) -> None:
    with pytest.raises(ModelError) as e:
        build_model(f"{models}:Derived")
    assert e.value.key == "fc_t" and "persistent=True" in e.value.fix


def test_finish_load_names_a_tensor_left_on_meta(models: Path) -> None:
    m = build_model(f"{models}:Rotary")
    m.load_state_dict({"fc.weight": torch.ones(6, 6)}, strict=False, assign=True)
    with pytest.raises(ModelError) as e:
        finish_load(m, "cpu")
    assert e.value.key == "fc.bias"
    m.load_state_dict({"fc.bias": torch.zeros(6)}, strict=False, assign=True)
    assert finish_load(m, "cpu") is m


def test_materialize_missing_keeps_the_constructors_buffer(models: Path) -> None:
    vals = materialize_missing(f"{models}:Holder", {}, ["k.w", "k.table"])
    assert torch.equal(vals["k.table"], torch.arange(4.0) * 3)
    assert vals["k.w"].shape == (4,) and not vals["k.w"].is_meta


def test_a_cpu_build_in_another_thread_is_not_put_on_meta(models: Path) -> None:
    from np2torch.tasks import model as model_mod

    seen = []
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        entered.wait(10)
        seen.append(torch.nn.Linear(2, 2).weight.device.type)  # built while the main thread is inside params_on_meta
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with model_mod.params_on_meta():
        entered.set()
        release.wait(10)
        inside = torch.nn.Linear(2, 2).weight.device.type
    t.join()
    assert seen == ["cpu"] and inside == "meta"
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_pipeline_verifies_a_model_with_constructor_buffers(models: Path, tmp_path: Path) -> None:
    """Before: verify saw the buffers still on meta ("Cannot copy out of meta tensor")."""
    from np2torch.tasks.config import load_config
    from np2torch.tasks.stages import run_all

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((6, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    np.savez(tmp_path / "weights.npz", **{"fc.weight": w, "fc.bias": b})
    x = rng.standard_normal((3, 6)).astype(np.float32)
    np.save(tmp_path / "input.npy", x)
    inv = 1.0 / (10.0 ** (np.arange(6) / 6))
    np.save(tmp_path / "ref.npy", ((x.astype(np.float64) @ w.T + b) * inv) @ np.tril(np.ones((6, 6))))
    cfg = {"name": "rotary", "source": {"path": "weights.npz"}, "model": {"target": f"{models}:Rotary"},
           "verify": {"input": "input.npy", "reference_output": "ref.npy", "rtol": 1e-5, "atol": 1e-5},
           "export": {"dir": "out"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    metrics = run_all(load_config(tmp_path / "c.yaml"))["verify-forward-pass"].metrics
    assert metrics["passed"] and metrics["max_abs_error"] < 1e-5
