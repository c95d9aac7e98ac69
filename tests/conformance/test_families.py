"""Families of real checkpoints (issue 18), each written by its framework at test time, zero rules.

- recurrent cells stored gate by gate (Flax ``LSTMCell`` / ``GRUCell``, one and two layers) into
  ``nn.LSTM`` / ``nn.GRU``;
- scanned layers (Flax ``nn.scan``: every block's parameters stacked on a leading depth axis)
  split onto ``blocks.0 … N-1``;
- attention stored per head (Keras ``MultiHeadAttention``) into a fused ``qkv``, separate q/k/v/out
  Linears and ``nn.MultiheadAttention``;
- whole JAX ViT checkpoints (the Google npz naming) into timm's ``VisionTransformer``, timm's
  own ``_load_weights`` as the oracle of what the file means;
- a keras.applications MobileNetV2 saved as ``.weights.h5`` into a torch port.

Configs name a preset, ``strategy: auto`` and ``format: auto`` only; references come from the
source framework. The max abs error of each case is in ``conformance_support.RESULTS``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from .conformance_support import RESULTS, check_case, plan_without_reference, unverified, write_case
from .conftest import need

HERE = Path(__file__).resolve().parent
PORTS = HERE / "torch_ports.py"


def _fresh(target: str, kwargs: dict):
    def make() -> torch.nn.Module:
        from np2torch.tasks.model import build_model

        torch.manual_seed(99)
        return build_model(target, kwargs, device="cpu")
    return make


def _randomized(variables, seed: int):
    """Every parameter random (Flax initialises biases to zero: they would test nothing)."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: (0.5 * rng.standard_normal(a.shape)).astype(np.float32), variables)


def _flat(variables) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}


# ---------------------------------------------------------------------------------------------
# 4. recurrent cells gate by gate


@pytest.fixture(scope="module")
def linen():
    need("jax")
    return need("flax.linen")


@pytest.fixture(scope="module")
def flax_rnns(linen):
    """(cell, layers) → (variables, input, reference) for Flax LSTMCell/GRUCell stacks."""
    import jax
    import jax.numpy as jnp

    nn = linen
    x = np.random.default_rng(3).standard_normal((2, 5, 3)).astype(np.float32)
    class Stack(nn.Module):
        cell: str
        layers: int

        @nn.compact
        def __call__(self, x):
            for _ in range(self.layers):
                x = nn.RNN({"lstm": nn.LSTMCell, "optimized-lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[self.cell](6))(x)
            return x

    out = {}
    for cell in ("lstm", "optimized-lstm", "gru"):
        for layers in (1, 2):
            m = Stack(cell, layers)
            v = _randomized(m.init(jax.random.PRNGKey(0), jnp.asarray(x)), 10 * layers + len(cell))
            out[cell, layers] = (v, x, np.asarray(m.apply(v, jnp.asarray(x)), dtype=np.float64))
    return out


@pytest.mark.parametrize("cell", ["lstm", "optimized-lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
def test_flax_cells_into_torch_rnn(flax_rnns, tmp_path: Path, cell: str, layers: int) -> None:
    v, x, ref = flax_rnns[cell, layers]
    kwargs = {"cell": "gru" if cell == "gru" else "lstm", "d_in": 3, "hidden": 6, "layers": layers}
    config = write_case(tmp_path, name=f"flax-{cell}-{layers}", arrays=_flat(v), inputs=x, reference=[ref],
                        target=f"{PORTS}:Recurrent", kwargs=kwargs, preset="flax")
    rows = {r["target_key"]: r for r in plan_without_reference(config) if r["target_key"]}
    w = rows["rnn.weight_ih_l0"]
    assert w["concat"] == 0  # one row, the gates joined in torch's order
    assert [s.rsplit("/", 2)[-2] for s in w["sources"]] == (["ir", "iz", "in"] if cell == "gru" else ["ii", "if", "ig", "io"])
    if cell == "gru":
        assert rows["rnn.bias_hh_l0"]["transform_spec"] == [["pad", [12, 0]]]  # only hn has a hidden-side bias
    else:
        assert rows["rnn.bias_ih_l0"]["status"] == "zeros"
    if layers == 2:
        assert all("Cell_1/h" in s for s in rows["rnn.weight_hh_l1"]["sources"])  # layer 1 from the second cell
    check_case(config, ambiguous=lambda k, s: "weight_hh" in k, fresh_model=_fresh(f"{PORTS}:Recurrent", kwargs))
    assert RESULTS[f"flax-{cell}-{layers}"][0] < 1e-4


# ---------------------------------------------------------------------------------------------
# 3. scanned layers


@pytest.fixture(scope="module")
def flax_scan(linen):
    import jax
    import jax.numpy as jnp

    nn = linen

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(8)(jnp.tanh(nn.LayerNorm()(x))), None

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8)(x)
            x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(x, None)
            return nn.Dense(2)(x)

    x = np.random.default_rng(4).standard_normal((5, 4)).astype(np.float32)
    m = Scanned()
    v = _randomized(m.init(jax.random.PRNGKey(0), jnp.asarray(x)), 7)
    return v, x, np.asarray(m.apply(v, jnp.asarray(x)), dtype=np.float64)


def test_flax_scan_splits_along_depth(flax_scan, tmp_path: Path) -> None:
    v, x, ref = flax_scan
    flat = _flat(v)
    assert [k for k, a in flat.items() if a.shape == (3, 8, 8)] == ["params/ScanBlock_0/Dense_0/kernel"]  # as nn.scan writes it
    config = write_case(tmp_path, name="flax-scan", arrays=flat, inputs=x, reference=[ref], target=f"{PORTS}:ScanNet", kwargs={},
                        preset="flax")
    rows = {r["target_key"]: r for r in plan_without_reference(config) if r["target_key"]}
    for i in range(3):
        spec = rows[f"blocks.{i}.fc.weight"]["transform_spec"]
        assert spec[0] == ["layer", i], spec  # block i reads layer i of the stacked kernel
        assert rows[f"blocks.{i}.norm.weight"]["transform_spec"] == [["layer", i]]
    assert rows["stem.weight"]["source_key"].endswith("Dense_0/kernel") and rows["head.weight"]["source_key"].endswith("Dense_1/kernel")
    check_case(config, ambiguous=lambda k, s: k.startswith("blocks.") and k.endswith("fc.weight"),
               fresh_model=_fresh(f"{PORTS}:ScanNet", {}))
    assert RESULTS["flax-scan"][0] < 1e-4


# ---------------------------------------------------------------------------------------------
# 1. attention stored per head


def _h5_case(root: Path, name: str, save, x: np.ndarray, ref: np.ndarray, target: str, kwargs: dict, preset: str) -> Path:
    """write_case's config for a file the framework itself wrote (``save(path)``)."""
    import yaml

    config = write_case(root, name=name, arrays={}, inputs=x, reference=[ref], target=target, kwargs=kwargs, preset=preset)
    (root / "weights.npz").unlink()
    save(root / "model.weights.h5")
    cfg = yaml.safe_load(config.read_text())
    cfg["source"]["path"] = "model.weights.h5"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def keras_mha():
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = need("keras")
    keras.utils.set_random_seed(5)
    inp = keras.Input((5, 16))
    y = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(inp, inp)
    model = keras.Model(inp, keras.layers.Dense(4)(y))
    rng = np.random.default_rng(5)
    for w in model.weights:
        w.assign((0.4 * rng.standard_normal(tuple(w.shape))).astype("float32"))
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    return model, x, np.asarray(model.predict(x, verbose=0), dtype=np.float64)


@pytest.mark.parametrize("style", ["fused", "split", "torch"])
def test_keras_mha_into_fused_and_split_targets(keras_mha, tmp_path: Path, style: str) -> None:
    model, x, ref = keras_mha
    kwargs = {"d": 16, "heads": 2, "d_out": 4, "style": style}
    config = _h5_case(tmp_path, f"keras-mha-{style}", model.save_weights, x, ref, f"{PORTS}:SelfAttention", kwargs, "keras")
    rows = {r["target_key"]: r for r in plan_without_reference(config) if r["target_key"]}
    fused = {"fused": "qkv.weight", "torch": "mha.in_proj_weight"}.get(style)
    if fused:  # one row, three sources in role order, each per-head kernel (16, 2, 8) → (16, 16) → transposed
        assert [s.split("/")[-2] for s in rows[fused]["sources"]] == ["query", "key", "value"] and rows[fused]["concat"] == 0
        assert rows[fused]["transform_spec"] == [["reshape", [16, 16]], ["transpose", None]]
    else:
        assert all(rows[f"{r}.weight"]["source_key"].endswith(f"{s}/kernel")
                   for r, s in (("q", "query"), ("k", "key"), ("v", "value"), ("out", "attention_output")))
    check_case(config, ambiguous=lambda k, s: "head" not in k and k.endswith("weight"),
               fresh_model=_fresh(f"{PORTS}:SelfAttention", kwargs))
    assert RESULTS[f"keras-mha-{style}"][0] < 1e-4


# ---------------------------------------------------------------------------------------------
# 2. whole JAX ViT checkpoints (Google's npz naming) into timm's VisionTransformer

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
VIT_TARGET = "timm.models.vision_transformer:VisionTransformer"


@pytest.fixture(scope="module")
def jax_vits(linen):
    """ViTs as google-research/vision_transformer (``encoderblock_N``) and big_vision (one
    ``nn.scan``-stacked ``encoderblock``) write them, module names included; their parameters
    flattened as their ``.npz`` checkpoints are (sorted keys), and their output for one batch."""
    import jax
    import jax.numpy as jnp

    nn = linen
    d, heads = VIT["embed_dim"], VIT["num_heads"]

    class MlpBlock(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jax.nn.gelu(nn.Dense(4 * d)(x), approximate=False)  # Dense_0
            return nn.Dense(d)(x)  # Dense_1

    class Encoder1DBlock(nn.Module):
        google: bool  # vit_jax's names (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3); else linen's own

        @nn.compact
        def __call__(self, x, _=None):
            names = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if self.google else (None,) * 4
            y = nn.LayerNorm(name=names[0])(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=heads, name=names[1])(y, y)
            return x + MlpBlock(name=names[3])(nn.LayerNorm(name=names[2])(x)), None

    class AddPositionEmbs(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]))

    class Encoder(nn.Module):
        scan: bool

        @nn.compact
        def __call__(self, x):
            if self.scan:
                x, _ = nn.scan(Encoder1DBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=VIT["depth"])(
                    False, name="encoderblock")(x, None)
            else:
                x = AddPositionEmbs(name="posembed_input")(x)
                for i in range(VIT["depth"]):
                    x, _ = Encoder1DBlock(True, name=f"encoderblock_{i}")(x)
            return nn.LayerNorm(name="encoder_norm")(x)

    class ViT(nn.Module):
        scan: bool

        @nn.compact
        def __call__(self, img):
            p = VIT["patch_size"]
            x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="embedding")(img)
            x = x.reshape(x.shape[0], -1, d)
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
            x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
            if self.scan:  # big_vision keeps the position embedding at the top
                x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], d))
            x = Encoder(self.scan, name="Transformer")(x)
            return nn.Dense(VIT["num_classes"], name="head")(x[:, 0])

    img = np.random.default_rng(8).standard_normal((2, 32, 32, 3)).astype(np.float32)
    out = {}
    for scan in (False, True):
        m = ViT(scan)
        v = _randomized(m.init(jax.random.PRNGKey(0), jnp.asarray(img)), 8)
        ref = np.asarray(m.apply(v, jnp.asarray(img)), dtype=np.float64)
        flat = _flat(v["params"])
        out["big_vision" if scan else "vit_jax"] = ({k: flat[k] for k in sorted(flat)}, img.transpose(0, 3, 1, 2).copy(), ref)
    return out


@pytest.mark.parametrize("layout", ["vit_jax", "big_vision"])
def test_jax_vit_npz_into_timm(jax_vits, tmp_path: Path, layout: str) -> None:
    from .conftest import need_timm

    need_timm()
    from timm.models import vision_transformer as tv

    arrays, x, ref = jax_vits[layout]
    blocks = ("Transformer/encoderblock_1/MultiHeadDotProductAttention_1" if layout == "vit_jax"
              else "Transformer/encoderblock/MultiHeadDotProductAttention_0")
    pos = "Transformer/posembed_input/pos_embedding" if layout == "vit_jax" else "pos_embedding"
    assert {"cls", "embedding/kernel", pos, "Transformer/encoder_norm/scale", "head/kernel", f"{blocks}/query/kernel"} <= set(arrays)
    name = f"jax-vit-{layout.replace('_', '-')}"
    config = write_case(tmp_path, name=name, arrays=arrays, inputs=x, reference=[ref], target=VIT_TARGET, kwargs=VIT, preset="flax")
    # the oracle: timm's own reader of Google's npz files
    oracle = tv.VisionTransformer(**VIT).eval()
    tv._load_weights(oracle, str(tmp_path / "weights.npz"))
    with torch.no_grad():
        assert float(np.abs(oracle(torch.from_numpy(x)).double().numpy() - ref).max()) < 1e-4  # the oracle reads the file as flax wrote it
    rows = {r["target_key"]: r for r in plan_without_reference(config) if r["target_key"]}
    assert rows["norm.weight"]["source_key"] == "Transformer/encoder_norm/scale"  # not shifted onto blocks.0.norm1
    assert rows["blocks.1.norm2.weight"]["source_key"] == ("Transformer/encoderblock_1/LayerNorm_2/scale" if layout == "vit_jax"
                                                            else "Transformer/encoderblock/LayerNorm_1/scale")
    assert rows["cls_token"]["source_key"] == "cls" and rows["pos_embed"]["source_key"] == pos
    assert [s.split("/")[-2] for s in rows["blocks.1.attn.qkv.weight"]["sources"]] == ["query", "key", "value"]
    check_case(config, ambiguous=lambda k, s: ".attn." in k and k.endswith("weight"), fresh_model=_fresh(VIT_TARGET, VIT))
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "out" / "model.safetensors")
    want = oracle.state_dict()
    assert set(ours) == set(want)
    diff = max(float((ours[k].double() - want[k].double()).abs().max()) for k in want)
    assert diff == 0.0, diff  # the same tensors as timm's own reader, bit for bit
    assert RESULTS[name][0] < 1e-4


# ---------------------------------------------------------------------------------------------
# 5. layer order in large Keras .weights.h5 files


@pytest.fixture(scope="module")
def keras_mobilenet():
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = need("keras")
    keras.utils.set_random_seed(1)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10, classifier_activation=None)
    rng = np.random.default_rng(1)
    for w in model.weights:
        shape = tuple(w.shape)
        w.assign((rng.uniform(0.5, 2.0, shape) if "variance" in w.path else 0.3 * rng.standard_normal(shape)).astype("float32"))
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    return model, x.transpose(0, 3, 1, 2).copy(), np.asarray(model.predict(x, verbose=0), dtype=np.float64)


@pytest.mark.slow
def test_keras_mobilenetv2_weights_h5(keras_mobilenet, tmp_path: Path) -> None:
    from np2torch.tasks.readers import scan_source

    model, x, ref = keras_mobilenet
    config = _h5_case(tmp_path, "keras-mobilenetv2", model.save_weights, x, ref, f"{PORTS}:MobileNetV2", {}, "keras")
    in_file = list(dict.fromkeys(r.key.rsplit("/", 1)[0] for r in scan_source(tmp_path / "model.weights.h5")))
    built = [layer.name for layer in model.layers if layer.weights]
    assert sorted(in_file) == sorted(built)
    rows = {r["target_key"]: r for r in plan_without_reference(config) if r["target_key"]}
    bn = [r["source_key"].rsplit("/", 1)[0] for k, r in rows.items() if k.endswith("running_var")]
    assert bn == [n for n in built if n.lower().startswith("bn") or n.lower().endswith("bn")]  # every BatchNorm in place
    assert not unverified(plan_without_reference(config))  # no square kernel: names, kinds and shapes settle every row
    _check_settled(config, _fresh(f"{PORTS}:MobileNetV2", {}))
    assert RESULTS["keras-mobilenetv2"][0] < 1e-3


def _check_settled(config: Path, fresh_model) -> None:
    """check_case's steps 2-3 for a case whose every row the shapes settle: the pipeline reproduces the
    reference, and the export loads strictly into a fresh model that reproduces it too."""
    from safetensors.torch import load_file

    from np2torch.tasks.config import load_config
    from np2torch.tasks.stages import run_all

    cfg = load_config(config)
    metrics = run_all(cfg)["verify-forward-pass"].metrics
    assert metrics["passed"] and metrics["reference"], metrics["problems"]
    model = fresh_model()
    model.load_state_dict(load_file(Path(cfg.export.dir) / "model.safetensors"), strict=True)
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(np.load(cfg.verify.input))).double().numpy()
    with np.load(cfg.verify.reference_output) as z:
        ref = z["arr_0"]
    np.testing.assert_allclose(out, ref, rtol=cfg.verify.rtol, atol=cfg.verify.atol)
    RESULTS[cfg.name] = (float(metrics["max_abs_error"]), float(np.abs(out - ref).max()), 0)


def test_keras_mha_into_a_model_of_other_width_says_why(keras_mha, tmp_path: Path) -> None:
    """A join that fits no module is never forced: the rows stay missing, and say which join did not fit."""
    model, x, ref = keras_mha
    config = _h5_case(tmp_path, "keras-mha-wrong", model.save_weights, x, ref, f"{PORTS}:SelfAttention", {"d": 24, "heads": 2}, "keras")
    rows = {r["target_key"]: r for r in plan_without_reference(config) if r["target_key"]}
    assert rows["qkv.weight"]["status"] == "missing" and "attention layer 'multi_head_attention'" in rows["qkv.weight"]["note"]
