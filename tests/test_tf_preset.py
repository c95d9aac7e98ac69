"""TF1 / OpenAI checkpoint names and Keras 3 depthwise kernels (issue 11, item 4).

Sources are written as those checkpoints store them; references are computed in NumPy in the
source layout (``x @ w`` with ``w`` of shape ``(1, in, out)`` squeezed; a channels-last
depthwise convolution), never by np2torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

MODELS = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, f)
        self.c_proj = nn.Linear(f, d)


class OpenAIStyle(nn.Module):
    """torch Linear layers fed from OpenAI-style 1x1-conv weights (1, in, out), numbered h0, h1."""

    def __init__(self, d=6, f=10, n=2):
        super().__init__()
        self.h = nn.ModuleList(Block(d, f) for _ in range(n))

    def forward(self, x):
        for b in self.h:
            x = x + b.c_proj(torch.tanh(b.c_fc(b.ln_1(x))))
        return x


class Depthwise(nn.Module):
    """Keras' DepthwiseConv2D(3, depth_multiplier=2) on channels-last input, as a grouped torch conv."""

    def __init__(self, c=4, mult=2):
        super().__init__()
        self.dw = nn.Conv2d(c, c * mult, 3, groups=c)

    def forward(self, x):
        return self.dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
'''


def _write(tmp_path: Path, arrays: dict, x: np.ndarray, ref: np.ndarray | None, target: str, preset: str) -> Path:
    (tmp_path / "models.py").write_text(MODELS)
    np.savez(tmp_path / "weights.npz", **arrays)
    np.save(tmp_path / "input.npy", x)
    verify = {"input": "input.npy", "rtol": 1e-5, "atol": 1e-5}
    if ref is not None:
        np.save(tmp_path / "ref.npy", ref)
        verify["reference_output"] = "ref.npy"
    cfg = {"name": "case", "source": {"path": "weights.npz"}, "model": {"target": f"models.py:{target}"},
           "mapping": {"strategy": "auto", "preset": preset}, "verify": verify, "export": {"dir": "out"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "c.yaml"


def _plan(config: Path) -> dict[str, dict]:
    from np2torch.tasks import infer_mapping, load_arrays
    from np2torch.tasks.config import load_config

    cfg = load_config(config)
    recs = load_arrays.scan_source(cfg.source.path, fmt=cfg.source.format)
    return {r["target_key"]: r for r in infer_mapping.build_manifest(cfg, recs) if r["target_key"]}


def _layernorm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-5) * g + b


def test_openai_names_and_1x1_conv_weights_load_into_linear(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d, f = 6, 10
    arrays = {}
    for i in range(2):
        arrays |= {f"model/h{i}/ln_1/g": 1 + 0.1 * rng.standard_normal(d), f"model/h{i}/ln_1/b": 0.1 * rng.standard_normal(d),
                   f"model/h{i}/c_fc/w": rng.standard_normal((1, d, f)), f"model/h{i}/c_fc/b": rng.standard_normal(f),
                   f"model/h{i}/c_proj/w": rng.standard_normal((1, f, d)), f"model/h{i}/c_proj/b": rng.standard_normal(d)}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    x = rng.standard_normal((3, d)).astype(np.float32)
    h = x.astype(np.float64)
    for i in range(2):  # the source's own computation: x @ w[0]
        a = {k.split("/", 2)[2]: v.astype(np.float64) for k, v in arrays.items() if k.startswith(f"model/h{i}/")}
        h = h + np.tanh(_layernorm(h, a["ln_1/g"], a["ln_1/b"]) @ a["c_fc/w"][0] + a["c_fc/b"]) @ a["c_proj/w"][0] + a["c_proj/b"]
    config = _write(tmp_path, arrays, x, h, "OpenAIStyle", "tf")
    rows = _plan(config)
    r = rows["h.1.c_fc.weight"]
    assert r["source_key"] == "model/h1/c_fc/w" and r["status"] == "mapped" and r["verified"]
    assert r["transform_spec"] == [["index", 0], ["transpose", None]]
    assert rows["h.0.ln_1.weight"]["source_key"] == "model/h0/ln_1/g" and rows["h.0.ln_1.bias"]["source_key"] == "model/h0/ln_1/b"

    from np2torch.tasks.config import load_config
    from np2torch.tasks.stages import run_all

    metrics = run_all(load_config(config))["verify-forward-pass"].metrics
    assert metrics["passed"] and metrics["max_abs_error"] < 1e-5


def _depthwise_ref(x: np.ndarray, k: np.ndarray, b: np.ndarray) -> np.ndarray:
    n, hh, ww, c = x.shape
    kh, kw, _, m = k.shape
    out = np.zeros((n, hh - kh + 1, ww - kw + 1, c * m))
    for i in range(hh - kh + 1):
        for j in range(ww - kw + 1):
            patch = x[:, i:i + kh, j:j + kw, :]  # (n, kh, kw, c)
            out[:, i, j, :] = np.einsum("nhwc,hwcm->ncm", patch, k).reshape(n, c * m)
    return out + b


def test_keras3_depthwise_kernel_named_kernel_feeds_a_grouped_conv(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    k = rng.standard_normal((3, 3, 4, 2)).astype(np.float32)  # Keras 3: 'depthwise_conv2d/kernel' (H, W, C, mult)
    b = rng.standard_normal(8).astype(np.float32)
    x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
    config = _write(tmp_path, {"depthwise_conv2d/kernel": k, "depthwise_conv2d/bias": b}, x,
                    _depthwise_ref(x.astype(np.float64), k.astype(np.float64), b), "Depthwise", "keras")
    r = _plan(config)["dw.weight"]
    assert r["source_key"] == "depthwise_conv2d/kernel" and r["verified"]
    assert r["transform_spec"] == [["depthwise_to_grouped", None]]

    from np2torch.tasks.config import load_config
    from np2torch.tasks.stages import run_all

    metrics = run_all(load_config(config))["verify-forward-pass"].metrics
    assert metrics["passed"] and metrics["max_abs_error"] < 1e-5
