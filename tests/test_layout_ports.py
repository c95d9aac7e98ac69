"""What the merge of issue-11-frameworks into the split mapping stage must keep (issue 11, items 1, 2, 4, 6).

- a preset's layout guessed by leaf name is refit to the target module's known layouts
  (:func:`np2torch.tasks.layouts.refit`): OpenAI ``(1, in, out)`` weights keep their squeeze in
  front of the Linear's transpose, a Keras 3 ``kernel`` feeding a grouped conv is depthwise;
- order matching applies the same refit, never a reshape by element count;
- the forward trace runs on a model whose buffers are real (parameters on meta), finds the
  flatten behind functional pooling, and leaves the buffers as they were.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from np2torch.tasks import layouts as L
from np2torch.tasks.model import TargetInfo


def _t(shape: tuple[int, ...], module_type: str) -> TargetInfo:
    return TargetInfo("m.weight", shape, "float32", False, "m", module_type)


def test_refit_keeps_the_squeeze_in_front_of_the_target_layout() -> None:
    squeeze = [["index", 0]]
    assert L.refit((1, 4, 3), squeeze, _t((3, 4), "Linear")) == [["index", 0], ["transpose", None]]
    assert L.refit((1, 4, 3), squeeze, _t((4, 3), "Conv1D")) == squeeze  # transformers Conv1D (in, out): the preset's guess fits
    assert L.refit((1, 4, 3), squeeze, _t((5, 4), "Linear")) is None  # nothing fits: no reshape by element count


def test_refit_depthwise_whatever_the_leaf_name() -> None:
    keras_conv = [["permute", [3, 2, 0, 1]]]  # the preset's guess for a 4-D 'kernel'
    assert L.refit((3, 3, 4, 2), keras_conv, _t((8, 1, 3, 3), "Conv2d")) == [["depthwise_to_grouped", None]]
    assert L.refit((3, 3, 4, 2), keras_conv, _t((8, 1, 3, 3), "Conv2d"), alternatives=False) is None


def test_square_squeezed_weight_lists_both_layouts() -> None:
    chosen, cands = L.layout_candidates([(1, 4, 4)], [["index", 0]], _t((4, 4), "Linear"))
    assert chosen == [["index", 0]]
    assert [["index", 0], ["transpose", None]] in cands and len(cands) == 2


MODELS = '''
import torch
import torch.nn.functional as F
from torch import nn


class TwoDense(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.second = nn.Linear(6, 3)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))
'''


def test_order_matching_refits_named_squeezed_weights(tmp_path: Path) -> None:
    """Scopes that name nothing in the model ('a', 'z'): matched by order, the 'w' leaves of shape
    (1, in, out) are squeezed and transposed, not reshaped by element count."""
    from np2torch.tasks import infer_mapping, load_arrays
    from np2torch.tasks.config import load_config

    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = rng.standard_normal((1, 4, 6)), rng.standard_normal(6), rng.standard_normal((1, 6, 3)), rng.standard_normal(3)
    np.savez(tmp_path / "w.npz", **{"model/a/w": w1, "model/a/b": b1, "model/z/w": w2, "model/z/b": b2})
    (tmp_path / "m.py").write_text(MODELS)
    cfg = {"name": "squeeze", "source": {"path": "w.npz"}, "model": {"target": "m.py:TwoDense"},
           "mapping": {"preset": "tf", "strategy": "order"}, "export": {"dir": "out"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    c = load_config(tmp_path / "c.yaml")
    rows = {r["target_key"]: r for r in infer_mapping.build_manifest(c, load_arrays.scan_source(c.source.path)) if r["target_key"]}
    assert rows["first.weight"]["source_key"] == "model/a/w"
    assert rows["first.weight"]["transform_spec"] == [["index", 0], ["transpose", None]]
    assert rows["second.weight"]["transform_spec"] == [["index", 0], ["transpose", None]]


class _BNPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)  # a constructor-computed buffer
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2) * self.scale
        return self.fc(x.view(x.shape[0], -1))


def test_trace_runs_with_real_buffers_and_leaves_them_real() -> None:
    from np2torch.tasks import forward
    from np2torch.tasks.config import InputSpec
    from np2torch.tasks.model import build_model

    model = build_model(f"{__name__}:_BNPool")
    assert model.conv.weight.is_meta and not model.scale.is_meta and not model.bn.running_var.is_meta
    tr = forward.trace_forward(model, InputSpec(shape=[2, 3, 8, 8], dtype="float32", seed=0))
    assert tr is not None, "the trace must run although buffers are real and parameters on meta"
    assert tr.flatten == {"fc": [4, 4, 4]}
    assert not model.scale.is_meta and float(model.scale) == 2.0
    assert not model.bn.running_var.is_meta and torch.equal(model.bn.running_var, torch.ones(4))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
