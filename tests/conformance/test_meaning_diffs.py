"""Issue 19: the weights load but the outputs differ. Each known difference of meaning, built with Keras 3.

Per row of :data:`np2torch.tasks.diagnose.TABLE`: a real Keras model (torch backend) whose
reference comes from ``model.predict``, the user's natural PyTorch port with PyTorch's defaults,
np2torch failing with the module, the difference and the fix in the first three lines; then
the port with that fix converting and reproducing the reference without any diagnosis (the
control: the diagnosis never runs on a passing conversion).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from np2torch.tasks import diagnose, stages
from np2torch.tasks.config import load_config
from np2torch.tasks.errors import ConversionError

from .keras_support import TOL, keras, predict, randomize

layers = keras.layers
MODELS = Path(__file__).resolve().parent / "meaning_torch_models.py"


def _model(inputs_shape: tuple[int, ...], *body: Any, seed: int = 0) -> Any:
    keras.utils.set_random_seed(seed)
    inp = keras.Input(inputs_shape)
    x = inp
    for layer in body:
        x = layer(x)
    model = keras.Model(inp, x)
    randomize(model, seed)
    return model


def _x(shape: tuple[int, ...], scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    return (offset + scale * np.random.default_rng(1).standard_normal(shape)).astype(np.float32)


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


NORM = ([0.2, -0.2, 0.5], [4.0, 1.0, 0.25])  # a Normalization layer's per-channel mean and variance

# row → (build the Keras model and its source-side input, torch class, natural kwargs, fixed kwargs,
#        verify input from the Keras input (natural, fixed), what the first three lines must name)
CASES: dict[str, tuple] = {
    "batchnorm-eps": (lambda: (_model((6, 6, 3), layers.Conv2D(4, 3), layers.BatchNormalization(), layers.ReLU(), layers.Flatten(),
                                      layers.Dense(5)), _x((4, 6, 6, 3))),
                      "ConvBN", {}, {"eps": 1e-3}, (_nchw, _nchw), ["bn1 (BatchNorm2d)", "eps differs", "0.001", "1e-05", "eps=0.001"]),
    "layernorm-eps": (lambda: (_model((6,), layers.Dense(8), layers.LayerNormalization(), layers.Dense(3)), _x((4, 6), 3.0)),
                      "DenseLN", {}, {"eps": 1e-3}, (None, None), ["ln (LayerNorm)", "eps differs", "eps=0.001"]),
    "final-softmax": (lambda: (_model((6,), layers.Dense(8, activation="relu"), layers.Dense(4, activation="softmax")), _x((4, 6))),
                      "Classifier", {}, {"softmax": True}, (None, None),
                      ["fc2 (Linear)", "softmax of the output", "torch.softmax(x, dim=-1)"]),
    "same-padding-stride": (lambda: (_model((8, 8, 3), layers.Conv2D(4, 3, strides=2, padding="same"), layers.GlobalAveragePooling2D(),
                                            layers.Dense(2)), _x((4, 8, 8, 3))),
                            "StridedConv", {}, {"tf_same": True}, (_nchw, _nchw),
                            ["conv (Conv2d)", "padding differs", "F.pad(x, [0, 1, 0, 1])"]),
    "gelu-tanh": (lambda: (_model((6,), layers.Dense(8), layers.Activation(lambda t: keras.activations.gelu(t, approximate=True)),
                                  layers.Dense(3)), _x((4, 6), 2.0)),
                  "GeluMLP", {}, {"approximate": "tanh"}, (None, None), ["act (GELU)", "tanh", 'nn.GELU(approximate="tanh")']),
    "recurrent-hard-sigmoid": (lambda: (_model((5, 3), layers.LSTM(4, recurrent_activation="hard_sigmoid"), layers.Dense(2)),
                                        _x((4, 5, 3), 2.0)),
                               "HardSigmoidLSTM", {}, {"custom_cell": True}, (None, None),
                               ["lstm (LSTM)", "hard_sigmoid", "not expressible", "cannot express"]),
    "avgpool-count-include-pad": (lambda: (_model((6, 6, 3), layers.Conv2D(4, 3, padding="same"),
                                                  layers.AveragePooling2D(3, strides=1, padding="same"),
                                                  layers.GlobalAveragePooling2D(), layers.Dense(2)), _x((4, 6, 6, 3))),
                                  "ConvAvgPool", {}, {"count_include_pad": False}, (_nchw, _nchw),
                                  ["pool (AvgPool2d)", "count_include_pad=False"]),
    "input-layout-nhwc": (lambda: (_model((8, 8, 3), layers.Conv2D(4, 3), layers.ReLU(), layers.GlobalAveragePooling2D(), layers.Dense(2)),
                                   _x((4, 8, 8, 3))),
                          "SmallCNN", {}, {}, (None, _nchw), ["input", "channels-last (NHWC)", "np.moveaxis(x, -1, 1)"]),
    "input-rescaling": (lambda: (_model((8, 8, 3), layers.Rescaling(1 / 255), layers.Conv2D(4, 3), layers.ReLU(),
                                        layers.GlobalAveragePooling2D(), layers.Dense(2)),
                                 np.random.default_rng(1).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)),
                        "SmallCNN", {}, {"scale": 1 / 255}, (_nchw, _nchw), ["input scaling differs", "Rescaling(1/255)", "x * 0.003922"]),
    "input-normalization": (lambda: (_model((8, 8, 3), layers.Normalization(mean=NORM[0], variance=NORM[1]), layers.Conv2D(4, 3),
                                            layers.ReLU(), layers.GlobalAveragePooling2D(), layers.Dense(2)),
                                     _x((16, 8, 8, 3), 3.0, 1.0)),
                            "SmallCNN", {}, {"mean": NORM[0], "variance": NORM[1]}, (_nchw, _nchw),
                            ["input scaling differs", "affine map", "scale [0.5, 1, 2]", "shift [-0.1, 0.2, -1]"]),
}


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
    """Each Keras model once per module: (model, its input, model.predict of it)."""
    out = {}
    for name, (build, *_rest) in CASES.items():
        model, x = build()
        out[name] = (model, x, predict(model, x))
    return out


def _case(tmp_path: Path, name: str, built: dict, kwargs: dict[str, Any], layout: Any, tag: str, torch_class: str | None = None) -> Path:
    model, x, ref = built[name]
    d = tmp_path / f"{name}-{tag}"
    d.mkdir()
    np.savez(d / "weights.npz", **{v.path: np.asarray(v.numpy()) for v in model.weights})
    np.save(d / "input.npy", layout(x) if layout else x)
    np.save(d / "ref.npy", ref)
    raw = {"name": f"{name}-{tag}", "source": {"path": "weights.npz", "format": "npz"},
           "model": {"target": f"{MODELS}:{torch_class or CASES[name][1]}", "kwargs": kwargs},
           "mapping": {"strategy": "auto", "preset": "keras"},
           "verify": {"input": "input.npy", "reference_output": "ref.npy", **TOL}, "export": {"dir": "out"}}
    (d / "config.yaml").write_text(yaml.safe_dump(raw))
    return d / "config.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_difference_is_named_then_the_fix_reproduces(tmp_path, built, name, monkeypatch) -> None:
    _build, _cls, natural, fixed, (lay_natural, lay_fixed), expect = CASES[name]
    with pytest.raises(ConversionError) as info:
        stages.run_all(load_config(_case(tmp_path, name, built, natural, lay_natural, "natural")))
    head = "\n".join(str(info.value).splitlines()[:3])
    assert info.value.exit_code == 1
    for needle in expect:
        assert needle in head, f"{needle!r} not in the first three lines:\n{info.value}"
    assert "flatten_nhwc_to_nchw" not in head and "Fix:" in head

    # the control: the port with the stated fix converts, reproduces predict, and no diagnosis runs
    monkeypatch.setattr(diagnose, "diagnose", lambda *a, **k: pytest.fail("the diagnosis ran on a passing conversion"))
    recs = stages.run_all(load_config(_case(tmp_path, name, built, fixed, lay_fixed, "fixed")))
    metrics = recs["verify-forward-pass"].metrics
    assert metrics["passed"] and metrics["max_abs_error"] < 1e-4


def test_keras2_gru_reset_before_is_named_not_expressible(tmp_path) -> None:
    """GRU(reset_after=False) has one (3u,) bias: the mapping stage already names it as what nn.GRU cannot express."""
    model = _model((5, 3), layers.GRU(4, reset_after=False), layers.Dense(2))
    x = _x((4, 5, 3))
    built = {"gru": (model, x, predict(model, x))}
    with pytest.raises(ConversionError) as info:
        stages.run_all(load_config(_case(tmp_path, "gru", built, {}, None, "natural", torch_class="GRUNet")))
    first = str(info.value).splitlines()[0]
    assert "reset_after=False" in first and "nn.GRU cannot express" in first


@pytest.mark.slow
def test_flax_layernorm_epsilon_and_tanh_gelu_are_named_together(flax_linen, tmp_path) -> None:
    """Flax's defaults (LayerNorm epsilon 1e-6, gelu approximate=True) against a port with PyTorch's: both named, combined."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    fnn = flax_linen

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(3)(fnn.gelu(fnn.LayerNorm()(fnn.Dense(8)(x))))

    x = _x((8, 6), 0.002)  # a small variance before the LayerNorm: its epsilon matters
    variables = Net().init(jax.random.PRNGKey(0), jnp.asarray(x))
    ref = np.asarray(Net().apply(variables, jnp.asarray(x)), dtype=np.float32)
    arrays = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}

    def config(kwargs: dict[str, Any], tag: str) -> Path:
        d = tmp_path / tag
        d.mkdir()
        np.savez(d / "weights.npz", **arrays)
        np.save(d / "input.npy", x)
        np.save(d / "ref.npy", ref)
        raw = {"name": tag, "source": {"path": "weights.npz"}, "model": {"target": f"{MODELS}:DenseLNGelu", "kwargs": kwargs},
               "mapping": {"preset": "flax"}, "verify": {"input": "input.npy", "reference_output": "ref.npy", **TOL},
               "export": {"dir": "out"}}
        (d / "config.yaml").write_text(yaml.safe_dump(raw))
        return d / "config.yaml"

    with pytest.raises(ConversionError) as info:
        stages.run_all(load_config(config({}, "natural")))
    head = str(info.value).splitlines()[:3]
    assert "ln (LayerNorm): eps differs: the source used 1e-06, the model 1e-05" in head[0] and "act (GELU): GELU approximation" in head[0]
    assert head[1].startswith("Fix: nn.LayerNorm(..., eps=1e-06)") and 'nn.GELU(approximate="tanh")' in head[1]
    recs = stages.run_all(load_config(config({"eps": 1e-6, "approximate": "tanh"}, "fixed")))
    assert recs["verify-forward-pass"].metrics["passed"]


def test_plan_with_a_reference_names_the_difference(tmp_path, built, capsys) -> None:
    from np2torch.api import plan_rows
    from np2torch.cli import main

    assert main(["plan", str(_case(tmp_path, "final-softmax", built, {}, None, "plan"))]) == 1  # `np2torch plan` exits 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "fc2 (Linear): final activation differs" in err[0] and err[1].startswith("Fix: end forward with `x = torch.softmax(x, dim=-1)`")
    _cfg, _rows, problem = plan_rows(_case(tmp_path, "final-softmax", built, {"softmax": True}, None, "plan-fixed"))
    assert problem is None


def test_load_into_with_a_reference_names_the_difference(built) -> None:
    import importlib.util
    import tempfile

    import np2torch

    spec = importlib.util.spec_from_file_location("meaning_torch_models_li", MODELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, x, ref = built["layernorm-eps"]
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "w.npz", **{v.path: np.asarray(v.numpy()) for v in model.weights})
        with pytest.raises(ConversionError, match=r"ln \(LayerNorm\): eps differs: the source used 0.001, the model 1e-05"):
            np2torch.load_into(mod.DenseLN(), Path(tmp) / "w.npz", preset="keras", reference=(x, ref), **TOL)
        _fixed, manifest = np2torch.load_into(mod.DenseLN(eps=1e-3), Path(tmp) / "w.npz", preset="keras", reference=(x, ref), **TOL)
        assert manifest.verification["passed"]


def test_legacy_h5_config_is_compared_before_any_forward_pass(tmp_path, built) -> None:
    """A legacy .h5 carries model_config: plan, without a reference, names the epsilon difference."""
    from np2torch.api import plan_rows

    model = built["batchnorm-eps"][0]
    cfg = _case(tmp_path, "batchnorm-eps", built, {}, _nchw, "h5")
    model.save(cfg.parent / "model.h5")
    raw = yaml.safe_load(cfg.read_text())
    raw["source"] = {"path": "model.h5", "format": "h5"}
    raw["verify"] = {"input": "input.npy"}  # no reference: nothing runs forward against one
    cfg.write_text(yaml.safe_dump(raw))
    _c, _rows, problem = plan_rows(cfg)
    assert problem is not None
    first = str(problem).splitlines()[0]
    assert "bn1: source epsilon 0.001, model eps 1e-05" in first, str(problem)
    raw["model"]["kwargs"] = {"eps": 1e-3}
    cfg.write_text(yaml.safe_dump(raw))
    assert plan_rows(cfg)[2] is None


def test_wrong_architecture_is_one_diff_on_the_first_line(tmp_path) -> None:
    keras_model = _model((6,), layers.Dense(16, activation="relu"), layers.Dense(5))
    d = tmp_path / "arch"
    d.mkdir()
    np.savez(d / "weights.npz", **{v.path: np.asarray(v.numpy()) for v in keras_model.weights})
    raw = {"name": "arch", "source": {"path": "weights.npz", "format": "npz"}, "model": {"target": f"{MODELS}:Wider"},
           "mapping": {"strategy": "auto", "preset": "keras"}, "export": {"dir": "out"}}
    (d / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConversionError) as info:
        stages.run_all(load_config(d / "config.yaml"))
    text = str(info.value)
    first = text.splitlines()[0]
    assert "— fc2.weight: model [10, 16], source " in first and "[16, 5] (as [5, 16])" in first, text
    assert "allow_missing" not in text.split("Fix:")[-1] and "architecture" in text.split("Fix:")[-1]
