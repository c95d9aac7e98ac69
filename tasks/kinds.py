"""Layer kinds: one table, kind → everything np2torch knows about it.

A row of :data:`KINDS` says, for one kind of layer (Dense, Conv, LSTM …):

- which torch module classes it fills (``torch_classes``);
- how a source layer of that kind is recognised from its leaf names and shapes (``recognise``:
  Keras/TF ``kernel``, ``bias``, ``gamma``, ``beta``, ``moving_mean``, ``depthwise_kernel``,
  ``recurrent_kernel``; Flax ``scale``, ``embedding``, ``mean``, ``var``; torch's own names);
- which torch leaf each source leaf fills (``leaf_roles``);
- the layouts its channels-last source leaves arrive in, each with the reason (``source_layouts``);
- the layouts a torch weight of the kind may arrive in when only shapes can tell (``target_layouts``),
  whether a grouped weight may come from a depthwise kernel (``grouped``);
- where its channel count is, for a flatten that follows it, and where a flatten feeds it (``channels``, ``features``);
- a source layer that is several torch modules (``split``: a Keras SeparableConv is two convs);
- for recurrent layers, the gate order, the bias layout and the torch leaves (``recurrent``).

:mod:`np2torch.tasks.presets`, :mod:`np2torch.tasks.layouts` and the mapping strategies read this
table at call time and never branch on a kind's name: adding a kind is one row.
Domain module: it imports nothing from np2torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["KINDS", "UNKNOWN_TARGET_LAYOUTS", "Channels", "Kind", "Misfit", "Recogniser", "Recurrent", "TargetLayout", "conv_layouts",
           "leaf_layout", "leaf_role", "matrix_layouts", "module_kind", "of_module", "recurrent", "recurrent_gate_counts", "source_kind",
           "split_layer"]

Shape = tuple[int, ...]
Leaves = dict[str, Shape]  # a source layer: its leaf names (as the source spells them) → shapes


@dataclass(frozen=True)
class Recogniser:
    rank: int  # every kind's recognisers are tried by rank, lowest first: the first that matches names the layer's kind
    test: Callable[[Leaves, str], bool]  # (leaves, layer scope) → is this kind
    why: str


class TargetLayout(NamedTuple):
    source_shape: Callable[[Shape], Shape]  # the source's shape, from the target's
    spec: list  # transform bringing it to torch's layout
    why: str


@dataclass(frozen=True)
class Channels:
    leaf: str  # torch leaf of the module
    axis: int  # its axis holding the count
    why: str


@dataclass(frozen=True)
class Misfit:
    """Why a source layer of a kind cannot fill its torch module at all (a problem, not a silent misload)."""

    leaf: str
    why: str
    expected: str
    fix: str


@dataclass(frozen=True)
class Recurrent:
    gate_order: tuple[str, str]  # (source order, torch order), gates named as torch names them
    bias_rows: int  # 1: one bias (G*u,); 2: (2, G*u) input and recurrent biases
    # source leaf → [(torch leaf prefix, transform, why)]; the slot suffix (_l0, _l1_reverse) is appended
    leaves: dict[str, list[tuple[str, list, str]]]
    zeros: tuple[str, ...]  # torch leaves the source has no counterpart for
    why: str
    misfit: Callable[[Leaves], Misfit | None] | None = None

    @property
    def gates(self) -> int:
        return len(self.gate_order[0])

    def source_shapes(self, n_in: int, units: int, bias: bool) -> dict[str, list[int]]:
        """The Keras layer's leaves and their shapes, in the order Keras builds them (a flat vector holds them so)."""
        gu = self.gates * units
        shapes = {"kernel": [n_in, gu], "recurrent_kernel": [units, gu]}
        return shapes | ({"bias": [self.bias_rows, gu] if self.bias_rows > 1 else [gu]} if bias else {})


@dataclass(frozen=True)
class Kind:
    name: str
    why: str
    torch_classes: tuple[str, ...] = ()
    recognise: tuple[Recogniser, ...] = ()
    leaf_roles: dict[str, str] = field(default_factory=dict)  # source leaf → torch leaf (recurrent kinds: see ``recurrent``)
    # (source leaf, ndim) → (transform to torch's layout, why): a channels-last framework's layout of the leaf
    source_layouts: dict[tuple[str, int], tuple[list, str]] = field(default_factory=dict)
    leaf_aliases: dict[str, str] = field(default_factory=dict)  # another spelling of a leaf with a layout → that leaf
    # layout families a torch weight may arrive in, by its ndim: the first that lists any is the kind's
    target_layouts: tuple[Callable[[int], list[TargetLayout]], ...] = ()
    grouped: bool = False  # a weight (C*M, 1, *S) may come from a depthwise kernel (*S, C, M)
    channels: Channels | None = None  # the output channel count a flatten after the module sees
    features: Channels | None = None  # the input feature count, when a flatten feeds the module
    recurrent: Recurrent | None = None
    # a source layer that fills several torch modules of this kind: (scope, leaves) per module, else None
    split: Callable[[str, dict[str, Any]], list[tuple[str, dict[str, Any]]] | None] | None = None

    def layout(self, leaf: str, ndim: int) -> list | None:
        hit = self.source_layouts.get((self.leaf_aliases.get(leaf, leaf), ndim))
        return [list(s) for s in hit[0]] if hit else None


# ---------------------------------------------------------------------------------------------
# layouts a torch weight may arrive in (target side), with the reason


_MATRIX = [
    TargetLayout(lambda t: t, [], "torch layout (out, in)"),
    TargetLayout(lambda t: (t[1], t[0]), [["transpose", None]], "(in, out): Keras/TF/Flax kernels, x @ W"),
]


def matrix_layouts(ndim: int) -> list[TargetLayout]:
    return _MATRIX if ndim == 2 else []


def conv_layouts(ndim: int) -> list[TargetLayout]:
    if ndim < 3:
        return []
    s = ndim - 2  # spatial axes
    return [
        TargetLayout(lambda t: t, [], "torch layout (O, I, *S)"),
        TargetLayout(lambda t: (*t[2:], t[1], t[0]), [["permute", [s + 1, s, *range(s)]]], "channels-last (*S, I, O): Keras/TF/Flax"),
        TargetLayout(lambda t: (*t[2:], t[0], t[1]), [["permute", [s, s + 1, *range(s)]]], "channels-last with I/O swapped (*S, O, I)"),
    ]


# a module class no row names (a custom layer): any layout a framework writes is possible
UNKNOWN_TARGET_LAYOUTS = (matrix_layouts, conv_layouts)


# ---------------------------------------------------------------------------------------------
# source side: recognisers and layouts


def _kernel_ndim(leaves: Leaves) -> int:
    k = leaves.get("kernel", leaves.get("weights"))
    return len(k) if k is not None else 0


def _rk_gates(leaves: Leaves) -> int:
    k, rk = leaves.get("kernel"), leaves.get("recurrent_kernel")
    if not k or not rk or len(rk) != 2 or rk[0] == 0 or k[-1] % rk[0]:
        return 0
    return k[-1] // rk[0]


def _permute_last_two_first(ndim: int) -> list:
    return [["permute", [ndim - 1, ndim - 2, *range(ndim - 2)]]]


_CONV_KERNELS = {
    ("kernel", 3): ([["permute", [2, 1, 0]]], "Conv1D kernel (W, I, O) → Conv1d weight (O, I, W)"),
    ("kernel", 4): ([["permute", [3, 2, 0, 1]]], ("Conv2D kernel (H, W, I, O) → Conv2d weight (O, I, H, W); "
                                                  "Conv2DTranspose (H, W, O, I) → ConvTranspose2d (I, O, H, W) is the same permutation")),
    ("kernel", 5): ([["permute", [4, 3, 0, 1, 2]]], "Conv3D kernel (D, H, W, I, O) → Conv3d weight (O, I, D, H, W)"),
    ("depthwise_kernel", 4): ([["depthwise_to_grouped", None]], "DepthwiseConv2D (H, W, C, mult) → Conv2d(groups=C) (C*mult, 1, H, W)"),
    ("depthwise_kernel", 3): ([["depthwise_to_grouped", None]], "DepthwiseConv1D (W, C, mult) → Conv1d(groups=C) (C*mult, 1, W)"),
    ("pointwise_kernel", 4): ([["permute", [3, 2, 0, 1]]], ("SeparableConv2D pointwise kernel (1, 1, C*mult, O) → the 1×1 Conv2d "
                                                            "weight (O, C*mult, 1, 1) after the depthwise one")),
    ("pointwise_kernel", 3): ([["permute", [2, 1, 0]]], "SeparableConv1D pointwise kernel (1, C*mult, O) → Conv1d (O, C*mult, 1)"),
}

def _separable(scope: str, leaves: dict[str, Any]) -> list[tuple[str, dict[str, Any]]] | None:
    """A Keras SeparableConv layer is two torch convs: the depthwise one (no bias), then the 1×1
    pointwise one, which takes the layer's bias."""
    if not {"depthwise_kernel", "pointwise_kernel"} <= leaves.keys():
        return None
    rest = {k: v for k, v in leaves.items() if k not in ("depthwise_kernel", "pointwise_kernel")}
    return [(f"{scope}.depthwise" if scope else "depthwise", {"depthwise_kernel": leaves["depthwise_kernel"]}),
            (f"{scope}.pointwise" if scope else "pointwise", {"pointwise_kernel": leaves["pointwise_kernel"], **rest})]


_SLIM = {"weights": "kernel"}  # tf.contrib.layers / slim name a kernel 'weights'
_TORCH_LEAVES = {"weight": "weight", "bias": "bias"}
_NORM_LEAVES = {"gamma": "weight", "scale": "weight", "beta": "bias", "bias": "bias", "weight": "weight"}


# ---------------------------------------------------------------------------------------------
# recurrent layers


def _reorder(source: str, torch: str) -> list:
    """Transform moving gate blocks from the source's order to torch's (both spelled in torch's gate letters)."""
    perm = [source.index(g) for g in torch]
    return [] if perm == sorted(perm) else [["reorder_chunks", perm]]


def _gru_reset_before(leaves: Leaves) -> Misfit | None:
    if len(leaves.get("bias", (0, 0))) != 1:
        return None
    # order/shape matching would load it "successfully" and wrongly: a problem instead
    return Misfit("bias", "a GRU bias of shape (3u,) is Keras' reset_after=False GRU (reset gate applied before the "
                  "recurrent matmul), which torch's nn.GRU cannot express", "bias of shape (2, 3u) (reset_after=True)",
                  "export the Keras model with GRU(reset_after=True) weights, or port the layer as a custom torch module")


def _recurrent_kind(name: str, torch_class: str, rank: int, order: tuple[str, str], bias_rows: int, why: str, recognise_why: str,
                    notes: tuple[str, ...], misfit: Callable[[Leaves], Misfit | None] | None = None) -> Kind:
    """A Keras recurrent layer (kernel (in, G*u), recurrent_kernel (u, G*u), bias) → torch nn.LSTM/GRU/RNN.

    ``notes`` are the reasons for kernel, recurrent kernel, and the bias (two with ``bias_rows`` 2)."""
    gates, r = len(order[0]), _reorder(*order)
    t = [["transpose", None], *r]
    if bias_rows == 1:  # one bias; torch adds bias_ih + bias_hh, so bias_hh is zeros
        bias, zeros = [("bias_ih", r, notes[2])], ("bias_hh",)
    else:  # (2, G*u): row 0 input bias, row 1 recurrent bias
        bias, zeros = [("bias_ih", [["index", 0], *r], notes[2]), ("bias_hh", [["index", 1], *r], notes[3])], ()
    return Kind(name, why, (torch_class,),
                (Recogniser(rank, lambda leaves, scope: _rk_gates(leaves) == gates, recognise_why),),
                source_layouts={("recurrent_kernel", 2): ([["transpose", None]],
                                                          "LSTM/GRU recurrent kernel (u, G*u) → weight_hh (G*u, u)")},
                target_layouts=(matrix_layouts,),
                recurrent=Recurrent(order, bias_rows, {"kernel": [("weight_ih", t, notes[0])],
                                                       "recurrent_kernel": [("weight_hh", t, notes[1])], "bias": bias}, zeros, why, misfit))


# ---------------------------------------------------------------------------------------------
# the table


_ROWS = [
    Kind("dense", "Keras Dense / TF matmul / Flax nn.Dense → nn.Linear", ("Linear", "LazyLinear", "NonDynamicallyQuantizableLinear"),
         (Recogniser(80, lambda leaves, scope: _kernel_ndim(leaves) == 2, "a 2-D kernel"),
          Recogniser(130, lambda leaves, scope: len(leaves.get("weight", ())) == 2, "torch Linear weight (out, in)")),
         leaf_roles={"kernel": "weight", "weights": "weight", "bias": "bias", "biases": "bias", **_TORCH_LEAVES},
         source_layouts={("kernel", 2): ([["transpose", None]], "Dense kernel (in, out) → Linear weight (out, in)")},
         leaf_aliases=_SLIM, target_layouts=(matrix_layouts,),
         features=Channels("weight", 1, "in_features: a channels-first flatten before it gives C·H·W of them")),
    Kind("conv", "Keras Conv1D/2D/3D, DepthwiseConv, SeparableConv (two convs) → nn.ConvNd", ("Conv1d", "Conv2d", "Conv3d"),
         (Recogniser(20, lambda leaves, scope: "depthwise_kernel" in leaves, "DepthwiseConv: becomes a grouped torch conv"),
          Recogniser(40, lambda leaves, scope: _kernel_ndim(leaves) >= 3, "kernel with spatial axes"),
          Recogniser(120, lambda leaves, scope: len(leaves.get("weight", ())) >= 3, "torch conv weight (O, I, *S)")),
         leaf_roles={"kernel": "weight", "weights": "weight", "depthwise_kernel": "weight", "pointwise_kernel": "weight", "bias": "bias",
                     "biases": "bias", **_TORCH_LEAVES},
         source_layouts=_CONV_KERNELS, leaf_aliases=_SLIM, target_layouts=(matrix_layouts, conv_layouts), grouped=True, split=_separable,
         channels=Channels("weight", 0, "out_channels: weight (O, I, *S)")),
    Kind("conv_transpose", "Keras Conv1D/2D/3DTranspose → nn.ConvTransposeNd", ("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"),
         (Recogniser(30, lambda leaves, scope: _kernel_ndim(leaves) >= 3 and bool(re.search(r"(?i)transpose|deconv", scope)),
                     "Conv2DTranspose: the layer name says so; its kernel is (*S, O, I)"),),
         leaf_roles={"kernel": "weight", "bias": "bias"},
         source_layouts={("kernel", n): (_permute_last_two_first(n),
                                         f"Conv{n - 2}DTranspose kernel (*S, O, I) → ConvTranspose{n - 2}d weight (I, O, *S)")
                         for n in (3, 4, 5)},
         target_layouts=(matrix_layouts, conv_layouts),
         channels=Channels("weight", 1, "out_channels: weight (I, O, *S)")),
    Kind("batchnorm", "Keras BatchNormalization / Flax nn.BatchNorm → nn.BatchNormNd",
         ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"),
         (Recogniser(60, lambda leaves, scope: {"moving_mean", "moving_variance"} <= leaves.keys() or {"mean", "var"} <= leaves.keys(),
                     "normalisation with running statistics"),
          Recogniser(110, lambda leaves, scope: "running_mean" in leaves and "running_var" in leaves, "torch BatchNorm leaves")),
         leaf_roles={**_NORM_LEAVES, "moving_mean": "running_mean", "mean": "running_mean", "moving_variance": "running_var",
                     "var": "running_var", "running_mean": "running_mean", "running_var": "running_var",
                     "num_batches_tracked": "num_batches_tracked"},
         channels=Channels("running_mean", 0, "num_features")),
    Kind("layernorm", "Keras LayerNormalization / Flax nn.LayerNorm → nn.LayerNorm", ("LayerNorm",),
         (Recogniser(70, lambda leaves, scope: bool({"gamma", "scale"} & leaves.keys()) and not {"moving_mean", "mean"} & leaves.keys(),
                     "normalisation without running statistics (LayerNorm)"),
          Recogniser(140, lambda leaves, scope: len(leaves.get("weight", ())) == 1 and "bias" in leaves, "torch LayerNorm leaves")),
         leaf_roles=dict(_NORM_LEAVES)),
    Kind("embedding", "Keras Embedding / Flax nn.Embed → nn.Embedding: (vocab, dim), torch's own layout", ("Embedding",),
         (Recogniser(50, lambda leaves, scope: any(k in ("embeddings", "embedding") or (k.endswith("_embeddings") and len(v) == 2)
                                                   for k, v in leaves.items()), "an embedding table"),),
         leaf_roles={"embeddings": "weight", "embedding": "weight"}),
    # Keras gate order: LSTM i, f, c, o (torch i, f, g, o: the same); GRU z, r, h (torch r, z, n)
    _recurrent_kind("lstm", "LSTM", 10, ("ifgo", "ifgo"), 1, "Keras LSTM → torch nn.LSTM",
                    "kernel (in, 4u) + recurrent_kernel (u, 4u): 4 gates i, f, c, o",
                    ("(in, 4u) → (4u, in); gate order i, f, c, o is torch's i, f, g, o", "(u, 4u) → (4u, u)",
                     "Keras has one bias; torch adds bias_ih + bias_hh, so bias_hh is zeros")),
    # reset_after=True (Keras 2 default, the only GRU torch implements): bias (2, 3u) = input, recurrent
    _recurrent_kind("gru", "GRU", 11, ("zrn", "rzn"), 2, "Keras GRU(reset_after=True) → torch nn.GRU",
                    "kernel (in, 3u) + recurrent_kernel (u, 3u): 3 gates z, r, h",
                    ("(in, 3u) z, r, h → (3u, in) r, z, n", "(u, 3u) z, r, h → (3u, u) r, z, n",
                     "row 0 of the (2, 3u) reset_after bias: input bias", "row 1: recurrent bias (applied inside r * (…))"),
                    misfit=_gru_reset_before),
    _recurrent_kind("rnn", "RNN", 12, ("h", "h"), 1, "Keras SimpleRNN → torch nn.RNN(tanh)",
                    "SimpleRNN: kernel (in, u) + recurrent_kernel (u, u)",
                    ("(in, u) → (u, in)", "(u, u) → (u, u)ᵀ", "one bias; bias_hh is zeros")),
]

KINDS: dict[str, Kind] = {k.name: k for k in _ROWS}


# ---------------------------------------------------------------------------------------------
# reading the table (at call time: a row added to KINDS is seen everywhere)


def of_module(module_type: str) -> Kind | None:
    """The kind a torch module class (``Linear``, ``Conv2d`` …) is filled as, or ``None``."""
    return next((k for k in KINDS.values() if module_type in k.torch_classes), None)


def module_kind(module_type: str) -> str | None:
    k = of_module(module_type)
    return k.name if k else None


def source_kind(leaves: Leaves, scope: str) -> str | None:
    """The kind of a source layer, from its leaves (name → shape) and scope; ``None`` when no row recognises it."""
    tests = sorted(((r, k.name) for k in KINDS.values() for r in k.recognise), key=lambda x: x[0].rank)
    return next((name for r, name in tests if r.test(leaves, scope)), None)


def leaf_layout(leaf: str, ndim: int) -> tuple[list, str] | None:
    """(transform, why) for a channels-last source leaf known by its name alone: the first row that has one."""
    return next((k.source_layouts[(leaf, ndim)] for k in KINDS.values() if (leaf, ndim) in k.source_layouts), None)


def leaf_role(kind: str, leaf: str) -> str | None:
    """The torch leaf a source leaf fills in a layer of ``kind`` (BERT's ``word_embeddings`` &c. are tables: ``weight``)."""
    return KINDS[kind].leaf_roles.get(leaf) or ("weight" if leaf.endswith("_embeddings") else None)


def split_layer(scope: str, leaves: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A source layer as the torch modules it fills: most are one, a SeparableConv is two."""
    return next((parts for k in KINDS.values() if k.split and (parts := k.split(scope, leaves))), [(scope, leaves)])


def recurrent(kind: str | None) -> Recurrent | None:
    k = KINDS.get(kind) if kind else None
    return k.recurrent if k else None


def recurrent_gate_counts() -> set[int]:
    return {k.recurrent.gates for k in KINDS.values() if k.recurrent}
