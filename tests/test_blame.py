"""A failure is blamed on the row that is actually wrong (issue 11, item 4).

The source's first Dense kernel is square (ambiguous: only the reference settles it); the
second layer's bias in the file is wrong. Before, the error named the ambiguous first kernel,
which evidence had in fact settled; now it names the second layer, the first whose output
diverges from the reference activations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
'''


def test_failure_names_the_first_diverging_layers_rows(tmp_path: Path) -> None:
    from np2torch.tasks.config import load_config
    from np2torch.tasks.errors import ConversionError
    from np2torch.tasks.stages import run_all

    rng = np.random.default_rng(0)
    k1, b1 = rng.standard_normal((4, 4)), rng.standard_normal(4)  # Keras kernels (in, out)
    k2, b2 = rng.standard_normal((4, 3)), rng.standard_normal(3)
    x = rng.standard_normal((5, 4))
    h = np.maximum(x @ k1 + b1, 0)
    np.savez(tmp_path / "acts.npz", fc1=(x @ k1 + b1).astype(np.float32), fc2=(h @ k2 + b2).astype(np.float32))
    np.save(tmp_path / "ref.npy", (h @ k2 + b2).astype(np.float32))
    np.save(tmp_path / "input.npy", x.astype(np.float32))
    bad_b2 = b2 + 0.5  # the file's second bias is not the model's
    np.savez(tmp_path / "w.npz", **{"dense/kernel": k1, "dense/bias": b1, "dense_1/kernel": k2, "dense_1/bias": bad_b2})
    (tmp_path / "m.py").write_text(MODEL)
    cfg = {"name": "blame", "source": {"path": "w.npz"}, "model": {"target": "m.py:Net"}, "mapping": {"preset": "keras"},
           "verify": {"input": "input.npy", "reference_output": "ref.npy", "reference_activations": "acts.npz", "rtol": 1e-4, "atol": 1e-4},
           "export": {"dir": "out"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConversionError) as e:
        run_all(load_config(tmp_path / "c.yaml"))
    keys = [p["key"] for p in e.value.problems]
    assert e.value.key.startswith("fc2."), keys
    assert {"fc2.weight", "fc2.bias"} <= set(keys[:2])
    assert "fc2" in str(e.value)
