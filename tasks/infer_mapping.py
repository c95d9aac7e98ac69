"""Stage 2, ``infer-mapping``: array table + model + mapping spec → parameter manifest.

The stage's whole computation is :func:`build_manifest` (used by :mod:`np2torch.tasks.stages`
and ``np2torch plan``):

1. the model is built on ``meta`` and its forward pass traced once on the verify input
   (:func:`np2torch.tasks.forward.trace_forward`): which flatten feeds each Linear, and which
   modules run in parallel;
2. the matching strategies run in order (:data:`np2torch.tasks.strategies.STRATEGIES`: rules,
   names, structure, order, shape; each target is taken by the first that claims it);
3. every row's layout is questioned (:func:`np2torch.tasks.layouts.layout_candidates`): when
   more than one known layout gives the target shape (a square kernel, a 1×1 conv with as many
   inputs as outputs, an array matched by position that a reshape by element count would also
   fit, a Linear after a channels-first flatten), the row lists them in ``candidates`` (its own
   choice first), its confidence is capped and it is unverified;
4. interchangeable layers on parallel branches (same kind and shapes, filled by position) are a
   *pairing* ambiguity: their rows list the alternative source layers as candidates;
5. with a reference output, :func:`np2torch.tasks.evidence.resolve` tries the candidates
   (pairings, then layouts) and records each one's error.

Nothing is dropped silently: targets nobody claims are ``missing`` (or ``allowed_missing``,
PyTorch-only counters included, with the reason), sources nobody uses are ``unused`` (or
``ignored``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from np2torch.tasks import transforms as T
from np2torch.tasks.config import MappingSpec
from np2torch.tasks.errors import MappingError, VerifyError
from np2torch.tasks.layouts import AMBIGUOUS_CONFIDENCE, flatten_heuristic, layout_candidates
from np2torch.tasks.manifest import ManifestRow, new_row
from np2torch.tasks.model import TargetInfo
from np2torch.tasks.readers.base import ArrayRecord
from np2torch.tasks.strategies import COUNTER_REASON, STRATEGIES, Claim, MapState, find_pairings, is_counter

__all__ = ["build_manifest", "infer_manifest", "target_dtype_for", "layout_candidates", "flatten_heuristic", "AMBIGUOUS_CONFIDENCE"]


def target_dtype_for(t: TargetInfo, src_dtype: str | None, convert_dtype: str) -> str:
    """Integer/bool buffers keep the model's dtype; float targets take the configured dtype."""
    if not t.is_float:
        return t.dtype
    if convert_dtype == "keep" and src_dtype:
        k = np.dtype(src_dtype)
        return {"f2": "float16", "f4": "float32", "f8": "float64"}.get(f"{k.kind}{k.itemsize}", t.dtype)
    return t.dtype if convert_dtype == "keep" else convert_dtype


def _raise_problems(st: MapState, what: str) -> None:
    p = st.problems[0]
    if what == "rules":
        raise MappingError(f"{len(st.problems)} mapping rule problem(s)", key="mapping.rules", problems=st.problems, fix=p["fix"])
    raise MappingError(p["reason"], key=p["key"], expected=p["expected"], actual=p["actual"], problems=st.problems, fix=p["fix"])


def question_layouts(st: MapState, flatten: dict[str, list[int]]) -> None:
    """List the candidate layouts of every claim the shapes cannot pin down."""
    for key, c in st.claims.items():
        if c.zeros or c.concat is not None or c.how == "rule":
            continue  # a rule is the user's statement of the layout; fused sources are rule-made
        t = st.targets[key]
        fl = flatten.get(t.module) if t.key.endswith("weight") and len(t.shape) == 2 else None
        chosen, cands = layout_candidates([st.records[s].shape for s in c.sources], c.spec, t, flatten=fl,
                                          prefer_flatten=st.preset.channels_last, reshape=c.reshape_candidate)
        c.spec, c.candidates = chosen, cands
        if cands:
            c.confidence = min(c.confidence, AMBIGUOUS_CONFIDENCE)


def infer_manifest(records: list[ArrayRecord], targets: list[TargetInfo], spec: MappingSpec, *, convert_dtype: str = "float32",
                   flatten: dict[str, list[int]] | None = None, parallel: Callable[[str, str], bool] | None = None,
                   graph: Callable[[], Callable[[str, str], bool] | None] | None = None) -> list[ManifestRow]:
    """Build the manifest rows (targets in model order, then unused sources in source order).

    ``flatten`` maps Linear modules that read a channels-first flatten to its ``[C, H, W]``
    (from :func:`np2torch.tasks.forward.trace_forward`); without it a registration-order
    heuristic (:func:`flatten_heuristic`) stands in. ``parallel(a, b)`` says whether two modules
    run on parallel branches, or ``graph()`` computes it on demand (a trace, only when two
    modules could be interchangeable); with neither, no pairing ambiguity is looked for.
    """
    st = MapState.new(records, targets, spec)
    for strategy in STRATEGIES:
        if spec.strategy not in strategy.under:
            continue
        strategy.run(st)
        if strategy.stop_on_problems and st.problems:
            _raise_problems(st, strategy.name)
    question_layouts(st, flatten if flatten is not None else flatten_heuristic(targets))
    if parallel is not None or graph is not None:
        find_pairings(st, (lambda: parallel) if parallel is not None else graph)
    return _rows(st, convert_dtype)


# ---------------------------------------------------------------------------------------------
# rows


def _rows(st: MapState, convert_dtype: str) -> list[ManifestRow]:
    rows = [_target_row(st, t, convert_dtype) for t in st.targets.values()]
    for k in st.order:
        if k in st.used:
            continue
        rec = st.records[k]
        status = "ignored" if k in st.ignored else "unused"
        note = f"{rec.numel - st.partial[k]} trailing elements never sliced" if k in st.partial else ""
        rows.append(new_row(source_key=k, status=status, source_shape=list(rec.shape), source_dtype=rec.dtype,
                            numel=rec.numel, fingerprint=rec.fingerprint, note=note, sources=[k],
                            n_nonfinite=rec.n_nonfinite, absmax=rec.absmax, absmin_nonzero=rec.absmin_nonzero))
    return rows


def _target_row(st: MapState, t: TargetInfo, convert_dtype: str) -> ManifestRow:
    key = t.key
    if t.tied_to is not None and key not in st.claims:
        return new_row(target_key=key, status="mapped", how="tied", tied_to=t.tied_to, target_shape=list(t.shape),
                       target_dtype=target_dtype_for(t, None, convert_dtype), numel=t.numel, confidence=1.0,
                       note=f"shares storage with {t.tied_to}; loaded from it")
    c = st.claims.get(key)
    if c is None:
        if st.allowed_missing(key):
            status, note = "allowed_missing", "keeps the model's initial value"
        elif is_counter(t):
            status, note = "allowed_missing", COUNTER_REASON
        else:
            status, note = "missing", "; ".join(st.notes)
        return new_row(target_key=key, status=status, target_shape=list(t.shape), result_shape=list(t.shape),
                       target_dtype=target_dtype_for(t, None, convert_dtype), numel=t.numel, note=note, confidence=0.0)
    return _claim_row(st, t, c, convert_dtype)


def _claim_row(st: MapState, t: TargetInfo, c: Claim, convert_dtype: str) -> ManifestRow:
    if c.zeros:
        return new_row(target_key=t.key, status="zeros", transform="zeros", transform_spec=c.spec, target_shape=list(t.shape),
                       result_shape=list(t.shape), target_dtype=target_dtype_for(t, None, convert_dtype), numel=t.numel,
                       confidence=c.confidence, how=c.how, note=c.note or "set to zeros by rule")
    recs = [st.records[s] for s in c.sources]
    try:
        if c.concat is not None:
            result = _concat_shape([T.apply_shape(r.shape, c.spec) for r in recs], c.concat)
        else:
            result = T.apply_shape(recs[0].shape, c.spec)
        note = c.note
    except T.TransformError as exc:
        result, note = (), f"transform does not fit: {exc}"
    if c.candidates:
        what = "pairings/layouts" if any(x and x[0][0] == "source" for x in c.candidates) else "layouts"
        note = (note + "; " if note else "") + f"{len(c.candidates)} {what} fit the shapes: unverified until a reference output decides"
    src_dtype = recs[0].dtype
    tdt = target_dtype_for(t, src_dtype, convert_dtype)
    out_of_range = [r.n_out_of_range.get(tdt, [0, 0]) for r in recs]
    return new_row(
        target_key=t.key, source_key=" + ".join(c.sources), transform=T.describe(c.spec),
        source_shape=[list(r.shape) for r in recs] if len(recs) > 1 else list(recs[0].shape),
        target_shape=list(t.shape), result_shape=list(result), source_dtype=src_dtype,
        target_dtype=tdt, numel=t.numel,
        fingerprint=" + ".join(r.fingerprint for r in recs), status="mapped", confidence=c.confidence,
        verified=not c.candidates, candidates=c.candidates, how=c.how, note=note,
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


# ---------------------------------------------------------------------------------------------
# the stage's entry point


def _spatial(model: Any) -> bool:
    """A flatten that feeds a Linear only exists after spatial layers: skip the meta forward otherwise
    (on meta, decomposed ops like LayerNorm still cost ~0.5 s each for big layers)."""
    return any(k in type(mod).__name__ for mod in model.modules() for k in ("Conv", "Pool", "Upsample"))


def _graph(model: Any, input_spec: Any, trace: Any) -> Callable[[], Callable[[str, str], bool] | None]:
    def parallel() -> Callable[[str, str], bool] | None:
        from np2torch.tasks import forward

        tr = trace or (forward.trace_forward(model, input_spec) if input_spec is not None else None) or forward.graph_upstream(model)
        return tr.parallel if tr is not None else None
    return parallel


def build_manifest(cfg: Any, records: list[ArrayRecord]) -> list[ManifestRow]:
    """Manifest for ``cfg`` from the array table: strategies, layouts, pairings, then evidence for ambiguous rows."""
    from np2torch.tasks import diagnose, evidence, forward
    from np2torch.tasks import model as model_mod

    m = model_mod.build_model(cfg.model.target, cfg.model.kwargs, allow_unsafe_load=cfg.model.allow_unsafe_load)
    targets = model_mod.describe_targets(m)
    trace = forward.trace_forward(m, cfg.verify.input) if cfg.verify.input is not None and _spatial(m) else None
    rows = infer_manifest(records, targets, cfg.mapping, convert_dtype=cfg.convert.dtype,
                          flatten=trace.flatten if trace is not None else None,  # None: the registration-order heuristic
                          graph=_graph(m, cfg.verify.input, trace))
    v = cfg.verify
    if v.input is None or (v.reference_output is None and v.reference_activations is None):
        return rows
    if not any(r.target_key and not r.verified for r in rows):
        return rows
    if any(r.status == "missing" or (r.status == "mapped" and r.how != "tied" and r.result_shape != r.target_shape)
           for r in rows if r.target_key):
        return rows  # validate reports these; evidence needs a complete, well-shaped model
    live = model_mod.build_model(cfg.model.target, cfg.model.kwargs, device="cpu", allow_unsafe_load=cfg.model.allow_unsafe_load)
    inputs, refs, acts = (forward.make_inputs(v.input), forward.load_reference(v.reference_output),
                          forward.load_activations(v.reference_activations))
    try:
        return evidence.resolve(rows, records, model=live, inputs=inputs, refs=refs, activations=acts, rtol=v.rtol, atol=v.atol)
    except (MappingError, VerifyError):  # no layout reproduces the reference: a difference of meaning may (named before any layout advice)
        diagnose.explain(live, inputs, refs, rtol=v.rtol, atol=v.atol, activations=acts, error=MappingError)
        raise
