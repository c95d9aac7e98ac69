"""Stage 3, validate: the pandera schema reports every failure at once, by key."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_arrays
from np2torch.tasks import infer_mapping, load_arrays, model
from np2torch.tasks.config import load_config
from np2torch.tasks.errors import ValidationError
from np2torch.tasks.validate import validate_manifest


def _rows(path, overrides=()):
    cfg = load_config(path, list(overrides))
    recs = load_arrays.scan_source(cfg.source.path)
    m = model.build_model(cfg.model.target, cfg.model.kwargs)
    return cfg, infer_mapping.infer_manifest(recs, model.describe_targets(m), cfg.mapping, convert_dtype=cfg.convert.dtype)


def test_valid_manifest_passes_and_buffers_are_targets(tiny):
    cfg, rows = _rows(tiny())
    validate_manifest(rows)
    by_key = {r["target_key"]: r for r in rows}
    assert by_key["bn.running_mean"]["status"] == "mapped"  # buffers, not only parameters
    assert by_key["bn.num_batches_tracked"]["status"] == "allowed_missing"


def test_all_problems_reported_at_once(tiny):
    arrays = tiny_arrays()
    arrays["fc1.weight"] = arrays["fc1.weight"][:, :2]  # wrong shape
    del arrays["bn.running_var"]  # missing key
    arrays["optimizer/step"] = np.zeros(1, np.float32)  # unused key
    arrays["fc2.bias"] = np.array([np.nan, 1.0], np.float32)  # NaN
    _, rows = _rows(tiny(arrays=arrays), ["mapping.strategy=name"])
    with pytest.raises(ValidationError) as exc:
        validate_manifest(rows)
    text = str(exc.value)
    assert text.startswith("[validate] `fc1.weight`: the manifest fails 4 check(s); nothing was converted")
    assert "`fc1.weight`: source fc1.weight [4,2] with transform [] gives the wrong shape (expected [4,3], got [4,2])" in text
    assert "`bn.running_var`: target [4] has no source array" in text
    assert ("`optimizer/step`: source array [1] is not used by any target — fix: map it with a rule, "
            "or leave it out on purpose with mapping.ignore") in text
    assert "`fc2.bias`: source fc2.bias holds 1 NaN/Inf value(s)" in text


def test_ignore_and_allow_nonfinite(tiny):
    arrays = tiny_arrays()
    arrays["optimizer/step"] = np.zeros(1, np.float32)
    arrays["fc2.bias"] = np.array([np.inf, 1.0], np.float32)
    path = tiny(arrays=arrays, mapping={"ignore": ["optimizer/.*"]}, source={"path": "weights.npz", "allow_nonfinite": True})
    cfg, rows = _rows(path)
    validate_manifest(rows, allow_nonfinite=cfg.source.allow_nonfinite)


def test_float16_overflow_named_before_casting(tiny):
    arrays = {k: v.astype(np.float64) for k, v in tiny_arrays().items()}
    arrays["fc1.weight"][0, 0] = 1e6
    _, rows = _rows(tiny(arrays=arrays), ["convert.dtype=float16"])
    with pytest.raises(ValidationError, match=r"`fc1.weight`: 1 value\(s\) of source fc1.weight exceed float16's maximum 65504 "
                                              r"\(largest \|x\| 1e\+06\)"):
        validate_manifest(rows)
