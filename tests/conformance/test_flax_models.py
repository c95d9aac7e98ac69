"""Flax (linen) models: parameters from ``model.init`` (+ ``batch_stats``), reference from ``model.apply``.

The variables are saved as Flax users save them for NumPy: the flattened tree
(``flax.traverse_util.flatten_dict(variables, sep='/')``) in a ``.npz``. np2torch loads them into
a PyTorch port (tests/conformance/torch_ports.py) or, for the BERT-like tree (the module names of
transformers' FlaxBertModel), into transformers' own BertModel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from .conformance_support import check_case, write_case

HERE = Path(__file__).resolve().parent
PORTS = HERE / "torch_ports.py"


def _flat(variables) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}


def _saved(variables, container: str) -> dict[str, np.ndarray] | bytes:
    """The variables as the user saved them: the flattened tree in a .npz, or Flax's own msgpack."""
    if container == "npz":
        return _flat(variables)
    from flax import serialization

    return serialization.to_bytes(variables)


CONTAINERS = pytest.mark.parametrize("container", ["npz", "msgpack"])


def _fresh(target: str, kwargs: dict):
    def make() -> torch.nn.Module:
        from np2torch.tasks.model import build_model

        torch.manual_seed(99)
        return build_model(target, kwargs, device="cpu")
    return make


def _square(key: str, shape: tuple[int, ...]) -> bool:
    return key.endswith("weight") and len(shape) == 2 and shape[0] == shape[1] and "embeddings" not in key


@CONTAINERS
def test_flax_mlp(flax_linen, tmp_path: Path, container: str) -> None:
    import jax
    import jax.numpy as jnp

    nn = flax_linen

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(32)(x))
            x = nn.relu(nn.Dense(32)(x))
            return nn.Dense(10)(x)

    x = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
    model = MLP()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(x))  # one XLA compile, not one per parameter
    ref = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)), dtype=np.float64)
    config = write_case(tmp_path, name=f"flax-mlp-{container}", arrays=_saved(variables, container), inputs=x, reference=[ref],
                        target=f"{PORTS}:MLP", kwargs={}, preset="flax")
    check_case(config, ambiguous=_square, fresh_model=_fresh(f"{PORTS}:MLP", {}))


def test_flax_cnn_with_batchnorm(flax_linen, tmp_path: Path) -> None:
    import jax
    import jax.numpy as jnp

    nn = flax_linen

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(8, (3, 3), padding="VALID")(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
            x = nn.relu(nn.Conv(16, (3, 3), padding="VALID")(x))
            return nn.Dense(10)(x.reshape((x.shape[0], -1)))

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 12, 12, 3)).astype(np.float32)
    model = CNN()
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.asarray(x))
    # running statistics as training leaves them: a few train-mode steps on shifted, scaled data
    step = jax.jit(lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"])[1])
    for i in range(5):
        batch = jnp.asarray(2.0 * rng.standard_normal((8, 12, 12, 3)).astype(np.float32) + 0.5 * i)
        variables = {**variables, **step(variables, batch)}
    arrays = _flat(variables)
    assert {"params/BatchNorm_0/scale", "batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"} <= set(arrays)
    ref = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)), dtype=np.float64)
    config = write_case(tmp_path, name="flax-cnn-bn", arrays=arrays, inputs=x, reference=[ref],
                        target=f"{PORTS}:CNN", kwargs={}, preset="flax")
    # the Dense after the flatten reads (H, W, C) features: only the flatten probe + a reference settle it
    check_case(config, ambiguous=lambda k, s: k == "fc.weight", fresh_model=_fresh(f"{PORTS}:CNN", {}))


BERT = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
            type_vocab_size=2)


def _flax_bert(nn, cfg: dict):
    """A BERT encoder in linen with FlaxBertModel's module names (embeddings/…, encoder/layer/0/attention/self/query …)."""
    import jax
    import jax.numpy as jnp

    H, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], 1e-12

    class Embeddings(nn.Module):
        @nn.compact
        def __call__(self, ids):
            pos = jnp.arange(ids.shape[1])[None, :]
            x = (nn.Embed(cfg["vocab_size"], H, name="word_embeddings")(ids)
                 + nn.Embed(cfg["max_position_embeddings"], H, name="position_embeddings")(pos)
                 + nn.Embed(cfg["type_vocab_size"], H, name="token_type_embeddings")(jnp.zeros_like(ids)))
            return nn.LayerNorm(epsilon=eps, name="LayerNorm")(x)

    class SelfAttention(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = H // heads
            split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d)  # noqa: E731
            q, k, v = (split(nn.Dense(H, name=n)(x)) for n in ("query", "key", "value"))
            w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d), axis=-1)
            return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(x.shape)

    class DenseNorm(nn.Module):  # BertSelfOutput / BertOutput: dense, then LayerNorm of the residual sum
        @nn.compact
        def __call__(self, h, residual):
            return nn.LayerNorm(epsilon=eps, name="LayerNorm")(nn.Dense(H, name="dense")(h) + residual)

    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            return DenseNorm(name="output")(SelfAttention(name="self")(x), x)

    class Intermediate(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.gelu(nn.Dense(cfg["intermediate_size"], name="dense")(x), approximate=False)

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = Attention(name="attention")(x)
            return DenseNorm(name="output")(Intermediate(name="intermediate")(a), a)

    class Layers(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(cfg["num_hidden_layers"]):
                x = Layer(name=str(i))(x)
            return x

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Layers(name="layer")(x)

    class Pooler(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(H, name="dense")(x[:, 0]))

    class Bert(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = Encoder(name="encoder")(Embeddings(name="embeddings")(ids))
            return h, Pooler(name="pooler")(h)

    return Bert()


@CONTAINERS
def test_flax_bert_like_tree_into_transformers_bert(flax_linen, transformers, tmp_path: Path, container: str) -> None:
    import jax
    import jax.numpy as jnp

    ids = np.random.default_rng(2).integers(1, BERT["vocab_size"], size=(2, 9)).astype(np.int64)
    model = _flax_bert(flax_linen, BERT)
    variables = jax.jit(model.init)(jax.random.PRNGKey(2), jnp.asarray(ids))
    # LayerNorm scales start at 1 and biases at 0: perturb every leaf so each tensor is distinctive
    rng = np.random.default_rng(3)
    variables = jax.tree_util.tree_map(lambda v: jnp.asarray(np.asarray(v) + 0.05 * rng.standard_normal(v.shape).astype(np.float32)),
                                       variables)
    arrays = _flat(variables)
    assert "params/encoder/layer/0/attention/self/query/kernel" in arrays
    ref = [np.asarray(o, dtype=np.float64) for o in jax.jit(model.apply)(variables, jnp.asarray(ids))]
    config = write_case(tmp_path, name=f"flax-bert-tree-{container}",
                        arrays=arrays if container == "npz" else _saved(variables, container), inputs=ids, reference=ref,
                        target="transformers:BertModel", kwargs=BERT, preset="flax", atol=1e-4)
    check_case(config, ambiguous=_square, fresh_model=_fresh("transformers:BertModel", BERT))
