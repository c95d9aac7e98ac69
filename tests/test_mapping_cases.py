"""Real checkpoints' conventions, converted through the real stages and checked against NumPy.

Every case builds its source arrays the way the source framework stores them (Keras/TF
channels-last kernels, (in, out) dense kernels, Keras gate orders, TF1 scope names, Flax
``params/Dense_0/kernel``), computes the reference output with the source framework's
semantics in NumPy (data/reference_ops.py), converts with ``tasks.stages`` and compares. The
wrong-choice paths are asserted too: the rejected candidate's error is in the manifest.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from np2torch.tasks import manifest, stages
from np2torch.tasks.config import load_config
from np2torch.tasks.errors import MappingError, VerifyError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
import reference_ops as ops  # noqa: E402

MODELS = REPO / "tests" / "mapping_models.py"
KERAS_CNN = REPO / "configs" / "models" / "keras_cnn.py"
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _init(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.5) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def run_case(tmp_path: Path, name: str, arrays: dict[str, np.ndarray], target: str, kwargs: dict[str, Any], mapping: dict[str, Any],
             x: np.ndarray, ref: np.ndarray | None, *, activations: dict[str, np.ndarray] | None = None,
             until: str = "verify") -> dict[str, Any]:
    """Write the case's files and config, run the stages, return rows (by target key) and metrics."""
    d = tmp_path / name
    d.mkdir()
    np.savez(d / "weights.npz", **arrays)
    np.save(d / "input.npy", x)
    verify: dict[str, Any] = {"input": "input.npy", **TOL}
    if ref is not None:
        np.save(d / "ref.npy", ref)
        verify["reference_output"] = "ref.npy"
    if activations is not None:
        np.savez(d / "acts.npz", **activations)
        verify["reference_activations"] = "acts.npz"
    raw = {"name": name, "source": {"path": "weights.npz", "format": "npz"}, "model": {"target": target, "kwargs": kwargs},
           "mapping": mapping, "verify": verify, "export": {"dir": "out"}}
    (d / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(d / "config.yaml")
    recs = stages.run_all(cfg, until="infer-mapping" if until == "mapping" else "verify-forward-pass")
    rows = manifest.read_manifest(recs["infer-mapping"].path("manifest.json"))
    out: dict[str, Any] = {"rows": {r["target_key"] or r["source_key"]: r for r in rows}, "cfg": cfg, "mapped": recs["infer-mapping"]}
    if until == "mapping":
        return out
    out.update(converted=recs["convert-to-device"], metrics=recs["verify-forward-pass"].metrics)
    _record(name, out["metrics"])
    return out


def _record(name: str, metrics: dict[str, Any]) -> None:
    table = os.environ.get("NP2TORCH_CASE_TABLE")  # the closing table of the issue is collected from here
    if table:
        with open(table, "a") as f:
            f.write(json.dumps({"case": name, "max_abs_error": metrics["max_abs_error"], "passed": metrics["passed"]}) + "\n")


def evidence(row: dict[str, Any]) -> dict[str, Any]:
    return row["evidence"]


# ---------------------------------------------------------------------------------------------
# Keras CNN: Conv2D + BatchNormalization + Flatten + Dense, no hand-written rule


def keras_cnn(rng: np.random.Generator, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    p: dict[str, np.ndarray] = {}
    p["conv2d/kernel:0"], p["conv2d/bias:0"] = _init(rng, (3, 3, 1, 8)), _init(rng, (8,))
    for name, c in (("batch_normalization", 8), ("batch_normalization_1", 16)):
        p[f"{name}/gamma:0"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        p[f"{name}/beta:0"] = _init(rng, (c,), 0.2)
        p[f"{name}/moving_mean:0"] = _init(rng, (c,))
        p[f"{name}/moving_variance:0"] = rng.uniform(0.3, 2.5, c).astype(np.float32)
    p["conv2d_1/kernel:0"], p["conv2d_1/bias:0"] = _init(rng, (3, 3, 8, 16), 0.2), _init(rng, (16,))
    p["dense/kernel:0"], p["dense/bias:0"] = _init(rng, (16 * 3 * 3, 32), 0.1), _init(rng, (32,))
    p["dense_1/kernel:0"], p["dense_1/bias:0"] = _init(rng, (32, 10), 0.3), _init(rng, (10,))

    def bn(t, n):
        return ops.batchnorm(t, p[f"{n}/gamma:0"], p[f"{n}/beta:0"], p[f"{n}/moving_mean:0"], p[f"{n}/moving_variance:0"])

    acts = {"conv1": ops.conv2d_nhwc(x, p["conv2d/kernel:0"], p["conv2d/bias:0"])}
    acts["bn1"] = bn(acts["conv1"], "batch_normalization")
    t = ops.maxpool2d_nhwc(ops.relu(acts["bn1"]))
    acts["conv2"] = ops.conv2d_nhwc(t, p["conv2d_1/kernel:0"], p["conv2d_1/bias:0"])
    acts["bn2"] = bn(acts["conv2"], "batch_normalization_1")
    acts["fc1"] = ops.dense(ops.flatten_nhwc(ops.relu(acts["bn2"])), p["dense/kernel:0"], p["dense/bias:0"])
    acts["fc2"] = ops.dense(ops.relu(acts["fc1"]), p["dense_1/kernel:0"], p["dense_1/bias:0"])
    return p, acts["fc2"], acts


CNN_KW = {"in_channels": 1, "image_size": 12, "num_classes": 10}
KERAS_MAPPING = {"preset": "keras", "allow_missing": [".*num_batches_tracked"]}


def test_keras_cnn_batchnorm_and_dense_after_flatten_without_a_rule(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 12, 12, 1)).astype(np.float32)
    p, ref, _ = keras_cnn(rng, x)
    case = run_case(tmp_path, "keras-cnn", p, f"{KERAS_CNN}:KerasCNN", CNN_KW, KERAS_MAPPING, x, ref)
    rows = case["rows"]
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    assert rows["bn2.running_var"]["source_key"] == "batch_normalization_1/moving_variance:0"
    assert rows["conv2.weight"]["transform"] == "permute=[3,2,0,1]"
    fc1 = rows["fc1.weight"]
    assert fc1["transform"] == "transpose; flatten_nhwc_to_nchw=[16,3,3]" and fc1["verified"]
    ev = evidence(fc1)
    assert ev["reproduces"] and ev["errors"]["transpose; flatten_nhwc_to_nchw=[16,3,3]"] < 1e-5
    assert ev["errors"]["transpose"] > 1e-2  # the wrong candidate: flatten order left channels-first


def test_keras_cnn_without_reference_reports_the_flatten_row_unverified(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 12, 12, 1)).astype(np.float32)
    p, _, _ = keras_cnn(rng, x)
    case = run_case(tmp_path, "keras-cnn-noref", p, f"{KERAS_CNN}:KerasCNN", CNN_KW, KERAS_MAPPING, x, None, until="mapping")
    fc1 = case["rows"]["fc1.weight"]
    assert not fc1["verified"] and float(fc1["confidence"]) <= 0.5
    assert [c[-1][0] for c in fc1["candidates"]] == ["flatten_nhwc_to_nchw", "transpose"]
    assert case["mapped"].unverified == ["fc1.weight"]


def test_reference_no_candidate_reproduces_fails_naming_the_dense_layer_and_rule(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 12, 12, 1)).astype(np.float32)
    p, ref, _ = keras_cnn(rng, x)
    bad = dict(p)
    bad["conv2d_1/bias:0"] = bad["conv2d_1/bias:0"] + 1.0  # the reference was computed with other weights
    with pytest.raises(MappingError, match=r"fc1\.weight.*no candidate layout reproduces the reference") as ei:
        run_case(tmp_path, "keras-cnn-bad", bad, f"{KERAS_CNN}:KerasCNN", CNN_KW, KERAS_MAPPING, x, ref, until="mapping")
    assert "flatten_nhwc_to_nchw" in ei.value.fix and "dense/kernel:0" in ei.value.fix


def test_verify_failure_names_the_first_diverging_layer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 12, 12, 1)).astype(np.float32)
    p, ref, acts = keras_cnn(rng, x)
    # a wrong hand-written rule: fc1 without the flatten reorder; everything before it is right
    mapping = {**KERAS_MAPPING, "rules": [{"source": "dense/kernel:0", "target": "fc1.weight", "transform": ["transpose"]}]}
    with pytest.raises(VerifyError, match=r"first diverging layer: fc1 \(reference_activations"):
        run_case(tmp_path, "keras-cnn-wrong-rule", p, f"{KERAS_CNN}:KerasCNN", CNN_KW, mapping, x, ref, activations=acts)


def test_reference_activations_choose_per_layer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 12, 12, 1)).astype(np.float32)
    p, _, acts = keras_cnn(rng, x)
    case = run_case(tmp_path, "keras-cnn-acts", p, f"{KERAS_CNN}:KerasCNN", CNN_KW, KERAS_MAPPING, x, None,
                    activations={k: v for k, v in acts.items() if k in ("conv1", "bn1", "fc1")})
    ev = evidence(case["rows"]["fc1.weight"])
    assert ev["method"] == "reference activation of fc1" and ev["chosen"].endswith("flatten_nhwc_to_nchw=[16,3,3]")
    assert ev["errors"]["transpose"] > 1e-2


# ---------------------------------------------------------------------------------------------
# recurrent layers


def _rnn_arrays(rng: np.random.Generator, gates: int, gru: bool) -> dict[str, np.ndarray]:
    n_in, u = 3, 5
    cell = "gru_cell" if gru else "lstm_cell"
    layer = "gru" if gru else "lstm"
    return {
        f"{layer}/{cell}/kernel:0": _init(rng, (n_in, gates * u)),
        f"{layer}/{cell}/recurrent_kernel:0": _init(rng, (u, gates * u)),
        f"{layer}/{cell}/bias:0": _init(rng, (2, gates * u) if gru else (gates * u,)),
        "dense/kernel:0": _init(rng, (u, 2)),
        "dense/bias:0": _init(rng, (2,)),
    }


@pytest.mark.parametrize("gru", [False, True], ids=["lstm", "gru"])
def test_keras_recurrent_layer_into_torch(tmp_path: Path, gru: bool) -> None:
    rng = np.random.default_rng(1)
    p = _rnn_arrays(rng, 3 if gru else 4, gru)
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    layer, cell = ("gru", "gru_cell") if gru else ("lstm", "lstm_cell")
    fn = ops.gru_keras if gru else ops.lstm_keras
    h = fn(x, *(p[f"{layer}/{cell}/{k}:0"] for k in ("kernel", "recurrent_kernel", "bias")))
    ref = ops.dense(h, p["dense/kernel:0"], p["dense/bias:0"])
    case = run_case(tmp_path, layer, p, f"{MODELS}:{'GRUNet' if gru else 'LSTMNet'}", {}, {"preset": "keras"}, x, ref)
    rows = case["rows"]
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    if gru:
        assert rows["rnn.weight_ih_l0"]["transform"] == "transpose; reorder_chunks=[1,0,2]"
        assert rows["rnn.bias_hh_l0"]["transform"] == "index=1; reorder_chunks=[1,0,2]"
    else:
        assert rows["rnn.bias_hh_l0"]["status"] == "zeros" and rows["rnn.bias_ih_l0"]["source_key"] == "lstm/lstm_cell/bias:0"


def test_keras_gru_without_reset_after_is_reported(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    p = _rnn_arrays(rng, 3, True)
    p["gru/gru_cell/bias:0"] = p["gru/gru_cell/bias:0"][0]  # reset_after=False: one (3u,) bias
    with pytest.raises(MappingError, match=r"gru/gru_cell/bias:0.*reset_after=False GRU.*cannot express") as ei:
        run_case(tmp_path, "gru-v1", p, f"{MODELS}:GRUNet", {}, {"preset": "keras"}, np.zeros((1, 2, 3), np.float32), None, until="mapping")
    assert "reset_after=True" in ei.value.fix


# ---------------------------------------------------------------------------------------------
# Flax


def test_flax_mlp_sorted_params_with_square_kernel(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    sizes = [4, 8, 8, 3]
    p = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        p[f"params/Dense_{i}/bias"], p[f"params/Dense_{i}/kernel"] = _init(rng, (b,)), _init(rng, (a, b))
    x = rng.standard_normal((5, 4)).astype(np.float32)
    t = x
    for i in range(3):
        t = ops.dense(t, p[f"params/Dense_{i}/kernel"], p[f"params/Dense_{i}/bias"])
        t = np.tanh(t) if i < 2 else t
    case = run_case(tmp_path, "flax-mlp", dict(sorted(p.items())), f"{MODELS}:MLP", {"sizes": sizes}, {"preset": "flax"}, x, t)
    rows = case["rows"]
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    assert [rows[f"layers.{i}.weight"]["source_key"] for i in range(3)] == [f"params/Dense_{i}/kernel" for i in range(3)]
    ev = evidence(rows["layers.1.weight"])  # (8, 8): only the reference tells the orientation
    assert ev["chosen"] == "transpose" and ev["errors"]["as-is"] > 1e-2


def test_flax_cnn_conv_then_dense(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    p = {"params/Conv_0/bias": _init(rng, (4,)), "params/Conv_0/kernel": _init(rng, (3, 3, 2, 4)),
         "params/Dense_0/bias": _init(rng, (5,)), "params/Dense_0/kernel": _init(rng, (64, 5), 0.2)}
    x = rng.standard_normal((2, 6, 6, 2)).astype(np.float32)
    t = ops.relu(ops.conv2d_nhwc(x, p["params/Conv_0/kernel"], p["params/Conv_0/bias"]))
    ref = ops.dense(ops.flatten_nhwc(t), p["params/Dense_0/kernel"], p["params/Dense_0/bias"])
    case = run_case(tmp_path, "flax-cnn", p, f"{MODELS}:FlaxCNN", {}, {"preset": "flax"}, x, ref)
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    assert case["rows"]["conv.weight"]["how"] == "structure"
    assert evidence(case["rows"]["fc.weight"])["chosen"] == "transpose; flatten_nhwc_to_nchw=[4,4,4]"


# ---------------------------------------------------------------------------------------------
# TF1 BERT encoder layer, ViT block with fused qkv


def test_tf1_bert_encoder_layer(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    d, inter, heads = 8, 16, 2
    pre = "bert/encoder/layer_0/"
    p = {}
    for n in ("query", "key", "value"):
        p[f"{pre}attention/self/{n}/kernel"], p[f"{pre}attention/self/{n}/bias"] = _init(rng, (d, d)), _init(rng, (d,), 0.1)
    p[f"{pre}attention/output/dense/kernel"], p[f"{pre}attention/output/dense/bias"] = _init(rng, (d, d)), _init(rng, (d,), 0.1)
    p[f"{pre}intermediate/dense/kernel"], p[f"{pre}intermediate/dense/bias"] = _init(rng, (d, inter)), _init(rng, (inter,), 0.1)
    p[f"{pre}output/dense/kernel"], p[f"{pre}output/dense/bias"] = _init(rng, (inter, d)), _init(rng, (d,), 0.1)
    for s in ("attention/output/", "output/"):
        p[f"{pre}{s}LayerNorm/gamma"] = rng.uniform(0.5, 1.5, d).astype(np.float32)
        p[f"{pre}{s}LayerNorm/beta"] = _init(rng, (d,), 0.1)
    x = rng.standard_normal((2, 5, d)).astype(np.float32)
    g = {k.removeprefix(pre): v for k, v in p.items()}
    a = ops.attention(x, *(g[f"attention/self/{n}/{w}"] for n in ("query", "key", "value") for w in ("kernel", "bias")),
                      g["attention/output/dense/kernel"], g["attention/output/dense/bias"], heads)
    h = ops.layernorm(a + x, g["attention/output/LayerNorm/gamma"], g["attention/output/LayerNorm/beta"])
    f = ops.dense(ops.gelu(ops.dense(h, g["intermediate/dense/kernel"], g["intermediate/dense/bias"])),
                  g["output/dense/kernel"], g["output/dense/bias"])
    ref = ops.layernorm(f + h, g["output/LayerNorm/gamma"], g["output/LayerNorm/beta"])
    case = run_case(tmp_path, "bert", dict(sorted(p.items())), f"{MODELS}:BertEncoder", {"d": d, "inter": inter, "heads": heads},
                    {"preset": "tf"}, x, ref)
    rows = case["rows"]
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    q = rows["encoder.layer.0.attention.self.query.weight"]
    assert q["source_key"] == f"{pre}attention/self/query/kernel" and q["how"] == "name-suffix"
    assert evidence(q)["chosen"] == "transpose" and evidence(q)["errors"]["as-is"] > 1e-3
    assert rows["encoder.layer.0.output.LayerNorm.weight"]["source_key"] == f"{pre}output/LayerNorm/gamma"


def test_vit_block_separate_qkv_into_fused_weight_by_rules(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    d, hidden, heads = 8, 16, 2
    p = {}
    for n in ("query", "key", "value"):
        p[f"blocks_0/attn/{n}/kernel"], p[f"blocks_0/attn/{n}/bias"] = _init(rng, (d, d)), _init(rng, (d,), 0.1)
    p["blocks_0/attn/proj/kernel"], p["blocks_0/attn/proj/bias"] = _init(rng, (d, d)), _init(rng, (d,), 0.1)
    p["blocks_0/mlp/fc1/kernel"], p["blocks_0/mlp/fc1/bias"] = _init(rng, (d, hidden)), _init(rng, (hidden,), 0.1)
    p["blocks_0/mlp/fc2/kernel"], p["blocks_0/mlp/fc2/bias"] = _init(rng, (hidden, d)), _init(rng, (d,), 0.1)
    for n in ("norm1", "norm2"):
        p[f"blocks_0/{n}/gamma"], p[f"blocks_0/{n}/beta"] = rng.uniform(0.5, 1.5, d).astype(np.float32), _init(rng, (d,), 0.1)
    x = rng.standard_normal((2, 5, d)).astype(np.float32)
    g = {k.removeprefix("blocks_0/"): v for k, v in p.items()}
    h = ops.layernorm(x, g["norm1/gamma"], g["norm1/beta"], eps=1e-6)
    x1 = x + ops.attention(h, *(g[f"attn/{n}/{w}"] for n in ("query", "key", "value") for w in ("kernel", "bias")),
                           g["attn/proj/kernel"], g["attn/proj/bias"], heads)
    h2 = ops.layernorm(x1, g["norm2/gamma"], g["norm2/beta"], eps=1e-6)
    ref = x1 + ops.dense(ops.gelu(ops.dense(h2, g["mlp/fc1/kernel"], g["mlp/fc1/bias"])), g["mlp/fc2/kernel"], g["mlp/fc2/bias"])
    mapping = {"preset": "keras", "rules": [
        {"source": [rf"blocks_(\d+)/attn/{n}/kernel" for n in ("query", "key", "value")], "target": r"blocks.\1.attn.qkv.weight",
         "transform": ["transpose"], "concat": 0},
        {"source": [rf"blocks_(\d+)/attn/{n}/bias" for n in ("query", "key", "value")], "target": r"blocks.\1.attn.qkv.bias", "concat": 0},
    ]}
    case = run_case(tmp_path, "vit", p, f"{MODELS}:ViT", {"d": d, "heads": heads, "hidden": hidden}, mapping, x, ref)
    rows = case["rows"]
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    qkv = rows["blocks.0.attn.qkv.weight"]
    assert qkv["source_key"] == " + ".join(f"blocks_0/attn/{n}/kernel" for n in ("query", "key", "value")) and qkv["concat"] == 0
    assert qkv["result_shape"] == [3 * d, d]
    assert evidence(rows["blocks.0.attn.proj.weight"])["errors"]["as-is"] > 1e-3  # square proj: the reference decided


def test_vit_concat_on_the_wrong_axis_fails_validation(tmp_path: Path) -> None:
    from np2torch.tasks.errors import ValidationError

    rng = np.random.default_rng(5)
    p = {f"blocks_0/attn/{n}/kernel": _init(rng, (8, 8)) for n in ("query", "key", "value")}
    mapping = {"preset": "keras", "strategy": "name", "rules": [
        {"source": [rf"blocks_(\d+)/attn/{n}/kernel" for n in ("query", "key", "value")], "target": r"blocks.\1.attn.qkv.weight",
         "transform": ["transpose"], "concat": 1}], "allow_missing": [r"blocks\.0\.(?!attn\.qkv\.weight).*"]}
    case = run_case(tmp_path, "vit-bad", p, f"{MODELS}:ViT", {}, mapping, np.zeros((1, 2, 8), np.float32), None, until="mapping")
    with pytest.raises(ValidationError, match=r"blocks\.0\.attn\.qkv\.weight.*wrong shape"):
        stages.run_all(case["cfg"], until="validate")


# ---------------------------------------------------------------------------------------------
# tied weights


def test_tied_embeddings_share_storage_after_loading_the_export(tmp_path: Path) -> None:
    from np2torch.tasks.verify import load_model_from_file

    rng = np.random.default_rng(6)
    vocab, d = 11, 6
    p = {"embedding/embeddings:0": _init(rng, (vocab, d)), "dense/kernel:0": _init(rng, (d, d)), "dense/bias:0": _init(rng, (d,), 0.1)}
    idx = rng.integers(0, vocab, size=(2, 7)).astype(np.int64)
    emb = p["embedding/embeddings:0"]
    ref = np.tanh(ops.dense(emb[idx], p["dense/kernel:0"], p["dense/bias:0"])) @ emb.T.astype(np.float64)
    case = run_case(tmp_path, "tied", p, f"{MODELS}:TiedLM", {"vocab": vocab, "d": d}, {"preset": "keras"}, idx, ref)
    rows = case["rows"]
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    assert rows["head.weight"]["how"] == "tied" and rows["head.weight"]["tied_to"] == "emb.weight"
    assert rows["emb.weight"]["source_key"] == "embedding/embeddings:0"
    model = load_model_from_file(f"{MODELS}:TiedLM", {"vocab": vocab, "d": d}, case["converted"].file, torch.device("cpu"))
    assert model.head.weight is model.emb.weight
    assert model.head.weight.data_ptr() == model.emb.weight.data_ptr()
    np.testing.assert_allclose(model.emb.weight.detach().numpy(), emb, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# square kernels: only the reference tells


def _square_mlp(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    p = {}
    for i in range(3):  # saved as Keras does, (in, out), under names that say nothing about layout
        p[f"w{i}"], p[f"b{i}"] = _init(rng, (6, 6)), _init(rng, (6,), 0.1)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    t = x
    for i in range(3):
        t = ops.dense(t, p[f"w{i}"], p[f"b{i}"])
        t = np.tanh(t) if i < 2 else t
    return p, x, t


def test_square_mlp_orientation_chosen_by_reference(tmp_path: Path) -> None:
    p, x, ref = _square_mlp(np.random.default_rng(7))
    case = run_case(tmp_path, "square", p, f"{MODELS}:MLP", {"sizes": [6, 6, 6, 6]}, {"strategy": "order"}, x, ref)
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    for i in range(3):
        row = case["rows"][f"layers.{i}.weight"]
        ev = evidence(row)
        assert row["verified"] and row["transform"] == "transpose" and ev["method"] == "reference output"
        assert ev["errors"]["transpose"] < 1e-5 < 1e-2 < ev["errors"]["as-is"]  # the wrong candidate's error is recorded


def test_square_mlp_without_reference_is_unverified_not_silently_chosen(tmp_path: Path) -> None:
    p, x, _ = _square_mlp(np.random.default_rng(7))
    case = run_case(tmp_path, "square-noref", p, f"{MODELS}:MLP", {"sizes": [6, 6, 6, 6]}, {"strategy": "order"}, x, None)
    assert case["metrics"]["passed"] and case["metrics"]["reference"] is False  # shapes and finiteness only
    for i in range(3):
        row = case["rows"][f"layers.{i}.weight"]
        assert not row["verified"] and float(row["confidence"]) <= 0.5 and row["evidence"] == {}
        assert [json.dumps(c) for c in row["candidates"]] == ["[]", '[["transpose", null]]']
    assert case["mapped"].unverified == [f"layers.{i}.weight" for i in range(3)]


def test_mapping_cache_key_follows_the_reference(tmp_path: Path) -> None:
    p, x, ref = _square_mlp(np.random.default_rng(7))
    case = run_case(tmp_path, "square-key", p, f"{MODELS}:MLP", {"sizes": [6, 6, 6, 6]}, {"strategy": "order"}, x, ref, until="mapping")
    cfg = case["cfg"]
    np.save(cfg.verify.reference_output, (ref + 1.0).astype(np.float64))
    with pytest.raises(MappingError, match="no candidate layout reproduces the reference"):
        stages.run_all(cfg, until="infer-mapping")


# ---------------------------------------------------------------------------------------------
# depthwise convolution


def test_keras_depthwise_conv_into_grouped_conv(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    p = {"depthwise_conv2d/depthwise_kernel:0": _init(rng, (3, 3, 3, 2)), "depthwise_conv2d/bias:0": _init(rng, (6,), 0.1)}
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    ref = ops.depthwise_conv2d_nhwc(x, p["depthwise_conv2d/depthwise_kernel:0"], p["depthwise_conv2d/bias:0"])
    case = run_case(tmp_path, "depthwise", p, f"{MODELS}:DepthwiseNet", {}, {"preset": "keras"}, x, ref)
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    assert case["rows"]["dw.weight"]["transform"] == "depthwise_to_grouped"


# ---------------------------------------------------------------------------------------------
# separable convolution: one Keras layer, two torch modules


def _separable(rng: np.random.Generator, out: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    p = {"separable_conv2d/bias:0": _init(rng, (out,), 0.1), "separable_conv2d/depthwise_kernel:0": _init(rng, (3, 3, 3, 2)),
         "separable_conv2d/pointwise_kernel:0": _init(rng, (1, 1, 6, out))}  # sorted, as a TF checkpoint lists them
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    ref = ops.separable_conv2d_nhwc(x, *(p[f"separable_conv2d/{k}:0"] for k in ("depthwise_kernel", "pointwise_kernel", "bias")))
    return p, x, ref


def test_keras_separable_conv_into_depthwise_and_pointwise_convs(tmp_path: Path) -> None:
    p, x, ref = _separable(np.random.default_rng(9), 4)
    case = run_case(tmp_path, "separable", p, f"{MODELS}:SeparableNet", {"out": 4}, {"preset": "keras"}, x, ref)
    rows = case["rows"]
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    assert rows["depthwise.weight"]["source_key"] == "separable_conv2d/depthwise_kernel:0"
    assert rows["depthwise.weight"]["transform"] == "depthwise_to_grouped"
    assert rows["pointwise.weight"]["source_key"] == "separable_conv2d/pointwise_kernel:0"
    assert rows["pointwise.weight"]["transform"] == "permute=[3,2,0,1]" and rows["pointwise.weight"]["verified"]
    assert rows["pointwise.bias"]["source_key"] == "separable_conv2d/bias:0"


def test_keras_separable_square_pointwise_is_resolved_by_the_reference(tmp_path: Path) -> None:
    # C*mult == out: the 1×1 pointwise kernel (1, 1, 6, 6) fits torch's (6, 6, 1, 1) two ways
    p, x, ref = _separable(np.random.default_rng(9), 6)
    case = run_case(tmp_path, "separable-square", p, f"{MODELS}:SeparableNet", {"out": 6}, {"preset": "keras"}, x, ref)
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    pw = case["rows"]["pointwise.weight"]
    ev = evidence(pw)
    assert pw["verified"] and pw["transform"] == "permute=[3,2,0,1]" and ev["chosen"] == "permute=[3,2,0,1]"
    assert ev["errors"]["permute=[3,2,0,1]"] < 1e-5 < 1e-2 < ev["errors"]["permute=[2,3,0,1]"]  # I/O swapped: wrong
    noref = run_case(tmp_path, "separable-square-noref", p, f"{MODELS}:SeparableNet", {"out": 6}, {"preset": "keras"}, x, None,
                     until="mapping")
    assert not noref["rows"]["pointwise.weight"]["verified"] and noref["mapped"].unverified == ["pointwise.weight"]


# ---------------------------------------------------------------------------------------------
# Bidirectional and stacked LSTMs


def _lstm_layer(rng: np.random.Generator, scope: str, n_in: int, u: int) -> dict[str, np.ndarray]:
    return {f"{scope}/lstm_cell/kernel:0": _init(rng, (n_in, 4 * u)), f"{scope}/lstm_cell/recurrent_kernel:0": _init(rng, (u, 4 * u)),
            f"{scope}/lstm_cell/bias:0": _init(rng, (4 * u,))}


def _lstm_ref(p: dict[str, np.ndarray], scope: str):
    return lambda t: ops.lstm_keras(t, *(p[f"{scope}/lstm_cell/{k}:0"] for k in ("kernel", "recurrent_kernel", "bias")))


def _bilstm(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    # n_in == units: forward and backward weights have the same shapes, only the names tell them apart
    p = {**_lstm_layer(rng, "bidirectional/forward_lstm", 5, 5), **_lstm_layer(rng, "bidirectional/backward_lstm", 5, 5),
         "dense/kernel:0": _init(rng, (10, 2)), "dense/bias:0": _init(rng, (2,))}
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    h = ops.bidirectional_keras(x, _lstm_ref(p, "bidirectional/forward_lstm"), _lstm_ref(p, "bidirectional/backward_lstm"))
    return p, x, ops.dense(h, p["dense/kernel:0"], p["dense/bias:0"])


@pytest.mark.parametrize("order", ["sorted", "file"])
def test_keras_bidirectional_lstm_into_bidirectional_torch_lstm(tmp_path: Path, order: str) -> None:
    p, x, ref = _bilstm(np.random.default_rng(10))
    if order == "sorted":  # a TF checkpoint lists backward_lstm before forward_lstm
        p = dict(sorted(p.items()))
    case = run_case(tmp_path, f"bilstm-{order}", p, f"{MODELS}:BiLSTMNet", {"n_in": 5}, {"preset": "keras"}, x, ref)
    rows = case["rows"]
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    for suffix, direction in (("_l0", "forward"), ("_l0_reverse", "backward")):
        scope = f"bidirectional/{direction}_lstm/lstm_cell"
        assert rows[f"rnn.weight_ih{suffix}"]["source_key"] == f"{scope}/kernel:0"
        assert rows[f"rnn.weight_hh{suffix}"]["source_key"] == f"{scope}/recurrent_kernel:0"
        assert rows[f"rnn.bias_ih{suffix}"]["source_key"] == f"{scope}/bias:0"
        assert rows[f"rnn.bias_hh{suffix}"]["status"] == "zeros"


def test_keras_bidirectional_lstm_directions_swapped_fails_verification(tmp_path: Path) -> None:
    # the wrong choice (directions swapped, every shape still fits) is caught by the reference
    p, x, ref = _bilstm(np.random.default_rng(10))
    swap = {"forward": "_l0_reverse", "backward": "_l0"}
    rules = [{"source": rf"bidirectional/{d}_lstm/lstm_cell/{src}:0", "target": f"rnn.{tgt}{swap[d]}", "transform": tf}
             for d in swap for src, tgt, tf in (("kernel", "weight_ih", ["transpose"]), ("recurrent_kernel", "weight_hh", ["transpose"]),
                                                ("bias", "bias_ih", []))]
    rules.append({"target": r"rnn\.bias_hh_l0(_reverse)?", "transform": ["zeros"]})
    with pytest.raises(VerifyError, match=r"does not reproduce the reference.*max abs error"):
        run_case(tmp_path, "bilstm-swapped", p, f"{MODELS}:BiLSTMNet", {"n_in": 5}, {"preset": "keras", "rules": rules}, x, ref)


def _stacked(rng: np.random.Generator, names: tuple[str, str]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    # n_in == units: both layers' kernels have the same shapes, only the layer numbers give the order
    p = {**_lstm_layer(rng, names[0], 5, 5), **_lstm_layer(rng, names[1], 5, 5),
         "dense/kernel:0": _init(rng, (5, 2)), "dense/bias:0": _init(rng, (2,))}
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    h = _lstm_ref(p, names[1])(_lstm_ref(p, names[0])(x))
    return dict(sorted(p.items())), x, ops.dense(h, p["dense/kernel:0"], p["dense/bias:0"])


@pytest.mark.parametrize("names", [("lstm", "lstm_1"), ("lstm_9", "lstm_10")], ids=["lstm-lstm_1", "lstm_9-lstm_10"])
def test_keras_stacked_lstms_into_two_layer_torch_lstm(tmp_path: Path, names: tuple[str, str]) -> None:
    p, x, ref = _stacked(np.random.default_rng(11), names)
    case = run_case(tmp_path, f"stacked-{names[1].replace('_', '-')}", p, f"{MODELS}:StackedLSTMNet", {"n_in": 5}, {"preset": "keras"},
                    x, ref)
    rows = case["rows"]
    assert case["metrics"]["passed"] and case["metrics"]["max_abs_error"] < 1e-5
    for layer, scope in enumerate(names):
        assert rows[f"rnn.weight_ih_l{layer}"]["source_key"] == f"{scope}/lstm_cell/kernel:0"
        assert rows[f"rnn.weight_hh_l{layer}"]["source_key"] == f"{scope}/lstm_cell/recurrent_kernel:0"
        assert rows[f"rnn.bias_hh_l{layer}"]["status"] == "zeros"


def test_keras_stacked_lstms_in_the_wrong_order_fail_verification(tmp_path: Path) -> None:
    p, x, ref = _stacked(np.random.default_rng(11), ("lstm", "lstm_1"))
    rules = [{"source": rf"{scope}/lstm_cell/{src}:0", "target": f"rnn.{tgt}_l{layer}", "transform": tf}
             for scope, layer in (("lstm", 1), ("lstm_1", 0))
             for src, tgt, tf in (("kernel", "weight_ih", ["transpose"]), ("recurrent_kernel", "weight_hh", ["transpose"]),
                                  ("bias", "bias_ih", []))]
    rules.append({"target": r"rnn\.bias_hh_l[01]", "transform": ["zeros"]})
    with pytest.raises(VerifyError, match=r"does not reproduce the reference.*max abs error"):
        run_case(tmp_path, "stacked-swapped", p, f"{MODELS}:StackedLSTMNet", {"n_in": 5}, {"preset": "keras", "rules": rules}, x, ref)
