"""A tiny, fully controlled conversion for cache/retry/audit tests (no bundled example needed).

An MLP(4, 6, 3) saved as one ``.npy`` per state-dict key in a folder, a verify input file, and
a config that points at them with relative paths, so the whole tree can be copied elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "configs" / "models" / "mlp.py"
KWARGS = {"in_features": 4, "hidden": 6, "out_features": 3}


def make_tiny(root: Path, *, name: str = "tiny", with_reference: bool = True) -> Path:
    """Write ``root/{weights/, input.npy, ref_out.npy, tiny.yaml}``; return the config path."""
    import importlib.util

    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("tiny_mlp", MODEL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.MLP(**KWARGS).eval()
    weights = root / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    for k, v in model.state_dict().items():
        np.save(weights / f"{k}.npy", v.numpy())
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.save(root / "input.npy", x)
    with torch.no_grad():
        np.save(root / "ref_out.npy", model(torch.from_numpy(x)).numpy())
    cfg = {
        "name": name,
        "source": {"path": "weights", "format": "npy-dir"},
        "model": {"target": f"{MODEL}:MLP", "kwargs": KWARGS},
        "mapping": {"strategy": "name", "preset": "none"},
        "convert": {"dtype": "float32", "device": "cpu"},
        "verify": {"input": "input.npy", "reference_output": "ref_out.npy" if with_reference else None, "rtol": 1e-5, "atol": 1e-6},
        "export": {"dir": "out", "formats": ["safetensors", "pt"]},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


