"""Layouts a target tensor may arrive in, and the candidates a row's shapes cannot tell apart.

Domain module of the mapping stage (no stage imports). For a torch target, the known layouts are
data, per kind (:data:`np2torch.tasks.kinds.KINDS`): a Linear weight ``(out, in)`` arrives as-is or
as a ``(in, out)`` kernel; a conv weight ``(O, I, *S)`` as-is or channels-last ``(*S, I, O)`` (or
``(*S, O, I)``); a grouped conv ``(C*M, 1, *S)`` as a depthwise ``(*S, C, M)`` kernel.
:func:`layout_candidates` lists every one that turns a source shape into the target shape,
deduplicated by effect (two specs that move every element to the same place are one candidate). A reshape by element count is only ever a
candidate, never a silent choice, when the row came from order matching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from np2torch.tasks import kinds as K
from np2torch.tasks import transforms as T
from np2torch.tasks.model import TargetInfo

__all__ = ["AMBIGUOUS_CONFIDENCE", "alternatives", "fitting_layouts", "flatten_heuristic", "layout_candidates", "refit", "source_layouts"]

AMBIGUOUS_CONFIDENCE = 0.5  # a row whose layout the shapes cannot pin down is a guess until evidence says otherwise


_ONE = [K.TargetLayout(lambda s: s, [], "one layout")]


def alternatives(t: TargetInfo) -> list[K.TargetLayout]:
    """(source shape from target shape, transform to torch, why) per layout the target's kind allows;
    a kind with one layout (Embedding, 1-D vectors) is never ambiguous."""
    kind = K.of_module(t.module_type)
    for family in kind.target_layouts if kind else K.UNKNOWN_TARGET_LAYOUTS:
        alts = family(len(t.shape))
        if alts:
            return alts
    return _ONE


def _depthwise_fits(src: tuple[int, ...], t: TargetInfo) -> bool:
    """A (*S, C, M) depthwise kernel for a grouped conv weight (C*M, 1, *S), whatever the kernel's leaf
    is called (Keras 3 names a DepthwiseConv2D kernel ``kernel``; Keras 2 ``depthwise_kernel``)."""
    kind = K.of_module(t.module_type)
    return ((kind is None or kind.grouped) and len(t.shape) >= 3 and t.shape[1] == 1 and len(src) == len(t.shape)
            and tuple(src[:-2]) == tuple(t.shape[2:]) and src[-2] * src[-1] == t.shape[0] and src[-2] > 1)


def _lead(src: tuple[int, ...], spec: list | None) -> list:
    """``spec``'s leading ``index``: TF1/OpenAI 1×1-conv weights ``(1, in, out)``, or one layer of a
    scanned ``(depth, in, out)`` stack: kept in front of every layout of the indexed ``(in, out)``."""
    if not spec or len(src) < 2:
        return []
    name, arg = spec[0]
    return [list(spec[0])] if name == "layer" or (name == "index" and arg == 0 and tuple(src[:1]) == (1,)) else []


def source_layouts(src: tuple[int, ...], t: TargetInfo, spec: list | None = None) -> list[list]:
    """Transforms (known layouts of the target's kind, source-shape aware) turning ``src`` into ``t.shape``.

    With a ``spec`` that starts by squeezing a leading axis of 1 (:func:`_lead`), the layouts of
    the squeezed source count too, behind the same squeeze.
    """
    out = []
    if _depthwise_fits(src, t):
        out.append([["depthwise_to_grouped", None]])
    lead = _lead(src, spec)
    for src_of, to_torch, _why in alternatives(t):
        try:
            alt_src = tuple(src_of(t.shape))
        except IndexError:
            continue
        if alt_src == tuple(src):
            out.append([list(x) for x in to_torch])
        elif lead and alt_src == tuple(src[1:]):
            out.append(lead + [list(x) for x in to_torch])
    return out


def effect_key(src_shape: tuple[int, ...], spec: list) -> Any:
    """Two specs with the same key move every element to the same place."""
    n = int(np.prod(src_shape, dtype=np.int64))
    if n > 1 << 20:
        return T.describe(spec)
    idx = np.arange(n, dtype=np.int64).reshape(src_shape)
    try:
        return T.apply(idx, spec).tobytes()
    except (T.TransformError, ValueError):
        return T.describe(spec)


def flatten_heuristic(targets: Sequence[TargetInfo]) -> dict[str, list[int]]:
    """Linear modules that probably follow a channels-first flatten, by registration order.

    Used when no forward trace ran (no verify input): a Linear whose in_features is a multiple
    (>1) of the channel count of the conv/norm module registered just before it. The exact
    ``[C, H, W]`` comes from :func:`np2torch.tasks.forward.trace_forward` when an input is known.
    """
    out: dict[str, list[int]] = {}
    channels = 0
    seen: set[str] = set()
    for t in targets:
        if t.module in seen:
            continue
        kind = K.of_module(t.module_type)
        ch, feat = (kind.channels, kind.features) if kind else (None, None)
        if ch and t.key.endswith(f".{ch.leaf}") and len(t.shape) > ch.axis:
            seen.add(t.module)
            channels = t.shape[ch.axis]
        elif feat and t.key.endswith(f".{feat.leaf}") and len(t.shape) > feat.axis:
            seen.add(t.module)
            f = t.shape[feat.axis]
            if channels and f % channels == 0 and f // channels > 1:
                hw = f // channels
                side = int(round(hw ** 0.5))
                out[t.module] = [channels, side, side] if side * side == hw else [channels, hw, 1]
            channels = 0
    return out


def _candidate_specs(src: tuple[int, ...], spec: list, t: TargetInfo, flat: bool, prefix: list) -> list[list]:
    if not flat:
        return source_layouts(src, t, spec)
    specs: list[list] = []
    kind = K.of_module(t.module_type)
    if kind and kind.grouped and len(t.shape) >= 3 and t.shape[1] == 1:
        # a grouped conv from a flat slice: a depthwise (*S, C, M) kernel for every C·M = out channels
        out = t.shape[0]
        for c in (d for d in range(2, out + 1) if out % d == 0):
            specs.append(prefix + [["reshape", [*t.shape[2:], c, out // c]], ["depthwise_to_grouped", None]])
    for src_of, to_torch, _why in alternatives(t):
        try:
            alt_src = tuple(src_of(t.shape))
        except IndexError:
            continue
        specs.append(prefix + [["reshape", list(alt_src)]] + [list(x) for x in to_torch])
    return specs


def _fitting(src: tuple[int, ...], specs: list[list], t: TargetInfo) -> tuple[list, list]:
    fitting, keys = [], []
    for c in specs:
        try:
            if T.apply_shape(src, c) != tuple(t.shape):
                continue
        except T.TransformError:
            continue
        k = effect_key(src, c)
        if k not in keys:
            fitting.append(c)
            keys.append(k)
    return fitting, keys


def fitting_layouts(src: tuple[int, ...], spec: list, t: TargetInfo, *, flatten: list[int] | None = None,
                    reshape: bool = False) -> tuple[list, list]:
    """(specs, effect keys): every distinct known layout that turns a ``src``-shaped source into ``t.shape``.

    A flat vector's ``slice`` and a leading ``index 0`` squeeze of ``spec`` stay in front of each
    layout; with ``reshape``, a reshape by element count is one more (when the shapes differ);
    with ``flatten``, each layout also comes with the channels-last flatten reorder.
    """
    src = tuple(src)
    prefix = [s for s in spec if s[0] in ("slice", "layer")]  # which elements: a flat slice, one layer of a scanned stack
    flat = any(s[0] == "slice" for s in spec) or (len(src) != len(t.shape) and any(s[0] == "reshape" for s in spec))
    specs = _candidate_specs(src, spec, t, flat, prefix)
    if reshape and not flat and src != tuple(t.shape):
        specs.append([["reshape", list(t.shape)]])
    if flatten:
        specs = [c + [["flatten_nhwc_to_nchw", list(flatten)]] for c in specs] + specs
    return _fitting(src, specs, t)


def refit(src: tuple[int, ...], spec: list, t: TargetInfo, *, alternatives: bool = True) -> list | None:
    """``spec`` when it gives the target's shape, else (with ``alternatives``) the first known layout of
    the target that does (a preset guesses by leaf name alone; the target module settles it), else None.

    Recurrent layers pass ``alternatives=False``: their gate order is the preset's alone.
    """
    try:
        if T.apply_shape(tuple(src), spec) == tuple(t.shape):
            return spec
    except T.TransformError:
        pass
    if not alternatives:
        return None
    fitting, _ = fitting_layouts(src, spec, t)
    return fitting[0] if fitting else None


def layout_candidates(src_shapes: list[tuple[int, ...]], spec: list, t: TargetInfo, *, flatten: list[int] | None = None,
                      prefer_flatten: bool = False, reshape: bool = False) -> tuple[list, list]:
    """(chosen spec, candidates): every known layout that turns the source into ``t.shape``.

    ``candidates`` is empty when only one layout fits (or the chosen spec is not one of the
    known layouts, e.g. a preset's gate reordering, which the shapes cannot contradict). With
    ``reshape`` (order matching: nothing but the position says what the array is), a reshape
    by element count is one more candidate whenever the shapes differ.
    """
    src = tuple(src_shapes[0])
    by_count = [["reshape", list(t.shape)]]
    fitting, keys = fitting_layouts(src, spec, t, flatten=flatten, reshape=reshape)
    mine = effect_key(src, spec) if fitting else None
    if mine not in keys:
        # the chosen spec is none of the generic layouts (a recurrent gate reordering): only a
        # reshape by element count competes with it
        alt = [c for c, k in zip(fitting, keys) if c == by_count] if reshape else []
        return spec, ([spec] + alt if alt else [])
    chosen = fitting[keys.index(mine)]
    if flatten and prefer_flatten and not any(s[0] == "flatten_nhwc_to_nchw" for s in chosen):
        with_flat = chosen + [["flatten_nhwc_to_nchw", list(flatten)]]
        wk = effect_key(src, with_flat)
        if wk in keys:
            chosen, mine = fitting[keys.index(wk)], wk
    if len(fitting) < 2:
        return chosen, []
    return chosen, [chosen] + [c for c, k in zip(fitting, keys) if k != mine]
