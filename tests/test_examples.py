"""The five bundled examples, end to end through the six stages (plain functions, no Prefect).

Each exported model.safetensors must load into a freshly built model with strict=True and
reproduce the reference outputs, which were computed on the source side (NumPy), not by np2torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, example_config, run_pipeline
from np2torch.tasks.config import load_config
from np2torch.tasks.model import build_model


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_example_converts_and_reproduces_reference(name, example_data, out_dir):
    cfg = load_config(example_config(name), [f"export.dir={out_dir}"])
    recs = run_pipeline(cfg)
    metrics = recs["verify-forward-pass"].metrics
    assert metrics["passed"] and metrics["reference"]
    assert metrics["max_abs_error"] <= cfg.verify.atol + cfg.verify.rtol * 10

    state = load_file(out_dir / "model.safetensors")
    model = build_model(cfg.model.target, cfg.model.kwargs, device="cpu")
    model.load_state_dict(state, strict=True)  # the user's way: a plain strict load
    model.eval()
    x = torch.from_numpy(np.load(cfg.verify.input))
    with torch.no_grad():
        out = model(x).numpy()
    ref = np.load(cfg.verify.reference_output)
    np.testing.assert_allclose(out, ref, rtol=cfg.verify.rtol, atol=cfg.verify.atol)
    assert {p.name for p in out_dir.iterdir()} >= {"model.safetensors", "manifest.csv"}
    if "pt" in cfg.export.formats:
        pt = torch.load(out_dir / "model.pt", weights_only=True)
        assert set(pt) == set(state)
        for k in state:
            assert torch.equal(pt[k], state[k])


def test_keras_cnn_loads_batchnorm_running_statistics(example_data, out_dir):
    """The seed article walks model.parameters() and never loads BN statistics; we must."""
    cfg = load_config(example_config("keras-cnn"), [f"export.dir={out_dir}"])
    run_pipeline(cfg)
    state = load_file(out_dir / "model.safetensors")
    with np.load(example_data / "keras-cnn" / "weights.npz") as z:
        np.testing.assert_array_equal(state["bn1.running_mean"].numpy(), z["batch_normalization/moving_mean"])
        np.testing.assert_array_equal(state["bn2.running_var"].numpy(), z["batch_normalization_1/moving_variance"])
        # the conv kernel is permuted HWIO → OIHW, not reshaped
        np.testing.assert_array_equal(state["conv1.weight"].numpy(), z["conv2d/kernel"].transpose(3, 2, 0, 1))
    assert state["bn1.num_batches_tracked"].dtype == torch.int64


def test_seed_flat_blind_reshape_would_be_garbage(example_data, out_dir):
    """The seed's Example 1 reshapes a (2, 10)-layout vector to (10, 2): np2torch transposes."""
    cfg = load_config(example_config("seed-flat"), [f"export.dir={out_dir}"])
    run_pipeline(cfg)
    w = load_file(out_dir / "model.safetensors")["weight"].numpy()
    flat = np.load(example_data / "seed-flat" / "params.npy")
    np.testing.assert_array_equal(w, flat[:20].reshape(2, 10).T)
    assert not np.array_equal(w, flat[:20].reshape(10, 2))


def test_exported_files_get_the_usual_mode_not_mkstemps_0600(example_data, out_dir):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    cfg = load_config(example_config("mlp"), [f"export.dir={out_dir}"])
    run_pipeline(cfg)
    for name in ("model.safetensors", "model.pt", "manifest.csv"):
        mode = os.stat(out_dir / name).st_mode & 0o777
        assert mode & 0o044 == 0o044 & ~umask, f"{name} is {oct(mode)}: others cannot read it"
