"""Keras 3 CNN (Conv2D + BatchNormalization, a Dense after Flatten) → hand-written PyTorch CNNs.

The PyTorch ports write ``forward`` the ways users do: pooling as ``F.max_pool2d`` and ``x.view``;
a channels-last ``x.permute`` before ``torch.flatten``; modules only. The flatten order each
Linear sees is read from what ``forward`` does, not from the module list.
"""

from __future__ import annotations

import numpy as np
import pytest

from .keras_support import convert, keras, max_abs_error_of_export, plan_rows, predict, randomize, unverified, write_case

layers = keras.layers


def keras_cnn(seed: int = 0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3)(inp)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Conv2D(8, 3)(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Flatten()(layers.MaxPooling2D(2)(x))
    model = keras.Model(inp, layers.Dense(5)(x))
    randomize(model, seed)
    x_nhwc = np.random.default_rng(seed).standard_normal((4, 8, 8, 3)).astype(np.float32)
    return model, x_nhwc, predict(model, x_nhwc)


CASES = [("pickle", "CNN"), ("npz", "CNN"), ("flat", "CNN"), ("pickle", "CNNChannelsLastFlatten"), ("npz", "CNNModules"),
         ("pickle", "CNNModules")]


@pytest.mark.parametrize("how,torch_class", CASES)
def test_keras_cnn_converts_and_reproduces_predict(tmp_path, how, torch_class) -> None:
    model, x_nhwc, ref = keras_cnn()
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    config = write_case(tmp_path, f"keras-cnn-{how}-{torch_class.lower()}", model, how, torch_class, x, ref)
    out = convert(config)
    assert out["recs"]["verify-forward-pass"].metrics["passed"]
    assert max_abs_error_of_export(config, torch_class, x, ref) < 1e-4
    rows = out["rows"]
    fc = next(k for k in rows if k.endswith(".weight") and rows[k]["target_shape"] == [5, 32])
    # the Dense after the flatten: reordered only when forward flattens channels-first
    assert ("flatten_nhwc_to_nchw" in rows[fc]["transform"]) == (torch_class != "CNNChannelsLastFlatten")
    counters = [r for k, r in rows.items() if k.endswith("num_batches_tracked")]
    assert len(counters) == 2 and all(r["status"] == "allowed_missing" and "PyTorch-only counter" in r["note"] for r in counters)


def test_keras_cnn_pickle_without_reference_is_unverified_naming_candidates(tmp_path) -> None:
    model, x_nhwc, _ = keras_cnn()
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    rows = plan_rows(write_case(tmp_path, "keras-cnn-noref", model, "pickle", "CNN", x, None))
    open_rows = unverified(rows)
    # a kernel matched by position: the channels-last permute, and a reshape by element count
    assert open_rows["conv1.weight"] == ["permute=[3,2,0,1]", "reshape=[4,3,3,3]"]
    assert open_rows["conv2.weight"][0] == "permute=[3,2,0,1]" and "reshape=[8,4,3,3]" in open_rows["conv2.weight"]
    assert open_rows["fc.weight"][0] == "transpose; flatten_nhwc_to_nchw=[8,2,2]"
    assert {"transpose", "reshape=[5,32]"} <= set(open_rows["fc.weight"])
    assert rows["bn2.running_var"]["verified"] and rows["bn2.running_var"]["source_key"] != ""


def test_keras_cnn_reference_rejects_the_reshape(tmp_path) -> None:
    model, x_nhwc, ref = keras_cnn()
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    rows = plan_rows(write_case(tmp_path, "keras-cnn-evidence", model, "pickle", "CNN", x, ref))

    ev = rows["conv1.weight"]["evidence"]
    assert ev["chosen"] == "permute=[3,2,0,1]" and ev["reproduces"]
    assert ev["errors"]["permute=[3,2,0,1]"] < 1e-4 < ev["errors"]["reshape=[4,3,3,3]"]
    assert all(r["verified"] for r in rows.values() if r["target_key"])
