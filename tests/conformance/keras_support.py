"""Keras 3 conformance helpers: real Keras models (torch backend, no TensorFlow), saved the ways users have them.

Importing this module skips the importing test module cleanly when Keras is not installed
(``pip install keras h5py``). Each case builds a small Keras model with a fixed seed, gives every
weight a random value (so BatchNorm statistics and biases matter), computes the reference with
``model.predict`` and saves the weights as a user would: a pickled ``get_weights()`` list, or a
``.npz`` of ``{variable.path: value}``. The PyTorch model is written by hand
(:mod:`keras_torch_models`), the config is what a README reader writes (preset + strategy, no
rules), and the stages run as in ``np2torch convert``.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras",
                            reason="Keras 3 is not installed (pip install keras h5py; it runs on the torch backend, no TensorFlow)")
if int(keras.__version__.split(".")[0]) < 3:
    pytest.skip(f"Keras 3 is needed, found {keras.__version__}", allow_module_level=True)

import yaml  # noqa: E402

from np2torch.tasks import manifest, stages  # noqa: E402
from np2torch.tasks.config import load_config  # noqa: E402

HERE = Path(__file__).resolve().parent
TORCH_MODELS = HERE / "keras_torch_models.py"
TOL = {"rtol": 1e-4, "atol": 1e-5}


def randomize(model: Any, seed: int) -> None:
    """Every weight random (variances positive), so no layer is an identity by accident."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape = tuple(v.shape)
        if "variance" in v.path:
            v.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
        else:
            v.assign((0.4 * rng.standard_normal(shape)).astype("float32"))


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, verbose=0), dtype=np.float32)


def save_weights(model: Any, d: Path, how: str) -> dict[str, Any]:
    """Write the weights as users have them; returns the config's ``source`` section."""
    if how == "pickle":
        with open(d / "weights.pkl", "wb") as f:
            pickle.dump(model.get_weights(), f)
        return {"path": "weights.pkl", "format": "pickle-list", "allow_pickle": True}
    if how == "npz":
        np.savez(d / "weights.npz", **{v.path: np.asarray(v.numpy()) for v in model.weights})
        return {"path": "weights.npz", "format": "npz"}
    if how == "flat":  # one vector of every weight, in get_weights() order
        np.save(d / "weights.npy", np.concatenate([np.ravel(w) for w in model.get_weights()]))
        return {"path": "weights.npy", "format": "flat"}
    if how == "weights.h5":
        model.save_weights(d / "model.weights.h5")
        return {"path": "model.weights.h5", "format": "h5"}
    raise ValueError(how)


def write_case(tmp_path: Path, name: str, model: Any, how: str, torch_class: str, x_torch: np.ndarray, ref: np.ndarray | None,
               *, mapping: dict[str, Any] | None = None) -> Path:
    """The case folder: weights, verify input (in the torch model's layout), reference, config.yaml."""
    d = tmp_path / name
    d.mkdir()
    source = save_weights(model, d, how)
    np.save(d / "input.npy", x_torch)
    verify: dict[str, Any] = {"input": "input.npy", **TOL}
    if ref is not None:
        np.save(d / "ref.npy", ref)
        verify["reference_output"] = "ref.npy"
    raw = {"name": name, "source": source, "model": {"target": f"{TORCH_MODELS}:{torch_class}"},
           "mapping": mapping or {"strategy": "auto", "preset": "keras"}, "verify": verify, "export": {"dir": "out"}}
    (d / "config.yaml").write_text(yaml.safe_dump(raw))
    return d / "config.yaml"


def plan_rows(config: Path) -> dict[str, dict[str, Any]]:
    """What ``np2torch plan`` shows: the mapping stage's rows, by target key."""
    cfg = load_config(config)
    mapped = stages.run_all(cfg, until="infer-mapping")["infer-mapping"]
    rows = manifest.read_manifest(Path(mapped.entry) / "manifest.json")
    return {r["target_key"] or r["source_key"]: r for r in rows}


def convert(config: Path) -> dict[str, Any]:
    """All six stages; returns the stage records and the rows (by target key)."""
    cfg = load_config(config)
    recs = stages.run_all(cfg)
    rows = manifest.read_manifest(Path(recs["infer-mapping"].entry) / "manifest.json")
    return {"recs": recs, "cfg": cfg, "rows": {r["target_key"] or r["source_key"]: r for r in rows}}


def max_abs_error_of_export(config: Path, torch_class: str, x: np.ndarray, ref: np.ndarray) -> float:
    """Load the exported safetensors into the hand-written model (strict), run it, compare with Keras."""
    import importlib.util

    import torch
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("keras_torch_models_check", TORCH_MODELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = getattr(mod, torch_class)()
    model.load_state_dict(load_file(config.parent / "out" / "model.safetensors"), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    err = float(np.abs(out - ref).max())
    _record(config.parent.name, err)
    return err


def _record(name: str, err: float) -> None:
    from .conformance_support import EXPORT_RESULTS

    EXPORT_RESULTS[name] = err  # the suite's closing table (conftest's terminal summary)
    table = os.environ.get("NP2TORCH_CASE_TABLE")  # the closing table of the issue is collected from here
    if table:
        with open(table, "a") as f:
            f.write(json.dumps({"case": name, "max_abs_error": err}) + "\n")


def unverified(rows: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Unverified target rows → their candidates, as ``plan`` prints them."""
    from np2torch.tasks import transforms as T

    return {k: [T.describe(c) or "as-is" for c in r["candidates"]] for k, r in rows.items()
            if r["target_key"] and not r["verified"]}
