"""Keras 3 LSTM and GRU → torch nn.LSTM / nn.GRU: transposes, GRU gate order (z, r, h → r, z, n),
the (2, 3u) GRU bias split into bias_ih / bias_hh, and the LSTM's one bias (bias_hh zeros)."""

from __future__ import annotations

import numpy as np
import pytest

from .keras_support import convert, keras, max_abs_error_of_export, plan_rows, predict, randomize, unverified, write_case

layers = keras.layers


def keras_recurrent(seed: int = 2):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5, 3))
    y = layers.LSTM(4, return_sequences=True)(inp)
    y = layers.GRU(6)(y)
    model = keras.Model(inp, layers.Dense(2)(y))
    randomize(model, seed)
    x = np.random.default_rng(seed).standard_normal((4, 5, 3)).astype(np.float32)
    return model, x, predict(model, x)


@pytest.mark.parametrize("how", ["pickle", "npz", "flat"])
def test_keras_lstm_gru_reproduce_predict(tmp_path, how) -> None:
    model, x, ref = keras_recurrent()
    config = write_case(tmp_path, f"keras-recurrent-{how}", model, how, "Recurrent", x, ref)
    out = convert(config)
    assert out["recs"]["verify-forward-pass"].metrics["passed"]
    assert max_abs_error_of_export(config, "Recurrent", x, ref) < 1e-4
    rows = out["rows"]
    assert rows["lstm.bias_hh_l0"]["status"] == "zeros"
    assert rows["gru.weight_ih_l0"]["transform"].endswith("transpose; reorder_chunks=[1,0,2]")
    assert rows["gru.bias_hh_l0"]["transform"].endswith("index=1; reorder_chunks=[1,0,2]")


def test_keras_recurrent_pickle_without_reference_is_unverified(tmp_path) -> None:
    model, x, _ = keras_recurrent()
    rows = plan_rows(write_case(tmp_path, "keras-recurrent-noref", model, "pickle", "Recurrent", x, None))
    open_rows = unverified(rows)
    assert open_rows["lstm.weight_ih_l0"] == ["transpose", "reshape=[16,3]"]
    assert open_rows["gru.weight_hh_l0"] == ["transpose; reorder_chunks=[1,0,2]", "reshape=[18,6]"]
    assert rows["gru.bias_ih_l0"]["sources"] == rows["gru.bias_hh_l0"]["sources"]  # one (2, 3u) array, split


def keras_bidirectional(seed: int = 5):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5, 3))
    model = keras.Model(inp, layers.Dense(2)(layers.Bidirectional(layers.LSTM(4))(inp)))
    randomize(model, seed)
    x = np.random.default_rng(seed).standard_normal((4, 5, 3)).astype(np.float32)
    return model, x, predict(model, x)


@pytest.mark.parametrize("how", ["pickle", "npz"])
def test_keras_bidirectional_lstm_fills_the_reverse_direction(tmp_path, how) -> None:
    model, x, ref = keras_bidirectional()
    config = write_case(tmp_path, f"keras-bilstm-{how}", model, how, "BiLSTM", x, ref)
    out = convert(config)
    assert out["recs"]["verify-forward-pass"].metrics["passed"]
    assert max_abs_error_of_export(config, "BiLSTM", x, ref) < 1e-4
    if how == "npz":
        assert "backward" in out["rows"]["lstm.weight_ih_l0_reverse"]["source_key"]
