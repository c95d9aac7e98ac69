"""The mapping stage's matching strategies: separate functions over one small state, in order.

:data:`STRATEGIES` lists them strongest first; each target is taken by the first that claims it
and each function only reads/writes :class:`MapState`:

1. ``rules`` (config ``mapping.rules``, confidence 1);
2. ``names``: exact, preset-normalised, unique suffix (1.0 / 0.95 / 0.85);
   ``families`` (:mod:`np2torch.tasks.align`): only when the sources hold a join (attention per
   head, recurrent cells gate by gate: :mod:`np2torch.tasks.joins`) or a scanned stack, the whole
   model by its names' structure (repeated units, roles, kinds in order);
3. ``structure``: source layers (grouped by scope, kind read from leaves and shapes) aligned with
   the model's modules of the same kind (0.8);
4. ``order``: remaining sources in source order against remaining targets in registration
   order, with the same per-kind layouts as structure (Linear ← transpose, ConvNd ← channels-last
   permute, depthwise ← grouped, LSTM/GRU gate reorder and bias split) and flat vectors sliced
   by ``numel`` (0.5–0.7); PyTorch-only counters (``num_batches_tracked``) are skipped;
5. ``shape``: a shape that occurs exactly once on both sides (0.6).

A preset guesses a leaf's layout by its name alone; where the guess does not give the target's
shape, the target module's known layouts decide (:func:`np2torch.tasks.layouts.refit`: OpenAI
``(1, in, out)`` weights squeezed, then as-is or transposed; a Keras 3 ``kernel`` feeding a
grouped conv is depthwise), except for recurrent layers, whose gate order is the preset's alone.

``mapping.strategy`` picks which run (``auto`` runs all). Pairing ambiguities (interchangeable
layers on parallel branches, :func:`find_pairings`) and layout ambiguities are found after.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from np2torch.tasks import align
from np2torch.tasks import kinds as K
from np2torch.tasks import layouts as L
from np2torch.tasks import presets as P
from np2torch.tasks import transforms as T
from np2torch.tasks.config import MappingSpec, Rule
from np2torch.tasks.errors import Problem
from np2torch.tasks.model import TargetInfo
from np2torch.tasks.readers import ArrayRecord, natural_key

__all__ = ["Claim", "MapState", "STRATEGIES", "Strategy", "is_counter", "find_pairings", "COUNTER_REASON"]

# PyTorch bookkeeping no other framework stores: skipped by order/shape matching, kept at the
# model's initial value unless a source names it
_COUNTERS = {"num_batches_tracked"}
COUNTER_REASON = "PyTorch-only counter (BatchNorm's batch count): Keras, TF and Flax never store it; keeps the model's initial value"


def is_counter(t: TargetInfo) -> bool:
    """A PyTorch bookkeeping buffer (``num_batches_tracked``) no other framework has."""
    return t.key.rpartition(".")[2] in _COUNTERS and not t.is_float


@dataclass
class Claim:
    sources: list[str]
    spec: list  # normalised transform spec (per source when concat, else for the one source)
    how: str
    confidence: float
    concat: int | None = None
    note: str = ""
    zeros: bool = False
    candidates: list = field(default_factory=list)  # layouts (and pairings) the shapes cannot tell apart
    reshape_candidate: bool = False  # order matching: a reshape by element count competes with the layouts


@dataclass
class MapState:
    """Everything the strategies share: the inputs (read-only) and the claims made so far."""

    records: dict[str, ArrayRecord]
    order: list[str]  # source keys in source order
    targets: dict[str, TargetInfo]
    spec: MappingSpec
    preset: P.Preset
    views: dict[str, P.SourceView]
    ignored: set[str]
    claims: dict[str, Claim] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    partial: dict[str, int] = field(default_factory=dict)  # source key → elements consumed by slices
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why a strategy stopped (shown on missing rows)

    @classmethod
    def new(cls, records: list[ArrayRecord], targets: list[TargetInfo], spec: MappingSpec) -> MapState:
        preset = P.PRESETS[spec.preset]
        order = [r.key for r in records]
        return cls(records={r.key: r for r in records}, order=order, targets={t.key: t for t in targets}, spec=spec, preset=preset,
                   views={r.key: P.view(r.key, r.shape, preset) for r in records},
                   ignored={k for k in order if any(re.fullmatch(p, k) for p in spec.ignore)})

    def free_targets(self) -> list[TargetInfo]:
        return [t for k, t in self.targets.items() if k not in self.claims and t.tied_to is None]

    def free_sources(self) -> list[str]:
        return [k for k in self.order if k not in self.used and k not in self.ignored]

    def claim(self, target: str, c: Claim) -> None:
        self.claims[target] = c
        self.used.update(c.sources)

    def allowed_missing(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.spec.allow_missing)


# ---------------------------------------------------------------------------------------------
# 1. rules


def _check_target(st: MapState, target: str, where: str) -> bool:
    if target in st.targets:
        return True
    import difflib

    close = difflib.get_close_matches(target, list(st.targets), n=3)
    st.problems.append(Problem(where, f"rule target {target!r} is not a key of the model",
                               expected=f"one of {close or list(st.targets)[:5]}", actual=target,
                               fix="use a key printed by `np2torch plan`"))
    return False


def _apply_rule(st: MapState, rule: Rule) -> int:
    spec = T.normalize(rule.transform)
    if any(n == "zeros" for n, _ in spec) and rule.source is None:
        hits = [k for k in st.targets if re.fullmatch(rule.target, k) and k not in st.claims]
        for key in hits:
            st.claim(key, Claim([], spec, "rule", 1.0, zeros=True))
        return len(hits)
    if isinstance(rule.source, list):
        return _apply_concat_rule(st, rule, spec)
    n = 0
    for key in st.order:
        m = re.fullmatch(rule.source, key)
        if not m:
            continue
        target = m.expand(rule.target)
        if not _check_target(st, target, f"rule {rule.source!r}") or target in st.claims:
            continue
        st.claim(target, Claim([key], spec, "rule", 1.0))
        n += 1
    return n


def _apply_concat_rule(st: MapState, rule: Rule, spec: list) -> int:
    groups: list[dict[tuple, str]] = []
    for pat in rule.source:
        g: dict[tuple, str] = {}
        for key in st.order:
            m = re.fullmatch(pat, key)
            if m:
                g[m.groups()] = key
        groups.append(g)
    n = 0
    for gkey, first in groups[0].items():
        keys = [g.get(gkey) for g in groups]
        if any(k is None for k in keys):
            st.problems.append(Problem(first, f"concat rule: not every pattern of {rule.source} has a match for groups {gkey}",
                                       fix="check the patterns"))
            continue
        target = re.fullmatch(rule.source[0], first).expand(rule.target)
        if _check_target(st, target, f"rule {rule.source!r}") and target not in st.claims:
            st.claim(target, Claim(list(keys), spec, "rule", 1.0, concat=rule.concat or 0))
            n += 1
    return n


def match_rules(st: MapState) -> None:
    for i, rule in enumerate(st.spec.rules):
        if not _apply_rule(st, rule):
            what = rule.source if rule.source is not None else rule.target
            st.problems.append(Problem(
                f"mapping.rules[{i}]", f"rule {what!r} → {rule.target!r} matched nothing",
                fix="check the regex against `np2torch inspect SOURCE` and the target keys in `np2torch plan`"))


# ---------------------------------------------------------------------------------------------
# 2. names


def _suffix_match(name: str, key: str) -> bool:
    return name.endswith("." + key) or key.endswith("." + name)


def _names_a_module(key: str) -> bool:
    # a split layer number (dense_3 → dense.3) may only match a key that also names a module:
    # "10.weight" would pair Keras' dense_10 with torch's 10th layer by number alone, and
    # numbering offsets differ between frameworks (dense, dense_1 … vs 0, 1 …)
    return any(not p.isdigit() for p in key.split(".")[:-1])


def _name_source(st: MapState, t: TargetInfo, free: list[str], norm: dict[str, list[str]]) -> tuple[str, str, float, list] | None:
    if t.key in st.records and t.key in free:
        return t.key, "name", 1.0, []
    if len(set(norm.get(t.key, []))) == 1:
        src = norm[t.key][0]
        return src, ("preset-name" if st.preset.name != "none" else "name"), 0.95, st.views[src].transform
    hits = {k for k in free if k not in st.used and (_suffix_match(st.views[k].name, t.key) or any(
        _suffix_match(n, t.key) and _names_a_module(t.key) for n in st.views[k].alt_names))}
    if len(hits) != 1:
        return None
    src = hits.pop()
    return src, "name-suffix", 0.85, st.views[src].transform


def match_names(st: MapState) -> None:
    free = st.free_sources()
    norm: dict[str, list[str]] = {}
    for k in free:
        for n in (st.views[k].name, *st.views[k].alt_names):
            norm.setdefault(n, []).append(k)
    for t in st.free_targets():
        found = _name_source(st, t, free, norm)
        if found is None or found[0] in st.used:
            continue
        src, how, conf, spec = found
        fitted = L.refit(st.records[src].shape, spec, t)  # the preset guessed by leaf name; the target's kind settles it
        fits = fitted is not None
        spec = fitted if fits else spec
        if not fits and st.records[src].shape == t.shape:
            spec, fits = [], True  # the name is right, the preset's layout guess is not (e.g. a torch-layout source)
        if fits:
            st.claim(t.key, Claim([src], spec, how, conf))
        elif conf == 1.0:
            # the very same key with another shape is a wrong checkpoint or wrong model kwargs,
            # not a reason to look elsewhere: keep the pair so validate names the mismatch
            st.claim(t.key, Claim([src], spec, how, conf, note="same key, different shape"))


# ---------------------------------------------------------------------------------------------
# 3. structure


def _source_layers(st: MapState) -> list[tuple[str, str, dict[str, str]]]:
    """(scope, kind, {source leaf: key}) per layer of the free sources, in model order."""
    groups: dict[str, dict[str, str]] = {}
    free = st.free_sources()
    for k in free:
        v = st.views[k]
        groups.setdefault(v.scope, {})[v.src_leaf] = k
    for scope, group in groups.items():
        if scope and group and all(leaf.isdigit() for leaf in group):  # Keras 3 .weights.h5: layers/<name>/vars/<i>
            keys = [group[leaf] for leaf in sorted(group, key=int)]
            names = P.name_numbered_vars(scope, [st.records[k].shape for k in keys])
            if names:
                groups[scope] = dict(zip(names, keys))
    layers = []
    for group_scope, group in groups.items():
        for scope, leaves in K.split_layer(group_scope, group):
            kind = K.source_kind({leaf: st.records[k].shape for leaf, k in leaves.items()}, scope)
            if kind is not None:
                layers.append((scope, kind, leaves))
    if len(layers) > 1 and free == sorted(free):
        # keys arrive sorted (TF checkpoints, h5): file order says nothing; layer numbers do
        layers.sort(key=lambda x: natural_key(x[0]))
    elif len(layers) > 1:
        # file order is only mostly right (Keras 3 .weights.h5: where h5 allocated the data): names correct it
        layers = [layers[i] for i in align.order_by_names([s for s, _, _ in layers])]
    return layers


def _target_slots(st: MapState) -> list[tuple[str, str, str]]:
    """(module, kind, slot suffix) per torch module (RNNs: per layer and direction) with free targets."""
    slots: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    free = {t.key for t in st.free_targets()}
    for t in st.targets.values():
        kind = K.module_kind(t.module_type)
        if kind is None or t.key not in free:
            continue
        suffix = _slot_suffix(kind, t.key)
        if suffix is None:
            continue
        if (t.module, suffix) not in seen:
            seen.add((t.module, suffix))
            slots.append((t.module, kind, suffix))
    return slots


def _slot_suffix(kind: str, key: str) -> str | None:
    if K.recurrent(kind) is None:
        return ""
    m = re.search(r"(_l\d+(?:_reverse)?)$", key)
    return m.group(1) if m else None


def _layer_claims(st: MapState, kind: str, leaves: dict[str, str], module: str, suffix: str, how: str = "structure",
                  confidence: float = 0.8) -> list[tuple[str, Claim]] | None:
    """Claims filling one module (slot) from one source layer, or ``None`` when anything misfits."""
    prefix = f"{module}." if module else ""
    out: list[tuple[str, Claim]] = []
    rec = K.recurrent(kind)
    if rec is not None:
        for leaf, key in leaves.items():
            outs = rec.leaves.get(leaf)
            if outs is None:
                return None
            for tleaf, spec, why in outs:
                out.append((f"{prefix}{tleaf}{suffix}", Claim([key], [list(s) for s in spec], how, confidence, note=why)))
        for z in rec.zeros:
            out.append((f"{prefix}{z}{suffix}",
                        Claim([], [["zeros", None]], how, confidence, zeros=True, note=f"{rec.why}: no source; zeros")))
    else:
        for leaf, key in leaves.items():
            tleaf = K.leaf_role(kind, leaf)
            if tleaf is None:
                return None
            spec = _leaf_spec(st, kind, leaf, key, f"{prefix}{tleaf}")
            out.append((f"{prefix}{tleaf}", Claim([key], spec, how, confidence)))
    free = {t.key for t in st.free_targets()}
    for target, c in out:
        if target not in free:
            return None
        if c.zeros:
            continue
        # e.g. OpenAI (1, in, out) weights into a Linear; a recurrent layer's gate layout is the preset's alone
        fitted = L.refit(st.records[c.sources[0]].shape, c.spec, st.targets[target], alternatives=rec is None)
        if fitted is None:
            return None
        c.spec = fitted
    return out


def _leaf_spec(st: MapState, kind: str, leaf: str, key: str, target: str) -> list:
    """The preset's layout for the leaf; when it does not fit, the layout the target module needs
    (Keras 3 names a DepthwiseConv2D kernel plain ``kernel``: a (*S, C, M) kernel feeding a
    grouped conv is depthwise whatever its leaf name)."""
    shape = st.records[key].shape
    spec = P.layer_leaf_transform(kind, leaf, shape, st.preset)
    t = st.targets.get(target)
    if t is None or not st.preset.channels_last:
        return spec
    try:
        if T.apply_shape(shape, spec) == t.shape:
            return spec
    except T.TransformError:
        pass
    alts = [a for a in L.source_layouts(shape, t, spec) if a]
    return alts[0] if alts else spec


def _misfit_problem(st: MapState, kind: str, leaves: dict[str, str]) -> None:
    """A source layer its kind says no torch module can take (Keras GRU reset_after=False): a problem,
    since order/shape matching would otherwise load it "successfully" and wrongly."""
    rec = K.recurrent(kind)
    m = rec.misfit({leaf: st.records[k].shape for leaf, k in leaves.items()}) if rec and rec.misfit else None
    if m is not None:
        key = leaves[m.leaf]
        st.problems.append(Problem(key, m.why, expected=m.expected, actual=list(st.records[key].shape), fix=m.fix))


def _align(st: MapState, kind: str, src: list[tuple[str, dict[str, str]]], tgt: list[tuple[str, str]], how: str = "structure") -> None:
    """Pair source layers with model slots of one kind in order; a layer that fits nowhere in line is
    skipped, not a reason to shift every later one (:func:`np2torch.tasks.align.pair_in_order`)."""
    conf = 0.8 if how == "structure" else 0.7
    fits: dict[tuple[int, int], list | None] = {}

    def claims(i: int, j: int) -> list | None:
        if (i, j) not in fits:
            fits[i, j] = _layer_claims(st, kind, src[i][1], *tgt[j], how=how, confidence=conf)
        return fits[i, j]
    pairs = align.pair_in_order(range(len(src)), range(len(tgt)), lambda i, j: claims(i, j) is not None)
    pairs += align.unique_fits([i for i in range(len(src)) if i not in {a for a, _ in pairs}],
                               [j for j in range(len(tgt)) if j not in {b for _, b in pairs}], lambda i, j: claims(i, j) is not None)
    if len(pairs) < min(len(src), len(tgt)):
        i = min(set(range(len(src))) - {a for a, _ in pairs})
        j = min(set(range(len(tgt))) - {b for _, b in pairs})
        st.notes.append(f"structural alignment of {kind} layers left source layer {src[i][0]!r} unpaired (it fits no free module in line; "
                        f"first free module: {tgt[j][0]!r}{tgt[j][1]})")
        _misfit_problem(st, kind, src[i][1])
    for i, j in pairs:
        for target, c in claims(i, j):
            c.reshape_candidate = how == "order" and not c.zeros
            st.claim(target, c)


def match_structure(st: MapState) -> None:
    _align_by_kind(st, _source_layers(st), "structure")


def _align_by_kind(st: MapState, layers: list[tuple[str, str, dict[str, str]]], how: str) -> None:
    slots = _target_slots(st)
    for kind in dict.fromkeys(k for _, k, _ in layers):
        src = [(s, leaves) for s, k, leaves in layers if k == kind]
        tgt = [(m, suf) for m, k, suf in slots if k == kind]
        if K.recurrent(kind) is not None:
            # Bidirectional: backward_* layers fill the *_reverse slots, whatever the key order
            # (sorted keys put backward_lstm before forward_lstm)
            for backward in (False, True):
                _align(st, kind, [x for x in src if P.is_backward_scope(x[0]) == backward],
                       [x for x in tgt if x[1].endswith("_reverse") == backward], how)
        else:
            _align(st, kind, src, tgt, how)


# ---------------------------------------------------------------------------------------------
# 4. order


def _order_layout(st: MapState, key: str, t: TargetInfo) -> tuple[list, str, bool] | None:
    """(spec, note, unnamed) for a source matched by position: the preset's layout for a named leaf,
    else as-is, else the target kind's layout, else a reshape by element count."""
    rec = st.records[key]
    view = st.views[key].transform
    try:
        if view and T.apply_shape(rec.shape, view) == t.shape:
            return view, "", False
    except T.TransformError:
        pass
    unnamed = not view  # nothing but the position says what this array is
    layouts = L.source_layouts(rec.shape, t, view)  # a named (1, in, out) weight: the squeezed source's layouts too
    if st.preset.channels_last and any(layouts):
        return next(x for x in layouts if x), "", unnamed  # a square kernel from Keras/TF/Flax is still (in, out)
    if rec.shape == t.shape:
        return [], "", unnamed
    if layouts:
        return layouts[0], "", unnamed
    if rec.numel == t.numel:
        return [["reshape", list(t.shape)]], f"reshaped {list(rec.shape)} → {list(t.shape)} by element count", unnamed
    return None


def _order_recurrent(st: MapState, targets: list[TargetInfo], ti: int, sources: list[str], si: int) -> tuple[int, int] | None:
    """A Keras-layout recurrent layer (kernel, recurrent_kernel[, bias]) filling one torch RNN slot."""
    t = targets[ti]
    kind = K.module_kind(t.module_type)
    suffix = _slot_suffix(kind, t.key) if K.recurrent(kind) is not None else None
    if suffix is None or st.records[sources[si]].shape == t.shape:
        return None  # torch layout: per-target order matching fits it
    slot = [x for x in targets[ti:] if x.module == t.module and _slot_suffix(kind, x.key) == suffix]
    if any(x is not targets[ti + i] for i, x in enumerate(slot)):
        return None
    names = ["kernel", "recurrent_kernel"] + (["bias"] if any(".bias_" in x.key for x in slot) else [])
    if si + len(names) > len(sources):
        return None
    leaves = dict(zip(names, sources[si: si + len(names)]))
    pairs = _layer_claims(st, kind, leaves, t.module, suffix, how="order", confidence=0.7)
    if pairs is None or {k for k, _ in pairs} != {x.key for x in slot}:
        return None
    for target, c in pairs:
        c.reshape_candidate = not c.zeros and not st.views[c.sources[0]].transform
        st.claim(target, c)
    return len(slot), len(names)


def _flat_recurrent(st: MapState, targets: list[TargetInfo], ti: int, key: str, pos: int) -> tuple[int, int] | None:
    """A Keras recurrent layer inside a flat vector (channels-last preset): kernel (in, G·u), recurrent
    kernel (u, G·u) and bias ((G·u,), GRU (2, 3u)) sliced in that order, laid out as structure does.
    Returns (targets filled, new position: 0 when the vector is used up)."""
    t, rec = targets[ti], st.records[key]
    kind = K.module_kind(t.module_type)
    r = K.recurrent(kind)
    if r is None or not st.preset.channels_last or len(rec.shape) != 1 or not t.key.startswith(f"{t.module}.weight_ih"):
        return None
    suffix = _slot_suffix(kind, t.key)
    slot = [x for x in targets[ti:] if x.module == t.module and _slot_suffix(kind, x.key) == suffix]
    if suffix is None or any(x is not targets[ti + i] for i, x in enumerate(slot)):
        return None
    shapes = r.source_shapes(t.shape[1], st.targets[f"{t.module}.weight_hh{suffix}"].shape[1], any(".bias_" in x.key for x in slot))
    need = sum(int(np.prod(v)) for v in shapes.values())
    if rec.numel - pos < need:
        return None
    for leaf, shp in shapes.items():
        n = int(np.prod(shp))
        for tleaf, spec, why in r.leaves[leaf]:
            st.claims[f"{t.module}.{tleaf}{suffix}"] = Claim([key], [["slice", [pos, pos + n]], ["reshape", shp], *[list(x) for x in spec]],
                                                           "slice", 0.5, note=f"elements [{pos}, {pos + n}) of {key}; {why}")
        pos += n
    for z in r.zeros:
        st.claims[f"{t.module}.{z}{suffix}"] = Claim([], [["zeros", None]], "slice", 0.5, zeros=True, note=f"{r.why}: no source; zeros")
    st.partial[key] = pos
    if pos == rec.numel:
        st.used.add(key)
        st.partial.pop(key)
        pos = 0
    return len(slot), pos


def _slice(st: MapState, key: str, t: TargetInfo, pos: int) -> int | None:
    rec = st.records[key]
    if not (len(rec.shape) == 1 and rec.numel - pos >= t.numel and (pos > 0 or rec.numel > t.numel)):
        return None
    spec = [["slice", [pos, pos + t.numel]], ["reshape", list(t.shape)]]
    st.claims[t.key] = Claim([key], spec, "slice", 0.5, note=f"elements [{pos}, {pos + t.numel}) of {key}")
    pos += t.numel
    st.partial[key] = pos
    if pos == rec.numel:
        st.used.add(key)
        st.partial.pop(key)
        return 0
    return pos


def _positional(st: MapState) -> None:
    sources = st.free_sources()
    targets = st.free_targets()
    si, pos, ti = 0, 0, 0
    while ti < len(targets) and si < len(sources):
        t, key = targets[ti], sources[si]
        if is_counter(t):
            # a torch state dict carries the counter (an integer scalar); Keras/TF/Flax never do: skip it
            if pos == 0 and st.records[key].shape == t.shape and st.records[key].dtype.lstrip("<>|=")[:1] in ("i", "u"):
                st.claim(t.key, Claim([key], [], "order", 0.7))
                si += 1
            ti += 1
            continue
        if pos == 0:
            n = _order_recurrent(st, targets, ti, sources, si)
            if n:
                ti, si = ti + n[0], si + n[1]
                continue
            layout = _order_layout(st, key, t)
            if st.allowed_missing(t.key) and not (layout is not None and layout[0] == [] and st.records[key].shape == t.shape):
                ti += 1
                continue  # e.g. an allowed-missing buffer: the source never had it
            if layout is not None and not (len(st.records[key].shape) == 1 and st.records[key].numel > t.numel):
                spec, note, unnamed = layout
                st.claim(t.key, Claim([key], spec, "order", 0.5 if note else 0.7, note=note, reshape_candidate=unnamed))
                ti, si = ti + 1, si + 1
                continue
        flat = _flat_recurrent(st, targets, ti, key, pos)
        new_pos = flat[1] if flat else _slice(st, key, t, pos)
        if flat:
            ti += flat[0] - 1
        if new_pos is not None:
            ti, pos = ti + 1, new_pos
            si += 1 if new_pos == 0 else 0
            continue
        # the sequences no longer line up: stop here rather than shift everything after
        rec = st.records[key]
        st.notes.append(f"order alignment stopped at target {t.key} {list(t.shape)} vs source {key} {list(rec.shape)} "
                        f"(elements left in it: {rec.numel - pos})")
        break


def _parse_layers(shapes: list[tuple[int, ...]], start: int = 0, budget: list[int] | None = None) -> list[list[str]] | None:
    """Split a list of unnamed arrays into layers (leaf names per layer) by the Keras variable patterns.

    Depth-first, longer layers first, at most a few thousand steps: ``None`` when no split covers
    every array (then the arrays stay in plain positional order).
    """
    budget = budget if budget is not None else [4096]
    if start == len(shapes):
        return []
    for n in (4, 3, 2, 1):
        budget[0] -= 1
        if budget[0] < 0 or start + n > len(shapes):
            continue
        names = P.name_numbered_vars("", shapes[start:start + n])
        if names is None or len(names) != n:
            continue
        rest = _parse_layers(shapes, start + n, budget)
        if rest is not None:
            return [names, *rest]
    return None


def _by_layer_kind(st: MapState) -> bool:
    """Unnamed arrays listed by graph depth (Keras: both branches' convs, then both BatchNorms) fill
    the model kind by kind, as structure matching does for named layers."""
    free = st.free_sources()
    if not free or any(st.views[k].transform or not st.views[k].src_leaf.isdigit() for k in free):
        return False
    split = _parse_layers([st.records[k].shape for k in free])
    if split is None:
        return False
    layers, i = [], 0
    for names in split:
        leaves = dict(zip(names, free[i:i + len(names)]))
        i += len(names)
        for scope, part in K.split_layer(f"#{len(layers)}", leaves):
            kind = K.source_kind({leaf: st.records[k].shape for leaf, k in part.items()}, scope)
            if kind is None:
                return False
            layers.append((scope, kind, part))
    _align_by_kind(st, layers, "order")
    return True


def _snapshot(st: MapState) -> tuple:
    return dict(st.claims), set(st.used), dict(st.partial), list(st.notes)


def _restore(st: MapState, snap: tuple) -> None:
    st.claims, st.used, st.partial, st.notes = dict(snap[0]), set(snap[1]), dict(snap[2]), list(snap[3])


def match_order(st: MapState) -> None:
    """Positional alignment; when it stops on unnamed arrays, alignment kind by kind, whichever fills more."""
    before = _snapshot(st)
    _positional(st)
    if len(st.notes) == len(before[3]):
        return  # aligned to the end
    positional = _snapshot(st)
    _restore(st, before)
    if _by_layer_kind(st):
        _positional(st)  # whatever kind-by-kind alignment left (parameters of custom modules)
        if len(st.claims) > len(positional[0]):
            return
    _restore(st, positional)


# ---------------------------------------------------------------------------------------------
# 5. shape


def match_shapes(st: MapState) -> None:
    by_shape: dict[tuple, list[str]] = {}
    for k in st.free_sources():
        try:
            shaped = T.apply_shape(st.records[k].shape, st.views[k].transform)
        except T.TransformError:
            shaped = st.records[k].shape
        by_shape.setdefault(shaped, []).append(k)
    tgt_by_shape: dict[tuple, list[TargetInfo]] = {}
    for t in st.free_targets():
        if not is_counter(t):
            tgt_by_shape.setdefault(t.shape, []).append(t)
    for shape, ts in tgt_by_shape.items():
        ss = by_shape.get(shape, [])
        if len(ts) == 1 and len(ss) == 1:
            st.claim(ts[0].key, Claim([ss[0]], st.views[ss[0]].transform, "shape", 0.6))


# ---------------------------------------------------------------------------------------------
# families (np2torch.tasks.align): joins, scanned stacks, alignment by the names' structure


def match_families(st: MapState) -> None:
    for p in align.propose(st):
        st.claim(p.target, Claim(p.sources, p.spec, p.how, p.confidence, concat=p.concat, note=p.note, zeros=p.zeros,
                                 candidates=p.candidates))


@dataclass(frozen=True)
class Strategy:
    name: str
    run: Callable[[MapState], None]
    under: tuple[str, ...]  # the mapping.strategy values it runs under
    stop_on_problems: bool = False  # a problem here is fatal before weaker strategies guess


STRATEGIES: list[Strategy] = [
    Strategy("rules", match_rules, ("auto", "name", "order", "shape"), stop_on_problems=True),  # rules always apply
    Strategy("names", match_names, ("auto", "name")),
    Strategy("families", match_families, ("auto",)),  # joins and scanned stacks: the whole model by its names' structure
    Strategy("structure", match_structure, ("auto",), stop_on_problems=True),
    Strategy("order", match_order, ("auto", "order")),
    Strategy("shape", match_shapes, ("auto", "shape")),
]


# ---------------------------------------------------------------------------------------------
# pairing ambiguity: interchangeable layers on parallel branches


_BY_POSITION = ("structure", "order", "slice", "shape")  # pairings made by position, not by name
MAX_PAIRINGS = 24  # evidence tries every pairing of a group up to this many (4 layers), then single swaps


def _signature(st: MapState, module: str) -> tuple | None:
    keys = [t for t in st.targets.values() if t.module == module]
    if not keys or any(t.key not in st.claims for t in keys if t.is_float):
        return None
    claims = [st.claims[t.key] for t in keys if t.key in st.claims]
    if any(c.how not in _BY_POSITION or c.concat is not None for c in claims) or not any(c.sources for c in claims):
        return None
    return (keys[0].module_type, tuple((t.key.rpartition(".")[2], t.shape) for t in keys),
            tuple(tuple(st.records[c.sources[0]].shape) if c.sources else () for c in claims))


def find_pairings(st: MapState, graph: Callable[[], Callable[[str, str], bool] | None]) -> list[list[str]]:
    """Groups of modules (≥ 2, in model order) of one kind and shapes, filled by position, on parallel branches.

    Which source layer goes to which of them, only a reference can tell: each row of the group
    lists the group's sources as candidates (``source=…`` first in the layout spec). ``graph()``
    gives ``parallel(a, b)`` (it traces the model, so it is only called when two modules share a
    signature); ``None`` when the model cannot be traced.
    """
    modules = list(dict.fromkeys(t.module for t in st.targets.values() if K.of_module(t.module_type)))
    sigs = {m: s for m in modules if (s := _signature(st, m)) is not None}
    if len(set(sigs.values())) == len(sigs):
        return []
    parallel = graph()
    if parallel is None:
        dup = [m for m in sigs if list(sigs.values()).count(sigs[m]) > 1]
        for key, c in st.claims.items():
            if st.targets[key].module in dup:
                c.note = ((c.note + "; ") if c.note else "") + ("same kind and shapes as another layer, paired by position: "
                                                                "forward could not be traced to tell parallel branches from a sequence")
        return []
    groups: list[list[str]] = []
    for m in sigs:
        for g in groups:
            if sigs[g[0]] == sigs[m] and all(parallel(m, x) for x in g):
                g.append(m)
                break
        else:
            groups.append([m])
    groups = [g for g in groups if len(g) > 1]
    for g in groups:
        _mark_pairing(st, g)
    return groups


def _mark_pairing(st: MapState, group: list[str]) -> None:
    rows = {m: [t.key for t in st.targets.values() if t.module == m and t.key in st.claims and st.claims[t.key].sources] for m in group}
    # each layer's own layouts (its own slice of a flat vector, if any), read before any row is rewritten
    own = {k: [st.claims[k].sources[0], st.claims[k].candidates or [st.claims[k].spec]] for m in group for k in rows[m]}
    for m in group:
        for i, key in enumerate(rows[m]):
            c = st.claims[key]
            options = []
            for other in group:
                src, layouts = own[rows[other][i]]
                options += [[["source", src], *lay] for lay in layouts]
            c.candidates = options
            c.confidence = min(c.confidence, L.AMBIGUOUS_CONFIDENCE)
            c.note = ((c.note + "; ") if c.note else "") + (
                f"pairing ambiguity: {len(group)} interchangeable {st.targets[key].module_type} layers on parallel branches "
                f"({', '.join(group)}); which source layer fills which only a reference output can tell")
