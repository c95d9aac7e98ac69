"""infer-mapping: presets, structural matching, layout candidates, and the `plan` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from np2torch.tasks import forward
from np2torch.tasks import kinds as K
from np2torch.tasks import presets as P
from np2torch.tasks import transforms as T
from np2torch.tasks.config import MappingSpec
from np2torch.tasks.errors import MappingError
from np2torch.tasks.infer_mapping import flatten_heuristic, infer_manifest, layout_candidates
from np2torch.tasks.load_arrays import scan_source
from np2torch.tasks.model import describe_targets
from np2torch.tasks.readers import natural_key

REPO = Path(__file__).resolve().parents[1]


def _records(tmp_path: Path, arrays: dict[str, np.ndarray]):
    np.savez(tmp_path / "w.npz", **arrays)
    return scan_source(tmp_path / "w.npz")


def _rows(tmp_path: Path, arrays: dict[str, np.ndarray], model: nn.Module, **spec) -> dict[str, dict]:
    rows = infer_manifest(_records(tmp_path, arrays), describe_targets(model), MappingSpec(**spec))
    return {r["target_key"] or r["source_key"]: r for r in rows}


# ---------------------------------------------------------------------------------------------
# presets


def test_preset_view_strips_tf_suffix_and_splits_numbered_scopes() -> None:
    v = P.view("bert/encoder/layer_3/attention/self/query/kernel:0", (8, 8), P.PRESETS["tf"])
    assert v.name == "bert.encoder.layer_3.attention.self.query.weight"
    assert v.alt_names == ("bert.encoder.layer.3.attention.self.query.weight",)
    assert v.transform == [["transpose", None]] and v.src_leaf == "kernel"
    f = P.view("params/Dense_0/kernel", (4, 8), P.PRESETS["flax"])
    assert (f.scope, f.leaf) == ("Dense_0", "weight")
    bn = P.view("batch_stats/BatchNorm_0/var", (8,), P.PRESETS["flax"])
    assert (bn.scope, bn.leaf) == ("BatchNorm_0", "running_var")


def test_every_preset_entry_says_why() -> None:
    for preset in P.PRESETS.values():
        assert all(why for _, why in preset.strip)
        assert all(why for _, why in preset.leaf_names.values())
        assert all(why for _, why in preset.layouts.values())
    assert all(k.why and all(r.why for r in k.recognise) and all(why for _, why in k.source_layouts.values()) for k in K.KINDS.values())
    assert all(t.why for t in T.TRANSFORMS.values())


def test_natural_order_recovers_layer_numbers() -> None:
    names = ["dense_10", "dense_2", "dense", "dense_1"]
    assert sorted(names, key=natural_key) == ["dense", "dense_1", "dense_2", "dense_10"]
    # file names too; text and numbers never compared with each other, a digit-like '²' stays text
    assert sorted(["w10.npy", "10", "w2.npy", "w²", "a"], key=natural_key) == ["10", "a", "w2.npy", "w10.npy", "w²"]


@pytest.mark.parametrize("leaves, kind", [
    ({"kernel": (3, 20), "recurrent_kernel": (5, 20), "bias": (20,)}, "lstm"),
    ({"kernel": (3, 15), "recurrent_kernel": (5, 15), "bias": (2, 15)}, "gru"),
    ({"kernel": (3, 3, 1, 8), "bias": (8,)}, "conv"),
    ({"depthwise_kernel": (3, 3, 4, 1)}, "conv"),
    ({"gamma": (8,), "beta": (8,), "moving_mean": (8,), "moving_variance": (8,)}, "batchnorm"),
    ({"gamma": (8,), "beta": (8,)}, "layernorm"),
    ({"embeddings": (100, 8)}, "embedding"),
    ({"kernel": (8, 4), "bias": (4,)}, "dense"),
])
def test_source_layer_kinds(leaves: dict, kind: str) -> None:
    assert K.source_kind(leaves, "layer") == kind


def test_conv_transpose_kind_and_layout() -> None:
    assert K.source_kind({"kernel": (3, 3, 4, 2)}, "conv2d_transpose") == "conv_transpose"
    spec = P.layer_leaf_transform("conv_transpose", "kernel", (3, 3, 4, 2), P.PRESETS["keras"])  # (H, W, O, I)
    assert T.apply_shape((3, 3, 4, 2), spec) == tuple(nn.ConvTranspose2d(2, 4, 3).weight.shape)  # (I, O, H, W)


# ---------------------------------------------------------------------------------------------
# transforms


def test_depthwise_to_grouped_matches_a_grouped_conv() -> None:
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, 3, 4, 2)).astype(np.float32)  # (H, W, C, mult)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w = torch.from_numpy(np.ascontiguousarray(T.apply(k, [["depthwise_to_grouped", None]])))
    out = torch.nn.functional.conv2d(torch.from_numpy(x), w, groups=4).numpy()
    for c in range(4):
        for m in range(2):
            expect = sum(x[0, c, i:i + 4, j:j + 4] * k[i, j, c, m] for i in range(3) for j in range(3))
            np.testing.assert_allclose(out[0, c * 2 + m], expect, rtol=1e-5, atol=1e-5)


def test_layout_label_ignores_sizes() -> None:
    assert T.layout_label([["slice", [0, 20]], ["reshape", [2, 10]], ["transpose", None]]) == "reshape; transpose"
    assert T.layout_label([]) == "as-is"


# ---------------------------------------------------------------------------------------------
# candidates


def _target(model: nn.Module, key: str):
    return next(t for t in describe_targets(model) if t.key == key)


def test_square_and_one_by_one_kernels_are_ambiguous_rectangular_ones_are_not() -> None:
    lin = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    chosen, cands = layout_candidates([(4, 4)], [["transpose", None]], _target(lin, "0.weight"))
    assert chosen == [["transpose", None]] and cands == [[["transpose", None]], []]
    assert layout_candidates([(4, 3)], [["transpose", None]], _target(lin, "1.weight"))[1] == []
    conv = nn.Sequential(nn.Conv2d(8, 8, 1))
    _, cands = layout_candidates([(1, 1, 8, 8)], [["permute", [3, 2, 0, 1]]], _target(conv, "0.weight"))
    assert [T.describe(c) for c in cands] == ["permute=[3,2,0,1]", "permute=[2,3,0,1]"]
    emb = nn.Sequential(nn.Embedding(6, 6))
    assert layout_candidates([(6, 6)], [], _target(emb, "0.weight"))[1] == []  # one layout for a table


def test_flat_slice_into_matrix_lists_both_orders() -> None:
    lin = nn.Sequential(nn.Linear(2, 10))
    spec = [["slice", [0, 20]], ["reshape", [10, 2]]]
    _, cands = layout_candidates([(30,)], spec, _target(lin, "0.weight"))
    assert [T.describe(c) for c in cands] == ["slice=[0,20]; reshape=[10,2]", "slice=[0,20]; reshape=[2,10]; transpose"]


def test_flatten_heuristic_and_probe_agree_on_the_keras_cnn() -> None:
    from np2torch.tasks.config import InputSpec
    from np2torch.tasks.model import build_model

    m = build_model(f"{REPO}/configs/models/keras_cnn.py:KerasCNN", {"in_channels": 1, "image_size": 28, "num_classes": 10})
    assert flatten_heuristic(describe_targets(m)) == {"fc1": [16, 11, 11]}
    assert forward.probe_flatten(m, InputSpec(shape=[2, 28, 28, 1])) == {"fc1": [16, 11, 11]}


def test_probe_sees_non_square_maps() -> None:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 4 * 6, 2)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    with torch.device("meta"):
        m = Net()
    from np2torch.tasks.config import InputSpec

    assert forward.probe_flatten(m, InputSpec(shape=[1, 3, 6, 8])) == {"fc": [4, 4, 6]}


# ---------------------------------------------------------------------------------------------
# structural matching and names


def test_sorted_checkpoint_keys_are_aligned_by_layer_number(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sizes = [3] + [4 + i for i in range(12)]
    arrays = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        name = "dense" if i == 0 else f"dense_{i}"
        arrays[f"{name}/kernel:0"] = rng.standard_normal((a, b)).astype(np.float32)
        arrays[f"{name}/bias:0"] = rng.standard_normal(b).astype(np.float32)
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
    rows = _rows(tmp_path, dict(sorted(arrays.items())), model, preset="keras")  # dense, dense_1, dense_10, dense_11, dense_2 …
    assert rows["10.weight"]["source_key"] == "dense_10/kernel:0" and rows["10.weight"]["how"] == "structure"
    assert rows["2.bias"]["source_key"] == "dense_2/bias:0"
    assert all(r["status"] == "mapped" for r in rows.values())


def test_structure_matches_kinds_not_just_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"embedding/embeddings": rng.standard_normal((10, 4)).astype(np.float32),
              "layer_normalization/gamma": np.ones(4, np.float32), "layer_normalization/beta": np.zeros(4, np.float32),
              "dense/kernel": rng.standard_normal((4, 3)).astype(np.float32), "dense/bias": np.zeros(3, np.float32)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)  # registered first: order matching would misplace everything
            self.norm = nn.LayerNorm(4)
            self.tok = nn.Embedding(10, 4)

    rows = _rows(tmp_path, arrays, Net(), preset="keras")
    assert rows["tok.weight"]["source_key"] == "embedding/embeddings"
    assert rows["norm.weight"]["source_key"] == "layer_normalization/gamma"
    assert rows["head.weight"]["source_key"] == "dense/kernel" and rows["head.weight"]["transform"] == "transpose"


def test_rules_come_first_and_bad_rules_are_named(tmp_path: Path) -> None:
    arrays = {"a": np.zeros((3, 2), np.float32)}
    with pytest.raises(MappingError, match=r"rule 'nope' → 'weight' matched nothing"):
        _rows(tmp_path, arrays, nn.Linear(2, 3), rules=[{"source": "nope", "target": "weight"}])


def test_unused_and_missing_are_reported(tmp_path: Path) -> None:
    arrays = {"fc.weight": np.zeros((3, 2), np.float32), "extra": np.zeros(7, np.float32)}
    m = nn.Sequential()
    m.fc = nn.Linear(2, 3)
    rows = _rows(tmp_path, arrays, m, strategy="name")
    assert rows["fc.bias"]["status"] == "missing" and rows["extra"]["status"] == "unused"


def test_config_rules_accept_every_table_transform() -> None:
    from np2torch.tasks.config import Rule

    r = Rule(source="x", target="y", transform=[{"reorder_chunks": [1, 0, 2]}, {"index": 0}, "depthwise_to_grouped"])
    assert T.normalize(r.transform)[0] == ["reorder_chunks", [1, 0, 2]]


# ---------------------------------------------------------------------------------------------
# plan


def test_plan_table_csv_and_json(example_data: Path, capsys: pytest.CaptureFixture) -> None:
    from np2torch.cli import main

    cfg = str(REPO / "configs" / "examples" / "keras-cnn-auto.yaml")
    assert main(["plan", cfg, "--wide"]) == 0  # candidates and how: details behind --wide
    out = capsys.readouterr().out
    assert "Manifest for keras-cnn-auto (18 targets, 0 unverified)" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("fc1.weight"))
    assert "transpose; flatten_nhwc_to_nchw=[16,11,11]" in line and "(chosen)" in line and "structure" in line
    assert "Unused source keys (0)" in out
    assert main(["plan", cfg, "--format", "csv"]) == 0
    csv_out = capsys.readouterr().out
    assert csv_out.splitlines()[0].startswith("target_key,source_key,transform") and "evidence" in csv_out.splitlines()[0]
    assert main(["plan", cfg, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    fc1 = next(r for r in doc["rows"] if r["target_key"] == "fc1.weight")
    assert doc["valid"] and doc["unverified"] == [] and json.loads(fc1["evidence"])["errors"]["transpose"] > 1e-2


def test_plan_lists_unverified_rows_without_reference(example_data: Path, capsys: pytest.CaptureFixture) -> None:
    from np2torch.cli import main

    cfg = str(REPO / "configs" / "examples" / "keras-cnn-auto.yaml")
    assert main(["plan", cfg, "--set", "verify.reference_output=", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["unverified"] == ["fc1.weight"]
    assert main(["plan", cfg, "--set", "verify.reference_output="]) == 0
    out = capsys.readouterr().out
    assert "mapped, UNVERIFIED" in out and "1 row(s) are unverified" in out


# ---------------------------------------------------------------------------------------------
# unnamed arrays matched by order: per-kind layouts, reshape only as a candidate (issue 11, item 2)


def _unnamed(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    # keys like a pickled get_weights() list's: nothing but the position says what each array is
    return {f"{i:02d}": a for i, a in enumerate(arrays)}


def _keras_like(rng: np.random.Generator, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def test_order_applies_kind_layouts_and_keeps_the_reshape_a_candidate(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    arrays = _keras_like(rng, (3, 3, 3, 4), (4,), (144, 5), (5,))  # Keras kernels: (kh, kw, in, out), (in, out)
    rows = _rows(tmp_path, _unnamed(arrays), model, strategy="order", preset="keras")
    conv, fc = rows["0.weight"], rows["2.weight"]
    assert conv["transform"] == "permute=[3,2,0,1]" and not conv["verified"]
    assert [T.describe(c) for c in conv["candidates"]] == ["permute=[3,2,0,1]", "reshape=[4,3,3,3]"]
    assert fc["transform"].startswith("transpose") and not fc["verified"]
    assert "reshape=[5,144]" in [T.describe(c) for c in fc["candidates"]]
    assert rows["0.bias"]["verified"] and rows["0.bias"]["how"] == "order"  # a vector has one layout


def test_order_fills_depthwise_and_keras_recurrent_layers(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(3, 6, 3, groups=3)
            self.lstm = nn.LSTM(3, 4)
            self.gru = nn.GRU(4, 6)

    arrays = _keras_like(rng, (3, 3, 3, 2), (6,), (3, 16), (4, 16), (16,), (4, 18), (6, 18), (2, 18))
    rows = _rows(tmp_path, _unnamed(arrays), Net(), strategy="order", preset="keras")
    assert rows["dw.weight"]["transform"] == "depthwise_to_grouped"
    assert rows["lstm.weight_ih_l0"]["transform"] == "transpose" and rows["lstm.bias_hh_l0"]["status"] == "zeros"
    assert rows["gru.weight_hh_l0"]["transform"] == "transpose; reorder_chunks=[1,0,2]"
    assert rows["gru.bias_ih_l0"]["source_key"] == rows["gru.bias_hh_l0"]["source_key"] == "07"
    assert rows["gru.bias_hh_l0"]["transform"] == "index=1; reorder_chunks=[1,0,2]"
    assert not any(r["status"] in ("missing", "unused") for r in rows.values())


def test_batchnorm_counter_keeps_order_and_validates(tmp_path: Path) -> None:
    from np2torch.tasks.validate import validate_manifest

    rng = np.random.default_rng(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    gamma, beta, mean = _keras_like(rng, (2,), (2,), (2,))
    arrays = [*_keras_like(rng, (3, 3, 1, 2), (2,)), gamma, beta, mean, np.abs(gamma) + 0.5, *_keras_like(rng, (32, 3), (3,))]
    rows = infer_manifest(_records(tmp_path, _unnamed(arrays)), describe_targets(model), MappingSpec(strategy="order", preset="keras"))
    by = {r["target_key"] or r["source_key"]: r for r in rows}
    assert by["1.num_batches_tracked"]["status"] == "allowed_missing" and "PyTorch-only counter" in by["1.num_batches_tracked"]["note"]
    assert by["1.running_var"]["source_key"] == "05" and by["3.weight"]["source_key"] == "06"
    validate_manifest(rows, allow_nonfinite=False)


# ---------------------------------------------------------------------------------------------
# what forward does (issue 11, item 6) and pairings (item 5)


class _Functional(nn.Module):
    def __init__(self, permute: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 2)
        self.permute = permute

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        if self.permute:
            return self.fc(x.permute(0, 2, 3, 1).contiguous().view(x.size(0), -1))
        return self.fc(x.view(x.size(0), -1))


def test_trace_follows_functional_pooling_view_and_permute() -> None:
    from np2torch.tasks.config import InputSpec

    with torch.device("meta"):
        plain, permuted = _Functional(), _Functional(permute=True)
    assert forward.probe_flatten(plain, InputSpec(shape=[1, 3, 8, 8])) == {"fc": [4, 3, 3]}
    tr = forward.trace_forward(permuted, InputSpec(shape=[1, 3, 8, 8]))
    assert tr.flatten == {} and tr.channels_last_flatten == {"fc"}  # forward already flattens (H, W, C)


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 3)
        self.c = nn.Linear(3, 3)  # same shape as nothing else: sequential after a

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return torch.cat([self.c(torch.tanh(self.a(h))), torch.relu(self.b(h))], 1)


def test_parallel_same_shaped_layers_are_a_pairing_ambiguity(tmp_path: Path) -> None:
    from np2torch.tasks.config import InputSpec

    with torch.device("meta"):
        m = _Branches()
    for tr in (forward.trace_forward(m, InputSpec(shape=[2, 4])), forward.graph_upstream(m)):
        assert tr.parallel("a", "b") and not tr.parallel("trunk", "a") and not tr.parallel("a", "c")
        rng = np.random.default_rng(3)
        arrays = {"dense/kernel": rng.standard_normal((4, 6)), "dense/bias": rng.standard_normal(6),
                  "dense_1/kernel": rng.standard_normal((6, 3)), "dense_1/bias": rng.standard_normal(3),
                  "dense_2/kernel": rng.standard_normal((6, 3)), "dense_2/bias": rng.standard_normal(3),
                  "dense_3/kernel": rng.standard_normal((3, 3)), "dense_3/bias": rng.standard_normal(3)}
        rows = infer_manifest(_records(tmp_path, arrays), describe_targets(m), MappingSpec(preset="keras"), parallel=tr.parallel)
        by = {r["target_key"]: r for r in rows if r["target_key"]}
        for key, leaf in (("a.weight", "kernel"), ("b.weight", "kernel"), ("a.bias", "bias"), ("b.bias", "bias")):
            cands = [T.describe(c) for c in by[key]["candidates"]]
            assert not by[key]["verified"]
            assert {c.split(";")[0] for c in cands} == {f'source="dense_1/{leaf}"', f'source="dense_2/{leaf}"'}
        assert by["trunk.weight"]["verified"] and by["c.weight"]["candidates"][0] != [["source", "dense_1/kernel"]]


def test_reference_chooses_the_pairing_and_records_each_error(tmp_path: Path) -> None:
    from np2torch.tasks import evidence

    with torch.device("meta"):
        meta = _Branches()
    rng = np.random.default_rng(4)
    w = {k: rng.standard_normal(s).astype(np.float32) for k, s in
         [("t", (4, 6)), ("tb", (6,)), ("b", (6, 3)), ("bb", (3,)), ("a", (6, 3)), ("ab", (3,)), ("c", (3, 3)), ("cb", (3,))]}
    # the source lists branch b first (its own order); a NumPy reference in the source layout
    arrays = {"dense/kernel": w["t"], "dense/bias": w["tb"], "dense_1/kernel": w["b"], "dense_1/bias": w["bb"],
              "dense_2/kernel": w["a"], "dense_2/bias": w["ab"], "dense_3/kernel": w["c"], "dense_3/bias": w["cb"]}
    x = rng.standard_normal((5, 4)).astype(np.float32)
    h = np.maximum(x @ w["t"] + w["tb"], 0)
    ref = np.concatenate([np.tanh(h @ w["a"] + w["ab"]) @ w["c"] + w["cb"], np.maximum(h @ w["b"] + w["bb"], 0)], 1)
    records = _records(tmp_path, arrays)
    rows = infer_manifest(records, describe_targets(meta), MappingSpec(preset="keras"), parallel=forward.graph_upstream(meta).parallel)
    out = evidence.resolve(rows, records, model=_Branches(), inputs=[x], refs=[ref], rtol=1e-4, atol=1e-5)
    by = {r["target_key"]: r for r in out if r["target_key"]}
    assert by["a.weight"]["source_key"] == "dense_2/kernel" and by["b.bias"]["source_key"] == "dense_1/bias"
    assert by["a.weight"]["verified"] and by["a.weight"]["transform"] == "transpose"
    ev = by["a.weight"]["evidence"]
    assert list(ev["pairings"]) == ["a <- dense_1/kernel, b <- dense_2/kernel", "a <- dense_2/kernel, b <- dense_1/kernel"]
    positional, swapped = ev["pairings"].values()
    assert swapped < 1e-4 < positional


def test_pairings_past_the_bound_try_single_swaps() -> None:
    from np2torch.tasks.evidence import pairings_to_try

    perms, note = pairings_to_try(4)
    assert len(perms) == 24 and note == ""
    perms, note = pairings_to_try(5)
    assert len(perms) == 1 + 10 and perms[0] == (0, 1, 2, 3, 4) and "more than the bound of 24" in note
