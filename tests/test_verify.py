"""Stage 5, verify-forward-pass: reference comparison, shapes/finiteness, clear failures."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_pipeline
from np2torch.tasks.config import InputSpec, load_config
from np2torch.tasks.errors import VerifyError
from np2torch.tasks.verify import compare, make_inputs


def test_compare_metrics_and_tolerances():
    out = [np.array([1.0, 2.0, 3.0])]
    ref = [np.array([1.0, 2.0, 3.001])]
    m = compare(out, ref, rtol=0, atol=1e-2)
    assert m["passed"] and m["max_abs_error"] == pytest.approx(1e-3)
    m = compare(out, ref, rtol=0, atol=1e-4)
    assert not m["passed"] and m["mismatched"] == 1
    assert not compare([np.array([np.nan])], None, rtol=0, atol=0)["passed"]
    assert "output 0 has shape [3], reference [2]" in compare(out, [np.zeros(2)], rtol=0, atol=1)["problems"][0]


def test_generated_input_is_reproducible():
    a = make_inputs(InputSpec(shape=[2, 3], seed=7))[0]
    b = make_inputs(InputSpec(shape=[2, 3], seed=7))[0]
    assert a.dtype == np.float32 and np.array_equal(a, b)


def test_wrong_weights_fail_verification_with_the_error(tiny, tmp_path):
    path = tiny()
    np.save(tmp_path / "ref.npy", np.load(tmp_path / "ref.npy") + 0.5)  # a reference the weights cannot meet
    with pytest.raises(VerifyError, match=r"\[verify-forward-pass\] `verify.reference_output`: "
                                          r"the converted model does not reproduce the reference: "
                                          r"10 element\(s\) outside atol=1e-06"):
        run_pipeline(load_config(path))


def test_no_reference_checks_shapes_and_finiteness(tiny):
    cfg = load_config(tiny(verify={"input": {"shape": [4, 3], "seed": 0}, "reference_output": None}))
    m = run_pipeline(cfg)["verify-forward-pass"].metrics
    assert m == {**m, "passed": True, "reference": False, "output_shapes": [[4, 2]], "finite": True}


def test_forward_that_raises_is_a_verify_error(tiny, tmp_path):
    import torch

    path = tiny()
    conv = np.random.default_rng(0).standard_normal((2, 1, 3, 3)).astype("float32")
    np.savez(tmp_path / "w2.npz", **{"conv.weight": conv, "conv.bias": np.zeros(2, "float32"),
                                     "fc.weight": np.zeros((3, 8), "float32"), "fc.bias": np.zeros(3, "float32")})
    cfg = load_config(path, ["model.target=tiny_model.py:NoFlatten", "source.path=w2.npz",
                             "verify.input={shape: [1, 1, 4, 4]}", "verify.reference_output=null"])
    with pytest.raises(VerifyError, match=r"the forward pass raised RuntimeError: .*mat1 and mat2 shapes cannot be multiplied.*"
                                          r"\(expected the model to accept the verify input, got inputs of shape \[\[1, 1, 4, 4\]\]\)"
                                          r"\nFix: check verify.input's shape and the model's forward \(e.g. a missing Flatten\)"):
        run_pipeline(cfg)
    del torch
