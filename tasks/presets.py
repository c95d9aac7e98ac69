"""Naming and layout conventions of the frameworks weights come from, as tables of data.

A preset turns a source key and shape into (a) the PyTorch-style names it most likely has and
(b) the transform that brings its layout to PyTorch's. What each kind of layer (Dense, Conv2D,
LSTM …) looks like in a source and in torch is the kinds table (:mod:`np2torch.tasks.kinds`),
which a channels-last preset reads for its layouts. Every entry says why it exists.

Conventions covered (keras / tf / flax):

- names: scopes ``a/b/c`` (→ ``a.b.c``), ``:0`` variable suffixes, leaf names (``kernel``,
  ``bias``, ``gamma``, ``beta``, ``scale``, ``embedding(s)``, ``moving_mean``,
  ``moving_variance``), numbered layers (Keras ``dense_3``, TF1 ``layer_3``, Flax ``Dense_0``,
  torch ``fc.3`` / ``layer.3``: numbers are read, never trusted as indices, because their
  offsets differ: Keras starts at ``dense`` then ``dense_1``, Flax at ``Dense_0``);
- TF1 / OpenAI checkpoints (``tf``): ``w``/``b``/``g`` leaves, ``h0`` → ``h.0``, a ``model/`` root
  scope, variables that are the layer's table (``wte``), 1×1-conv weights ``(1, in, out)`` that
  load into a transformers ``Conv1D`` ``(in, out)`` or (transposed) a ``Linear``;
- layouts: per kind (:data:`np2torch.tasks.kinds.KINDS`); Bidirectional ``forward_*`` / ``backward_*`` scopes (torch
  ``*_l0`` / ``*_l0_reverse``, :func:`is_backward_scope`); stacked ``lstm``, ``lstm_1`` (``*_l0``, ``*_l1``);
  Keras 3 ``vars/0``, ``vars/1`` … named by build order (:data:`KERAS_VARS`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from np2torch.tasks import kinds as K

__all__ = ["KERAS_VARS", "PRESETS", "Preset", "SourceView", "is_backward_scope", "layer_leaf_transform", "name_numbered_vars",
           "view"]

Shape = tuple[int, ...]


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
    # (leaf, ndim) → (transform bringing the source layout to PyTorch's, why): this framework's own spellings
    layouts: dict[tuple[str, int], tuple[list, str]] = field(default_factory=dict)
    # activations are channels-last, so a Flatten after convolutions orders features (H, W, C), and
    # the kinds' channels-last layouts apply (to every leaf, or to ``kind_leaves`` only)
    channels_last: bool = False
    kind_leaves: frozenset[str] | None = None

    def layout(self, leaf: str, ndim: int) -> list:
        """The layout guessed from the leaf's name alone (the layer's kind is not known yet)."""
        hit = self.layouts.get((leaf, ndim))
        if hit is None and self.channels_last and (self.kind_leaves is None or leaf in self.kind_leaves):
            hit = K.leaf_layout(leaf, ndim)
        return [list(s) for s in hit[0]] if hit else []


_TF_VARIABLE_SUFFIX = (r":\d+$", "TF variable names end in ':0'")

PRESETS: dict[str, Preset] = {
    "none": Preset("none"),
    "keras": Preset("keras", strip=(_TF_VARIABLE_SUFFIX,), leaf_names=dict(_KERAS_LEAVES), channels_last=True),
    "tf": Preset(
        "tf",
        strip=(_TF_VARIABLE_SUFFIX,
               (r"^model/", "OpenAI GPT-2 checkpoints scope every variable under 'model/' (transformers' converter skips it)")),
        leaf_names={**_KERAS_LEAVES, "weights": ("weight", "tf.contrib.layers / slim name of a kernel"),
                    "biases": ("bias", "tf.contrib.layers / slim name of a bias"),
                    "w": ("weight", "OpenAI GPT-2 / TF1 hand-written layers: weight"), "b": ("bias", "… bias"),
                    "g": ("weight", "… LayerNorm gain (OpenAI 'g'/'b')"),
                    "output_weights": ("weight", "TF1 BERT classifier 'cls/seq_relationship/output_weights' (labels, hidden): "
                                                 "torch's layout"),
                    "output_bias": ("bias", "TF1 BERT 'output_bias' (cls/predictions/output_bias → cls.predictions.bias)")},
        layouts={("weights", 2): ([["transpose", None]], "slim fully_connected weights (in, out)"),
                 ("weights", 4): ([["permute", [3, 2, 0, 1]]], "slim conv2d weights (H, W, I, O)"),
                 ("w", 2): ([["transpose", None]], "TF1 matmul weight (in, out) → Linear (out, in)"),
                 ("w", 3): ([["index", 0]], ("OpenAI conv1d weight (1, in, out) as a dense layer → transformers Conv1D (in, out); "
                                             "a Linear takes its transpose (the target module decides)"))},
        channels_last=True,
    ),
    "flax": Preset(
        "flax",
        strip=((r"^(params|batch_stats)/", "flax variables live under the 'params' / 'batch_stats' collections"),),
        leaf_names={"kernel": ("weight", "nn.Dense / nn.Conv"), "bias": ("bias", "same name"),
                    "scale": ("weight", "nn.LayerNorm / nn.BatchNorm scale"),
                    "embedding": ("weight", "nn.Embed table (num_embeddings, features): same layout as torch"),
                    "mean": ("running_mean", "nn.BatchNorm 'batch_stats' collection"), "var": ("running_var", "… its variance")},
        channels_last=True, kind_leaves=frozenset({"kernel"}),
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


# Keras 3 ``.weights.h5`` stores a layer's variables as ``layers/<name>/vars/0``, ``vars/1`` … in
# the order the layer built them, without their names: the shapes say which layer it is, and the
# build order then names them. First match wins.
def _recurrent_vars(s: list[Shape]) -> bool:
    return (len(s) in (2, 3) and len(s[0]) == 2 and len(s[1]) == 2 and s[1][0] > 0 and s[0][1] == s[1][1] and s[1][1] % s[1][0] == 0
            and s[1][1] // s[1][0] in K.recurrent_gate_counts())


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


def layer_leaf_transform(kind: str, src_leaf: str, shape: Shape, preset: Preset) -> list:
    """Layout transform for one leaf of a layer of ``kind`` (structural matching): the kind's own
    layout for the leaf (a Conv2DTranspose kernel is ``(*S, O, I)``), else the preset's guess by name."""
    if not preset.channels_last:
        return []
    own = K.KINDS[kind].layout(src_leaf, len(shape))
    return own if own is not None else preset.layout(src_leaf, len(shape))
