"""Files as users have them (issue 18, section 6), written by the real frameworks at test time:
a Keras 3 native ``.keras`` file and a ``.weights.h5``, both with the optimizer's state in them
(compiled and fitted one step), and transformers' sharded safetensors (``save_pretrained`` with
a small ``max_shard_size``), the source path being the folder or its index file. Each converts
with zero rules; the reference is the source framework's own output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from .conformance_support import RESULTS
from .keras_support import TOL, TORCH_MODELS, convert, keras, max_abs_error_of_export, predict, randomize

layers = keras.layers


def _fitted_cnn(seed: int = 0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3)(inp)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Conv2D(8, 3)(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Flatten()(layers.MaxPooling2D(2)(x))
    model = keras.Model(inp, layers.Dense(5)(x))
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(seed)
    model.fit(rng.standard_normal((4, 8, 8, 3)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32), epochs=1, verbose=0)
    randomize(model, seed)
    x_nhwc = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    return model, x_nhwc, predict(model, x_nhwc)


@pytest.mark.parametrize("how", ["keras", "weights.h5"])
def test_keras_file_with_optimizer_state_converts_with_zero_rules(tmp_path, how) -> None:
    from np2torch.tasks.readers import detect_format, scan_source
    from np2torch.tasks.readers.keras_zip import keras_layer_order

    model, x_nhwc, ref = _fitted_cnn()
    d = tmp_path / f"keras-{how.replace('.', '-')}-optimizer"
    d.mkdir()
    src = d / ("model.keras" if how == "keras" else "model.weights.h5")
    model.save(src) if how == "keras" else model.save_weights(src)
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    np.save(d / "input.npy", x)
    np.save(d / "ref.npy", ref)
    raw = {"name": d.name, "source": {"path": src.name, "format": "auto"}, "model": {"target": f"{TORCH_MODELS}:CNN"},
           "mapping": {"strategy": "auto", "preset": "keras"}, "verify": {"input": "input.npy", "reference_output": "ref.npy", **TOL},
           "export": {"dir": "out"}}
    (d / "config.yaml").write_text(yaml.safe_dump(raw))

    assert detect_format(src, "auto") == ("keras" if how == "keras" else "h5")
    notes: list[str] = []
    recs = scan_source(src, notes=notes)
    assert [r.key for r in recs] == [v.path for v in model.weights]  # model order; no optimizer variable among them
    n_opt = len(model.optimizer.variables)
    assert notes == [f"optimizer state left out: {n_opt} arrays under optimizer/vars/ (training state, not model weights)"]
    if how == "keras":
        assert all(r.offset > 0 for r in recs), "the stored model.weights.h5 is memory-mapped inside the .keras file"
        assert keras_layer_order(src) == [layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]

    out = convert(d / "config.yaml")
    assert out["recs"]["verify-forward-pass"].metrics["passed"]
    assert not [k for k in out["rows"] if "optimizer" in k or "adam" in k]
    assert max_abs_error_of_export(d / "config.yaml", "CNN", x, ref) < 1e-4


# ---------------------------------------------------------------------------------------------
# transformers save_pretrained(max_shard_size=...) → sharded safetensors

BERT = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
            type_vocab_size=2)
GPT2 = dict(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=40, use_cache=False, bos_token_id=0, eos_token_id=0)


@pytest.mark.parametrize("cls,kwargs,via", [("BertModel", BERT, "folder"), ("GPT2Model", GPT2, "index")])
def test_sharded_safetensors_from_save_pretrained(transformers, tmp_path, cls, kwargs, via) -> None:
    from safetensors.torch import load_file

    from np2torch.tasks.config import load_config
    from np2torch.tasks.readers import detect_format, scan_source, source_files
    from np2torch.tasks.stages import run_all

    model_cls = getattr(transformers, cls)
    torch.manual_seed(1234)
    src = model_cls(model_cls.config_class(**kwargs)).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / "ckpt"
    src.save_pretrained(ckpt, max_shard_size="20KB", safe_serialization=True)
    index = ckpt / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 3, shards
    path = ckpt if via == "folder" else index
    assert detect_format(path, "auto") == "safetensors-sharded"
    assert source_files(path)[1] == [index, *(ckpt / s for s in shards)]
    assert {r.key for r in scan_source(path)} == set(json.loads(index.read_text())["weight_map"])

    ids = np.random.default_rng(0).integers(1, 61, size=(2, 9)).astype(np.int64)
    with torch.no_grad():
        ref = [t.double().numpy() for t in src(torch.from_numpy(ids)).to_tuple() if isinstance(t, torch.Tensor)]
    case = tmp_path / "case"
    case.mkdir()
    np.save(case / "input.npy", ids)
    np.savez(case / "reference.npz", *ref)
    name = f"{cls.lower()}-sharded-{via}"
    cfg = {"name": name, "source": {"path": str(path), "format": "auto"}, "model": {"target": f"transformers:{cls}", "kwargs": kwargs},
           "mapping": {"strategy": "auto", "preset": "none"}, "convert": {"dtype": "float32", "device": "cpu"},
           "verify": {"input": "input.npy", "reference_output": "reference.npz", "rtol": 1e-4, "atol": 1e-5}, "export": {"dir": "out"}}
    (case / "c.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    c = load_config(case / "c.yaml")
    recs = run_all(c)
    metrics = recs["verify-forward-pass"].metrics
    assert metrics["passed"] and metrics["reference"], metrics["problems"]
    torch.manual_seed(99)
    fresh = model_cls(model_cls.config_class(**kwargs)).eval()
    fresh.load_state_dict(load_file(Path(c.export.dir) / "model.safetensors"), strict=True)
    with torch.no_grad():
        outs = [t.double().numpy() for t in fresh(torch.from_numpy(ids)).to_tuple() if isinstance(t, torch.Tensor)]
    err = max(float(np.abs(o - r).max()) for o, r in zip(outs, ref))
    assert err < 1e-4
    RESULTS[name] = (float(metrics["max_abs_error"]), err, 0)
