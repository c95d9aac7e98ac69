"""Keras 3 DepthwiseConv2D + SeparableConv2D → grouped torch convs (depthwise (*S, C, M) → (C*M, 1, *S))."""

from __future__ import annotations

import numpy as np
import pytest

from .keras_support import convert, keras, max_abs_error_of_export, plan_rows, predict, randomize, unverified, write_case

layers = keras.layers


def keras_depthwise(seed: int = 1):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3))
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu")(inp)
    x = layers.SeparableConv2D(4, 3)(x)
    model = keras.Model(inp, layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))
    randomize(model, seed)
    x_nhwc = np.random.default_rng(seed).standard_normal((4, 8, 8, 3)).astype(np.float32)
    return model, x_nhwc, predict(model, x_nhwc)


@pytest.mark.parametrize("how", ["pickle", "npz", "flat"])
def test_keras_depthwise_separable_reproduces_predict(tmp_path, how) -> None:
    model, x_nhwc, ref = keras_depthwise()
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    config = write_case(tmp_path, f"keras-depthwise-{how}", model, how, "DepthwiseSeparable", x, ref)
    out = convert(config)
    assert out["recs"]["verify-forward-pass"].metrics["passed"]
    assert max_abs_error_of_export(config, "DepthwiseSeparable", x, ref) < 1e-4
    assert out["rows"]["dw.weight"]["transform"].endswith("depthwise_to_grouped")
    assert out["rows"]["sep_dw.weight"]["transform"].endswith("depthwise_to_grouped")
    assert out["rows"]["sep_pw.weight"]["transform"].endswith("permute=[3,2,0,1]")
    if how == "flat":  # sliced, reshaped to a (3, 3, C, M) kernel (every C·M = 6 split places elements alike), regrouped
        assert out["rows"]["dw.weight"]["transform"].startswith("slice=[0,54]; reshape=[3,3,")


def test_keras_depthwise_pickle_without_reference_lists_the_reshape(tmp_path) -> None:
    model, x_nhwc, _ = keras_depthwise()
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    open_rows = unverified(plan_rows(write_case(tmp_path, "keras-depthwise-noref", model, "pickle", "DepthwiseSeparable", x, None)))
    assert open_rows["dw.weight"] == ["depthwise_to_grouped", "reshape=[6,1,3,3]"]
    assert open_rows["sep_pw.weight"][0] == "permute=[3,2,0,1]" and "reshape=[4,6,1,1]" in open_rows["sep_pw.weight"]
