"""Layout and pairing choice by evidence: the reference output settles what shapes cannot.

Shapes cannot tell a square kernel's orientation, the feature order a Linear sees after a
channels-last Flatten, whether an array matched by position is a kernel to transpose or a
buffer to reshape, nor which of two interchangeable branch layers a source layer belongs to.
A reference output can. For the manifest rows that list candidates, :func:`resolve` loads the
model once (float64, CPU), then tries them cheaply:

0. pairings: for each group of interchangeable layers, every assignment of the group's source
   layers to its modules (all of them up to :data:`~np2torch.tasks.strategies.MAX_PAIRINGS`;
   past it the positional pairing and every swap of two layers, which the evidence says);
1. per layer, when ``verify.reference_activations`` holds that module's output: each candidate
   of the module's rows is scored on the module's own output, in execution order (greedy);
2. the remaining rows together, one *convention* at a time: the framework's layout family first
   (Keras/TF/Flax: Dense kernels transposed, conv kernels channels-last, depthwise regrouped,
   with and without the flatten reorder), then every exact layout label ("transpose"): sources
   are consistent;
3. if no convention reproduces the reference, coordinate descent over the remaining modules
   (two sweeps at most): the cost is a sum over candidates, never a product over rows.

Every ambiguous row then records each candidate's error (with the other rows at their final
choice) in the manifest's ``evidence`` column, pairings included. When no choice reproduces the
reference the mapping stage fails, naming the rows, each candidate's error, the first diverging
layer (when activations are given) and the rule to add; the rows of that first diverging module
come first (:func:`_blame`), ambiguous or not, since they are the ones actually wrong.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from np2torch.tasks import transforms as T
from np2torch.tasks.errors import MappingError, Problem
from np2torch.tasks.forward import Recorder, compare, compare_activation, localise, run_forward
from np2torch.tasks.manifest import ManifestRow
from np2torch.tasks.readers.access import ArrayRecord
from np2torch.tasks.source_tensor import source_tensor
from np2torch.tasks.strategies import MAX_PAIRINGS

__all__ = ["resolve", "MAX_PAIRINGS"]

_MAX_COMBOS_PER_MODULE = 16  # candidates are tried per module; a product over one module's rows stays small


def _source_tensor(row: ManifestRow, records: dict[str, ArrayRecord]) -> np.ndarray:
    """The row's source tensor as the convert stage reads it, as a float64 trial copy."""
    return np.array(source_tensor(row, records), dtype=np.float64)


def _split_source(spec: list) -> tuple[str | None, list]:
    if spec and spec[0][0] == "source":
        return spec[0][1], spec[1:]
    return None, spec


class _Trial:
    """The model in float64 with every row loaded; candidates swapped in place."""

    def __init__(self, rows: list[ManifestRow], records: list[ArrayRecord], model: nn.Module, inputs: list[np.ndarray],
                 refs: list[np.ndarray] | None, activations: dict[str, np.ndarray], rtol: float, atol: float):
        self.recs = {r.key: r for r in records}
        self.model = model.double()
        self.inputs, self.refs, self.acts, self.rtol, self.atol = inputs, refs, activations, rtol, atol
        sd = self.model.state_dict()
        with torch.no_grad():
            for r in rows:
                if r.target_key and r.status in ("mapped", "zeros") and r.how != "tied":
                    v = torch.from_numpy(_source_tensor(r, self.recs))
                    sd[r.target_key].copy_(v.to(sd[r.target_key].dtype))
        self.sd = sd
        self.recorder = Recorder(self.model, set(activations) if activations else set())

    def set(self, row: ManifestRow, spec: list) -> None:
        src, rest = _split_source(spec)
        r = dataclasses.replace(row, transform_spec=rest, sources=row.sources if src is None else [src])
        with torch.no_grad():
            self.sd[row.target_key].copy_(torch.from_numpy(_source_tensor(r, self.recs)))

    def run(self) -> tuple[float, bool, dict[str, np.ndarray]]:
        self.recorder.reset()
        outs = run_forward(self.model, self.inputs, torch.device("cpu"))
        if self.refs is None:
            return float("nan"), False, dict(self.recorder.outputs)
        m = compare(outs, self.refs, rtol=self.rtol, atol=self.atol)
        err = m["max_abs_error"] if m["max_abs_error"] is not None and len(outs) == len(self.refs) else float("inf")
        return float(err), bool(m["passed"]), dict(self.recorder.outputs)


@dataclass
class _Search:
    """One resolve: the rows, each ambiguous row's candidates, the current choice, how it was made."""

    rows: list[ManifestRow]
    trial: _Trial
    cands: dict[int, list]  # row index → its candidates (specs; a pairing candidate starts with ["source", key])
    active: dict[int, list[int]]  # row index → candidate indices still in play
    choice: dict[int, int] = field(default_factory=dict)
    method: dict[int, str] = field(default_factory=dict)
    pairings: dict[int, dict[str, Any]] = field(default_factory=dict)  # row index → {"errors": {pairing: error}, "bound": text}

    def module_of(self, i: int) -> str:
        return self.rows[i].target_key.rpartition(".")[0]

    def apply(self, idx: list[int], combo: tuple[int, ...]) -> None:
        for i, c in zip(idx, combo):
            self.choice[i] = c
            self.trial.set(self.rows[i], self.cands[i][c])

    def combos(self, idx: list[int]) -> list[tuple[int, ...]]:
        return list(itertools.islice(itertools.product(*[self.active[i] for i in idx]), _MAX_COMBOS_PER_MODULE))

    def activation_error(self, mods: list[str], outs: dict[str, np.ndarray]) -> float:
        acts = self.trial.acts
        return sum(compare_activation(outs[m], acts[m]) if m in outs else float("inf") for m in mods if m in acts)


# ---------------------------------------------------------------------------------------------
# 0. pairings


def _block(spec: list) -> str:
    """Which source layer a pairing candidate reads: its source, and its slice of a flat vector."""
    src, rest = _split_source(spec)
    return f"{src}[{rest[0][1][0]}:{rest[0][1][1]}]" if rest and rest[0][0] == "slice" else str(src)


def _pairing_groups(s: _Search) -> dict[tuple[str, ...], list[tuple[int, list[str]]]]:
    """(modules in layer order) → [(row, the group's source layers for this row, in layer order)]."""
    holder = {}
    for i, r in enumerate(s.rows):
        if r.target_key and r.sources:
            holder[_block([["source", r.sources[0]], *r.transform_spec])] = i
    groups: dict[tuple[str, ...], list[tuple[int, list[str]]]] = {}
    for i, cands in s.cands.items():
        blocks = list(dict.fromkeys(_block(c) for c in cands if c and c[0][0] == "source"))
        if len(blocks) < 2 or any(b not in holder for b in blocks):
            continue
        mods = tuple(s.module_of(holder[b]) for b in blocks)
        groups.setdefault(mods, []).append((i, blocks))
    return groups


def pairings_to_try(k: int) -> tuple[list[tuple[int, ...]], str]:
    """Every assignment of k layers up to the bound; past it the positional one and each swap of two."""
    if math.factorial(k) <= MAX_PAIRINGS:
        return list(itertools.permutations(range(k))), ""
    perms = [tuple(range(k))]
    for a, b in itertools.combinations(range(k), 2):
        p = list(range(k))
        p[a], p[b] = b, a
        perms.append(tuple(p))
    return perms, (f"{k} interchangeable layers have {math.factorial(k)} pairings, more than the bound of {MAX_PAIRINGS}: "
                   f"tried the positional pairing and each swap of two layers ({len(perms)} in all)")


def _pick(s: _Search, i: int, src: str) -> int:
    """The candidate of row ``i`` reading ``src`` with the layout the row has now (else the first reading it)."""
    now = T.layout_label(s.cands[i][s.choice[i]])
    hits = [k for k, c in enumerate(s.cands[i]) if c and c[0][0] == "source" and _block(c) == src]
    same = [k for k in hits if T.layout_label(s.cands[i][k]) == now]
    return (same or hits)[0]


_Group = tuple[tuple[str, ...], list[tuple[int, list[str]]]]  # (modules in layer order, [(row, its sources in layer order)])


def _set_pairing(s: _Search, group: _Group, perm: tuple[int, ...]) -> str:
    """Load one pairing of a group; returns its label (``module <- source`` per module)."""
    mods, members = group
    for i, blocks in members:
        s.apply([i], (_pick(s, i, blocks[perm[mods.index(s.module_of(i))]]),))
    return ", ".join(f"{m} <- {members[0][1][perm[p]]}" for p, m in enumerate(mods))


def _score(s: _Search, mods: list[str]) -> tuple[float, bool]:
    err, ok, outs = s.trial.run()
    return (s.activation_error(mods, outs), False) if s.trial.refs is None else (err, ok)


def _search_pairings(s: _Search, groups: list[_Group], choice: list[tuple[int, ...]], which: list[int],
                     options: list[list[tuple[int, ...]]]) -> dict[str, float]:
    """Try every combination of the ``which`` groups' pairings (others fixed at ``choice``); keep the best in ``choice``."""
    errors: dict[str, float] = {}
    best: tuple[float, tuple] | None = None
    mods = [m for g in groups for m in g[0]]
    for combo in itertools.product(*[options[g] for g in which]):
        labels = [_set_pairing(s, groups[g], perm) for g, perm in zip(which, combo)]
        err, _ = _score(s, mods)
        errors["; ".join(labels)] = err
        if best is None or err < best[0]:
            best = (err, combo)
    for g, perm in zip(which, best[1]):
        choice[g] = perm
    return errors


def _resolve_pairings(s: _Search) -> list[int]:
    """All groups' pairings jointly (branches of conv + BN are two groups that must swap together)
    while the product stays within the bound; past it, one group at a time, two sweeps."""
    groups = list(_pairing_groups(s).items())
    if not groups:
        return []
    tried = [pairings_to_try(len(mods)) for mods, _ in groups]
    options = [perms for perms, _ in tried]
    bounds = [b for _, b in tried if b]
    choice = [perms[0] for perms in options]
    if math.prod(len(o) for o in options) <= MAX_PAIRINGS:
        joint = _search_pairings(s, groups, choice, list(range(len(groups))), options)
        errors = {g: joint for g in range(len(groups))}
    else:
        bounds.append(f"{len(groups)} groups of interchangeable layers have {math.prod(len(o) for o in options)} joint pairings, "
                      f"more than the bound of {MAX_PAIRINGS}: each group was tried in turn, the others fixed (two sweeps)")
        errors = {}
        for _sweep in range(2):
            for g in range(len(groups)):
                errors[g] = _search_pairings(s, groups, choice, [g], options)
    for g, group in enumerate(groups):
        _set_pairing(s, group, choice[g])
        for i, _blocks in group[1]:
            src = _block(s.cands[i][s.choice[i]])
            s.active[i] = [k for k, c in enumerate(s.cands[i]) if c and c[0][0] == "source" and _block(c) == src]
            s.method[i] = "reference output (pairing)" if s.trial.refs is not None else "reference activations (pairing)"
            s.pairings[i] = {"errors": errors[g], **({"bound": "; ".join(bounds)} if bounds else {})}
    return [i for _, members in groups for i, _ in members]


# ---------------------------------------------------------------------------------------------
# 1.–3. layouts


def _by_activations(s: _Search, groups: dict[str, list[int]]) -> None:
    acts = s.trial.acts
    for mod, idx in groups.items():
        if mod not in acts:
            continue
        scores = []
        for combo in s.combos(idx):
            s.apply(idx, combo)
            _, _, outs = s.trial.run()
            scores.append((compare_activation(outs[mod], acts[mod]) if mod in outs else float("inf"), combo))
        s.apply(idx, min(scores)[1])
        for i in idx:
            s.method[i] = f"reference activation of {mod}"


def layout_family(spec: list) -> tuple[str, bool]:
    """The framework convention a candidate stands for, whatever the layer kind: ``("channels-last", flatten?)``.

    A Dense kernel's transpose, a conv kernel's ``(*S, I, O)`` permute and a depthwise kernel's
    regrouping are one convention (Keras/TF/Flax), so every row can take it at once.
    """
    steps = [(n, a) for n, a in spec if n not in ("slice", "reshape", "source", "layer")]
    flat = any(n == "flatten_nhwc_to_nchw" for n, _ in steps)
    names = [n for n, _ in steps if n != "flatten_nhwc_to_nchw"]
    if not names:
        return "torch", flat
    first, arg = next((n, a) for n, a in steps if n != "flatten_nhwc_to_nchw")
    if first in ("transpose", "depthwise_to_grouped"):
        return "channels-last", flat
    if first == "permute" and arg:
        n = len(arg)
        if list(arg) == [n - 1, n - 2, *range(n - 2)]:
            return "channels-last", flat
        if list(arg) == [n - 2, n - 1, *range(n - 2)]:
            return "channels-last (*S, O, I)", flat
    return T.layout_label([[n, a] for n, a in steps if n != "flatten_nhwc_to_nchw"]), flat


def _conventions(s: _Search, rest: dict[str, list[int]]) -> list[Any]:
    rows = [i for idx in rest.values() for i in idx]
    fams = list(dict.fromkeys(layout_family(s.cands[i][k])[0] for i in rows for k in s.active[i]))
    labels = list(dict.fromkeys(T.layout_label(s.cands[i][k]) for i in rows for k in s.active[i]))
    return [("family", f, flat) for f in fams for flat in (True, False)] + [("label", lab, None) for lab in labels]


def _convention_pick(s: _Search, i: int, conv: tuple) -> int | None:
    kind, what, flat = conv
    if kind == "label":
        hit = [k for k in s.active[i] if T.layout_label(s.cands[i][k]) == what]
    else:
        fam = {k: layout_family(s.cands[i][k]) for k in s.active[i]}
        hit = [k for k, f in fam.items() if f == (what, flat)] or [k for k, f in fam.items() if f[0] == what]
    return hit[0] if hit else None


def _by_convention(s: _Search, rest: dict[str, list[int]], err: float) -> None:
    """One convention for every remaining row at once: the source framework's layout family (with
    and without the flatten reorder), then each exact layout label."""
    best = (err, dict(s.choice))
    for conv in _conventions(s, rest):
        for idx in rest.values():
            for i in idx:
                k = _convention_pick(s, i, conv)
                if k is not None:
                    s.apply([i], (k,))
        e, ok, _ = s.trial.run()
        if e < best[0]:
            best = (e, dict(s.choice))
        if ok:
            break
    for i, c in best[1].items():
        if s.choice[i] != c:
            s.apply([i], (c,))


def _by_descent(s: _Search, rest: dict[str, list[int]]) -> bool:
    err, passed, _ = s.trial.run()
    for _sweep in range(2):
        if passed:
            break
        for idx in rest.values():
            scores = []
            for combo in s.combos(idx):
                s.apply(idx, combo)
                e, _, _ = s.trial.run()
                scores.append((e, combo))
            s.apply(idx, min(scores)[1])
        err, passed, _ = s.trial.run()
    return passed


def _module_groups(s: _Search, amb: list[int]) -> dict[str, list[int]]:
    """Ambiguous rows by module, modules in execution order."""
    probe = Recorder(s.trial.model, {s.module_of(i) for i in amb})
    try:
        s.trial.run()
    finally:
        probe.close()
    order = {m: k for k, m in enumerate(probe.order)}
    groups: dict[str, list[int]] = {}
    for i in sorted(amb, key=lambda i: (order.get(s.module_of(i), len(order)), i)):
        groups.setdefault(s.module_of(i), []).append(i)
    return groups


# ---------------------------------------------------------------------------------------------
# recording


def _candidate_errors(s: _Search, i: int) -> dict[str, float]:
    errors: dict[str, float] = {}
    mod, keep = s.module_of(i), s.choice[i]
    for c in s.cands[i]:
        s.trial.set(s.rows[i], c)
        e, _, outs = s.trial.run()
        if s.method.get(i, "").startswith("reference activation"):
            e = compare_activation(outs[mod], s.trial.acts[mod]) if mod in outs else float("inf")
        errors[T.describe(c) or "as-is"] = e
    s.trial.set(s.rows[i], s.cands[i][keep])
    return errors


def _record(s: _Search, i: int, passed: bool) -> None:
    chosen = s.cands[i][s.choice[i]]
    r = s.rows[i]
    ev: dict[str, Any] = {"method": s.method.get(i, "reference output"), "chosen": T.describe(chosen) or "as-is",
                          "errors": _candidate_errors(s, i), "reproduces": passed}
    if i in s.pairings:
        ev["pairings"] = s.pairings[i]["errors"]
        if "bound" in s.pairings[i]:
            ev["pairing_bound"] = s.pairings[i]["bound"]
    src, spec = _split_source(chosen)
    if src is not None and r.sources != [src]:
        rec = s.trial.recs[src]
        r.sources, r.source_key, r.fingerprint, r.source_shape = [src], src, rec.fingerprint, list(rec.shape)
        r.n_nonfinite, r.absmax, r.absmin_nonzero = rec.n_nonfinite, rec.absmax, rec.absmin_nonzero
    r.evidence, r.transform_spec, r.transform = ev, spec, T.describe(spec)
    if passed:
        what = "pairings/layouts" if src is not None else "candidates"
        r.verified = True
        r.confidence = max(float(r.confidence), 0.99)
        r.note = f"chosen by {ev['method']} among {len(s.cands[i])} {what}" + (f"; {ev['pairing_bound']}" if "pairing_bound" in ev else "")


def _failure(s: _Search, amb: list[int], inputs: list[np.ndarray], rtol: float, atol: float) -> MappingError:
    where = localise(s.trial.model, inputs, s.trial.acts, rtol=rtol, atol=atol) if s.trial.acts else None
    problems = _blame(s.rows, amb, s.cands, where)
    msg = "the reference output cannot be reproduced with any candidate layout or pairing of the ambiguous rows"
    if where:
        msg += f"; first diverging layer: {where['module']} (max abs error {where['max_abs_error']:.3g})"
    return MappingError(msg, key=problems[0]["key"], problems=problems, fix=problems[0]["fix"])


def resolve(rows: list[ManifestRow], records: list[ArrayRecord], *, model: nn.Module, inputs: list[np.ndarray],
            refs: list[np.ndarray] | None, activations: dict[str, np.ndarray] | None = None, rtol: float = 1e-5,
            atol: float = 1e-6) -> list[ManifestRow]:
    """Choose the candidate (pairing, layout) of every ambiguous row from the reference; record each one's error.

    ``model`` is a freshly built CPU model (its values are overwritten). Returns new rows;
    raises :class:`MappingError` when no choice reproduces the reference.
    """
    activations = activations or {}
    amb = [i for i, r in enumerate(rows) if r.target_key and not r.verified and r.candidates]
    if not amb or (refs is None and not activations):
        return rows
    rows = [dataclasses.replace(r) for r in rows]
    cands = {i: rows[i].candidates for i in amb}
    s = _Search(rows, _Trial(rows, records, model, inputs, refs, activations, rtol, atol), cands,
                active={i: list(range(len(c))) for i, c in cands.items()})
    for i in amb:  # the row's own choice: its candidate 0, or the pairing candidate reading its own source
        own = rows[i].sources
        hit = [k for k, c in enumerate(cands[i]) if (_split_source(c)[0] in (None, *own)) and _split_source(c)[1] == rows[i].transform_spec]
        s.choice[i] = hit[0] if hit else 0
    groups = _module_groups(s, amb)
    rest = {m: idx for m, idx in groups.items() if m not in activations}
    paired: list[int] = []
    for _round in range(2):  # pairings are judged with the layouts as they stand: a second round after layouts improved
        for i in paired:
            s.active[i] = list(range(len(s.cands[i])))
        paired = _resolve_pairings(s)
        _by_activations(s, groups)
        err, passed, _ = s.trial.run()
        if rest and refs is not None and not passed:
            _by_convention(s, rest, err)
            passed = _by_descent(s, rest)
        if passed or not paired or refs is None:
            break
    if paired and refs is not None:  # each pairing's error, measured with the layouts as finally chosen
        for i in paired:
            s.active[i] = list(range(len(s.cands[i])))
        _resolve_pairings(s)
        passed = s.trial.run()[1]
    if refs is None:
        passed = all(compare_activation(o, activations[m]) <= atol + rtol * float(np.abs(activations[m]).max(initial=0.0))
                     for m, o in s.trial.run()[2].items() if m in activations)
    for i in amb:
        _record(s, i, passed)
    s.trial.recorder.close()
    if not passed:
        raise _failure(s, amb, inputs, rtol, atol)
    return rows


def _blame(rows: list[ManifestRow], amb: list[int], cands: dict[int, list], where: dict[str, Any] | None) -> list[Problem]:
    """The failure's problems, the rows actually wrong first: those of the first module whose output
    diverges from the reference activations (ambiguous or not), then the other ambiguous rows."""
    problems = []
    culprits = [i for i, r in enumerate(rows) if where and r.target_key and r.target_key.rpartition(".")[0] == where["module"]]
    for i in culprits:
        r = rows[i]
        err = "" if where["max_abs_error"] is None else f" (max abs error {where['max_abs_error']:.3g})"
        tried = f", every candidate tried ({', '.join(r.evidence['errors'])})" if i in amb else ""
        problems.append(Problem(r.target_key, f"its module {where['module']!r} is the first whose output diverges from the reference "
                                f"activations{err}; loaded from '{r.source_key}' as [{r.transform or 'as-is'}]{tried}",
                                fix=_rule_hint(r, cands.get(i, []))))
    for i in amb:
        if i in culprits:
            continue
        errs = ", ".join(f"[{d}] {e:.3g}" for d, e in rows[i].evidence["errors"].items())
        problems.append(Problem(rows[i].target_key, f"no candidate layout reproduces the reference (max abs error per candidate: {errs})",
                                fix=_rule_hint(rows[i], cands[i])))
    return problems


def _rule_hint(row: ManifestRow, cands: list[list]) -> str:
    flat = [c for c in cands if any(s[0] == "flatten_nhwc_to_nchw" for s in c)]
    src = row.sources[0] if row.sources else row.source_key
    if flat:
        tr = [s[0] if s[1] is None else {s[0]: s[1]} for s in _split_source(flat[0])[1]]
        return (f"{row.target_key} reads a flattened conv output: if the source flattened channels-last, add the rule "
                f"{{source: '{src}', target: '{row.target_key}', transform: {json.dumps(tr)}}}; otherwise check the layers before it")
    return (f"state the layout with a rule for {row.target_key} (source '{src}'), e.g. transform: [transpose] or [], "
            "and check the layers before it (verify.reference_activations localises the first diverging one)")
