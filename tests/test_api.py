"""The Python API as a notebook user calls it: np2torch.load_into / plan / inspect / convert."""

from __future__ import annotations

import hashlib
import json
import os
import pydoc
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import np2torch
from conftest import REPO, example_config, tiny_arrays, tiny_reference
from np2torch.tasks.errors import ConfigError, LoadError, MappingError, ValidationError, VerifyError

sys.path.insert(0, str(REPO / "data"))
import reference_ops as R  # noqa: E402  (NumPy ops with Keras semantics: the source side, not np2torch)


def seed_model() -> nn.Sequential:
    """The seed article's Example 2 shape, with the Flatten it forgot: conv → flatten → two Linears."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 10))


def keras_weights(path: Path) -> dict[str, np.ndarray]:
    """What Keras' Conv2D/Dense would save: HWIO kernels, (in, out) dense kernels, an (H, W, C) flatten."""
    rng = np.random.default_rng(0)
    w = {"conv2d/kernel": rng.standard_normal((3, 3, 3, 4)) * 0.3, "conv2d/bias": rng.standard_normal(4) * 0.1,
         "dense/kernel": rng.standard_normal((144, 16)) * 0.1, "dense/bias": rng.standard_normal(16) * 0.1,
         "dense_1/kernel": rng.standard_normal((16, 10)) * 0.3, "dense_1/bias": rng.standard_normal(10) * 0.1}
    w = {k: v.astype("float32") for k, v in w.items()}
    np.savez(path, **w)
    return w


def keras_forward(w: dict[str, np.ndarray], x_nhwc: np.ndarray) -> np.ndarray:
    """The source model's output, computed in NumPy in the source (channels-last) layout."""
    h = np.maximum(R.conv2d_nhwc(x_nhwc, w["conv2d/kernel"], w["conv2d/bias"]), 0)
    h = np.maximum(R.dense(R.flatten_nhwc(h), w["dense/kernel"], w["dense/bias"]), 0)
    return R.dense(h, w["dense_1/kernel"], w["dense_1/bias"])


@pytest.fixture
def keras_case(tmp_path):
    w = keras_weights(tmp_path / "weights.npz")
    x = np.random.default_rng(1).standard_normal((4, 8, 8, 3)).astype("float32")
    return tmp_path / "weights.npz", w, x, keras_forward(w, x)


def test_load_into_seed_model_from_keras_npz_reproduces_the_numpy_reference(keras_case):
    path, w, x, y = keras_case
    model = seed_model()
    params_before = {k: id(p) for k, p in model.named_parameters()}
    x_nchw = x.transpose(0, 3, 1, 2)  # the torch model takes channels-first
    out_model, manifest = np2torch.load_into(model, path, preset="keras", reference=(x_nchw, y))

    assert out_model is model and {k: id(p) for k, p in model.named_parameters()} == params_before  # filled in place
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(np.ascontiguousarray(x_nchw))).numpy()
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-5)
    # the Keras conventions, each row named: HWIO → OIHW, (in, out) → (out, in), and the (H, W, C) flatten
    rows = {r.target_key: r for r in manifest.targets}
    assert rows["0.weight"].source_key == "conv2d/kernel" and rows["0.weight"].transform == "permute=[3,2,0,1]"
    assert rows["3.weight"].source_key == "dense/kernel" and "flatten_nhwc_to_nchw=[4,6,6]" in rows["3.weight"].transform
    assert rows["5.weight"].source_key == "dense_1/kernel" and rows["5.weight"].transform == "transpose"
    assert manifest.unverified == [] and manifest.unused == []
    assert manifest.verification["passed"] and manifest.verification["max_abs_error"] < 1e-5
    np.testing.assert_array_equal(model[0].weight.detach().numpy(), w["conv2d/kernel"].transpose(3, 2, 0, 1))
    df = manifest.df
    assert list(df.target_key[:6]) == ["0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    assert df.loc[df.target_key == "3.weight", "target_shape"].item() == [16, 144]


def test_load_into_without_reference_leaves_ambiguous_rows_unverified(keras_case):
    path, w, _, _ = keras_case
    model, manifest = np2torch.load_into(seed_model(), path, preset="keras")
    assert manifest.verification is None
    assert "3.weight" in manifest.unverified  # a Linear after a flatten: shapes cannot tell the feature order
    assert "unverified" in repr(manifest)


def test_load_into_with_inputs_only_checks_shapes_and_finiteness(keras_case):
    path, _, x, _ = keras_case
    _, manifest = np2torch.load_into(seed_model(), path, preset="keras", reference=(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), None))
    v = manifest.verification
    assert v["passed"] and not v["reference"] and v["output_shapes"] == [[4, 10]] and v["finite"]


def test_load_into_casts_dtype(keras_case):
    path, _, x, y = keras_case
    model, manifest = np2torch.load_into(seed_model(), path, preset="keras", reference=(x.transpose(0, 3, 1, 2), y), dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert set(manifest.df.target_dtype) == {"float64"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_load_into_moves_the_model_to_cuda(keras_case):
    path, w, x, y = keras_case
    model, manifest = np2torch.load_into(seed_model(), path, preset="keras", reference=(x.transpose(0, 3, 1, 2), y), device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"} and manifest.verification["passed"]
    np.testing.assert_array_equal(model[5].bias.cpu().detach().numpy(), w["dense_1/bias"])


def test_load_into_a_model_built_on_meta(keras_case):
    path, w, x, y = keras_case
    with torch.device("meta"):
        model = seed_model()
    np2torch.load_into(model, path, preset="keras", reference=(x.transpose(0, 3, 1, 2), y))
    assert all(p.device.type == "cpu" for p in model.parameters())
    np.testing.assert_array_equal(model[5].bias.detach().numpy(), w["dense_1/bias"])


def _tiny_model(config: Path):
    """The tiny conversion's model, as an instance (from the ``tiny_model.py`` beside its config)."""
    sys.path.insert(0, str(config.parent))
    try:
        import importlib

        mod = importlib.import_module("tiny_model")
        mod = importlib.reload(mod)
    finally:
        sys.path.remove(str(config.parent))
    return mod.Tiny()


def test_load_into_missing_key_raises_the_pipelines_validation_error(tiny, tmp_path):
    arrays = tiny_arrays()
    del arrays["fc2.bias"]
    cfg = tiny(arrays=arrays)
    model = _tiny_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValidationError) as api_err:
        np2torch.load_into(model, tmp_path / "weights.npz", strategy="name", allow_missing=[".*num_batches_tracked"])
    _, _, pipeline_err = np2torch.api.plan_rows(cfg, ["mapping.strategy=name"])
    assert isinstance(pipeline_err, ValidationError)
    assert str(api_err.value) == str(pipeline_err)  # the same stage, keys, reasons and fixes
    assert "`fc2.bias`: target [2] has no source array" in str(api_err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_load_into_wrong_reference_is_a_verify_error_naming_the_tolerance(tiny, tmp_path):
    model = _tiny_model(tiny())
    arrays = tiny_arrays()
    x = np.random.default_rng(1).standard_normal((5, 3)).astype("float32")
    y = tiny_reference(arrays, x)
    np2torch.load_into(model, tmp_path / "weights.npz", allow_missing=[".*num_batches_tracked"], reference=(x, y), atol=1e-5)
    with pytest.raises(VerifyError, match=r"does not reproduce the reference.*max abs error") as exc:
        np2torch.load_into(model, tmp_path / "weights.npz", allow_missing=[".*num_batches_tracked"], reference=(x, y + 1.0))
    assert exc.value.stage == "verify-forward-pass" and exc.value.key == "verify.reference_output"


@pytest.mark.parametrize("kwargs, error, message", [
    ({"preset": "pytorch"}, ConfigError, r"`mapping.preset`: Input should be 'none', 'keras', 'tf' or 'flax'"),
    ({"strategy": "names"}, ConfigError, r"`mapping.strategy`"),
    ({"rules": [{"source": "dense/kernel", "target": "3.weight", "transform": ["transpos"]}]}, ConfigError,
     r"unknown transform 'transpos'"),
    ({"reference": np.zeros(3)}, ConfigError, r"reference must be a pair \(inputs, expected outputs\)"),
    ({"device": "tpu"}, ConfigError, r"device 'tpu' must be cpu, cuda, cuda:N or mps"),
])
def test_load_into_bad_arguments_are_config_errors_naming_the_key(keras_case, kwargs, error, message):
    path, *_ = keras_case
    with pytest.raises(error, match=message):
        np2torch.load_into(seed_model(), path, **kwargs)


def test_load_into_bad_source_and_model(tmp_path, keras_case):
    path, *_ = keras_case
    with pytest.raises(LoadError, match="does not exist"):
        np2torch.load_into(seed_model(), tmp_path / "nope.npz")
    with pytest.raises(ConfigError, match="not an nn.Module"):
        np2torch.load_into({"weight": 1}, path)
    # a model the weights do not fit: the mapping stage names the target it cannot fill
    with pytest.raises((MappingError, ValidationError)) as exc:
        np2torch.load_into(nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(180, 10)), path, preset="keras")
    assert exc.value.stage in ("infer-mapping", "validate") and exc.value.key


def test_help_is_useful():
    text = pydoc.render_doc(np2torch.load_into, renderer=pydoc.plaintext)
    for words in ("reference", "(inputs, expected_outputs)", "preset", "Raises", "Example", "manifest.df"):
        assert words in text, words
    assert "load_into" in dir(np2torch) and "convert" in np2torch.__all__


# --- plan and inspect ----------------------------------------------------------------------


def test_plan_returns_the_manifest_dataframe_and_writes_nothing(example_data, isolated_data):
    df = np2torch.plan(example_config("keras-cnn"))
    assert df.attrs["valid"] and df.attrs["name"] == "keras-cnn" and df.attrs["problems"] == []
    conv = df.set_index("target_key").loc["conv1.weight"]
    assert conv["source_key"] == "conv2d/kernel" and conv["transform"] == "permute=[3,2,0,1]" and conv["target_shape"] == [8, 1, 3, 3]
    assert (df.status == "allowed_missing").sum() == 2  # the two num_batches_tracked
    assert not isolated_data.exists()


def test_plan_of_a_model_instance_touches_nothing(keras_case):
    path, *_ = keras_case
    model = seed_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    df = np2torch.plan(model, path, preset="keras")
    assert df.attrs["valid"] and df.attrs["unverified"] == ["3.weight"]  # the Linear after the flatten: no reference given
    assert list(df.loc[df.target_key != "", "source_key"][:2]) == ["conv2d/kernel", "conv2d/bias"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="unexpected option"):
        np2torch.plan(model, path, presett="keras")


def test_plan_of_a_failing_config_lists_every_problem(tiny):
    arrays = tiny_arrays()
    del arrays["fc2.bias"], arrays["bn.bias"]
    df = np2torch.plan(tiny(arrays=arrays), overrides=["mapping.strategy=name"])
    assert not df.attrs["valid"]
    assert {p["key"] for p in df.attrs["problems"]} == {"fc2.bias", "bn.bias"}
    assert set(df.loc[df.status == "missing", "target_key"]) == {"fc2.bias", "bn.bias"}


def test_plan_override_error_names_the_set(tiny):
    with pytest.raises(ConfigError, match=r"`convert.dtype`: .*\(from --set convert.dtype=float17\)"):
        np2torch.plan(tiny(), overrides=["convert.dtype=float17"])


def test_inspect_returns_one_row_per_array(example_data, isolated_data):
    df = np2torch.inspect(example_data / "keras-cnn" / "weights.npz")
    assert len(df) == 16 and df.nbytes.sum() > 0
    row = df.set_index("key").loc["conv2d/kernel"]
    assert row["shape"] == [3, 3, 1, 8] and row["dtype"] == "<f4" and row["nonfinite"] == 0
    with pytest.raises(LoadError, match="allow"):
        np2torch.inspect(example_data / "seed-pickled" / "params.npy")
    assert len(np2torch.inspect(example_data / "seed-pickled" / "params.npy", allow_pickle=True)) > 0
    assert not isolated_data.exists()


# --- convert -------------------------------------------------------------------------------


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_convert_without_orchestration_returns_the_typed_audit_record(example_data, tmp_path, isolated_data):
    out = tmp_path / "out"
    result = np2torch.convert(example_config("mlp"), overrides=[f"export.dir={out}"], orchestrate=False)
    assert isinstance(result, np2torch.ConversionResult)
    assert result.status == "success" and result.name == "mlp" and result.run_id is None
    assert set(result.files) == {"model.safetensors", "model.pt", "manifest.csv"}
    for o in result.outputs:
        assert o.path.parent == out and o.bytes == o.path.stat().st_size and o.sha256 == _sha256(o.path)
    assert list(result.stages) == ["load-arrays", "infer-mapping", "validate", "convert-to-device", "verify-forward-pass", "export"]
    assert result.cache_hits == 0 and all(s.seconds >= 0 and not s.failed for s in result.stages.values())
    assert result.verification["passed"] and result.verification["reference"]
    assert result.record_path == out / "report.json" and json.loads(result.record_path.read_text())["config_sha256"] == result.config_sha256
    log = [json.loads(line) for line in (isolated_data / "audit.jsonl").read_text().splitlines()]
    assert log[-1]["name"] == "mlp" and log[-1]["status"] == "success"
    again = np2torch.convert(example_config("mlp"), overrides=[f"export.dir={out}"], orchestrate=False)
    assert again.cache_hits == 6 and [o.sha256 for o in again.outputs] == [o.sha256 for o in result.outputs]
    # the same audit record as a flow run's: the overrides and --refresh are in it (`np2torch audit` shows them)
    assert log[-1]["overrides"] == [f"export.dir={out}"] and log[-1]["refresh"] is False and log[-1]["manifest_path"]
    fresh = np2torch.convert(example_config("mlp"), overrides=[f"export.dir={out}"], refresh=True, orchestrate=False)
    assert fresh.cache_hits == 0 and fresh.record["refresh"] is True and fresh.record["overrides"] == [f"export.dir={out}"]


def test_a_stage_s_time_includes_computing_its_key(example_data, tmp_path, monkeypatch):
    """Hashing the sources for load-arrays' key is load-arrays' work: its seconds say so (summary, audit record, report.json)."""
    from np2torch.tasks import load_arrays

    real = load_arrays.fingerprint_files

    def slow(*a, **kw):  # noqa: ANN002, ANN003 - the key's hashing pass, made measurable
        import time

        time.sleep(0.6)
        return real(*a, **kw)

    monkeypatch.setattr(load_arrays, "fingerprint_files", slow)
    result = np2torch.convert(example_config("mlp"), overrides=[f"export.dir={tmp_path / 'out'}"], orchestrate=False)
    assert result.stages["load-arrays"].seconds >= 0.6
    assert json.loads(result.record_path.read_text())["stages"]["load-arrays"]["seconds"] >= 0.6


def test_convert_without_orchestration_failure_raises_and_is_audited(tiny, isolated_data):
    arrays = tiny_arrays()
    del arrays["fc2.bias"]
    with pytest.raises(ValidationError):
        np2torch.convert(tiny(arrays=arrays), overrides=["mapping.strategy=name"], orchestrate=False)
    rec = json.loads((isolated_data / "audit.jsonl").read_text().splitlines()[-1])
    assert rec["status"] == "failed" and rec["error"]["stage"] == "validate" and rec["stages"]["validate"]["failed"]


def test_convert_as_a_prefect_flow_run(prefect_harness, example_data, tmp_path, capfd):
    out = tmp_path / "out"
    result = np2torch.convert(example_config("mlp"), overrides=[f"export.dir={out}"])
    assert result.status == "success" and result.run_id  # a real flow run
    assert result.files["model.safetensors"].is_file() and result.record_path == out / "report.json"
    assert result.stages["verify-forward-pass"].attempts >= 1
    captured = capfd.readouterr()
    assert "database is locked" not in captured.err + captured.out


def _readme_api_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):text.index("\n## ", text.index("## Python API") + 3)]
    return [b.split("\n", 1)[1] for b in section.split("```python")[1:] for b in [b[: b.index("```")]]]


@pytest.mark.slow
def test_readme_python_api_example_runs(example_data, tmp_path):
    """The README's notebook example, as written, in a copy of the repository's configs and data."""
    import shutil
    import subprocess

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copytree(example_data, tmp_path / "data" / "examples")
    blocks = _readme_api_blocks()
    assert len(blocks) == 2 and "np2torch.load_into(" in blocks[0] and "np2torch.convert(" in blocks[1]
    # a notebook shows the last expression of a cell; print it so the test can read it
    checks = ("\nassert manifest.unverified == [] and manifest.verification['passed'], manifest\n"
              "print('CELL1', manifest)\n")
    checks2 = ("\nassert result.status == 'success' and result.files['model.safetensors'].is_file()\n"
               "assert plan.attrs['valid'] and len(df) == 16\nprint('CELL2', result.stages['export'])\n")
    env = {**os.environ, "NP2TORCH_DATA_DIR": str(tmp_path / "data")}
    r = subprocess.run([sys.executable, "-c", blocks[0] + checks + blocks[1] + checks2], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "CELL1 <Manifest: 18 targets, 0 unverified, 0 unused source keys, verified: max abs error" in r.stdout
    assert "CELL2 StageTiming(" in r.stdout
    assert "database is locked" not in r.stderr
