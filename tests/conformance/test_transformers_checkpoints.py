"""Hugging Face transformers models fed from the checkpoints their weights originally came in.

No TensorFlow is needed: a tiny transformers model is built with a fixed seed and its weights
are written out exactly as the original checkpoints store them (the inverse of transformers'
own converters ``load_tf_weights_in_bert`` and ``load_tf_weights_in_gpt2``: TF1 BERT names with
``(in, out)`` kernels; OpenAI GPT-2 names ``model/h0/attn/c_attn/w`` with ``(1, in, out)``
1×1-conv weights), or as the flat parameter vector of ``parameters_to_vector``. The reference
output is that source model's own; np2torch loads the arrays into a fresh model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from .conformance_support import check_case, write_case

SEED_SOURCE = 1234  # the source model's weights
SEED_FRESH = 99  # the model the user loads the export into: different initial values

BERT = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
            type_vocab_size=2)
GPT2 = dict(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=40, use_cache=False, bos_token_id=0, eos_token_id=0)
LLAMA = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
             max_position_embeddings=40, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _source(transformers, cls: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(SEED_SOURCE)
    model_cls = getattr(transformers, cls)
    model = model_cls(model_cls.config_class(**kwargs)).eval()
    with torch.no_grad():  # initial LayerNorms are 1/0 and biases 0: make every tensor distinctive
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _fresh(transformers, cls: str, kwargs: dict):
    def make() -> torch.nn.Module:
        torch.manual_seed(SEED_FRESH)
        model_cls = getattr(transformers, cls)
        return model_cls(model_cls.config_class(**kwargs))
    return make


def _reference(model: torch.nn.Module, ids: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(ids))
    return [t.double().numpy() for t in out.to_tuple() if isinstance(t, torch.Tensor)]


def _ids(seed: int, n: int = 2, length: int = 9, vocab: int = 61) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, size=(n, length)).astype(np.int64)


def _square_linear(key: str, shape: tuple[int, ...]) -> bool:
    return (key.endswith(".weight") and len(shape) == 2 and shape[0] == shape[1] and "embeddings" not in key
            and not key.endswith(("wte.weight", "wpe.weight")))


# ---------------------------------------------------------------------------------------------
# TF1 BERT (google-research/bert checkpoints): inverse of transformers' load_tf_weights_in_bert


def bert_tf1_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """BertForPreTraining's state dict under the TF1 checkpoint's variable names and layouts."""
    out: dict[str, np.ndarray] = {}
    special = {"cls.predictions.bias": "cls/predictions/output_bias", "cls.seq_relationship.weight": "cls/seq_relationship/output_weights",
               "cls.seq_relationship.bias": "cls/seq_relationship/output_bias"}
    for key, t in model.state_dict().items():
        a = t.detach().numpy().copy()
        if key == "cls.predictions.decoder.weight" or key == "cls.predictions.decoder.bias":
            continue  # tied to the word embeddings / output bias: TF1 stores them once
        if key in special:
            out[special[key]] = a  # output_weights is (num_labels, hidden): not transposed by the converter
            continue
        scope, _, leaf = key.rpartition(".")
        tf_scope = re.sub(r"\.layer\.(\d+)", r".layer_\1", scope).replace(".", "/")
        if scope.endswith("_embeddings"):
            out[tf_scope] = a  # the table is the variable itself: bert/embeddings/word_embeddings
        elif scope.endswith("LayerNorm"):
            out[f"{tf_scope}/{'gamma' if leaf == 'weight' else 'beta'}"] = a
        elif leaf == "weight":
            out[f"{tf_scope}/kernel"] = a.T.copy()  # tf.layers.dense kernel (in, out)
        else:
            out[f"{tf_scope}/{leaf}"] = a
    return out


def test_bert_from_tf1_checkpoint_names(transformers, tmp_path: Path) -> None:
    src = _source(transformers, "BertForPreTraining", BERT)
    arrays = bert_tf1_arrays(src)
    assert "bert/encoder/layer_0/attention/self/query/kernel" in arrays and "bert/embeddings/LayerNorm/gamma" in arrays
    ids = _ids(0)
    config = write_case(tmp_path, name="bert-tf1", arrays=arrays, inputs=ids, reference=_reference(src, ids),
                        target="transformers:BertForPreTraining", kwargs=BERT, preset="tf")
    check_case(config, ambiguous=_square_linear, fresh_model=_fresh(transformers, "BertForPreTraining", BERT))


# ---------------------------------------------------------------------------------------------
# OpenAI GPT-2 (openai/gpt-2 checkpoints): inverse of transformers' load_tf_weights_in_gpt2


def gpt2_openai_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's weights under OpenAI's names (model/h0/attn/c_attn/w), 1×1-conv weights (1, in, out)."""
    out: dict[str, np.ndarray] = {}
    for key, t in model.state_dict().items():
        if not key.startswith("transformer."):
            continue  # lm_head is tied to wte: OpenAI stores the table once
        a = t.detach().numpy().copy()
        parts = key.removeprefix("transformer.").split(".")
        if parts[0] == "h":
            parts = [f"h{parts[1]}", *parts[2:]]  # h.0 → h0
        leaf = parts[-1]
        if parts[0] in ("wte", "wpe"):
            out[f"model/{parts[0]}"] = a
            continue
        if leaf == "weight" and "ln_" in parts[-2]:
            parts[-1] = "g"
        elif leaf == "weight":
            parts[-1] = "w"
            a = a[None]  # conv1d(…, 'w', [1, nx, nf]); transformers' Conv1D keeps (nx, nf)
        else:
            parts[-1] = "b"
        out["model/" + "/".join(parts)] = a
    return out


def test_gpt2_from_openai_checkpoint_names(transformers, tmp_path: Path) -> None:
    src = _source(transformers, "GPT2LMHeadModel", GPT2)
    arrays = gpt2_openai_arrays(src)
    assert arrays["model/h0/attn/c_attn/w"].shape == (1, 32, 96) and "model/h1/ln_2/g" in arrays
    ids = _ids(1)
    config = write_case(tmp_path, name="gpt2-openai", arrays=arrays, inputs=ids, reference=_reference(src, ids),
                        target="transformers:GPT2LMHeadModel", kwargs=GPT2, preset="tf")
    check_case(config, ambiguous=_square_linear, fresh_model=_fresh(transformers, "GPT2LMHeadModel", GPT2))


# ---------------------------------------------------------------------------------------------
# Llama as one flat parameter vector (torch.nn.utils.parameters_to_vector)


def test_llama_from_a_flat_parameter_vector(transformers, tmp_path: Path) -> None:
    src = _source(transformers, "LlamaForCausalLM", LLAMA)
    flat = torch.nn.utils.parameters_to_vector(src.parameters()).detach().numpy()
    ids = _ids(2)
    config = write_case(tmp_path, name="llama-flat", arrays=flat, inputs=ids, reference=_reference(src, ids),
                        target="transformers:LlamaForCausalLM", kwargs=LLAMA, preset="none", strategy="order", fmt="flat")
    check_case(config, ambiguous=lambda k, s: len(s) == 2 and "embed_tokens" not in k,
               fresh_model=_fresh(transformers, "LlamaForCausalLM", LLAMA))


# ---------------------------------------------------------------------------------------------
# constructor-made buffers survive the meta build (issue 11, item 1)


@pytest.mark.parametrize("cls,kwargs", [("BertModel", BERT), ("LlamaModel", LLAMA)])
def test_constructor_buffers_are_real_after_a_meta_build(transformers, cls: str, kwargs: dict) -> None:
    from np2torch.tasks.model import build_model

    model = build_model(f"transformers:{cls}", kwargs)
    assert all(p.is_meta for p in model.parameters())
    torch.manual_seed(0)
    model_cls = getattr(transformers, cls)
    real = model_cls(model_cls.config_class(**kwargs))
    bufs = dict(model.named_buffers())
    assert bufs, "these models have non-persistent buffers"
    for k, b in real.named_buffers():
        assert not bufs[k].is_meta, k
        assert torch.equal(bufs[k], b), k
