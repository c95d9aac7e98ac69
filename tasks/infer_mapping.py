"""Stage 2, ``infer-mapping``: array table + model + mapping spec → parameter manifest.

Order of evidence, strongest first (each target is taken by the first that claims it):

1. ``rules`` from the config, in order (confidence 1); a list ``source`` joins with ``concat``;
2. names: exact (1.0), then normalised through the preset (``/``→``.``, ``:0``, ``kernel``→
   ``weight``, ``layer_0``→``layer.0`` …, 0.95), then a unique suffix match (0.85);
3. structure: source keys grouped into layers by scope, each layer's kind read from its leaves
   and shapes (Dense, Conv, BatchNorm, LSTM …, :mod:`np2torch.tasks.presets`), aligned with the model's
   modules of the same kind in registration order, every shape checked (0.8); a separable conv
   is two layers (depthwise, pointwise); Bidirectional ``backward_*`` layers fill ``*_reverse``;
4. ``order``: remaining sources in source order against remaining targets in registration
   order; a source larger than the target (a flat vector, one file per layer) is sliced by
   ``numel`` with every boundary checked (0.5–0.7);
5. ``shape``: a shape that occurs exactly once on both sides (0.6).

Then every row's layout is questioned: when more than one known layout gives the target shape
(a square kernel, a 1×1 conv with as many inputs as outputs, a flat slice, a Linear after a
channels-first flatten), the row lists them in ``candidates`` (its own choice first), its
confidence is capped and it is marked unverified until :mod:`np2torch.tasks.evidence` picks one with a
reference output. Nothing is dropped silently: targets nobody claims are ``missing`` (or
``allowed_missing``), sources nobody uses are ``unused`` (or ``ignored``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from np2torch.tasks import presets as P
from np2torch.tasks import transforms as T
from np2torch.tasks.config import MappingSpec, Rule
from np2torch.tasks.errors import MappingError, Problem
from np2torch.tasks.load_arrays import ArrayRecord
from np2torch.tasks.manifest import new_row
from np2torch.tasks.model import TargetInfo

__all__ = ["infer_manifest", "target_dtype_for", "layout_candidates", "fitting_layouts", "refit", "flatten_heuristic", "AMBIGUOUS_CONFIDENCE"]

AMBIGUOUS_CONFIDENCE = 0.5  # a row whose layout the shapes cannot pin down is a guess until evidence says otherwise


@dataclass
class _Claim:
    sources: list[str]
    spec: list  # normalised transform spec (per source when concat, else for the one source)
    how: str
    confidence: float
    concat: int | None = None
    note: str = ""
    zeros: bool = False
    candidates: list = field(default_factory=list)  # filled by _question_layouts


def target_dtype_for(t: TargetInfo, src_dtype: str | None, convert_dtype: str) -> str:
    """Integer/bool buffers keep the model's dtype; float targets take the configured dtype."""
    if not t.is_float:
        return t.dtype
    if convert_dtype == "keep" and src_dtype:
        k = np.dtype(src_dtype)
        return {"f2": "float16", "f4": "float32", "f8": "float64"}.get(f"{k.kind}{k.itemsize}", t.dtype)
    return t.dtype if convert_dtype == "keep" else convert_dtype


# ---------------------------------------------------------------------------------------------
# layouts a target tensor may arrive in: (source shape from target shape, transform to torch, why)


def _conv_alts(nd: int) -> list[tuple[Any, list, str]]:
    s = nd - 2  # spatial axes
    return [
        (lambda t: t, [], "torch layout (O, I, *S)"),
        (lambda t: (*t[2:], t[1], t[0]), [["permute", [s + 1, s, *range(s)]]], "channels-last (*S, I, O): Keras/TF/Flax"),
        (lambda t: (*t[2:], t[0], t[1]), [["permute", [s, s + 1, *range(s)]]], "channels-last with I/O swapped (*S, O, I)"),
    ]


_MATRIX_ALTS = [
    (lambda t: t, [], "torch layout (out, in)"),
    (lambda t: (t[1], t[0]), [["transpose", None]], "(in, out): Keras/TF/Flax kernels, x @ W"),
]

# module kinds whose 2-D/N-D weights have several plausible layouts; anything else (Embedding,
# 1-D vectors) has one layout and is never ambiguous
_AMBIGUOUS_KINDS = {"dense", "conv", "conv_transpose", "lstm", "gru", "rnn", None}


def _alternatives(t: TargetInfo) -> list[tuple[Any, list, str]]:
    kind = P.TORCH_KINDS.get(t.module_type)
    if kind not in _AMBIGUOUS_KINDS:
        return [(lambda s: s, [], "one layout")]
    if len(t.shape) == 2:
        return _MATRIX_ALTS
    if len(t.shape) >= 3 and kind in ("conv", "conv_transpose", None):
        return _conv_alts(len(t.shape))
    return [(lambda s: s, [], "one layout")]


def _effect_key(src_shape: tuple[int, ...], spec: list) -> Any:
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

    Used when no shape probe ran (no verify input): a Linear whose in_features is a multiple
    (>1) of the channel count of the conv/norm module registered just before it. The exact
    ``[C, H, W]`` comes from :func:`np2torch.tasks.evidence.probe_flatten` when an input is known.
    """
    out: dict[str, list[int]] = {}
    channels = 0
    seen: set[str] = set()
    for t in targets:
        if t.module in seen:
            continue
        kind = P.TORCH_KINDS.get(t.module_type)
        if kind in ("conv", "conv_transpose") and t.key.endswith(".weight") and len(t.shape) >= 3:
            seen.add(t.module)
            channels = t.shape[0] if kind == "conv" else t.shape[1]
        elif kind == "batchnorm" and t.key.endswith(".running_mean"):
            seen.add(t.module)
            channels = t.shape[0]
        elif kind == "dense" and t.key.endswith(".weight"):
            seen.add(t.module)
            f = t.shape[1]
            if channels and f % channels == 0 and f // channels > 1:
                hw = f // channels
                side = int(round(hw ** 0.5))
                out[t.module] = [channels, side, side] if side * side == hw else [channels, hw, 1]
            channels = 0
    return out


def _depthwise_alt(src: tuple[int, ...], t: TargetInfo) -> list[list]:
    """A kernel ``(*S, C, mult)`` feeding a grouped conv ``(C*mult, 1, *S)`` is depthwise, whatever its
    leaf is called (Keras 3 names a DepthwiseConv2D kernel ``kernel``; Keras 2 ``depthwise_kernel``)."""
    if len(t.shape) >= 3 and len(src) == len(t.shape) and t.shape[1] == 1 and tuple(src[:-2]) == tuple(t.shape[2:]) \
            and src[-2] * src[-1] == t.shape[0] and P.TORCH_KINDS.get(t.module_type) in ("conv", None):
        return [["depthwise_to_grouped", None]]
    return []


def fitting_layouts(src: tuple[int, ...], spec: list, t: TargetInfo, *, flatten: list[int] | None = None) -> tuple[list, list]:
    """(specs, effect keys): every distinct known layout that turns a ``src``-shaped source into ``t.shape``.

    A leading ``index 0`` of ``spec`` on a source whose first axis is 1 (TF1/OpenAI 1×1-conv
    weights ``(1, in, out)``) is kept in front of each layout, as is a flat vector's ``slice``.
    """
    prefix = [s for s in spec if s[0] == "slice"]
    lead = [list(spec[0])] if spec and spec[0][0] == "index" and spec[0][1] == 0 and tuple(src[:1]) == (1,) else []
    flat = bool(prefix) or (len(src) != len(t.shape) and any(s[0] == "reshape" for s in spec))
    specs: list[list] = []
    for src_of, to_torch, _why in _alternatives(t):
        try:
            alt_src = tuple(src_of(t.shape))
        except IndexError:
            continue
        if flat:
            specs.append(prefix + [["reshape", list(alt_src)]] + [list(x) for x in to_torch])
        elif alt_src == tuple(src):
            specs.append([list(x) for x in to_torch])
        elif lead and alt_src == tuple(src[1:]):
            specs.append(lead + [list(x) for x in to_torch])
    if not flat:
        specs += [d for d in [_depthwise_alt(tuple(src), t)] if d]
    if flatten:
        specs = [c + [["flatten_nhwc_to_nchw", list(flatten)]] for c in specs] + specs
    fitting, keys = [], []
    for c in specs:
        try:
            if T.apply_shape(src, c) != tuple(t.shape):
                continue
        except T.TransformError:
            continue
        k = _effect_key(src, c)
        if k not in keys:
            fitting.append(c)
            keys.append(k)
    return fitting, keys


def refit(src: tuple[int, ...], spec: list, t: TargetInfo, *, alternatives: bool = True) -> list | None:
    """``spec`` when it gives the target's shape, else (with ``alternatives``) the first known layout of
    the target that does (a preset's guess is by leaf name alone; the target module settles it), else None."""
    try:
        if T.apply_shape(src, spec) == tuple(t.shape):
            return spec
    except T.TransformError:
        pass
    if not alternatives:
        return None
    fitting, _ = fitting_layouts(src, spec, t)
    return fitting[0] if fitting else None


def layout_candidates(src_shapes: list[tuple[int, ...]], spec: list, t: TargetInfo, *, flatten: list[int] | None = None,
                      prefer_flatten: bool = False) -> tuple[list, list]:
    """(chosen spec, candidates): every known layout that turns the source into ``t.shape``.

    ``candidates`` is empty when only one layout fits (or the chosen spec is not one of the
    known layouts, e.g. a preset's gate reordering, which the shapes cannot contradict).
    """
    src = src_shapes[0]
    fitting, keys = fitting_layouts(src, spec, t, flatten=flatten)
    mine = _effect_key(src, spec) if fitting else None
    if mine not in keys:
        return spec, []
    chosen = fitting[keys.index(mine)]
    if flatten and prefer_flatten and not any(s[0] == "flatten_nhwc_to_nchw" for s in chosen):
        with_flat = chosen + [["flatten_nhwc_to_nchw", list(flatten)]]
        wk = _effect_key(src, with_flat)
        if wk in keys:
            chosen, mine = fitting[keys.index(wk)], wk
    if len(fitting) < 2:
        return chosen, []
    return chosen, [chosen] + [c for c, k in zip(fitting, keys) if k != mine]


# ---------------------------------------------------------------------------------------------


class _Mapper:
    def __init__(self, records: list[ArrayRecord], targets: list[TargetInfo], spec: MappingSpec):
        self.records = {r.key: r for r in records}
        self.order = [r.key for r in records]
        self.targets = {t.key: t for t in targets}
        self.spec = spec
        self.preset = P.PRESETS[spec.preset]
        self.views: dict[str, P.SourceView] = {r.key: P.view(r.key, r.shape, self.preset) for r in records}
        self.claims: dict[str, _Claim] = {}
        self.used: set[str] = set()
        self.partial: dict[str, int] = {}  # source key → elements consumed by slices
        self.ignored = {k for k in self.order if any(re.fullmatch(p, k) for p in spec.ignore)}
        self.problems: list[Problem] = []
        self.notes: list[str] = []  # why a strategy stopped (shown on missing rows)

    # -- helpers ------------------------------------------------------------------------------
    def free_targets(self) -> list[TargetInfo]:
        return [t for k, t in self.targets.items() if k not in self.claims and t.tied_to is None]

    def free_sources(self) -> list[str]:
        return [k for k in self.order if k not in self.used and k not in self.ignored]

    def claim(self, target: str, c: _Claim) -> None:
        self.claims[target] = c
        self.used.update(c.sources)

    def allowed_missing(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.spec.allow_missing)

    # -- 1. rules -------------------------------------------------------------------------------
    def apply_rules(self) -> None:
        for i, rule in enumerate(self.spec.rules):
            if not self._apply_rule(rule):
                what = rule.source if rule.source is not None else rule.target
                self.problems.append(Problem(
                    f"mapping.rules[{i}]", f"rule {what!r} → {rule.target!r} matched nothing",
                    fix="check the regex against `np2torch inspect SOURCE` and the target keys in `np2torch plan`"))

    def _check_target(self, target: str, where: str) -> bool:
        if target in self.targets:
            return True
        import difflib

        close = difflib.get_close_matches(target, list(self.targets), n=3)
        self.problems.append(Problem(where, f"rule target {target!r} is not a key of the model", expected=f"one of {close or list(self.targets)[:5]}",
                                     actual=target, fix="use a key printed by `np2torch plan`"))
        return False

    def _apply_rule(self, rule: Rule) -> int:
        spec = T.normalize(rule.transform)
        if any(n == "zeros" for n, _ in spec) and rule.source is None:
            n = 0
            for key in self.targets:
                if re.fullmatch(rule.target, key) and key not in self.claims:
                    self.claim(key, _Claim([], spec, "rule", 1.0, zeros=True))
                    n += 1
            return n
        if isinstance(rule.source, list):
            return self._apply_concat_rule(rule, spec)
        n = 0
        for key in self.order:
            m = re.fullmatch(rule.source, key)
            if not m:
                continue
            target = m.expand(rule.target)
            if not self._check_target(target, f"rule {rule.source!r}") or target in self.claims:
                continue
            self.claim(target, _Claim([key], spec, "rule", 1.0))
            n += 1
        return n

    def _apply_concat_rule(self, rule: Rule, spec: list) -> int:
        groups: list[dict[tuple, str]] = []
        for pat in rule.source:
            g: dict[tuple, str] = {}
            for key in self.order:
                m = re.fullmatch(pat, key)
                if m:
                    g[m.groups()] = key
            groups.append(g)
        n = 0
        for gkey, first in groups[0].items():
            keys = [g.get(gkey) for g in groups]
            if any(k is None for k in keys):
                self.problems.append(Problem(first, f"concat rule: not every pattern of {rule.source} has a match for groups {gkey}",
                                             fix="check the patterns"))
                continue
            target = re.fullmatch(rule.source[0], first).expand(rule.target)
            if self._check_target(target, f"rule {rule.source!r}") and target not in self.claims:
                self.claim(target, _Claim(list(keys), spec, "rule", 1.0, concat=rule.concat or 0))
                n += 1
        return n

    # -- 2. names -------------------------------------------------------------------------------
    def match_names(self) -> None:
        free = self.free_sources()
        norm: dict[str, list[str]] = {}
        for k in free:
            for n in (self.views[k].name, *self.views[k].alt_names):
                norm.setdefault(n, []).append(k)
        for t in self.free_targets():
            if t.key in self.records and t.key in free:
                src, how, conf, spec = t.key, "name", 1.0, []
            elif len(set(norm.get(t.key, []))) == 1:
                src = norm[t.key][0]
                how, conf, spec = ("preset-name" if self.preset.name != "none" else "name"), 0.95, self.views[src].transform
            else:
                hits = {k for k in free if k not in self.used and (_suffix_match(self.views[k].name, t.key) or any(
                    _suffix_match(n, t.key) and _names_a_module(t.key) for n in self.views[k].alt_names))}
                if len(hits) != 1:
                    continue
                src = hits.pop()
                how, conf, spec = "name-suffix", 0.85, self.views[src].transform
            if src in self.used:
                continue
            fitted = refit(self.records[src].shape, spec, t)  # the preset guessed by leaf name; the target's kind settles it
            fits = fitted is not None
            spec = fitted if fits else spec
            if not fits and self.records[src].shape == t.shape:
                spec, fits = [], True  # the name is right, the preset's layout guess is not (e.g. a torch-layout source)
            if fits:
                self.claim(t.key, _Claim([src], spec, how, conf))
            elif conf == 1.0:
                # the very same key with another shape is a wrong checkpoint or wrong model kwargs,
                # not a reason to look elsewhere: keep the pair so validate names the mismatch
                self.claim(t.key, _Claim([src], spec, how, conf, note="same key, different shape"))

    # -- 3. structure ---------------------------------------------------------------------------
    def _source_layers(self) -> list[tuple[str, str, dict[str, str]]]:
        """(scope, kind, {source leaf: key}) per layer of the free sources, in model order."""
        groups: dict[str, dict[str, str]] = {}
        for k in self.free_sources():
            v = self.views[k]
            groups.setdefault(v.scope, {})[v.src_leaf] = k
        layers = []
        for group_scope, group in groups.items():
            for scope, leaves in P.split_separable(group_scope, group):
                kind = P.source_layer_kind({leaf: self.records[k].shape for leaf, k in leaves.items()}, scope)
                if kind is not None:
                    layers.append((scope, kind, leaves))
        free = self.free_sources()
        if len(layers) > 1 and free == sorted(free):
            # keys arrive sorted (TF checkpoints, h5): file order says nothing; layer numbers do
            layers.sort(key=lambda x: P.natural_key(x[0]))
        return layers

    def _target_slots(self) -> list[tuple[str, str, str]]:
        """(module, kind, slot suffix) per torch module (RNNs: per layer and direction) with free targets."""
        slots: list[tuple[str, str, str]] = []
        seen: set[tuple[str, str]] = set()
        free = {t.key for t in self.free_targets()}
        for t in self.targets.values():
            kind = P.TORCH_KINDS.get(t.module_type)
            if kind is None or t.key not in free:
                continue
            suffix = ""
            if kind in P.RECURRENT:
                m = re.search(r"(_l\d+(?:_reverse)?)$", t.key)
                if not m:
                    continue
                suffix = m.group(1)
            if (t.module, suffix) not in seen:
                seen.add((t.module, suffix))
                slots.append((t.module, kind, suffix))
        return slots

    def _pair(self, kind: str, leaves: dict[str, str], module: str, suffix: str) -> list[tuple[str, _Claim]] | None:
        prefix = f"{module}." if module else ""
        out: list[tuple[str, _Claim]] = []
        if kind in P.RECURRENT:
            rec = P.RECURRENT[kind]
            for leaf, key in leaves.items():
                outs = rec.leaves.get(leaf)
                if outs is None:
                    return None
                for tleaf, spec, why in outs:
                    out.append((f"{prefix}{tleaf}{suffix}", _Claim([key], [list(s) for s in spec], "structure", 0.8, note=why)))
            for z in rec.zeros:
                out.append((f"{prefix}{z}{suffix}", _Claim([], [["zeros", None]], "structure", 0.8, zeros=True, note=f"{rec.why}: no source; zeros")))
        else:
            roles = P.LEAF_ROLES.get(kind, {})
            for leaf, key in leaves.items():
                tleaf = roles.get(leaf) or ("weight" if leaf.endswith("_embeddings") else None)
                if tleaf is None:
                    return None
                spec = P.layer_leaf_transform(kind, leaf, self.records[key].shape, self.preset)
                out.append((f"{prefix}{tleaf}", _Claim([key], spec, "structure", 0.8)))
        free = {t.key for t in self.free_targets()}
        for target, c in out:
            if target not in free:
                return None
            if c.zeros:
                continue
            # e.g. a Keras 3 depthwise 'kernel'; an RNN's gate layout is the preset's alone
            fitted = refit(self.records[c.sources[0]].shape, c.spec, self.targets[target], alternatives=kind not in P.RECURRENT)
            if fitted is None:
                return None
            c.spec = fitted
        return out

    def match_structure(self) -> None:
        layers = self._source_layers()
        slots = self._target_slots()
        compatible = {"conv": {"conv"}, "conv_transpose": {"conv_transpose"}}
        for kind in dict.fromkeys(k for _, k, _ in layers):
            src = [(s, leaves) for s, k, leaves in layers if k == kind]
            tgt = [(m, suf) for m, k, suf in slots if k in compatible.get(kind, {kind})]
            if kind in P.RECURRENT:
                # Bidirectional: backward_* layers fill the *_reverse slots, whatever the key order
                # (sorted keys put backward_lstm before forward_lstm)
                for backward in (False, True):
                    self._align(kind, [x for x in src if P.is_backward_scope(x[0]) == backward],
                                [x for x in tgt if x[1].endswith("_reverse") == backward])
            else:
                self._align(kind, src, tgt)

    def _align(self, kind: str, src: list[tuple[str, dict[str, str]]], tgt: list[tuple[str, str]]) -> None:
        """Pair source layers with model slots of one kind in order, stopping at the first misfit."""
        for (scope, leaves), (module, suffix) in zip(src, tgt):
            pairs = self._pair(kind, leaves, module, suffix)
            if pairs is None:
                self.notes.append(f"structural alignment of {kind} layers stopped at source layer {scope!r} vs module {module!r}{suffix}")
                if kind == "gru" and "bias" in leaves and len(self.records[leaves["bias"]].shape) == 1:
                    # order/shape matching would load it "successfully" and wrongly: stop here
                    self.problems.append(Problem(
                        leaves["bias"], "a GRU bias of shape (3u,) is Keras' reset_after=False GRU (reset gate applied before the "
                        "recurrent matmul), which torch's nn.GRU cannot express", expected="bias of shape (2, 3u) (reset_after=True)",
                        actual=list(self.records[leaves["bias"]].shape),
                        fix="export the Keras model with GRU(reset_after=True) weights, or port the layer as a custom torch module"))
                break
            for target, c in pairs:
                self.claim(target, c)
                if not c.zeros:
                    self.used.add(c.sources[0])

    # -- 4. order -------------------------------------------------------------------------------
    def match_order(self) -> None:
        sources = self.free_sources()
        targets = self.free_targets()
        si, pos = 0, 0
        for t in targets:
            if si >= len(sources):
                break
            key = sources[si]
            rec = self.records[key]
            layout = self.views[key].transform if pos == 0 else []
            try:
                shaped = T.apply_shape(rec.shape, layout)
            except T.TransformError:
                shaped, layout = rec.shape, []
            if shaped != t.shape and pos == 0 and rec.shape == t.shape:
                shaped, layout = rec.shape, []
            if self.allowed_missing(t.key) and not (pos == 0 and shaped == t.shape):
                continue  # e.g. num_batches_tracked: the source never had it
            if pos == 0 and shaped == t.shape:
                self.claim(t.key, _Claim([key], layout, "order", 0.7))
                si += 1
                continue
            if pos == 0 and rec.numel == t.numel:
                self.claim(t.key, _Claim([key], [["reshape", list(t.shape)]], "order", 0.5,
                                         note=f"reshaped {list(rec.shape)} → {list(t.shape)} by element count"))
                si += 1
                continue
            if len(rec.shape) == 1 and rec.numel - pos >= t.numel and (pos > 0 or rec.numel > t.numel):
                spec = [["slice", [pos, pos + t.numel]], ["reshape", list(t.shape)]]
                self.claims[t.key] = _Claim([key], spec, "slice", 0.5, note=f"elements [{pos}, {pos + t.numel}) of {key}")
                pos += t.numel
                self.partial[key] = pos
                if pos == rec.numel:
                    self.used.add(key)
                    self.partial.pop(key)
                    si, pos = si + 1, 0
                continue
            # the sequences no longer line up: stop here rather than shift everything after
            self.notes.append(f"order alignment stopped at target {t.key} {list(t.shape)} vs source {key} {list(rec.shape)} "
                              f"(elements left in it: {rec.numel - pos})")
            break

    # -- 5. shape -------------------------------------------------------------------------------
    def match_shapes(self) -> None:
        by_shape: dict[tuple, list[str]] = {}
        for k in self.free_sources():
            try:
                shaped = T.apply_shape(self.records[k].shape, self.views[k].transform)
            except T.TransformError:
                shaped = self.records[k].shape
            by_shape.setdefault(shaped, []).append(k)
        tgt_by_shape: dict[tuple, list[TargetInfo]] = {}
        for t in self.free_targets():
            tgt_by_shape.setdefault(t.shape, []).append(t)
        for shape, ts in tgt_by_shape.items():
            ss = by_shape.get(shape, [])
            if len(ts) == 1 and len(ss) == 1:
                self.claim(ts[0].key, _Claim([ss[0]], self.views[ss[0]].transform, "shape", 0.6))

    # -- layouts --------------------------------------------------------------------------------
    def question_layouts(self, flatten: dict[str, list[int]]) -> None:
        """List the candidate layouts of every claim the shapes cannot pin down."""
        for key, c in self.claims.items():
            if c.zeros or c.concat is not None or c.how == "rule":
                continue  # a rule is the user's statement of the layout; fused sources are rule-made
            t = self.targets[key]
            fl = flatten.get(t.module) if t.key.endswith("weight") and len(t.shape) == 2 else None
            chosen, cands = layout_candidates([self.records[s].shape for s in c.sources], c.spec, t, flatten=fl,
                                              prefer_flatten=self.preset.channels_last)
            c.spec, c.candidates = chosen, cands
            if cands:
                c.confidence = min(c.confidence, AMBIGUOUS_CONFIDENCE)

    # -- rows -----------------------------------------------------------------------------------
    def rows(self, convert_dtype: str) -> list[dict[str, Any]]:
        rows = []
        for key, t in self.targets.items():
            if t.tied_to is not None and key not in self.claims:
                rows.append(new_row(target_key=key, status="mapped", how="tied", tied_to=t.tied_to, target_shape=list(t.shape),
                                    target_dtype=target_dtype_for(t, None, convert_dtype), numel=t.numel, confidence=1.0,
                                    note=f"shares storage with {t.tied_to}; loaded from it"))
                continue
            c = self.claims.get(key)
            if c is None:
                status = "allowed_missing" if self.allowed_missing(key) else "missing"
                note = "; ".join(self.notes) if status == "missing" else "keeps the model's initial value"
                rows.append(new_row(target_key=key, status=status, target_shape=list(t.shape), result_shape=list(t.shape),
                                    target_dtype=target_dtype_for(t, None, convert_dtype), numel=t.numel, note=note, confidence=0.0))
                continue
            rows.append(self._claim_row(t, c, convert_dtype))
        for k in self.order:
            if k in self.used:
                continue
            rec = self.records[k]
            status = "ignored" if k in self.ignored else "unused"
            note = f"{rec.numel - self.partial[k]} trailing elements never sliced" if k in self.partial else ""
            rows.append(new_row(source_key=k, status=status, source_shape=list(rec.shape), source_dtype=rec.dtype,
                                numel=rec.numel, fingerprint=rec.fingerprint, note=note, sources=[k],
                                n_nonfinite=rec.n_nonfinite, absmax=rec.absmax, absmin_nonzero=rec.absmin_nonzero))
        return rows

    def _claim_row(self, t: TargetInfo, c: _Claim, convert_dtype: str) -> dict[str, Any]:
        if c.zeros:
            return new_row(target_key=t.key, status="zeros", transform="zeros", transform_spec=c.spec, target_shape=list(t.shape),
                           result_shape=list(t.shape), target_dtype=target_dtype_for(t, None, convert_dtype), numel=t.numel,
                           confidence=c.confidence, how=c.how, note=c.note or "set to zeros by rule")
        recs = [self.records[s] for s in c.sources]
        try:
            if c.concat is not None:
                result = _concat_shape([T.apply_shape(r.shape, c.spec) for r in recs], c.concat)
            else:
                result = T.apply_shape(recs[0].shape, c.spec)
            note = c.note
        except T.TransformError as exc:
            result, note = (), f"transform does not fit: {exc}"
        if c.candidates:
            note = (note + "; " if note else "") + f"{len(c.candidates)} layouts fit the shapes: unverified until a reference output decides"
        src_dtype = recs[0].dtype
        tdt = target_dtype_for(t, src_dtype, convert_dtype)
        out_of_range = [r.n_out_of_range.get(tdt, [0, 0]) for r in recs]
        return new_row(
            target_key=t.key, source_key=" + ".join(c.sources), transform=T.describe(c.spec),
            source_shape=[list(r.shape) for r in recs] if len(recs) > 1 else list(recs[0].shape),
            target_shape=list(t.shape), result_shape=list(result), source_dtype=src_dtype,
            target_dtype=target_dtype_for(t, src_dtype, convert_dtype), numel=t.numel,
            fingerprint=" + ".join(r.fingerprint for r in recs), status="mapped", confidence=c.confidence,
            verified=not c.candidates, candidates=c.candidates, how=c.how, note=note,
            n_nonfinite=sum(r.n_nonfinite for r in recs), absmax=max(r.absmax for r in recs),
            absmin_nonzero=min((r.absmin_nonzero for r in recs if r.absmin_nonzero > 0), default=0.0),
            n_overflow=sum(o for o, _ in out_of_range), n_underflow=sum(u for _, u in out_of_range),
            sources=c.sources, transform_spec=c.spec, concat="" if c.concat is None else c.concat,
        )


def _suffix_match(name: str, key: str) -> bool:
    return name.endswith("." + key) or key.endswith("." + name)


def _names_a_module(key: str) -> bool:
    # a split layer number (dense_3 → dense.3) may only match a key that also names a module:
    # "10.weight" would pair Keras' dense_10 with torch's 10th layer by number alone, and
    # numbering offsets differ between frameworks (dense, dense_1 … vs 0, 1 …)
    return any(not p.isdigit() for p in key.split(".")[:-1])


def _concat_shape(parts: list[tuple[int, ...]], axis: int) -> tuple[int, ...]:
    base = list(parts[0])
    ax = axis % len(base)
    for p in parts[1:]:
        if len(p) != len(base) or any(a != b for i, (a, b) in enumerate(zip(p, base)) if i != ax):
            raise T.TransformError(f"cannot concat shapes {[list(q) for q in parts]} on axis {axis}")
        base[ax] += p[ax]
    return tuple(base)


def infer_manifest(records: list[ArrayRecord], targets: list[TargetInfo], spec: MappingSpec, *, convert_dtype: str = "float32",
                   flatten: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """Build the manifest rows (targets in model order, then unused sources in source order).

    ``flatten`` maps Linear modules that read a channels-first flatten to its ``[C, H, W]``
    (from :func:`np2torch.tasks.evidence.probe_flatten`); without it a registration-order heuristic
    (:func:`flatten_heuristic`) stands in.
    """
    m = _Mapper(records, targets, spec)
    m.apply_rules()
    if m.problems:
        raise MappingError(f"{len(m.problems)} mapping rule problem(s)", key="mapping.rules", problems=m.problems, fix=m.problems[0]["fix"])
    strategy = spec.strategy
    if strategy in ("auto", "name"):
        m.match_names()
    if strategy == "auto":
        m.match_structure()
        if m.problems:
            raise MappingError(m.problems[0]["reason"], key=m.problems[0]["key"], expected=m.problems[0]["expected"],
                               actual=m.problems[0]["actual"], problems=m.problems, fix=m.problems[0]["fix"])
    if strategy in ("auto", "order"):
        m.match_order()
    if strategy in ("auto", "shape"):
        m.match_shapes()
    m.question_layouts(flatten if flatten is not None else flatten_heuristic(targets))
    return m.rows(convert_dtype)
