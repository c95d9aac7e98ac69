"""Alignment by the names' structure and the model's order: families of real checkpoints.

Domain module of the mapping stage (no stage imports; :mod:`np2torch.tasks.strategies` calls
:func:`propose` as its ``families`` strategy). It runs when the free sources hold what no
per-layer strategy can express: a join (:mod:`np2torch.tasks.joins`: attention stored per head,
recurrent cells stored gate by gate) or a scanned stack (``nn.scan`` / big_vision: every block's
parameters on a leading depth axis). Then it aligns the whole remaining model:

1. **source layers** by scope; a scope whose every array shares a leading axis ``D`` (with a
   bias or scale among them, which is 1-D in any unstacked layer) is a scanned stack when the
   model repeats a module ``D`` times: it becomes ``D`` layers, each reading ``layer i``;
   sibling scopes named by roles (query/key/value/out) or gates (ii … ho) become one join layer;
2. **units**: the outermost numbered scope that repeats (``encoderblock_0 … _11``, ``RNN_0``,
   ``LSTMCell_1``) pairs with the model's repeated container of the same length and contents
   (``blocks.0 … 11``, an ``nn.LSTM``'s layers ``_l0, _l1``), unit *i* with unit *i*, never by
   sorted key order (``encoder_norm`` sorts before ``encoderblock_0``);
3. inside a pair of units, and then among the layers outside any unit, **kind by kind in order**
   (source: numbered names read as numbers; model: registration order), with an alignment that
   skips a layer that fits nothing (:func:`pair_in_order`, a longest common subsequence) instead
   of shifting every later one; what is left is paired where exactly one fits each way;
4. loose parameters (``cls``, ``pos_embedding`` → ``cls_token``, ``pos_embed``) by a shape that
   occurs once on both sides.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from np2torch.tasks import joins as J
from np2torch.tasks import kinds as K
from np2torch.tasks import layouts as L
from np2torch.tasks import presets as P
from np2torch.tasks.readers.base import natural_key

__all__ = ["Layer", "Slot", "natural_parts", "order_by_names", "pair_in_order", "propose", "unique_fits"]

A = TypeVar("A")
B = TypeVar("B")

_NUMBERED = re.compile(r"^(.*?)_?(\d+)$")
_PER_LAYER_1D = ("bias", "scale", "gamma", "beta", "mean", "var", "moving_mean", "moving_variance")


def natural_parts(part: str) -> tuple[str, int | None]:
    """``encoderblock_11`` → ``("encoderblock", 11)``; ``encoder_norm`` → ``("encoder_norm", None)``."""
    if part.isdigit():
        return "", int(part)  # a torch ModuleList / Sequential index
    m = _NUMBERED.match(part)
    return (m.group(1), int(m.group(2))) if m and m.group(1) else (part, None)


def pair_in_order(src: Sequence[A], tgt: Sequence[B], fits: Callable[[A, B], bool]) -> list[tuple[int, int]]:
    """Order-keeping pairs (i, j) with the most fitting pairs: a layer out of place is skipped, the rest stay aligned."""
    n, m = len(src), len(tgt)
    fit = [[fits(a, b) for b in tgt] for a in src]
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            best[i][j] = max(best[i + 1][j], best[i][j + 1], best[i + 1][j + 1] + 1 if fit[i][j] else 0)
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if fit[i][j] and best[i][j] == best[i + 1][j + 1] + 1:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif best[i + 1][j] >= best[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def _numbered(name: str) -> tuple[str, int | None]:
    """The family and number a layer name carries: ``block_16_project_BN`` → ``("block", 16)``,
    ``conv2d_12`` → ``("conv2d", 12)``, ``conv2d`` → ``("conv2d", None)`` (Keras' first of a kind)."""
    tokens = name.split("_")
    for i, tok in enumerate(tokens):
        if tok.isdigit() and i:
            return "_".join(tokens[:i]), int(tok)
    return name, None


def order_by_names(names: Sequence[str]) -> list[int]:
    """Positions of layers (given in file order) in an order their names say, whatever the allocation.

    A Keras ``.weights.h5`` stores no layer order; where the data sits is only mostly right. Names
    say more: layers of one numbered family (``block_1 … block_16``, ``conv2d, conv2d_1 …``) run in
    their numbers' order, so the family's members are sorted by number among the positions they
    hold; a layer named after another (``block_3_expand_BN`` after ``block_3_expand``,
    ``bn_Conv1`` after ``Conv1``) comes right after it. Everything else keeps its place.
    """
    leaf = list(names)
    parsed = [_numbered(n) for n in leaf]
    numbers: dict[str, set[int]] = {}
    for fam, idx in parsed:
        if idx is not None:
            numbers.setdefault(fam, set()).add(idx)
    repeated = {f for f, idx in numbers.items() if len(idx) > 1}
    order = list(range(len(names)))
    for fam in repeated:
        held = [i for i in order if parsed[i][0] == fam]
        members = sorted(held, key=lambda i: (-1 if parsed[i][1] is None else parsed[i][1], held.index(i)))
        where = [k for k, i in enumerate(order) if parsed[i][0] == fam]
        for k, i in zip(where, members):
            order[k] = i
    index = {n: i for i, n in enumerate(leaf)}
    for i in list(order):
        base = max((b for b in index if b != leaf[i]
                    and re.fullmatch(rf"{re.escape(b)}_.*[A-Za-z].*|.*[A-Za-z].*_{re.escape(b)}", leaf[i])),
                   key=len, default=None)
        if base is not None and base != leaf[i]:
            order.remove(i)
            order.insert(order.index(index[base]) + 1, i)
    return order


def unique_fits(src: Sequence[A], tgt: Sequence[B], fits: Callable[[A, B], bool]) -> list[tuple[A, B]]:
    """Pairs of what order alignment left: a source that fits exactly one target that only it fits."""
    pairs: list[tuple[A, B]] = []
    left_s, left_t = list(src), list(tgt)
    changed = True
    while changed:
        changed = False
        for a in list(left_s):
            hits = [b for b in left_t if fits(a, b)]
            if len(hits) == 1 and sum(fits(x, hits[0]) for x in left_s) == 1:
                pairs.append((a, hits[0]))
                left_s.remove(a)
                left_t.remove(hits[0])
                changed = True
    return pairs


# ---------------------------------------------------------------------------------------------
# the source side


@dataclass
class Layer:
    path: tuple[str, ...]
    kind: str
    leaves: dict[str, Any]  # plain: {leaf: Src}; join: {role/gate: {leaf: Src}}
    first: int  # position of its first array in the source
    unit: tuple | None = None  # (family, index) of its outermost repeated scope


@dataclass
class Slot:
    module: str
    kind: str
    keys: Any  # plain/rnn: {leaf: target key}; attention: [(roles, {weight/bias: key})]
    order: int
    unit: tuple | None = None


def _scan_prefixes(groups: dict[tuple[str, ...], dict[str, J.Src]], depths: set[int]) -> dict[tuple[str, ...], int]:
    """Outermost scopes whose every array is stacked on a leading axis whose length the model repeats."""
    found: dict[tuple[str, ...], int] = {}
    prefixes = sorted({path[:i] for path in groups for i in range(1, len(path) + 1)}, key=len)
    for pre in prefixes:
        if any(pre[:i] in found for i in range(1, len(pre))):
            continue
        under = [s for path, leaves in groups.items() if path[:len(pre)] == pre for s in leaves.values()]
        leads = {s.shape[0] if len(s.shape) >= 2 else None for s in under}
        names = {leaf for path, leaves in groups.items() if path[:len(pre)] == pre for leaf, s in leaves.items() if len(s.shape) == 2}
        if len(leads) == 1 and (d := leads.pop()) in depths and names & set(_PER_LAYER_1D):
            found[pre] = d
    return found


def _source_layers(st: Any, depths: set[int]) -> tuple[list[Layer], list[J.Src], bool]:
    """(layers, loose arrays, whether a join or a scanned stack was found)."""
    free = st.free_sources()
    pos = {k: i for i, k in enumerate(st.order)}
    groups: dict[tuple[str, ...], dict[str, J.Src]] = {}
    for k in free:
        v = st.views[k]
        shape = tuple(st.records[k].shape)
        groups.setdefault(tuple(v.scope.split(".")) if v.scope else (), {})[v.src_leaf] = J.Src(k, shape, shape)
    scans = _scan_prefixes(groups, depths)
    special = bool(scans)
    for pre, d in scans.items():
        for path in [p for p in groups if p[:len(pre)] == pre]:
            leaves = groups.pop(path)
            for i in range(d):
                new = (*pre[:-1], f"{pre[-1]}_{i}", *path[len(pre):])
                groups[new] = {leaf: J.Src(s.key, s.shape[1:], s.stored, (("layer", i),)) for leaf, s in leaves.items()}
    by_parent: dict[tuple[str, ...], dict[str, dict[str, J.Src]]] = {}
    for path, leaves in groups.items():
        if path:
            by_parent.setdefault(path[:-1], {})[path[-1]] = leaves
    layers: list[Layer] = []
    taken: set[tuple[str, ...]] = set()
    for parent, children in by_parent.items():
        found = J.source_join(children)
        if found is None:
            continue
        kind, parts = found
        used = {(*parent, name) for name, leaves in children.items() if any(leaves is p for p in parts.values())}
        taken |= used
        layers.append(Layer(parent, kind, parts, min(pos[s.key] for p in parts.values() for s in p.values())))
        special = True
    loose: list[J.Src] = []
    for path, leaves in groups.items():
        if path in taken:
            continue
        kind = K.source_kind({leaf: s.shape for leaf, s in leaves.items()}, ".".join(path))
        if kind is None or not _roles(kind) or not path:
            loose += leaves.values()
            continue
        layers.append(Layer(path, kind, leaves, min(pos[s.key] for s in leaves.values())))
    _units(layers, lambda x: x.path)
    return layers, loose, special


def _roles(kind: str | None) -> dict[str, str]:
    """Source leaf → torch leaf of a one-module kind (empty for recurrent kinds and unknown ones)."""
    return K.KINDS[kind].leaf_roles if kind in K.KINDS else {}


def _units(items: list, path_of: Callable[[Any], tuple[str, ...]]) -> None:
    """Each item's unit: the outermost numbered path part whose family (same parent, same stem) repeats."""
    fams: dict[tuple, set[int]] = {}
    parsed = {id(x): [natural_parts(p) for p in path_of(x)] for x in items}
    for x in items:
        parts = path_of(x)
        for i, (stem, idx) in enumerate(parsed[id(x)]):
            if idx is not None:
                fams.setdefault((parts[:i], stem), set()).add(idx)
    for x in items:
        parts = path_of(x)
        for i, (stem, idx) in enumerate(parsed[id(x)]):
            if idx is not None and len(fams[(parts[:i], stem)]) > 1:
                x.unit = ((parts[:i], stem), idx)
                break


# ---------------------------------------------------------------------------------------------
# the model side


def _target_slots(st: Any) -> tuple[list[Slot], list[Any]]:
    """(slots in registration order, loose targets: parameters of modules of no known kind)."""
    free = st.free_targets()
    order = {t.key: i for i, t in enumerate(st.targets.values())}
    by_module: dict[str, list[Any]] = {}
    for t in free:
        by_module.setdefault(t.module, []).append(t)
    slots: list[Slot] = []
    used: set[str] = set()
    # attention: a module whose projections carry role names (or nn.MultiheadAttention's in_proj)
    types = {t.module: t.module_type for t in st.targets.values()}
    dense_children: dict[str, dict[str, dict[str, str]]] = {}
    for mm, ts in by_module.items():
        if K.module_kind(ts[0].module_type) in J.PROJECTION_KINDS:
            parent, _, name = mm.rpartition(".")
            dense_children.setdefault(parent, {})[name] = {t.key.rpartition(".")[2]: t.key for t in ts}
    for m in dict.fromkeys([*dense_children, *(mm for mm in by_module if types.get(mm) == "MultiheadAttention")]):
        children = dict(dense_children.get(m, {}))
        if m in by_module:
            children[""] = {t.key.rpartition(".")[2]: t.key for t in by_module[m]}
        parts = J.attention_parts(m, types.get(m, ""), children)
        if parts is None or any(k in used for _, keys in parts for k in keys.values()):
            continue
        used |= {k for _, keys in parts for k in keys.values()}
        slots.append(Slot(m, "attention", parts, min(order[k] for _, keys in parts for k in keys.values())))
    loose = []
    for m, ts in by_module.items():
        kind = K.module_kind(ts[0].module_type)
        ts = [t for t in ts if t.key not in used and not (t.key.rpartition(".")[2] == "num_batches_tracked" and not t.is_float)]
        if not ts:
            continue
        if K.recurrent(kind) is not None:
            layers: dict[int, dict[str, str]] = {}
            for t in ts:
                mt = re.search(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$", t.key.rpartition(".")[2])
                if mt:
                    layers.setdefault(int(mt.group(2)), {})[mt.group(1)] = t.key
            for n, keys in sorted(layers.items()):
                slots.append(Slot(m, kind, keys, min(order[k] for k in keys.values()), ((m, "#layer"), n) if len(layers) > 1 else None))
        elif _roles(kind):
            slots.append(Slot(m, kind, {t.key.rpartition(".")[2]: t.key for t in ts}, min(order[t.key] for t in ts)))
        elif kind is None:
            loose += ts
    slots.sort(key=lambda s: s.order)
    _units([s for s in slots if s.unit is None], lambda s: tuple(s.module.split(".")))
    return slots, loose


# ---------------------------------------------------------------------------------------------
# one layer into one slot


_COMPAT = {kind: j.target_kind for kind, j in J.JOINS.items()}  # a join layer fills a slot of its target kind


def _plain_claims(st: Any, layer: Layer, slot: Slot) -> list[J.Proposal] | None:
    roles = _roles(layer.kind)
    out = []
    for leaf, src in layer.leaves.items():
        tleaf = roles.get(leaf)
        tkey = slot.keys.get(tleaf) if tleaf else None
        if tkey is None:
            return None
        t = st.targets[tkey]
        spec = src.spec(*P.layer_leaf_transform(layer.kind, leaf, src.shape, st.preset))
        fitted = L.refit(src.stored, spec, t)
        if fitted is None:
            return None
        out.append(J.Proposal(tkey, [src.key], fitted, how="structure"))
    return out if len(out) == len(slot.keys) else None


def _claims(st: Any, layer: Layer, slot: Slot, cache: dict) -> list[J.Proposal] | None:
    key = (id(layer), id(slot))
    if key not in cache:
        if _COMPAT.get(layer.kind, layer.kind) != slot.kind:
            cache[key] = None
        elif layer.kind in J.JOINS:
            cache[key] = J.join_claims(layer.kind, layer.leaves, slot.keys, {k: st.targets[k].shape for k in _slot_keys(slot)})
        else:
            cache[key] = _plain_claims(st, layer, slot)
    return cache[key]


def _slot_keys(slot: Slot) -> list[str]:
    if slot.kind == "attention":
        return [k for _, keys in slot.keys for k in keys.values()]
    return list(slot.keys.values())


# ---------------------------------------------------------------------------------------------
# alignment


@dataclass
class _Run:
    st: Any
    cache: dict = field(default_factory=dict)
    done_layers: set[int] = field(default_factory=set)
    done_slots: set[int] = field(default_factory=set)
    out: list[J.Proposal] = field(default_factory=list)

    def fits(self, layer: Layer, slot: Slot) -> bool:
        return self._claims(layer, slot) is not None

    def _claims(self, layer: Layer, slot: Slot) -> list[J.Proposal] | None:
        return _claims(self.st, layer, slot, self.cache)

    def take(self, layer: Layer, slot: Slot, why: str) -> None:
        for p in self._claims(layer, slot):
            p.note = "; ".join(x for x in (p.note, why) if x)
            self.out.append(p)
        self.done_layers.add(id(layer))
        self.done_slots.add(id(slot))

    def in_order(self, layers: list[Layer], slots: list[Slot], why: str) -> None:
        layers = [x for x in layers if id(x) not in self.done_layers]
        slots = [s for s in slots if id(s) not in self.done_slots]
        for kind in dict.fromkeys(x.kind for x in layers):
            src = [x for x in layers if x.kind == kind]
            tgt = [s for s in slots if s.kind == _COMPAT.get(kind, kind)]
            for i, j in pair_in_order(src, tgt, self.fits):
                self.take(src[i], tgt[j], why)

    def leftovers(self, layers: list[Layer], slots: list[Slot]) -> None:
        ls = [x for x in layers if id(x) not in self.done_layers]
        ss = [s for s in slots if id(s) not in self.done_slots]
        for x, s in unique_fits(ls, ss, self.fits):
            self.take(x, s, f"the only free {s.kind} module that fits {'.'.join(x.path)}")


def _families(items: list, unit_of: Callable[[Any], tuple | None]) -> dict[Any, dict[int, list]]:
    fams: dict[Any, dict[int, list]] = {}
    for x in items:
        u = unit_of(x)
        if u is not None:
            fams.setdefault(u[0], {}).setdefault(u[1], []).append(x)
    return fams


def _signature(members: list, kind_of: Callable[[Any], str]) -> Counter:
    return Counter(kind_of(x) for x in members)


def propose(st: Any) -> list[J.Proposal]:
    """Rows for the free targets when the free sources hold a join or a scanned stack; else none."""
    slots, loose_targets = _target_slots(st)
    tfams = _families(slots, lambda s: s.unit)
    depths = {len(members) for members in tfams.values()}
    layers, loose_sources, special = _source_layers(st, depths)
    if not special:
        return []
    # keys that arrive sorted (npz, h5) say nothing by their position: numbered names read as numbers do
    sorted_source = st.free_sources() == sorted(st.free_sources())
    layers.sort(key=lambda x: tuple(natural_key(p) for p in x.path) if sorted_source else (x.first,))
    run = _Run(st)
    sfams = _families(layers, lambda x: x.unit)
    free_t = dict(tfams)
    for fam, units in sfams.items():
        sig = _signature(units[min(units)], lambda x: _COMPAT.get(x.kind, x.kind))
        match = next((tf for tf, tu in free_t.items() if len(tu) == len(units) and _signature(tu[min(tu)], lambda s: s.kind) == sig), None)
        if match is None:
            continue
        tu = free_t.pop(match)
        for (si, smembers), (ti, tmembers) in zip(sorted(units.items()), sorted(tu.items())):
            run.in_order(smembers, tmembers, f"repeated unit {'/'.join((*fam[0], fam[1]))}_{si} ↔ {tmembers[0].module} #{ti}")
    run.in_order(layers, slots, "")
    run.leftovers(layers, slots)
    for x in layers:
        if x.kind in J.JOINS and id(x) not in run.done_layers:
            st.notes.append(f"{x.kind} layer {'/'.join(x.path)!r} ({J.JOINS[x.kind].why}) fits no free {J.JOINS[x.kind].target_kind} "
                            "module of the model (shapes, or projections without role names)")
    _loose(run, loose_sources, loose_targets)
    return run.out


def _loose(run: _Run, sources: list[J.Src], targets: list[Any]) -> None:
    """Parameters of no layer kind (``cls`` → ``cls_token``): paired where their shape occurs once on both sides."""
    src_shapes = Counter(s.stored for s in sources if not s.prefix)
    tgt_shapes = Counter(tuple(t.shape) for t in targets)
    for t in targets:
        shape = tuple(t.shape)
        if src_shapes[shape] == 1 and tgt_shapes[shape] == 1:
            src = next(s for s in sources if s.stored == shape and not s.prefix)
            run.out.append(J.Proposal(t.key, [src.key], [], how="shape", confidence=0.6,
                                      note="a parameter of no layer kind; its shape occurs once among those left on both sides"))
