"""Stage 2, ``infer-mapping``: array table + model + mapping spec → parameter manifest.

Order of evidence, strongest first (each target is taken by the first that claims it):

1. ``rules`` from the config, in order (confidence 1);
2. names: exact (1.0), then normalised through the preset (``/``→``.``, ``:0``, ``kernel``→
   ``weight``…, 0.95), then a unique suffix match (0.85, e.g. a ``model.`` prefix);
3. ``order``: remaining sources in source order against remaining targets in registration
   order, with the preset's layout transforms; a source larger than the target (a flat vector,
   or one file per layer) is sliced by ``numel`` with every boundary checked (0.5–0.7);
4. ``shape``: a shape that occurs exactly once on both sides (0.6).

Nothing is dropped silently: targets nobody claims are ``missing`` (or ``allowed_missing``),
sources nobody uses are ``unused`` (or ``ignored``); the validate stage turns those into errors.
Rows whose layout the shapes cannot pin down (a square kernel, a flat slice into a matrix)
list the alternatives in ``candidates`` and are marked unverified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks import transforms as T
from tasks.config import MappingSpec, Rule
from tasks.errors import MappingError, Problem
from tasks.load_arrays import ArrayRecord
from tasks.manifest import new_row
from tasks.model import TargetInfo
from tasks.presets import PRESETS, SourceView, view

__all__ = ["infer_manifest", "target_dtype_for"]


@dataclass
class _Claim:
    sources: list[str]
    spec: list  # normalised transform spec (per source when concat, else for the one source)
    how: str
    confidence: float
    concat: int | None = None
    candidates: list | None = None  # alternative transform specs that also fit
    note: str = ""
    zeros: bool = False


def target_dtype_for(t: TargetInfo, src_dtype: str | None, convert_dtype: str) -> str:
    """Integer/bool buffers keep the model's dtype; float targets take the configured dtype."""
    if not t.is_float:
        return t.dtype
    if convert_dtype == "keep" and src_dtype:
        k = np.dtype(src_dtype)
        return {"f2": "float16", "f4": "float32", "f8": "float64"}.get(f"{k.kind}{k.itemsize}", t.dtype)
    return t.dtype if convert_dtype == "keep" else convert_dtype


def _alt_layouts(src_shape: tuple[int, ...], spec: list, target_shape: tuple[int, ...]) -> list[list]:
    """Other transforms that give the same target shape: the orientation shapes cannot reveal."""
    alts: list[list] = []
    plain = [s for s in spec if s[0] not in ("transpose", "permute", "reshape")]
    slicing = [s for s in spec if s[0] == "slice"]
    if len(target_shape) == 2:
        out_, in_ = target_shape
        cands = [slicing + [["reshape", [out_, in_]]], slicing + [["reshape", [in_, out_]], ["transpose", None]]]
        if not slicing and len(src_shape) == 2:
            cands = [[["transpose", None]], []] if src_shape == (in_, out_) and in_ == out_ else []
        for c in cands:
            try:
                if T.apply_shape(src_shape, c) == target_shape and c not in alts:
                    alts.append(c)
            except T.TransformError:
                pass
    del plain
    return alts if len(alts) > 1 else []


class _Mapper:
    def __init__(self, records: list[ArrayRecord], targets: list[TargetInfo], spec: MappingSpec):
        self.records = {r.key: r for r in records}
        self.order = [r.key for r in records]
        self.targets = {t.key: t for t in targets}
        self.spec = spec
        self.preset = PRESETS[spec.preset]
        self.views: dict[str, SourceView] = {r.key: view(r.key, r.shape, self.preset) for r in records}
        self.claims: dict[str, _Claim] = {}
        self.used: set[str] = set()
        self.partial: dict[str, int] = {}  # source key → elements consumed by slices
        self.ignored = {k for k in self.order if any(re.fullmatch(p, k) for p in spec.ignore)}
        self.problems: list[Problem] = []

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
            matched = self._apply_rule(rule)
            if not matched:
                what = rule.source if rule.source is not None else rule.target
                self.problems.append(Problem(
                    f"mapping.rules[{i}]", f"rule {what!r} → {rule.target!r} matched nothing",
                    fix="check the regex against `np2torch inspect SOURCE` and the target keys in `np2torch plan`"))

    def _check_target(self, target: str, where: str) -> bool:
        if target in self.targets:
            return True
        import difflib

        close = difflib.get_close_matches(target, list(self.targets), n=3)
        self.problems.append(Problem(where, f"rule target {target!r} is not a key of the model", expected=f"one of {close or list(self.targets)[:5]}", actual=target,
                                     fix="use a key printed by `np2torch plan`"))
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
            if not self._check_target(target, f"rule {rule.source!r}"):
                continue
            if target in self.claims:
                continue
            self.claims[target] = _Claim([key], spec, "rule", 1.0)
            self.used.add(key)
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
                self.problems.append(Problem(first, f"concat rule: not every pattern of {rule.source} has a match for groups {gkey}", fix="check the patterns"))
                continue
            target = re.fullmatch(rule.source[0], first).expand(rule.target)
            if self._check_target(target, f"rule {rule.source!r}") and target not in self.claims:
                self.claim(target, _Claim(list(keys), spec, "rule", 1.0, concat=rule.concat or 0))
                n += 1
        return n

    # -- 2. names -------------------------------------------------------------------------------
    def match_names(self) -> None:
        free = set(self.free_sources())
        exact = {k: k for k in free}
        norm: dict[str, list[str]] = {}
        for k in free:
            norm.setdefault(self.views[k].name, []).append(k)
        for t in self.free_targets():
            if t.key in exact:
                src, how, conf, spec = t.key, "name", 1.0, []
            elif len(norm.get(t.key, [])) == 1:
                src = norm[t.key][0]
                how, conf, spec = ("preset-name" if self.preset.name != "none" else "name"), 0.95, self.views[src].transform
            else:
                hits = [k for k in free if k not in self.used and
                        (self.views[k].name.endswith("." + t.key) or t.key.endswith("." + self.views[k].name))]
                if len(hits) != 1:
                    continue
                src, how, conf, spec = hits[0], "name-suffix", 0.85, self.views[hits[0]].transform
            if src in self.used:
                continue
            rec = self.records[src]
            alts = _alt_layouts(rec.shape, spec, t.shape)
            self.claim(t.key, _Claim([src], spec, how, conf, candidates=alts or None))

    # -- 3. order -------------------------------------------------------------------------------
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
            if self.allowed_missing(t.key) and not (pos == 0 and shaped == t.shape):
                continue  # e.g. num_batches_tracked: the source never had it
            if pos == 0 and shaped == t.shape:
                alts = _alt_layouts(rec.shape, layout, t.shape)
                self.claim(t.key, _Claim([key], layout, "order", 0.7 if not alts else 0.5, candidates=alts or None))
                si += 1
                continue
            if pos == 0 and rec.numel == t.numel:
                spec = [["reshape", list(t.shape)]]
                self.claim(t.key, _Claim([key], spec, "order", 0.5, candidates=_alt_layouts(rec.shape, [["slice", [0, t.numel]]], t.shape) or None,
                                         note=f"reshaped {list(rec.shape)} → {list(t.shape)} by element count"))
                si += 1
                continue
            if len(rec.shape) == 1 and rec.numel - pos >= t.numel and (pos > 0 or rec.numel > t.numel):
                spec = [["slice", [pos, pos + t.numel]], ["reshape", list(t.shape)]]
                alts = _alt_layouts(rec.shape, [["slice", [pos, pos + t.numel]]], t.shape)
                self.claims[t.key] = _Claim([key], spec, "slice", 0.5, candidates=alts or None,
                                            note=f"elements [{pos}, {pos + t.numel}) of {key}")
                pos += t.numel
                self.partial[key] = pos
                if pos == rec.numel:
                    self.used.add(key)
                    self.partial.pop(key)
                    si, pos = si + 1, 0
                continue
            # the sequences no longer line up: stop here rather than shift everything after
            self.problems_note = (f"order alignment stopped at target {t.key} {list(t.shape)} "
                                  f"vs source {key} {list(rec.shape)} (elements left in it: {rec.numel - pos})")
            break

    # -- 4. shape -------------------------------------------------------------------------------
    def match_shapes(self) -> None:
        srcs = self.free_sources()
        by_shape: dict[tuple, list[str]] = {}
        for k in srcs:
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
                layout = self.views[ss[0]].transform
                alts = _alt_layouts(self.records[ss[0]].shape, layout, shape)
                self.claim(ts[0].key, _Claim([ss[0]], layout, "shape", 0.6, candidates=alts or None))

    # -- rows -----------------------------------------------------------------------------------
    def rows(self, convert_dtype: str) -> list[dict[str, Any]]:
        rows = []
        for key, t in self.targets.items():
            if t.tied_to is not None and key not in self.claims:
                rows.append(new_row(target_key=key, status="mapped", how="tied", tied_to=t.tied_to, target_shape=list(t.shape),
                                    target_dtype=self._row_dtype(t, None, convert_dtype), numel=t.numel, confidence=1.0,
                                    note=f"shares storage with {t.tied_to}; loaded from it"))
                continue
            c = self.claims.get(key)
            if c is None:
                status = "allowed_missing" if self.allowed_missing(key) else "missing"
                note = getattr(self, "problems_note", "") if status == "missing" else "keeps the model's initial value"
                rows.append(new_row(target_key=key, status=status, target_shape=list(t.shape), result_shape=list(t.shape),
                                    target_dtype=self._row_dtype(t, None, convert_dtype), numel=t.numel, note=note, confidence=0.0))
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

    def _row_dtype(self, t: TargetInfo, src_dtype: str | None, convert_dtype: str) -> str:
        return target_dtype_for(t, src_dtype, convert_dtype)

    def _claim_row(self, t: TargetInfo, c: _Claim, convert_dtype: str) -> dict[str, Any]:
        recs = [self.records[s] for s in c.sources]
        if c.zeros:
            return new_row(target_key=t.key, status="zeros", transform="zeros", transform_spec=c.spec, target_shape=list(t.shape),
                           result_shape=list(t.shape), target_dtype=self._row_dtype(t, None, convert_dtype), numel=t.numel,
                           confidence=1.0, how=c.how, note="set to zeros by rule")
        try:
            if c.concat is not None:
                parts = [T.apply_shape(r.shape, c.spec) for r in recs]
                result = _concat_shape(parts, c.concat)
            else:
                result = T.apply_shape(recs[0].shape, c.spec)
            note = c.note
        except T.TransformError as exc:
            result, note = (), f"transform does not fit: {exc}"
        src_dtype = recs[0].dtype
        tdt = self._row_dtype(t, src_dtype, convert_dtype)
        out_of_range = [r.n_out_of_range.get(tdt, [0, 0]) for r in recs]
        cands = [T.describe(a) for a in (c.candidates or [])]
        return new_row(
            target_key=t.key, source_key=" + ".join(c.sources), transform=T.describe(c.spec),
            source_shape=[list(r.shape) for r in recs] if len(recs) > 1 else list(recs[0].shape),
            target_shape=list(t.shape), result_shape=list(result), source_dtype=src_dtype,
            target_dtype=self._row_dtype(t, src_dtype, convert_dtype), numel=t.numel,
            fingerprint=" + ".join(r.fingerprint for r in recs), status="mapped", confidence=c.confidence,
            verified=not cands, candidates=c.candidates or [], how=c.how, note=note,
            n_nonfinite=sum(r.n_nonfinite for r in recs), absmax=max(r.absmax for r in recs),
            absmin_nonzero=min((r.absmin_nonzero for r in recs if r.absmin_nonzero > 0), default=0.0),
            n_overflow=sum(o for o, _ in out_of_range), n_underflow=sum(u for _, u in out_of_range),
            sources=c.sources, transform_spec=c.spec, concat="" if c.concat is None else c.concat,
        )


def _concat_shape(parts: list[tuple[int, ...]], axis: int) -> tuple[int, ...]:
    base = list(parts[0])
    ax = axis % len(base)
    for p in parts[1:]:
        if len(p) != len(base) or any(a != b for i, (a, b) in enumerate(zip(p, base)) if i != ax):
            raise T.TransformError(f"cannot concat shapes {[list(q) for q in parts]} on axis {axis}")
        base[ax] += p[ax]
    return tuple(base)


def infer_manifest(records: list[ArrayRecord], targets: list[TargetInfo], spec: MappingSpec, *, convert_dtype: str = "float32") -> list[dict[str, Any]]:
    """Build the manifest rows (targets in model order, then unused sources in source order)."""
    m = _Mapper(records, targets, spec)
    m.apply_rules()
    if m.problems:
        raise MappingError(f"{len(m.problems)} mapping rule problem(s)", key="mapping.rules", problems=m.problems, fix=m.problems[0]["fix"])
    strategy = spec.strategy
    if strategy in ("auto", "name"):
        m.match_names()
    if strategy in ("auto", "order"):
        m.match_order()
    if strategy in ("auto", "shape"):
        m.match_shapes()
    return m.rows(convert_dtype)
