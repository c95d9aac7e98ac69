"""``np2torch port``: a Keras ``.keras`` / legacy ``.h5`` → generated ``model.py`` → the usual conversion.

Real Keras models (``keras.applications`` with ``weights=None`` at their smallest input, and
small hand-built ones covering the layer table), every weight random so that BatchNorm
statistics and biases matter, each saved once per module as ``.keras`` and legacy ``.h5`` and
ported in both layouts. Each generated file is ruff-clean, at most 120 columns, imports only
torch, loads the exported weights with ``strict=True`` and answers like Keras's ``predict``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import np2torch
from np2torch.port_keras import PortError

from .keras_support import _record, keras

h5py = pytest.importorskip("h5py", reason="h5py is not installed (pip install h5py)")

L = keras.layers
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# the models (each built, randomised, predicted and saved once per module)


def _cnn_branches():
    """Many rows of the table in one functional graph: asymmetric same padding, pooling with
    padding, separable/depthwise convs, merges, keepdims pooling, LayerNorm on images, two outputs."""
    inp = keras.Input((12, 12, 3), name="image")
    x = L.Rescaling(1 / 2.0, offset=-0.25)(inp)
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = L.BatchNormalization(epsilon=1e-5, name="stem_bn")(x)
    x = L.ReLU(6.0)(x)
    a = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="hard_swish")(x)
    a = L.Conv2D(8, 1, activation="swish")(a)
    b = L.SeparableConv2D(8, 3, padding="same", activation="gelu")(x)
    b = L.MaxPooling2D(3, strides=1, padding="same")(b)
    c = L.AveragePooling2D(3, strides=1, padding="same")(x)
    c = L.UpSampling2D(2)(c)
    c = L.Cropping2D(((3, 4), (4, 3)))(c)
    c = L.ZeroPadding2D(((1, 0), (0, 1)))(c)
    y = L.Add()([a, b, c])
    se = L.GlobalAveragePooling2D(keepdims=True)(y)
    se = L.Conv2D(8, 1, activation="hard_sigmoid")(se)
    y = L.Multiply()([y, se])
    y = L.Concatenate()([y, L.Subtract()([a, b])])
    y = L.LayerNormalization(epsilon=1e-6)(y)
    y = L.Activation("elu")(y)
    y = L.Dropout(0.5)(y)
    flat = L.Flatten()(L.MaxPooling2D(2)(y))
    logits = L.Dense(5, name="logits")(flat)
    probs = L.Softmax(name="probs")(L.Dense(4)(L.GlobalMaxPooling2D()(y)))
    return keras.Model(inp, [logits, probs], name="cnn_branches"), [(2, 12, 12, 3)]


def _audio():
    inp = keras.Input((16, 2), name="signal")
    x = L.Conv1D(6, 3, padding="causal", activation="relu")(inp)
    x = L.Conv1D(6, 4, strides=2, padding="same")(x)
    x = L.BatchNormalization()(x)
    x = L.MaxPooling1D(2)(x)
    x = L.Reshape((4, 6))(x)
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(3, activation="tanh")(x), name="audio_net"), [(3, 16, 2)]


def _multi_input():
    img = keras.Input((8, 8, 3), name="img")
    vec = keras.Input((5,), name="vec")
    x = L.Conv2D(4, 3, strides=2, padding="same", activation="relu")(img)
    x = L.Flatten()(x)
    x = L.Concatenate()([x, L.Dense(6, activation="sigmoid")(vec)])
    return keras.Model([img, vec], [L.Dense(2)(x), L.Dense(3)(vec)], name="two_inputs"), [(2, 8, 8, 3), (2, 5)]


def _text():
    inp = keras.Input((7,), name="tokens")
    x = L.Embedding(20, 6)(inp)
    x = L.LSTM(5, return_sequences=True)(x)
    x = L.Bidirectional(L.GRU(4, return_sequences=True), merge_mode="sum")(x)
    x = L.SimpleRNN(4, return_sequences=True)(x)
    x = L.Bidirectional(L.LSTM(3))(x)
    return keras.Model(inp, L.Dense(2)(x), name="text_model"), "tokens"


def _randomize(model, seed: int) -> None:
    """Every weight random, BatchNorm statistics included, at a scale that keeps a deep network's
    activations near 1 (kernels ~ 1/sqrt(fan-in)), so 1e-4 absolute is a real bound."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape, path = tuple(v.shape), v.path
        if "variance" in path:
            value = rng.uniform(0.5, 2.0, shape)
        elif "gamma" in path and len(shape) == 1 and "layer_scale" not in path:
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) >= 2:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]) if "depthwise" not in path else np.prod(shape[:-2]))
        else:
            value = 0.2 * rng.standard_normal(shape)
        v.assign(value.astype("float32"))


def _attention():
    """Causal self-attention, then cross-attention with its own key, value and output sizes: two (N, T, C) inputs."""
    seq = keras.Input((5, 8), name="seq")
    mem = keras.Input((4, 6), name="memory")
    x = L.MultiHeadAttention(num_heads=2, key_dim=3, name="self_attn")(seq, seq, use_causal_mask=True)
    x = L.LayerNormalization()(L.Add()([seq, x]))
    y = L.MultiHeadAttention(num_heads=3, key_dim=2, value_dim=4, output_shape=7, name="cross")(x, mem, key=mem)
    return keras.Model([seq, mem], L.Dense(2)(y), name="attention"), [(2, 5, 8), (2, 4, 6)]


def _nested():
    """A Sequential used as a layer, called twice (shared weights, nested class)."""
    block = keras.Sequential([keras.Input((6, 6, 4)), L.Conv2D(4, 3, padding="same", name="conv"), L.LayerNormalization(name="norm")],
                             name="block")
    inp = keras.Input((6, 6, 3), name="pixels")
    x = L.Conv2D(4, 1, name="stem")(inp)
    x = block(x)
    x = L.Add()([x, block(x)])
    return keras.Model(inp, L.Dense(2)(L.Flatten()(x)), name="outer"), [(2, 6, 6, 3)]


def _app(name: str, size: int):
    def build():
        model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None)
        return model, [(2, size, size, 3)]
    return build


MODELS = {"cnn_branches": _cnn_branches, "audio": _audio, "multi_input": _multi_input, "text": _text, "nested": _nested,
          "attention": _attention,
          "MobileNetV2": _app("MobileNetV2", 32), "ResNet50": _app("ResNet50", 32), "VGG16": _app("VGG16", 32),
          "MobileNetV3Small": _app("MobileNetV3Small", 32), "EfficientNetB0": _app("EfficientNetB0", 32),
          "DenseNet121": _app("DenseNet121", 32), "ResNet50V2": _app("ResNet50V2", 32), "Xception": _app("Xception", 71),
          "InceptionV3": _app("InceptionV3", 75), "EfficientNetV2B0": _app("EfficientNetV2B0", 32),
          "ConvNeXtTiny": _app("ConvNeXtTiny", 32)}  # NASNetMobile does not build on Keras's torch backend
FAST = ["cnn_branches", "audio", "multi_input", "text", "nested", "attention", "MobileNetV2"]
SEQUENCES = ("text", "attention")  # rank-3 inputs that feed attention / RNNs stay (N, T, C) in both layouts
SLOW = [m for m in MODELS if m not in FAST]
_BUILT: dict[str, tuple[Path, list[np.ndarray], list[np.ndarray]]] = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    def get(case: str):
        if case not in _BUILT:
            keras.backend.clear_session()  # Keras numbers unnamed layers per session: the names must not depend on earlier tests
            keras.utils.set_random_seed(3)
            model, shapes = MODELS[case]()
            _randomize(model, 3)
            rng = np.random.default_rng(4)
            if shapes == "tokens":
                xs = [rng.integers(0, 20, (3, 7)).astype("float32")]
            else:
                xs = [rng.standard_normal(s).astype("float32") for s in shapes]
            out = model.predict(xs if len(xs) > 1 else xs[0], verbose=0)
            ys = [np.asarray(o, dtype=np.float32) for o in (out if isinstance(out, (list, tuple)) else [out])]
            d = tmp_path_factory.mktemp(case)
            model.save(d / "m.keras")
            model.save(d / "m.h5")
            _BUILT[case] = (d, xs, ys)
        return _BUILT[case]
    return get


# ---------------------------------------------------------------------------------------------
# the checks


def _check_source(path: Path) -> None:
    src = path.read_text()
    assert max(len(line) for line in src.splitlines()) <= 120
    imports = [line for line in src.splitlines() if re.match(r"\s*(import|from)\s", line)]
    assert imports and all(re.match(r"(import torch(\.nn\.functional as F)?|from torch import nn)$", i) for i in imports), imports
    ruff = Path(sys.executable).parent / "ruff"
    if ruff.exists():
        cfg = ["--config", str(REPO / "pyproject.toml")] if "[tool.ruff" in (REPO / "pyproject.toml").read_text() else []
        r = subprocess.run([str(ruff), "check", *cfg, "--line-length", "120", str(path)], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def _torch_layout(a: np.ndarray, cf: bool) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, -1, 1)) if cf and a.ndim >= 3 else a


def _port_and_compare(built, case: str, fmt: str, layout: str, tmp_path: Path) -> float:
    import torch
    from safetensors.torch import load_file

    d, xs, ys = built(case)
    out = tmp_path / "ported"
    t0 = time.perf_counter()
    cls, manifest = np2torch.port(d / f"m.{fmt}", out=out, reference=(xs, ys), layout=layout, orchestrate=False)
    seconds = time.perf_counter() - t0
    assert manifest.verification["passed"] and manifest.verification["reference"]
    assert not [r.target_key for r in manifest.targets if r.status not in ("mapped", "zeros", "allowed_missing")]
    _check_source(out / "model.py")
    model = cls()
    model.load_state_dict(load_file(out / "out" / "model.safetensors"), strict=True)
    model.eval()
    cfs = [layout == "channels_first" and (a.ndim >= 4 or a.ndim == 3 and case not in SEQUENCES) for a in xs]
    with torch.no_grad():
        got = model(*[torch.from_numpy(_torch_layout(x, cf)) for x, cf in zip(xs, cfs, strict=True)])
    got = [g.numpy() for g in (got if isinstance(got, tuple) else (got,))]
    err = max(float(np.abs(_keras_layout(g, y.shape) - y).max()) for g, y in zip(got, ys, strict=True))
    name = f"port-{case}-{fmt}-{layout.split('_')[1]}"
    _record(f"{name} (port {seconds:.0f}s)", err)  # the closing table: error and port time per case
    print(f"{name}: max abs error {err:.3g}, port {seconds:.1f}s")
    assert err <= 1e-4
    return err


def _keras_layout(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A channels-first image output back in Keras's layout (sequences and vectors already are)."""
    return a if a.shape == shape else np.moveaxis(a, 1, -1)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("fmt", ["keras", "h5"])
@pytest.mark.parametrize("case", FAST)
def test_port_reproduces_keras(built, case, fmt, layout, tmp_path) -> None:
    _port_and_compare(built, case, fmt, layout, tmp_path)


# A Keras 3 .weights.h5 numbers a layer's variables instead of naming them; the .keras reader names
# them by shape, which cannot tell BatchNormalization(scale=False)'s (beta, mean, variance) apart
# (InceptionV3). Naming them from config.json's layer flags is still to do; the legacy .h5 passes.
KERAS3_WEIGHTS_NAMING = {"InceptionV3"}


# Each keras.applications model once from .keras (channels-first) and once from legacy .h5
# (channels-last): both formats and both layouts, at half the cost of every combination (the
# small models above run all four).
@pytest.mark.slow
@pytest.mark.parametrize("fmt,layout", [("keras", "channels_first"), ("h5", "channels_last")])
@pytest.mark.parametrize("case", SLOW)
def test_port_reproduces_keras_applications(built, case, fmt, layout, tmp_path, request) -> None:
    if fmt == "keras" and case in KERAS3_WEIGHTS_NAMING:
        request.applymarker(pytest.mark.xfail(reason="BatchNormalization(scale=False) variables in a .keras file are numbered, "
                                                     "named by shape", strict=True))
    _port_and_compare(built, case, fmt, layout, tmp_path)


def test_generated_module_reads_like_the_keras_graph(built, tmp_path) -> None:
    d, xs, ys = built("cnn_branches")
    from np2torch.porting import write_port

    config, gen = write_port(d / "m.keras", tmp_path / "p", reference=(xs, ys))
    src = (tmp_path / "p" / "model.py").read_text()
    assert gen.class_name == "CnnBranches" and "class CnnBranches(nn.Module):" in src
    assert "self.stem = nn.Conv2d(3, 8, 3, stride=2, bias=False)" in src
    assert "self.stem_bn = nn.BatchNorm2d(8, eps=1e-05)" in src
    assert "rescaling = image * 0.5 - 0.25  # (N, 3, 12, 12)" in src
    assert "stem = self.stem(F.pad(rescaling, (0, 1, 0, 1)))  # (N, 8, 6, 6)" in src  # Keras's asymmetric 'same' padding
    # 'same' average pooling counts only the real inputs (asymmetric padding is not tested against predict: Keras's
    # torch backend pads those by replicating the edge, unlike its TensorFlow and JAX backends, which the port follows)
    assert "F.avg_pool2d(re_lu, 3, 1, padding=1, count_include_pad=False)" in src
    assert "F.max_pool2d(separable_conv2d, 3, 1, padding=1)" in src
    assert "torch.flatten(max_pooling2d_1.permute(0, 2, 3, 1), 1)" in src  # Keras's (H, W, C) element order
    cfg = __import__("yaml").safe_load(config.read_text())
    assert cfg["model"]["target"] == "model.py:CnnBranches" and cfg["mapping"]["preset"] == "keras"
    assert cfg["verify"]["rtol"] == 1e-4 and cfg["verify"]["atol"] == 1e-5 and cfg["export"]["dir"] == "out"
    assert np.load(tmp_path / "p" / cfg["verify"]["input"]).shape == (2, 3, 12, 12)  # permuted to channels-first for the module
    assert [r.shape for r in np.load(tmp_path / "p" / cfg["verify"]["reference_output"]).values()] == [(2, 5), (2, 4)]


def test_cli_port_runs_the_usual_conversion(prefect_harness, built, tmp_path) -> None:
    # no capsys here: Prefect's console handler, created on the first flow run, would keep its closed stream
    from np2torch.cli import main

    d, xs, ys = built("audio")
    np.save(tmp_path / "x.npy", xs[0])
    np.save(tmp_path / "y.npy", ys[0])
    out = tmp_path / "ported"
    code = main(["port", str(d / "m.h5"), "--out", str(out), "--input", str(tmp_path / "x.npy"), "--reference", str(tmp_path / "y.npy")])
    assert code == 0
    assert "class AudioNet(nn.Module):" in (out / "model.py").read_text()
    assert "permuted to the module's channels-first layout" in (out / "config.yaml").read_text()
    report = json.loads((out / "out" / "report.json").read_text())
    assert report["status"] == "success" and report["verification"]["passed"] and report["run_id"]
    assert list(report["stages"]) == ["load-arrays", "infer-mapping", "validate", "convert-to-device", "verify-forward-pass", "export"]
    assert main(["convert", str(out / "config.yaml")]) == 0  # the config stands on its own


# ---------------------------------------------------------------------------------------------
# bad input: one message naming the layer, nothing written, nothing run


def _lambda_model(d: Path) -> Path:
    inp = keras.Input((4,))
    x = L.Dense(3)(inp)
    x = L.Lambda(lambda t: t * 2.0, name="double_it")(x)
    keras.Model(inp, L.Dense(2)(x), name="with_lambda").save(d / "lam.h5")
    return d / "lam.h5"


def test_lambda_layer_is_one_clear_error_and_nothing_is_written(tmp_path, capsys) -> None:
    from np2torch.cli import main

    src = _lambda_model(tmp_path)
    with pytest.raises(PortError, match=r"(?s)'double_it' \(Lambda\).*bytecode.*not shown.*np2torch port --allow-placeholders"):
        np2torch.port(src, out=tmp_path / "nope")
    assert main(["port", str(src), "--out", str(tmp_path / "nope")]) == 1
    assert "double_it" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_allow_placeholders_writes_a_marked_module_and_runs_nothing(tmp_path, capsys) -> None:
    from np2torch.cli import main

    src = _lambda_model(tmp_path)
    assert main(["port", str(src), "--out", str(tmp_path / "ph"), "--allow-placeholders"]) == 0
    text = (tmp_path / "ph" / "model.py").read_text()
    assert "PLACEHOLDER" in text and 'placeholder("double_it"' in text and "raise NotImplementedError" in text
    assert not (tmp_path / "ph" / "out").exists() and "write them by hand" in capsys.readouterr().err
    _check_source(tmp_path / "ph" / "model.py")


def _zip(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return path


_CFG = {"class_name": "Functional", "config": {"name": "m", "layers": [
    {"class_name": "InputLayer", "name": "x", "config": {"name": "x", "batch_shape": [None, 4]}, "inbound_nodes": []},
    {"class_name": "Dense", "name": "d", "config": {"name": "d", "units": 2},
     "inbound_nodes": [{"args": [{"class_name": "__keras_tensor__", "config": {"keras_history": ["x", 0, 0]}}], "kwargs": {}}]}],
    "input_layers": [["x", 0, 0]], "output_layers": [["d", 0, 0]]}}


@pytest.mark.parametrize("members,link,match", [
    ({"../config.json": b"{}", "config.json": json.dumps(_CFG).encode()}, None, "escapes the archive"),
    ({"/abs": b"", "config.json": json.dumps(_CFG).encode()}, None, "escapes the archive"),
    ({"config.json": json.dumps(_CFG).encode()}, "model.weights.h5", "symbolic link"),
    ({"metadata.json": b"{}"}, None, "no config.json"),
    ({"config.json": b"{not json"}, None, "not valid JSON"),
    ({"config.json": json.dumps(_CFG).encode()}, None, "no model.weights.h5"),  # found after model.py was due: still nothing left
])
def test_keras_zip_hazards(tmp_path, members, link, match) -> None:
    with pytest.raises(PortError, match=match):
        np2torch.port(_zip(tmp_path / "bad.keras", members, link), out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_config_json_inflating_past_its_bound(tmp_path, monkeypatch) -> None:
    from np2torch import port_keras

    monkeypatch.setattr(port_keras, "MAX_CONFIG_BYTES", 1000)
    big = json.dumps({**_CFG, "pad": "x" * 5000}).encode()
    with pytest.raises(PortError, match="too large|inflates"):
        np2torch.port(_zip(tmp_path / "big.keras", {"config.json": big}), out=tmp_path / "o")


@pytest.mark.parametrize("patch,match", [
    ({"class_name": "Evil", "module": "os", "registered_name": "os>system"},
        r"'d' \(Evil\).*not in np2torch's layer table.*registered_name"),
    ({"config": {"name": "d", "units": "2); import os; os.system('echo pwned'"}}, r"units must be an integer"),
    ({"config": {"name": "d", "units": 2, "activation": {"module": "evil", "class_name": "function", "config": "boom"}}},
     r"activation .* is not one np2torch knows"),
])
def test_config_is_data_never_code(tmp_path, patch, match) -> None:
    cfg = json.loads(json.dumps(_CFG))
    layer = cfg["config"]["layers"][1]
    layer.update(patch)
    before = set(sys.modules)
    with pytest.raises(PortError, match=match):
        np2torch.port(_zip(tmp_path / "evil.keras", {"config.json": json.dumps(cfg).encode()}), out=tmp_path / "o")
    assert "evil" not in set(sys.modules) - before and not (tmp_path / "o").exists()


def test_layer_names_never_reach_code_unchecked(tmp_path) -> None:
    from np2torch.porting import write_port

    cfg = json.loads(json.dumps(_CFG))
    cfg["config"]["name"] = 'm"""\nimport os'
    cfg["config"]["layers"][1]["name"] = cfg["config"]["layers"][1]["config"]["name"] = "d = 1\nimport os  #"
    cfg["config"]["output_layers"] = [["d = 1\nimport os  #", 0, 0]]
    src = _zip(tmp_path / "names.keras", {"config.json": json.dumps(cfg).encode(), "model.weights.h5": b""})
    write_port(src, tmp_path / "o")
    text = (tmp_path / "o" / "model.py").read_text()
    assert "import os" not in text and "self.layer = nn.Linear(4, 2)" in text
    compile(text, "model.py", "exec")
