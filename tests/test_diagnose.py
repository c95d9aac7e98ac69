"""tasks/diagnose.py without a source framework: what it must never do, and the table's shape.

The differences themselves are tested against real Keras models in
tests/conformance/test_meaning_diffs.py; here: no claim when the model already reproduces the
reference (float rounding is not meaning), the caller's model untouched, no pairing of
unrelated tensors in the architecture diff, and every row of issue 19 present.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from np2torch.tasks.diagnose import TABLE, architecture_headline, diagnose


def _net(eps: float) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, eps=eps), nn.Linear(6, 2)).eval()
    net[1].running_var.uniform_(0.01, 0.1)
    return net


def test_every_row_of_the_issue_is_in_the_table() -> None:
    names = {(r.name, r.kinds) for r in TABLE}
    assert len(TABLE) == 9 and all(r.source and r.torch_default and r.reason and r.fix_text for r in TABLE)
    assert ("eps differs", (nn.modules.batchnorm._BatchNorm,)) in names and ("eps differs", (nn.LayerNorm, nn.GroupNorm)) in names
    assert [r for r in TABLE if not r.expressible] == [r for r in TABLE if r.name == "recurrent semantics differ"]


def test_no_claim_when_nothing_differs_in_meaning_and_the_model_is_untouched() -> None:
    model = _net(1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert diagnose(model, [x], [ref + 1e-6], rtol=0, atol=1e-7) is None  # float32 rounding: float64 reproduces, no claim
    assert diagnose(model, [x], [ref + 1.0], rtol=1e-4, atol=1e-5) is None  # an offset no row explains: nothing said
    found = diagnose(model, [x], [_net(1e-3)(torch.from_numpy(x)).detach().numpy()], rtol=1e-4, atol=1e-5)
    assert found is not None and found.message().startswith("1 (BatchNorm1d): eps differs: the source used 0.001, the model 1e-05")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model[1].eps == 1e-5


def _row(target: str, status: str, tshape: list[int], source: str = "", sshape: list[int] | None = None,
         result: list[int] | None = None) -> dict:
    return {"target_key": target, "status": status, "how": "name", "target_shape": json.dumps(tshape), "source_key": source,
            "source_shape": json.dumps(sshape) if sshape else "", "result_shape": json.dumps(result) if result else ""}


def test_architecture_diff_pairs_only_the_same_tensor() -> None:
    rows = [_row("fc1.weight", "mapped", [16, 6], "dense/kernel", [6, 16], [16, 6]), _row("fc2.weight", "missing", [10, 16]),
            _row("fc2.bias", "missing", [10]), _row("bn.running_var", "missing", [4]),
            _row("", "unused", [], "dense_1/kernel", [16, 5]), _row("", "unused", [], "dense_1/bias", [5]),
            _row("", "unused", [], "optimizer/step", [1])]
    key, head, fix, keys = architecture_headline(rows)
    assert key == "fc2.weight" and head.startswith("fc2.weight: model [10, 16], source dense_1/kernel [16, 5] (as [5, 16])")
    assert "(fc2.bias)" in head and "missing in the source: bn.running_var" in head and "unexpected in the source: optimizer/step" in head
    assert keys == {"fc2.weight", "fc2.bias", "dense_1/kernel", "dense_1/bias"} and "allow" not in fix.split(";")[0]
    assert architecture_headline([r for r in rows if r["target_key"] != "fc2.weight" and r["source_key"] != "dense_1/kernel"][:1]) is None
