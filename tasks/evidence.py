"""Layout choice by evidence, and localisation of the first layer that diverges.

Shapes cannot tell a square kernel's orientation, nor the feature order a Linear sees after a
channels-last Flatten. A reference output can. For the manifest rows that list candidates,
:func:`resolve` loads the model once (float64, CPU), then tries layouts cheaply:

1. per layer, when ``verify.reference_activations`` holds that module's output: each candidate
   of the module's rows is scored on the module's own output, in execution order (greedy; the
   layers before it are already settled);
2. the remaining rows together, one *convention* at a time (every row takes its candidate with
   the same layout label, e.g. "transpose": sources are usually consistent);
3. if no convention reproduces the reference, coordinate descent over the remaining modules
   (two sweeps at most): the cost is a sum over candidates, never a product over rows.

Every ambiguous row then records each candidate's error (with the other rows at their final
choice) in the manifest's ``evidence`` column. When no choice reproduces the reference the
mapping stage fails, naming the rows, each candidate's error, the first diverging layer (when
activations are given) and, for a Linear after a flatten, the rule to add.

:func:`localise` is what the verify stage uses when the final comparison fails.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from np2torch.tasks import transforms as T
from np2torch.tasks.errors import MappingError, Problem, VerifyError
from np2torch.tasks.load_arrays import ArrayRecord

__all__ = ["probe_flatten", "resolve", "localise", "load_activations", "build_manifest", "compare_activation"]

_MAX_COMBOS_PER_MODULE = 16  # candidates are tried per module; a product over one module's rows stays small


# ---------------------------------------------------------------------------------------------
# shape probe: which Linear reads a channels-first flatten


def _input_shapes(spec: Any) -> list[tuple[tuple[int, ...], str]] | None:
    from np2torch.tasks.config import InputSpec

    if isinstance(spec, InputSpec):
        return [(tuple(spec.shape), spec.dtype)]
    if isinstance(spec, (str, Path)) and Path(spec).is_file():
        p = Path(spec)
        try:
            if p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    return [(z[k].shape, str(z[k].dtype)) for k in z.files]
            a = np.load(p, mmap_mode="r", allow_pickle=False)
            return [(a.shape, str(a.dtype))]
        except (ValueError, OSError):
            return None
    return None


def probe_flatten(model: nn.Module, input_spec: Any) -> dict[str, list[int]] | None:
    """``{linear module: [C, H, W]}`` for every Linear fed by a flatten of a ``(N, C, *S)`` activation.

    Runs the model once on the ``meta`` device (no memory, no arithmetic) with hooks on every
    leaf module (its buffers move to ``meta`` too). ``None`` when the model cannot run on meta or
    no input is known.
    """
    shapes = _input_shapes(input_spec)
    if not shapes:
        return None
    trace: list[tuple[str, str, tuple, tuple]] = []  # (module, type, first input shape, output shape)

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple, out: Any) -> None:
            a = args[0] if args and isinstance(args[0], torch.Tensor) else None
            o = out if isinstance(out, torch.Tensor) else None
            trace.append((name, type(mod).__name__, tuple(a.shape) if a is not None else (), tuple(o.shape) if o is not None else ()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    try:
        xs = [torch.empty(s, dtype=getattr(torch, "float32" if d.startswith("float") or d == "bfloat16" else d), device="meta") for s, d in shapes]
        if any(p.device.type != "meta" for p in model.parameters()):
            return None
        model.to("meta")  # the constructor's real buffers (BatchNorm statistics …) join the meta parameters
        with torch.no_grad():
            model(*xs)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    out: dict[str, list[int]] = {}
    for i, (name, typ, ins, _) in enumerate(trace):
        if typ not in ("Linear", "LazyLinear") or len(ins) != 2:
            continue
        for prev in reversed(trace[:i]):
            o = prev[3]
            if len(o) >= 3 and int(np.prod(o[1:])) == ins[1]:
                c, spatial = o[1], o[2:]
                if c > 1 and int(np.prod(spatial)) > 1:
                    out[name] = [c, int(np.prod(spatial[:-1])), spatial[-1]] if len(spatial) > 1 else [c, spatial[0], 1]
                break
            if o != ins:  # something else in between (a Linear, a reshape to another size): not a flatten
                break
    return out


# ---------------------------------------------------------------------------------------------
# activations


def load_activations(path: Path | None) -> dict[str, np.ndarray]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise VerifyError("reference_activations file does not exist", key=str(p), fix="check verify.reference_activations")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        raise VerifyError(f"cannot read reference_activations: {exc}", key=str(p), fix="save it with np.savez(name=array, …)") from None


def compare_activation(out: np.ndarray, ref: np.ndarray) -> float:
    """Max abs error of a module output against a reference in torch or channels-last layout."""
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape and out.ndim >= 3 and ref.shape == (out.shape[0], *out.shape[2:], out.shape[1]):
        ref = np.moveaxis(ref, -1, 1)  # the source framework is channels-last
    if out.shape != ref.shape:
        return float("inf")
    return float(np.abs(out - ref).max(initial=0.0))


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


class _Recorder:
    """Forward hooks recording module outputs (as float64 NumPy) and the execution order."""

    def __init__(self, model: nn.Module, names: set[str] | None):
        self.outputs: dict[str, np.ndarray] = {}
        self.order: list[str] = []
        self.handles = []
        for n, m in model.named_modules():
            if not n or (names is not None and n not in names):
                continue
            self.handles.append(m.register_forward_hook(self._hook(n)))

    def _hook(self, name: str):
        def fn(mod: nn.Module, args: tuple, out: Any) -> None:
            t = _first_tensor(out)
            if name not in self.outputs:
                self.order.append(name)
            if t is not None:
                self.outputs[name] = t.detach().to("cpu", torch.float64).numpy()
        return fn

    def reset(self) -> None:
        self.outputs.clear()
        self.order.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def localise(model: nn.Module, inputs: list[np.ndarray], activations: dict[str, np.ndarray], *, rtol: float, atol: float,
             device: torch.device | None = None) -> dict[str, Any] | None:
    """The first module (in execution order) whose output diverges, or ``None`` when none does.

    With reference activations, a module diverges when its output is outside ``atol + rtol·|ref|``
    of its reference; without them, when its output holds NaN/Inf.
    """
    from np2torch.tasks.verify import run_forward

    rec = _Recorder(model, set(activations) if activations else None)
    try:
        run_forward(model, inputs, device or torch.device("cpu"))
    finally:
        rec.close()
    checked = []
    for name in rec.order:
        out = rec.outputs.get(name)
        if out is None:
            continue
        if activations:
            err = compare_activation(out, activations[name])
            ref = np.asarray(activations[name], dtype=np.float64)
            bound = atol + rtol * float(np.abs(ref).max(initial=0.0))
            checked.append(name)
            if not err <= bound:
                return {"module": name, "max_abs_error": err, "bound": bound, "matched_before": checked[:-1], "by": "reference_activations"}
        elif not np.isfinite(out).all():
            return {"module": name, "max_abs_error": None, "bound": None, "matched_before": [], "by": "non-finite output"}
    return None


# ---------------------------------------------------------------------------------------------
# resolve ambiguous rows


class _Trial:
    """The model in float64 with every row loaded; candidates swapped in place."""

    def __init__(self, rows: list[dict[str, Any]], records: list[ArrayRecord], model: nn.Module, inputs: list[np.ndarray],
                 refs: list[np.ndarray] | None, activations: dict[str, np.ndarray]):
        from np2torch.tasks.convert import source_tensor

        self.source_tensor = source_tensor
        self.recs = {r.key: r for r in records}
        self.model = model.double()
        self.inputs = inputs
        self.refs = refs
        self.acts = activations
        state = {}
        for r in rows:
            if r["target_key"] and r["status"] in ("mapped", "zeros") and r["how"] != "tied":
                state[r["target_key"]] = torch.from_numpy(np.array(source_tensor(r, self.recs), dtype=np.float64))
        sd = self.model.state_dict()
        with torch.no_grad():
            for k, v in state.items():
                sd[k].copy_(v.to(sd[k].dtype) if sd[k].is_floating_point() else v.to(sd[k].dtype))
        self.sd = sd
        self.recorder = _Recorder(self.model, set(activations) if activations else set())

    def set(self, row: dict[str, Any], spec: list) -> None:
        r = {**row, "transform_spec": json.dumps(spec)}
        with torch.no_grad():
            self.sd[row["target_key"]].copy_(torch.from_numpy(np.array(self.source_tensor(r, self.recs), dtype=np.float64)))

    def run(self) -> tuple[float, bool, dict[str, np.ndarray]]:
        from np2torch.tasks.verify import compare, run_forward

        self.recorder.reset()
        outs = run_forward(self.model, self.inputs, torch.device("cpu"))
        if self.refs is None:
            return float("nan"), False, dict(self.recorder.outputs)
        m = compare(outs, self.refs, rtol=self._rtol, atol=self._atol)
        err = m["max_abs_error"] if m["max_abs_error"] is not None and len(outs) == len(self.refs) else float("inf")
        return float(err), bool(m["passed"]), dict(self.recorder.outputs)

    _rtol = 1e-5
    _atol = 1e-6


def _combos(rows: list[dict[str, Any]]) -> list[tuple[int, ...]]:
    sizes = [len(json.loads(r["candidates"])) for r in rows]
    combos = list(itertools.product(*[range(n) for n in sizes]))
    return combos[:_MAX_COMBOS_PER_MODULE]


def resolve(rows: list[dict[str, Any]], records: list[ArrayRecord], *, model: nn.Module, inputs: list[np.ndarray],
            refs: list[np.ndarray] | None, activations: dict[str, np.ndarray] | None = None, rtol: float = 1e-5,
            atol: float = 1e-6) -> list[dict[str, Any]]:
    """Choose the candidate layout of every ambiguous row from the reference; record each candidate's error.

    ``model`` is a freshly built CPU model (its values are overwritten). Returns new rows;
    raises :class:`MappingError` when no choice reproduces the reference.
    """
    activations = activations or {}
    amb = [i for i, r in enumerate(rows) if r["target_key"] and not r["verified"] and json.loads(r["candidates"])]
    if not amb or (refs is None and not activations):
        return rows
    rows = [dict(r) for r in rows]
    trial = _Trial(rows, records, model, inputs, refs, activations)
    trial._rtol, trial._atol = rtol, atol
    cands = {i: json.loads(rows[i]["candidates"]) for i in amb}
    choice = {i: 0 for i in amb}

    def module_of(i: int) -> str:
        return rows[i]["target_key"].rpartition(".")[0]

    # execution order of the modules holding ambiguous rows
    probe = _Recorder(trial.model, {module_of(i) for i in amb})
    try:
        base_err, passed, _ = trial.run()
    finally:
        probe.close()
    order = {m: k for k, m in enumerate(probe.order)}
    groups: dict[str, list[int]] = {}
    for i in sorted(amb, key=lambda i: (order.get(module_of(i), len(order)), i)):
        groups.setdefault(module_of(i), []).append(i)
    method: dict[int, str] = {}

    def apply(idx: list[int], combo: tuple[int, ...]) -> None:
        for i, c in zip(idx, combo):
            choice[i] = c
            trial.set(rows[i], cands[i][c])

    # 1. per layer, on its own reference activation
    for mod, idx in groups.items():
        if mod not in activations:
            continue
        scores = []
        for combo in _combos([rows[i] for i in idx]):
            apply(idx, combo)
            _, _, outs = trial.run()
            scores.append((compare_activation(outs[mod], activations[mod]) if mod in outs else float("inf"), combo))
        apply(idx, min(scores)[1])
        for i in idx:
            method[i] = f"reference activation of {mod}"
    rest = {m: idx for m, idx in groups.items() if m not in activations}
    err, passed, _ = trial.run()
    if rest and refs is not None and not passed:
        # 2. one convention for every remaining row
        labels = list(dict.fromkeys(T.layout_label(c) for m in rest for i in rest[m] for c in cands[i]))
        best = (err, dict(choice))
        for lab in labels:
            for m, idx in rest.items():
                for i in idx:
                    hit = [k for k, c in enumerate(cands[i]) if T.layout_label(c) == lab]
                    if hit:
                        apply([i], (hit[0],))
            e, ok, _ = trial.run()
            if e < best[0]:
                best = (e, dict(choice))
            if ok:
                break
        for i, c in best[1].items():
            if choice[i] != c:
                apply([i], (c,))
        err, passed, _ = trial.run()
        # 3. coordinate descent over modules
        for _sweep in range(2):
            if passed:
                break
            for m, idx in rest.items():
                scores = []
                for combo in _combos([rows[i] for i in idx]):
                    apply(idx, combo)
                    e, _, _ = trial.run()
                    scores.append((e, combo))
                apply(idx, min(scores)[1])
            err, passed, _ = trial.run()
    for m, idx in rest.items():
        for i in idx:
            method[i] = "reference output"
    if refs is None:
        passed = all(compare_activation(o, activations[m]) <= atol + rtol * float(np.abs(activations[m]).max(initial=0.0))
                     for m, o in trial.run()[2].items() if m in activations)

    # errors of every candidate, the other rows at their final choice
    for i in amb:
        errors: dict[str, float] = {}
        mod = module_of(i)
        keep = choice[i]
        for k, c in enumerate(cands[i]):
            trial.set(rows[i], c)
            e, _, outs = trial.run()
            if method[i].startswith("reference activation"):
                e = compare_activation(outs[mod], activations[mod]) if mod in outs else float("inf")
            errors[T.describe(c) or "as-is"] = e
        trial.set(rows[i], cands[i][keep])
        chosen = cands[i][keep]
        r = rows[i]
        r["evidence"] = json.dumps({"method": method[i], "chosen": T.describe(chosen) or "as-is", "errors": errors, "reproduces": passed},
                                   separators=(",", ":"))
        r["transform_spec"] = json.dumps(chosen, separators=(",", ":"))
        r["transform"] = T.describe(chosen)
        if passed:
            r["verified"] = True
            r["confidence"] = max(float(r["confidence"]), 0.99)
            r["note"] = f"layout chosen by {method[i]} among {len(cands[i])} candidates"
    trial.recorder.close()
    if not passed:
        where = localise(trial.model, inputs, activations, rtol=rtol, atol=atol) if activations else None
        problems = _blame(rows, amb, cands, where)
        msg = "the reference output cannot be reproduced with any candidate layout of the ambiguous rows"
        if where:
            msg += f"; first diverging layer: {where['module']} (max abs error {where['max_abs_error']:.3g})"
        raise MappingError(msg, key=problems[0]["key"], problems=problems, fix=problems[0]["fix"])
    return rows


def _blame(rows: list[dict[str, Any]], amb: list[int], cands: dict[int, list], where: dict[str, Any] | None) -> list[Problem]:
    """The failure's problems, the rows actually wrong first: those of the first module whose output
    diverges from the reference activations (ambiguous or not), then the other ambiguous rows."""
    problems = []
    culprits = [i for i, r in enumerate(rows) if where and r["target_key"] and r["target_key"].rpartition(".")[0] == where["module"]]
    for i in culprits:
        err = "" if where["max_abs_error"] is None else f" (max abs error {where['max_abs_error']:.3g})"
        problems.append(Problem(rows[i]["target_key"], f"its module {where['module']!r} is the first whose output diverges from the reference "
                                f"activations{err}; loaded from '{rows[i]['source_key']}' as [{rows[i]['transform'] or 'as-is'}]"
                                + (f", every candidate layout tried ({', '.join(json.loads(rows[i]['evidence'])['errors'])})" if i in amb else ""),
                                fix=_rule_hint(rows[i], cands.get(i, []))))
    for i in amb:
        if i in culprits:
            continue
        ev = json.loads(rows[i]["evidence"])
        errs = ", ".join(f"[{d}] {e:.3g}" for d, e in ev["errors"].items())
        problems.append(Problem(rows[i]["target_key"], f"no candidate layout reproduces the reference (max abs error per candidate: {errs})",
                                fix=_rule_hint(rows[i], cands[i])))
    return problems


def _rule_hint(row: dict[str, Any], cands: list[list]) -> str:
    flat = [c for c in cands if any(s[0] == "flatten_nhwc_to_nchw" for s in c)]
    src = json.loads(row["sources"])
    src = src[0] if src else row["source_key"]
    if flat:
        tr = [s[0] if s[1] is None else {s[0]: s[1]} for s in flat[0]]
        return (f"{row['target_key']} reads a flattened conv output: if the source flattened channels-last, add the rule "
                f"{{source: '{src}', target: '{row['target_key']}', transform: {json.dumps(tr)}}}; otherwise check the layers before it")
    return (f"state the layout with a rule for {row['target_key']} (source '{src}'), e.g. transform: [transpose] or [], "
            "and check the layers before it (verify.reference_activations localises the first diverging one)")


# ---------------------------------------------------------------------------------------------
# the mapping stage's whole computation (used by tasks.stages and `np2torch plan`)


def build_manifest(cfg: Any, records: list[ArrayRecord]) -> list[dict[str, Any]]:
    """Manifest for ``cfg`` from the array table: names/structure/order, then evidence for ambiguous rows."""
    from np2torch.tasks import infer_mapping, model as model_mod
    from np2torch.tasks.verify import load_reference, make_inputs

    m = model_mod.build_model(cfg.model.target, cfg.model.kwargs, allow_unsafe_load=cfg.model.allow_unsafe_load)
    targets = model_mod.describe_targets(m)
    # a flatten that feeds a Linear only exists after spatial layers; skip the meta forward
    # otherwise (on meta, decomposed ops like LayerNorm still cost ~0.5 s each for big layers)
    spatial = any(k in type(mod).__name__ for mod in m.modules() for k in ("Conv", "Pool", "Upsample"))
    flatten = probe_flatten(m, cfg.verify.input) if cfg.verify.input is not None and spatial else None
    rows = infer_mapping.infer_manifest(records, targets, cfg.mapping, convert_dtype=cfg.convert.dtype, flatten=flatten)
    v = cfg.verify
    if v.input is None or (v.reference_output is None and v.reference_activations is None):
        return rows
    if not any(r["target_key"] and not r["verified"] for r in rows):
        return rows
    if any(r["status"] == "missing" or (r["status"] == "mapped" and r["how"] != "tied" and r["result_shape"] != r["target_shape"])
           for r in rows if r["target_key"]):
        return rows  # validate reports these; evidence needs a complete, well-shaped model
    live = model_mod.build_model(cfg.model.target, cfg.model.kwargs, device="cpu", allow_unsafe_load=cfg.model.allow_unsafe_load)
    return resolve(rows, records, model=live, inputs=make_inputs(v.input), refs=load_reference(v.reference_output),
                   activations=load_activations(v.reference_activations), rtol=v.rtol, atol=v.atol)
