"""Alignment by the names' structure (tasks/align.py) and the join table (tasks/joins.py), without frameworks."""

from __future__ import annotations

import numpy as np

from np2torch.tasks import align
from np2torch.tasks import joins as J
from np2torch.tasks import transforms as T


def test_pair_in_order_skips_a_misplaced_layer_instead_of_shifting_the_rest() -> None:
    src = [8, 16, 99, 24, 32]  # one layer out of place (fits nothing here)
    tgt = [8, 16, 24, 32, 99]
    pairs = align.pair_in_order(src, tgt, lambda a, b: a == b)
    assert [(src[i], tgt[j]) for i, j in pairs] == [(8, 8), (16, 16), (24, 24), (32, 32)]


def test_order_by_names_puts_a_misallocated_keras_layer_back() -> None:
    built = ["Conv1", "bn_Conv1", "expanded_conv_depthwise", "expanded_conv_depthwise_BN", "block_1_expand", "block_1_expand_BN",
             "block_2_expand", "block_2_expand_BN", "block_10_expand", "block_10_expand_BN", "Conv_1", "Conv_1_bn", "predictions"]
    in_file = [n for n in built if n != "block_10_expand_BN"]
    in_file.insert(3, "block_10_expand_BN")  # where h5 happened to allocate it
    in_file[0], in_file[1] = in_file[1], in_file[0]  # bn_Conv1 before its conv
    assert [in_file[i] for i in align.order_by_names(in_file)] == built


def test_order_by_names_reads_keras_default_numbers() -> None:
    in_file = ["dense_2", "dense", "conv2d_10", "dense_1", "conv2d_9"]
    assert [in_file[i] for i in align.order_by_names(in_file)] == ["dense", "dense_1", "conv2d_9", "dense_2", "conv2d_10"]


def _src(key: str, shape: tuple[int, ...]) -> J.Src:
    return J.Src(key, shape, shape)


def test_gru_cell_join_pads_the_only_hidden_bias() -> None:
    u, n_in = 4, 3
    gates = {f"{side}{g}": {"kernel": _src(f"{side}{g}/kernel", (n_in if side == "i" else u, u))} for side in "ih" for g in "rzn"}
    for g in ("ir", "iz", "in", "hn"):
        gates[g]["bias"] = _src(f"{g}/bias", (u,))
    kind, parts = J.source_join(gates)
    assert kind == "gru_cell"
    keys = {"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih", "bias_hh": "b_hh"}
    rows = {p.target: p
            for p in J.join_claims(kind, parts, keys, {"w_ih": (3 * u, n_in), "w_hh": (3 * u, u), "b_ih": (3 * u,), "b_hh": (3 * u,)})}
    assert rows["w_ih"].sources == ["ir/kernel", "iz/kernel", "in/kernel"] and rows["w_ih"].concat == 0
    assert rows["b_hh"].sources == ["hn/bias"] and rows["b_hh"].spec == [["pad", [2 * u, 0]]]
    assert rows["w_hh"].candidates == [[["transpose", None]], []]  # square: only a reference tells (in, out) from (out, in)
    b = np.arange(u, dtype=np.float32) + 1
    assert T.apply(b, rows["b_hh"].spec).tolist() == [0.0] * 2 * u + b.tolist()


def test_attention_join_pairs_projections_by_role_not_order() -> None:
    d, h = 8, 2
    children = {name: {"kernel": _src(f"{name}/kernel", (h, d // h, d) if name == "attention_output" else (d, h, d // h)),
                       "bias": _src(f"{name}/bias", (d,) if name == "attention_output" else (h, d // h))}
                for name in ("value", "attention_output", "query", "key")}  # any order
    kind, parts = J.source_join(children)
    assert kind == "attention"
    target = J.attention_parts("attn", "Attention", {"qkv": {"weight": "attn.qkv.weight", "bias": "attn.qkv.bias"},
                                                     "proj": {"weight": "attn.proj.weight", "bias": "attn.proj.bias"}})
    shapes = {"attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,)}
    rows = {p.target: p for p in J.join_claims(kind, parts, target, shapes)}
    assert rows["attn.qkv.weight"].sources == ["query/kernel", "key/kernel", "value/kernel"]
    assert rows["attn.qkv.weight"].spec == [["reshape", [d, d]], ["transpose", None]]
    assert rows["attn.qkv.bias"].spec == [["reshape", [d]]] and rows["attn.proj.weight"].sources == ["attention_output/kernel"]


def test_unique_fits_pairs_what_order_left_only_when_unambiguous() -> None:
    assert align.unique_fits([112, 8], [8, 112], lambda a, b: a == b) == [(112, 112), (8, 8)]
    assert align.unique_fits([8, 8], [8, 8], lambda a, b: a == b) == []  # two of a kind: only a reference can tell
