"""A Keras functional model with two same-shaped branches: which source layer fills which torch
module is a pairing ambiguity (Keras lists layers by graph depth, not as the torch port names them)."""

from __future__ import annotations

import numpy as np
import pytest

from .keras_support import convert, keras, max_abs_error_of_export, plan_rows, predict, randomize, unverified, write_case

layers = keras.layers


def keras_branches(seed: int = 3):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = layers.Dense(8, activation="relu")(inp)
    relu_branch = layers.Dense(5, activation="relu")(h)  # created first: Keras lists it first
    tanh_branch = layers.Dense(5, activation="tanh")(h)
    out = layers.Dense(3)(layers.Concatenate()([tanh_branch, relu_branch]))
    model = keras.Model(inp, out)
    randomize(model, seed)
    x = np.random.default_rng(seed).standard_normal((8, 6)).astype(np.float32)
    return model, x, predict(model, x)


def keras_conv_branches(seed: int = 4):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3))
    tanh_branch = layers.Activation("tanh")(layers.BatchNormalization()(layers.Conv2D(4, 3, padding="same")(inp)))
    relu_branch = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(4, 3, padding="same")(inp)))
    out = layers.Dense(3)(layers.GlobalAveragePooling2D()(layers.Add()([tanh_branch, relu_branch])))
    model = keras.Model(inp, out)
    randomize(model, seed)
    x = np.random.default_rng(seed).standard_normal((4, 8, 8, 3)).astype(np.float32)
    return model, x, predict(model, x)


@pytest.mark.parametrize("how", ["pickle", "npz"])
def test_keras_conv_bn_branches_two_pairing_groups(tmp_path, how) -> None:
    model, x_nhwc, ref = keras_conv_branches()
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    config = write_case(tmp_path, f"keras-conv-branches-{how}", model, how, "ConvBranches", x, ref)
    out = convert(config)
    assert out["recs"]["verify-forward-pass"].metrics["passed"]
    assert max_abs_error_of_export(config, "ConvBranches", x, ref) < 1e-4
    rows = out["rows"]
    for key in ("conv_tanh.weight", "bn_tanh.running_var"):  # a conv group and a BatchNorm group, each paired by the reference
        ev = rows[key]["evidence"]
        # the two groups swap together: all 2 × 2 joint pairings are tried, each one's error recorded
        assert ev["method"].endswith("(pairing)") and len(ev["pairings"]) == 4 and min(ev["pairings"].values()) < 1e-4


@pytest.mark.parametrize("how", ["pickle", "npz", "flat"])
def test_keras_two_branches_pairing_chosen_by_reference(tmp_path, how) -> None:
    model, x, ref = keras_branches()
    config = write_case(tmp_path, f"keras-branches-{how}", model, how, "TwoBranch", x, ref)
    out = convert(config)
    assert out["recs"]["verify-forward-pass"].metrics["passed"]
    assert max_abs_error_of_export(config, "TwoBranch", x, ref) < 1e-4
    left = out["rows"]["left.weight"]
    ev = left["evidence"]
    assert ev["method"].endswith("(pairing)") and len(ev["pairings"]) == 2
    # one pairing reproduces Keras, the other does not: which is tried first depends on the order the
    # source gives (graph depth in a pickled list; layer numbers, i.e. creation order, where names exist)
    errors = sorted(ev["pairings"].values())
    assert errors[0] < 1e-4 < errors[1]


def test_keras_two_branches_without_reference_name_the_pairings(tmp_path) -> None:
    model, x, _ = keras_branches()
    rows = plan_rows(write_case(tmp_path, "keras-branches-noref", model, "npz", "TwoBranch", x, None))
    open_rows = unverified(rows)
    for key in ("left.weight", "left.bias", "right.weight", "right.bias"):
        sources = {c.split(";")[0] for c in open_rows[key]}
        assert len(sources) == 2 and all(s.startswith("source=") for s in sources), open_rows[key]
        assert "pairing ambiguity" in rows[key]["note"]
    assert "trunk.weight" not in open_rows and "head.weight" not in open_rows  # named and unique: settled by the shapes
