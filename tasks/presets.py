"""Naming and layout conventions of the frameworks weights come from, as tables of data.

A preset turns a source key and shape into (a) the PyTorch-style names it most likely has and
(b) the transform that brings its layout to PyTorch's. It also says which kind of layer a
group of source keys is (Dense, Conv2D, LSTM …) so the mapping stage can align source and model
layer by layer when names differ. Every entry says why it exists.

Conventions covered (keras / tf / flax):

- names: scopes ``a/b/c`` (→ ``a.b.c``), ``:0`` variable suffixes, leaf names (``kernel``,
  ``bias``, ``gamma``, ``beta``, ``scale``, ``embedding(s)``, ``moving_mean``,
  ``moving_variance``), numbered layers (Keras ``dense_3``, TF1 ``layer_3``, Flax ``Dense_0``,
  torch ``fc.3`` / ``layer.3``: numbers are read, never trusted as indices, because their
  offsets differ: Keras starts at ``dense`` then ``dense_1``, Flax at ``Dense_0``);
- TF1 / OpenAI checkpoints (``tf``): ``w``/``b``/``g`` leaves, ``h0`` → ``h.0``, a ``model/`` root
  scope, variables that are the layer's table (``wte``), 1×1-conv weights ``(1, in, out)`` that
  load into a transformers ``Conv1D`` ``(in, out)`` or (transposed) a ``Linear``;
- layouts: Dense ``(in, out)``; Conv1D/2D/3D channels-last ``(*S, I, O)``; depthwise
  ``(*S, C, mult)``; separable = depthwise ``(*S, C, mult)`` + pointwise ``(1…, C*mult, O)`` (two
  torch convs, :func:`split_separable`); transposed ``(*S, O, I)``; Embedding ``(vocab, dim)`` (same as torch);
  LSTM/GRU ``kernel (in, G*u)`` / ``recurrent_kernel (u, G*u)`` / ``bias`` (gate order and
  bias layout per :data:`RECURRENT`); Bidirectional ``forward_*`` / ``backward_*`` scopes (torch
  ``*_l0`` / ``*_l0_reverse``, :func:`is_backward_scope`); stacked ``lstm``, ``lstm_1`` (``*_l0``, ``*_l1``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Preset", "PRESETS", "SourceView", "view", "LayerKind", "source_layer_kind", "TORCH_KINDS", "LEAF_ROLES", "RECURRENT",
           "layer_leaf_transform",
           "split_separable", "is_backward_scope", "KERAS_VARS", "name_numbered_vars"]

Shape = tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# layouts: (source leaf, ndim) → transform to torch's layout, with the reason


def _why(spec: list, why: str) -> tuple[list, str]:
    return spec, why


_CHANNELS_LAST_KERNELS: dict[tuple[str, int], tuple[list, str]] = {
    ("kernel", 2): _why([["transpose", None]], "Dense kernel (in, out) → Linear weight (out, in)"),
    ("kernel", 3): _why([["permute", [2, 1, 0]]], "Conv1D kernel (W, I, O) → Conv1d weight (O, I, W)"),
    ("kernel", 4): _why([["permute", [3, 2, 0, 1]]], "Conv2D kernel (H, W, I, O) → Conv2d weight (O, I, H, W); "
                        "Conv2DTranspose (H, W, O, I) → ConvTranspose2d (I, O, H, W) is the same permutation"),
    ("kernel", 5): _why([["permute", [4, 3, 0, 1, 2]]], "Conv3D kernel (D, H, W, I, O) → Conv3d weight (O, I, D, H, W)"),
    ("depthwise_kernel", 4): _why([["depthwise_to_grouped", None]], "DepthwiseConv2D (H, W, C, mult) → Conv2d(groups=C) (C*mult, 1, H, W)"),
    ("depthwise_kernel", 3): _why([["depthwise_to_grouped", None]], "DepthwiseConv1D (W, C, mult) → Conv1d(groups=C) (C*mult, 1, W)"),
    ("pointwise_kernel", 4): _why([["permute", [3, 2, 0, 1]]], "SeparableConv2D pointwise kernel (1, 1, C*mult, O) → the 1×1 Conv2d "
                                  "weight (O, C*mult, 1, 1) after the depthwise one"),
    ("pointwise_kernel", 3): _why([["permute", [2, 1, 0]]], "SeparableConv1D pointwise kernel (1, C*mult, O) → Conv1d (O, C*mult, 1)"),
    ("recurrent_kernel", 2): _why([["transpose", None]], "LSTM/GRU recurrent kernel (u, G*u) → weight_hh (G*u, u)"),
}

_KERAS_LEAVES: dict[str, tuple[str, str]] = {
    "kernel": ("weight", "Dense/Conv weights"),
    "bias": ("bias", "same name"),
    "gamma": ("weight", "BatchNormalization / LayerNormalization scale"),
    "beta": ("bias", "… and shift"),
    "moving_mean": ("running_mean", "BatchNormalization statistics: buffers in torch, not parameters"),
    "moving_variance": ("running_var", "… the variance (torch keeps the variance too, not the std)"),
    "embeddings": ("weight", "Embedding table (vocab, dim): same layout as torch"),
    "depthwise_kernel": ("weight", "DepthwiseConv2D → Conv2d(groups=C)"),
}


@dataclass(frozen=True)
class Preset:
    name: str
    # (regex, why): removed from every key, in order (framework-specific scopes and suffixes)
    strip: tuple[tuple[str, str], ...] = ()
    # leaf parameter names → (PyTorch leaf, why)
    leaf_names: dict[str, tuple[str, str]] = field(default_factory=dict)
    # (leaf, ndim) → (transform bringing the source layout to PyTorch's, why)
    layouts: dict[tuple[str, int], tuple[list, str]] = field(default_factory=dict)
    # activations are channels-last, so a Flatten after convolutions orders features (H, W, C)
    channels_last: bool = False

    def layout(self, leaf: str, ndim: int) -> list:
        return [list(s) for s in self.layouts.get((leaf, ndim), ([], ""))[0]]


_TF_VARIABLE_SUFFIX = (r":\d+$", "TF variable names end in ':0'")

PRESETS: dict[str, Preset] = {
    "none": Preset("none"),
    "keras": Preset("keras", strip=(_TF_VARIABLE_SUFFIX,), leaf_names=dict(_KERAS_LEAVES), layouts=dict(_CHANNELS_LAST_KERNELS),
                    channels_last=True),
    "tf": Preset(
        "tf",
        strip=(_TF_VARIABLE_SUFFIX,
               (r"^model/", "OpenAI GPT-2 checkpoints scope every variable under 'model/' (transformers' converter skips it)")),
        leaf_names={**_KERAS_LEAVES, "weights": ("weight", "tf.contrib.layers / slim name of a kernel"),
                    "biases": ("bias", "tf.contrib.layers / slim name of a bias"),
                    "w": ("weight", "OpenAI GPT-2 / TF1 hand-written layers: weight"), "b": ("bias", "… bias"),
                    "g": ("weight", "… LayerNorm gain (OpenAI 'g'/'b')"),
                    "output_weights": ("weight", "TF1 BERT classifier 'cls/seq_relationship/output_weights' (labels, hidden): torch's layout"),
                    "output_bias": ("bias", "TF1 BERT 'output_bias' (cls/predictions/output_bias → cls.predictions.bias)")},
        layouts={**_CHANNELS_LAST_KERNELS, ("weights", 2): _why([["transpose", None]], "slim fully_connected weights (in, out)"),
                 ("weights", 4): _why([["permute", [3, 2, 0, 1]]], "slim conv2d weights (H, W, I, O)"),
                 ("w", 2): _why([["transpose", None]], "TF1 matmul weight (in, out) → Linear (out, in)"),
                 ("w", 3): _why([["index", 0]], "OpenAI conv1d weight (1, in, out) as a dense layer → transformers Conv1D (in, out); "
                                "a Linear takes its transpose (the target module decides)")},
        channels_last=True,
    ),
    "flax": Preset(
        "flax",
        strip=((r"^(params|batch_stats)/", "flax variables live under the 'params' / 'batch_stats' collections"),),
        leaf_names={"kernel": ("weight", "nn.Dense / nn.Conv"), "bias": ("bias", "same name"),
                    "scale": ("weight", "nn.LayerNorm / nn.BatchNorm scale"),
                    "embedding": ("weight", "nn.Embed table (num_embeddings, features): same layout as torch"),
                    "mean": ("running_mean", "nn.BatchNorm 'batch_stats' collection"), "var": ("running_var", "… its variance")},
        layouts={k: v for k, v in _CHANNELS_LAST_KERNELS.items() if k[0] == "kernel"},
        channels_last=True,
    ),
}


# ---------------------------------------------------------------------------------------------
# a source key seen through a preset


@dataclass(frozen=True)
class SourceView:
    """A source key seen through a preset."""

    key: str  # the original source key
    name: str  # dotted, PyTorch-style name
    scope: str  # the layer part of the name (everything before the leaf), dotted
    leaf: str  # the PyTorch leaf name
    transform: list  # layout transform from the preset
    src_leaf: str = ""  # the leaf as the source spells it (kernel, gamma, …)
    alt_names: tuple[str, ...] = ()  # further spellings: numbered scopes split (layer_0 → layer.0)


_NUMBERED = re.compile(r"^(.*?)_(\d+)$")
_NUMBERED_BARE = re.compile(r"^([A-Za-z]+)(\d+)$")


def _split_numbered(part: str, bare: bool = False) -> str:
    # TF1/Keras number scopes with a suffix (layer_0, dense_3); torch uses a ModuleList index.
    # OpenAI's TF1 code numbers without the underscore (h0, h11: transformers' converter splits
    # r"[A-Za-z]+\d+"): only as a further spelling, since torch's own conv1/fc2 look the same
    m = (_NUMBERED_BARE if bare else _NUMBERED).match(part)
    return f"{m.group(1)}.{m.group(2)}" if m and m.group(1) else part


def view(key: str, shape: Shape, preset: Preset) -> SourceView:
    k = key
    for pat, _ in preset.strip:
        k = re.sub(pat, "", k)
    k = re.sub(r":\d+$", "", k)
    parts = [p for p in re.split(r"[/.]", k) if p]
    src_leaf = parts[-1] if parts else k
    transform = preset.layout(src_leaf, len(shape))
    torch_leaf = preset.leaf_names.get(src_leaf, (src_leaf, ""))[0]
    if preset.name in ("keras", "tf") and src_leaf.endswith("_embeddings") and len(shape) == 2:
        torch_leaf = f"{src_leaf}.weight"  # BERT: 'embeddings/word_embeddings' is the table itself
    scope = ".".join(parts[:-1])
    name = f"{scope}.{torch_leaf}" if scope else torch_leaf
    alt_scope = ".".join(_split_numbered(p) for p in parts[:-1])
    alts = [f"{alt_scope}.{torch_leaf}" if alt_scope else torch_leaf]
    if preset.name == "tf":
        bare_scope = ".".join(_split_numbered(p, bare=True) for p in parts[:-1])
        alts.append(f"{bare_scope}.{torch_leaf}" if bare_scope else torch_leaf)
        if src_leaf not in preset.leaf_names and len(shape) == 2:
            # a variable that is the layer itself (GPT-2 'model/wte', 'model/h0/…/wpe'): its table
            alts += [f"{name}.weight", f"{bare_scope}.{src_leaf}.weight" if bare_scope else f"{src_leaf}.weight"]
    alts = tuple(n for n in dict.fromkeys(alts) if n != name)
    return SourceView(key, name, scope, torch_leaf, transform, src_leaf, alts)


# ---------------------------------------------------------------------------------------------
# layer kinds: which source groups are which layers, and which torch modules they can fill


@dataclass(frozen=True)
class LayerKind:
    kind: str
    test: Callable[[dict[str, Shape], str], bool]  # (leaf → shape, scope) → is this kind
    why: str


def _rk_gates(leaves: dict[str, Shape]) -> int:
    k, rk = leaves.get("kernel"), leaves.get("recurrent_kernel")
    if not k or not rk or len(rk) != 2 or rk[0] == 0 or k[-1] % rk[0]:
        return 0
    return k[-1] // rk[0]


def _kernel_ndim(leaves: dict[str, Shape]) -> int:
    k = leaves.get("kernel", leaves.get("weights"))
    return len(k) if k is not None else 0


# First match wins; leaf names are the source's own (kernel, gamma, …).
SOURCE_KINDS: list[LayerKind] = [
    LayerKind("lstm", lambda l, s: _rk_gates(l) == 4, "kernel (in, 4u) + recurrent_kernel (u, 4u): 4 gates i, f, c, o"),
    LayerKind("gru", lambda l, s: _rk_gates(l) == 3, "kernel (in, 3u) + recurrent_kernel (u, 3u): 3 gates z, r, h"),
    LayerKind("rnn", lambda l, s: _rk_gates(l) == 1, "SimpleRNN: kernel (in, u) + recurrent_kernel (u, u)"),
    LayerKind("conv", lambda l, s: "depthwise_kernel" in l, "DepthwiseConv: becomes a grouped torch conv"),
    LayerKind("conv_transpose", lambda l, s: _kernel_ndim(l) >= 3 and bool(re.search(r"(?i)transpose|deconv", s)),
              "Conv2DTranspose: the layer name says so; its kernel is (*S, O, I)"),
    LayerKind("conv", lambda l, s: _kernel_ndim(l) >= 3, "kernel with spatial axes"),
    LayerKind("embedding", lambda l, s: any(k in ("embeddings", "embedding") or (k.endswith("_embeddings") and len(v) == 2) for k, v in l.items()),
              "an embedding table"),
    LayerKind("batchnorm", lambda l, s: ("moving_mean" in l and "moving_variance" in l) or ("mean" in l and "var" in l),
              "normalisation with running statistics"),
    LayerKind("layernorm", lambda l, s: ("gamma" in l or "scale" in l) and not any(k in l for k in ("moving_mean", "mean")),
              "normalisation without running statistics (LayerNorm)"),
    LayerKind("dense", lambda l, s: _kernel_ndim(l) == 2, "a 2-D kernel"),
    # sources already in torch naming whose module names differ from the model's
    LayerKind("batchnorm", lambda l, s: "running_mean" in l and "running_var" in l, "torch BatchNorm leaves"),
    LayerKind("conv", lambda l, s: len(l.get("weight", ())) >= 3, "torch conv weight (O, I, *S)"),
    LayerKind("dense", lambda l, s: len(l.get("weight", ())) == 2, "torch Linear weight (out, in)"),
    LayerKind("layernorm", lambda l, s: len(l.get("weight", ())) == 1 and "bias" in l, "torch LayerNorm leaves"),
]


def split_separable(scope: str, leaves: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """A Keras SeparableConv layer is two torch convs: the depthwise one (no bias), then the 1×1
    pointwise one, which takes the layer's bias. Other layers pass through unchanged."""
    if "depthwise_kernel" not in leaves or "pointwise_kernel" not in leaves:
        return [(scope, leaves)]
    rest = {k: v for k, v in leaves.items() if k not in ("depthwise_kernel", "pointwise_kernel")}
    return [(f"{scope}.depthwise" if scope else "depthwise", {"depthwise_kernel": leaves["depthwise_kernel"]}),
            (f"{scope}.pointwise" if scope else "pointwise", {"pointwise_kernel": leaves["pointwise_kernel"], **rest})]


# Keras 3 ``.weights.h5`` stores a layer's variables as ``layers/<name>/vars/0``, ``vars/1`` … in
# the order the layer built them, without their names: the shapes say which layer it is, and the
# build order then names them. First match wins.
def _recurrent_vars(s: list[Shape]) -> bool:
    return (len(s) in (2, 3) and len(s[0]) == 2 and len(s[1]) == 2 and s[1][0] > 0 and s[0][1] == s[1][1] and s[1][1] % s[1][0] == 0
            and s[1][1] // s[1][0] in (1, 3, 4))


KERAS_VARS: list[tuple[Callable[[list[Shape]], bool], tuple[str, ...], str]] = [
    (_recurrent_vars, ("kernel", "recurrent_kernel", "bias"),
     "LSTM/GRU/SimpleRNN cell: kernel (in, G*u), recurrent_kernel (u, G*u), bias (G*u,) or (2, G*u)"),
    (lambda s: len(s) in (2, 3) and len(s[0]) >= 3 and len(s[1]) == len(s[0]) and all(d == 1 for d in s[1][:-2])
     and s[1][-2] == s[0][-2] * s[0][-1], ("depthwise_kernel", "pointwise_kernel", "bias"),
     "SeparableConv: depthwise kernel (*S, C, M), pointwise kernel (1…, C*M, O), bias"),
    (lambda s: len(s) in (1, 2) and len(s[0]) >= 2 and (len(s) == 1 or len(s[1]) == 1), ("kernel", "bias"),
     "Dense / Conv / DepthwiseConv: kernel, then bias"),
    (lambda s: len(s) == 4 and all(len(x) == 1 and x == s[0] for x in s), ("gamma", "beta", "moving_mean", "moving_variance"),
     "BatchNormalization (center and scale): gamma, beta, moving_mean, moving_variance"),
    (lambda s: len(s) == 2 and all(len(x) == 1 and x == s[0] for x in s), ("gamma", "beta"), "LayerNormalization: gamma, beta"),
]


def name_numbered_vars(scope: str, shapes: list[Shape]) -> list[str] | None:
    """Leaf names for a layer whose variables are only numbered (``vars/0``, ``vars/1`` …), or ``None``."""
    if len(shapes) == 1 and len(shapes[0]) == 2 and "embedding" in scope.lower():
        return ["embeddings"]  # Embedding (vocab, dim): one 2-D variable, named by its layer
    for test, names, _why in KERAS_VARS:
        if test(shapes):
            return list(names[: len(shapes)])
    return None


# Keras Bidirectional scopes its two copies of the layer 'forward_<name>' and 'backward_<name>'
_BACKWARD_SCOPE = re.compile(r"(^|\.)backward_[^.]*")


def is_backward_scope(scope: str) -> bool:
    """True for the backward half of a Keras Bidirectional layer (torch's ``*_reverse`` slot)."""
    return bool(_BACKWARD_SCOPE.search(scope))


def source_layer_kind(leaves: dict[str, Shape], scope: str) -> str | None:
    for k in SOURCE_KINDS:
        if k.test(leaves, scope):
            return k.kind
    return None


# torch module class → layer kind it can be filled from
TORCH_KINDS: dict[str, str] = {
    "Linear": "dense", "LazyLinear": "dense", "NonDynamicallyQuantizableLinear": "dense",
    "Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv",
    "ConvTranspose1d": "conv_transpose", "ConvTranspose2d": "conv_transpose", "ConvTranspose3d": "conv_transpose",
    "BatchNorm1d": "batchnorm", "BatchNorm2d": "batchnorm", "BatchNorm3d": "batchnorm", "SyncBatchNorm": "batchnorm",
    "LayerNorm": "layernorm", "Embedding": "embedding",
    "LSTM": "lstm", "GRU": "gru", "RNN": "rnn",
}

# per kind: source leaf → torch leaf (within one layer); None: the leaf depends on the slot (RNNs)
_TORCH_LEAVES = {"weight": "weight", "bias": "bias"}

LEAF_ROLES: dict[str, dict[str, str]] = {
    "dense": {"kernel": "weight", "weights": "weight", "bias": "bias", "biases": "bias", **_TORCH_LEAVES},
    "conv": {"kernel": "weight", "weights": "weight", "depthwise_kernel": "weight", "pointwise_kernel": "weight", "bias": "bias", "biases": "bias", **_TORCH_LEAVES},
    "conv_transpose": {"kernel": "weight", "bias": "bias"},
    "batchnorm": {"gamma": "weight", "scale": "weight", "beta": "bias", "bias": "bias", "moving_mean": "running_mean", "mean": "running_mean",
                  "moving_variance": "running_var", "var": "running_var", "weight": "weight", "running_mean": "running_mean",
                  "running_var": "running_var", "num_batches_tracked": "num_batches_tracked"},
    "layernorm": {"gamma": "weight", "scale": "weight", "beta": "bias", "bias": "bias", "weight": "weight"},
    "embedding": {"embeddings": "weight", "embedding": "weight"},
}


@dataclass(frozen=True)
class Recurrent:
    gates: int
    # source leaf → [(torch leaf prefix, transform, why)]; the slot suffix (_l0, _l1_reverse) is appended
    leaves: dict[str, list[tuple[str, list, str]]]
    zeros: tuple[str, ...]  # torch leaves the source has no counterpart for
    why: str


# Keras gate order: LSTM i, f, c, o (same as torch i, f, g, o); GRU z, r, h (torch r, z, n).
RECURRENT: dict[str, Recurrent] = {
    "lstm": Recurrent(4, {
        "kernel": [("weight_ih", [["transpose", None]], "(in, 4u) → (4u, in); gate order i, f, c, o is torch's i, f, g, o")],
        "recurrent_kernel": [("weight_hh", [["transpose", None]], "(u, 4u) → (4u, u)")],
        "bias": [("bias_ih", [], "Keras has one bias; torch adds bias_ih + bias_hh, so bias_hh is zeros")],
    }, ("bias_hh",), "Keras LSTM → torch nn.LSTM"),
    "gru": Recurrent(3, {
        "kernel": [("weight_ih", [["transpose", None], ["reorder_chunks", [1, 0, 2]]], "(in, 3u) z, r, h → (3u, in) r, z, n")],
        "recurrent_kernel": [("weight_hh", [["transpose", None], ["reorder_chunks", [1, 0, 2]]], "(u, 3u) z, r, h → (3u, u) r, z, n")],
        # reset_after=True (Keras 2 default, the only GRU torch implements): bias (2, 3u) = input, recurrent
        "bias": [("bias_ih", [["index", 0], ["reorder_chunks", [1, 0, 2]]], "row 0 of the (2, 3u) reset_after bias: input bias"),
                 ("bias_hh", [["index", 1], ["reorder_chunks", [1, 0, 2]]], "row 1: recurrent bias (applied inside r * (…))")],
    }, (), "Keras GRU(reset_after=True) → torch nn.GRU"),
    "rnn": Recurrent(1, {
        "kernel": [("weight_ih", [["transpose", None]], "(in, u) → (u, in)")],
        "recurrent_kernel": [("weight_hh", [["transpose", None]], "(u, u) → (u, u)ᵀ")],
        "bias": [("bias_ih", [], "one bias; bias_hh is zeros")],
    }, ("bias_hh",), "Keras SimpleRNN → torch nn.RNN(tanh)"),
}


def layer_leaf_transform(kind: str, src_leaf: str, shape: Shape, preset: Preset) -> list:
    """Layout transform for one leaf of a layer of ``kind`` (structural matching)."""
    if not preset.channels_last:
        return []
    if kind == "conv_transpose" and src_leaf == "kernel":
        nd = len(shape)
        return [["permute", [nd - 1, nd - 2, *range(nd - 2)]]]  # (*S, O, I) → (I, O, *S)
    spec = preset.layout(src_leaf, len(shape))
    if not spec and src_leaf in ("kernel", "weights"):
        spec = PRESETS["keras"].layout("kernel", len(shape))
    if not spec and src_leaf in ("depthwise_kernel", "pointwise_kernel"):
        spec = PRESETS["keras"].layout(src_leaf, len(shape))
    return spec
