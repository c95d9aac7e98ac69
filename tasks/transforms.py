"""Array transforms named in configs and presets, as one table of data.

Each transform knows how to act on an array and, without data, on a shape, so the mapping stage
can plan and check every target shape before a byte is read. Arrays stay views where NumPy
allows (transpose, permute), so a memory-mapped source is copied once, at the cast.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TRANSFORMS", "normalize", "apply", "apply_shape", "describe", "layout_label", "TransformError"]

Spec = list[Any]  # normalised: a list of [name, arg] pairs


class TransformError(ValueError):
    """A transform cannot apply to this shape (a config or mapping mistake, not a data one)."""


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _reshape_shape(shape: tuple[int, ...], arg: Sequence[int]) -> tuple[int, ...]:
    arg = [int(a) for a in arg]
    n = _prod(shape)
    if arg.count(-1) > 1:
        raise TransformError(f"reshape {arg}: at most one -1")
    if -1 in arg:
        known = _prod([a for a in arg if a != -1])
        if known == 0 or n % known:
            raise TransformError(f"reshape {arg}: {n} elements do not divide into it")
        arg[arg.index(-1)] = n // known
    if _prod(arg) != n:
        raise TransformError(f"reshape {list(shape)} → {arg}: {n} elements cannot become {_prod(arg)}")
    return tuple(arg)


def _permute_shape(shape: tuple[int, ...], axes: Sequence[int]) -> tuple[int, ...]:
    if sorted(axes) != list(range(len(shape))):
        raise TransformError(f"permute {list(axes)} does not fit a {len(shape)}-D array of shape {list(shape)}")
    return tuple(shape[a] for a in axes)


def _slice_shape(shape: tuple[int, ...], arg: Sequence[int]) -> tuple[int, ...]:
    start, stop = int(arg[0]), int(arg[1])
    n = _prod(shape)
    if not 0 <= start <= stop <= n:
        raise TransformError(f"slice [{start}, {stop}] is outside the {n} elements of the source")
    return (stop - start,)


def _nhwc_shape(shape: tuple[int, ...], arg: Sequence[int]) -> tuple[int, ...]:
    c, h, w = (int(a) for a in arg)
    if len(shape) != 2 or shape[1] != c * h * w:
        raise TransformError(f"flatten_nhwc_to_nchw {[c, h, w]} needs an (out, {c * h * w}) weight, got {list(shape)}")
    return shape


def _nhwc_apply(a: np.ndarray, arg: Sequence[int]) -> np.ndarray:
    # Keras flattens (H, W, C); PyTorch flattens (C, H, W): reorder the dense layer's input axis.
    c, h, w = (int(x) for x in arg)
    return a.reshape(a.shape[0], h, w, c).transpose(0, 3, 1, 2).reshape(a.shape[0], c * h * w)


def _chunks_shape(shape: tuple[int, ...], arg: Sequence[int]) -> tuple[int, ...]:
    if not shape or shape[0] % len(arg):
        raise TransformError(f"reorder_chunks {list(arg)}: axis 0 of {list(shape)} does not split into {len(arg)}")
    return shape


def _chunks_apply(a: np.ndarray, arg: Sequence[int]) -> np.ndarray:
    parts = np.split(a, len(arg), axis=0)
    return np.concatenate([parts[i] for i in arg], axis=0)


def _pad_shape(shape: tuple[int, ...], arg: Sequence[int]) -> tuple[int, ...]:
    before, after = (int(a) for a in arg)
    if not shape or before < 0 or after < 0:
        raise TransformError(f"pad {list(arg)} needs an array with an axis 0 and non-negative counts, got {list(shape)}")
    return (shape[0] + before + after, *shape[1:])


def _pad_apply(a: np.ndarray, arg: Sequence[int]) -> np.ndarray:
    return np.pad(a, [(int(arg[0]), int(arg[1]))] + [(0, 0)] * (a.ndim - 1))


def _index_shape(shape: tuple[int, ...], arg: int) -> tuple[int, ...]:
    if not shape or not -shape[0] <= int(arg) < shape[0]:
        raise TransformError(f"index {arg} is outside axis 0 of {list(shape)}")
    return shape[1:]


def _depthwise_shape(shape: tuple[int, ...], _: Any) -> tuple[int, ...]:
    if len(shape) < 3:
        raise TransformError(f"depthwise_to_grouped needs a (*spatial, C, multiplier) kernel, got {list(shape)}")
    *spatial, c, mult = shape
    return (c * mult, 1, *spatial)


def _depthwise_apply(a: np.ndarray, _: Any) -> np.ndarray:
    # Keras depthwise kernel (*S, C, M): output channel c*M + m uses kernel[..., c, m]. torch's
    # groups=C conv weight is (C*M, 1, *S) with the same channel numbering (C order merge).
    *spatial, c, mult = a.shape
    nd = len(spatial)
    merged = a.reshape(*spatial, c * mult)  # (*S, C*M)
    return merged.transpose([nd, *range(nd)]).reshape(c * mult, 1, *spatial)


@dataclass(frozen=True)
class Transform:
    apply: Callable[[np.ndarray, Any], np.ndarray]
    shape: Callable[[tuple[int, ...], Any], tuple[int, ...]]
    why: str


TRANSFORMS: dict[str, Transform] = {
    "transpose": Transform(lambda a, _: a.T, lambda s, _: tuple(reversed(s)),
                           "reverse all axes: a Keras/TF/Flax Dense kernel is (in, out), torch Linear is (out, in)"),
    "permute": Transform(lambda a, axes: a.transpose([int(x) for x in axes]), _permute_shape,
                         "reorder axes: channels-last conv kernels (H, W, I, O) → torch (O, I, H, W) is [3, 2, 0, 1]"),
    "reshape": Transform(lambda a, shp: np.reshape(a, _reshape_shape(a.shape, shp)), _reshape_shape,
                         "same elements, new shape (C order): a flat slice back to its tensor"),
    "flatten_nhwc_to_nchw": Transform(_nhwc_apply, _nhwc_shape,
                                      "a dense layer after a channels-last Flatten sees (H, W, C)-ordered inputs; "
                                      "torch flattens (C, H, W)"),
    "slice": Transform(lambda a, arg: a.reshape(-1)[int(arg[0]) : int(arg[1])], _slice_shape,
                       "a range of a flat parameter vector"),
    "zeros": Transform(lambda a, _: a, lambda s, _: s, "the target gets zeros (e.g. a bias the source never had)"),
    "reorder_chunks": Transform(_chunks_apply, _chunks_shape,
                                "reorder equal blocks along axis 0: gate order differs, Keras GRU (z, r, h) vs torch (r, z, n)"),
    "pad": Transform(_pad_apply, _pad_shape,
                     "zeros before/after along axis 0: Flax GRUCell has a bias only for the n gate's hidden part "
                     "(torch bias_hh is r, z, n)"),
    "index": Transform(lambda a, i: a[int(i)], _index_shape,
                       "take one row of axis 0: Keras GRU reset_after bias (2, 3u) holds input and recurrent biases"),
    "layer": Transform(lambda a, i: a[int(i)], _index_shape,
                       "one layer of a scanned parameter: Flax nn.scan / big_vision stack every block on a leading depth axis"),
    "depthwise_to_grouped": Transform(_depthwise_apply, _depthwise_shape,
                                      "Keras/TF depthwise kernel (H, W, C, mult) → torch Conv2d(groups=C) weight (C*mult, 1, H, W)"),
}


def normalize(spec: Sequence[str | dict[str, Any] | Sequence[Any]]) -> Spec:
    """Turn ``['transpose', {'reshape': [2, 10]}]`` into ``[['transpose', None], ['reshape', [2, 10]]]``."""
    out: Spec = []
    for item in spec:
        if isinstance(item, str):
            name, arg = item, None
        elif isinstance(item, dict):
            if len(item) != 1:
                raise TransformError(f"transform {item!r} must have exactly one key")
            name, arg = next(iter(item.items()))
        else:
            name, arg = item[0], item[1]
        if name not in TRANSFORMS:
            raise TransformError(f"unknown transform {name!r}; known: {sorted(TRANSFORMS)}")
        out.append([name, arg])
    return out


def apply_shape(shape: Sequence[int], spec: Spec) -> tuple[int, ...]:
    s = tuple(int(d) for d in shape)
    for name, arg in spec:
        s = TRANSFORMS[name].shape(s, arg)
    return s


def apply(a: np.ndarray, spec: Spec) -> np.ndarray:
    for name, arg in spec:
        a = TRANSFORMS[name].apply(a, arg)
    return a


# A pairing candidate in the manifest starts with ["source", key]: which source array the row reads
# (interchangeable layers). It is not a transform (no rule can name it); the evidence step swaps
# the row's source and strips it, so it never reaches apply().
PAIRING_STEP = "source"


def layout_label(spec: Spec) -> str:
    """The layout a spec stands for, without its sizes: ``slice=[0,20]; reshape=[2,10]; transpose`` → ``reshape; transpose``.

    Candidates of different rows that share a label are the same convention (e.g. "the source
    stores every kernel as (in, out)"), which is what the evidence step tries first, all at once.
    """
    parts = []
    for name, arg in spec:
        if name in ("slice", "layer", PAIRING_STEP):
            continue
        parts.append(name if name in ("reshape", "flatten_nhwc_to_nchw") or arg is None
                     else f"{name}={json.dumps(arg, separators=(',', ':'))}")
    return "; ".join(parts) or "as-is"


def describe(spec: Spec) -> str:
    """Compact, stable text for the manifest: ``transpose; reshape=[2,10]``."""
    parts = []
    for name, arg in spec:
        parts.append(name if arg is None else f"{name}={json.dumps(arg, separators=(',', ':'))}")
    return "; ".join(parts)
