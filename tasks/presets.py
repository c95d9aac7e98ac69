"""Naming and layout conventions of the frameworks weights come from, as tables of data.

A preset turns a source key and shape into (a) the PyTorch-style name it most likely has and
(b) the transform that brings its layout to PyTorch's. Each entry says why it exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Preset", "PRESETS", "SourceView", "view"]


@dataclass(frozen=True)
class Preset:
    name: str
    # regexes removed from every key, in order (framework-specific scopes and suffixes)
    strip: tuple[str, ...] = ()
    # leaf parameter names → PyTorch names
    leaf_names: dict[str, str] = field(default_factory=dict)
    # (leaf, ndim) → transform bringing the source layout to PyTorch's
    layouts: dict[tuple[str, int], list] = field(default_factory=dict)


_CHANNELS_LAST_KERNELS = {
    # Dense kernel (in, out) → Linear weight (out, in)
    ("kernel", 2): [["transpose", None]],
    # Conv1D kernel (W, I, O) → Conv1d weight (O, I, W)
    ("kernel", 3): [["permute", [2, 1, 0]]],
    # Conv2D kernel (H, W, I, O) → Conv2d weight (O, I, H, W)
    ("kernel", 4): [["permute", [3, 2, 0, 1]]],
    # Conv3D kernel (D, H, W, I, O) → Conv3d weight (O, I, D, H, W)
    ("kernel", 5): [["permute", [4, 3, 0, 1, 2]]],
}

_KERAS_LEAVES = {
    "kernel": "weight",  # Dense/Conv weights
    "bias": "bias",
    "gamma": "weight",  # BatchNormalization / LayerNormalization scale
    "beta": "bias",  # … and shift
    "moving_mean": "running_mean",  # BatchNormalization statistics: buffers, not parameters
    "moving_variance": "running_var",
    "embeddings": "weight",  # Embedding table (vocab, dim): same layout as torch
}

PRESETS: dict[str, Preset] = {
    "none": Preset("none"),
    "keras": Preset(
        "keras",
        strip=(r":\d+$",),  # TF variable names end in ':0'
        leaf_names=_KERAS_LEAVES,
        layouts=dict(_CHANNELS_LAST_KERNELS),
    ),
    "tf": Preset(
        "tf",
        strip=(r":\d+$",),
        leaf_names={**_KERAS_LEAVES, "weights": "weight", "biases": "bias"},  # tf.contrib / slim names
        layouts={**_CHANNELS_LAST_KERNELS, ("weights", 2): [["transpose", None]], ("weights", 4): [["permute", [3, 2, 0, 1]]]},
    ),
    "flax": Preset(
        "flax",
        strip=(r"^params/",),  # flax variables live under the 'params' collection
        leaf_names={"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight", "mean": "running_mean", "var": "running_var"},
        layouts=dict(_CHANNELS_LAST_KERNELS),
    ),
}


@dataclass(frozen=True)
class SourceView:
    """A source key seen through a preset."""

    key: str  # the original source key
    name: str  # dotted, PyTorch-style name
    scope: str  # the layer part of the name (everything before the leaf)
    leaf: str  # the PyTorch leaf name
    transform: list  # layout transform from the preset


def view(key: str, shape: tuple[int, ...], preset: Preset) -> SourceView:
    k = key
    for pat in preset.strip:
        k = re.sub(pat, "", k)
    k = re.sub(r":\d+$", "", k)
    parts = [p for p in re.split(r"[/.]", k) if p]
    leaf = parts[-1] if parts else k
    transform = list(preset.layouts.get((leaf, len(shape)), []))
    torch_leaf = preset.leaf_names.get(leaf, leaf)
    scope = ".".join(parts[:-1])
    name = f"{scope}.{torch_leaf}" if scope else torch_leaf
    return SourceView(key, name, scope, torch_leaf, transform)
