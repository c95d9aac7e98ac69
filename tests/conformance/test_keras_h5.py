"""Keras 3 ``.weights.h5`` (``layers/<name>/vars/<i>``: numbered, unnamed variables) and legacy ``.h5``.

The mapping is tested twice: on the file's own dataset paths, read with h5py into an ``.npz``,
and on the ``.h5`` file itself through np2torch's ``h5`` reader (``source.format: h5``).
"""

from __future__ import annotations

import numpy as np
import pytest

from .keras_support import convert, max_abs_error_of_export, write_case
from .test_keras_branches import keras_branches
from .test_keras_cnn import keras_cnn
from .test_keras_depthwise import keras_depthwise
from .test_keras_recurrent import keras_recurrent

h5py = pytest.importorskip("h5py", reason="h5py is not installed (pip install h5py)")

MODELS = {"CNN": (keras_cnn, True), "DepthwiseSeparable": (keras_depthwise, True), "Recurrent": (keras_recurrent, False),
          "TwoBranch": (keras_branches, False)}


def _datasets(path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _case(torch_class: str):
    build, channels_first = MODELS[torch_class]
    model, x_src, ref = build()
    x = np.ascontiguousarray(x_src.transpose(0, 3, 1, 2)) if channels_first else x_src
    return model, x, ref


@pytest.mark.parametrize("file_kind", ["weights.h5", "legacy.h5"])
@pytest.mark.parametrize("torch_class", sorted(MODELS))
def test_keras_h5_paths_map_without_rules(tmp_path, torch_class, file_kind) -> None:
    model, x, ref = _case(torch_class)
    h5 = tmp_path / ("model.weights.h5" if file_kind == "weights.h5" else "model.h5")
    model.save_weights(h5) if file_kind == "weights.h5" else model.save(h5)
    arrays = _datasets(h5)
    assert arrays and all(k.startswith("layers/" if file_kind == "weights.h5" else "model_weights/") for k in arrays)
    config = write_case(tmp_path, f"keras-{file_kind.replace('.', '-')}-{torch_class.lower()}", model, "npz", torch_class, x, ref)
    np.savez(config.parent / "weights.npz", **arrays)  # the h5 file's own paths and values
    out = convert(config)
    assert out["recs"]["verify-forward-pass"].metrics["passed"]
    assert max_abs_error_of_export(config, torch_class, x, ref) < 1e-4


@pytest.mark.parametrize("file_kind", ["weights.h5", "legacy.h5"])
@pytest.mark.parametrize("torch_class", sorted(MODELS))
def test_keras_h5_file_converts(tmp_path, torch_class, file_kind) -> None:
    model, x, ref = _case(torch_class)
    config = write_case(tmp_path, f"keras-h5-{file_kind.replace('.', '-')}-{torch_class.lower()}", model, "npz", torch_class, x, ref)
    h5 = config.parent / ("model.weights.h5" if file_kind == "weights.h5" else "model.h5")
    model.save_weights(h5) if file_kind == "weights.h5" else model.save(h5)
    config.write_text(config.read_text().replace("path: weights.npz", f"path: {h5.name}").replace("format: npz", "format: h5"))
    out = convert(config)
    assert out["recs"]["verify-forward-pass"].metrics["passed"]
    assert max_abs_error_of_export(config, torch_class, x, ref) < 1e-4
