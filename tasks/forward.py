"""Forward passes shared by the mapping stage's evidence step and the verify stage.

Domain module below the stages (it imports no stage module but the array reader): reading the
verify input and references, running a model once, comparing outputs, recording module outputs
with hooks, localising the first diverging module, and *tracing* a forward pass on ``meta``
(:func:`trace_forward`) to learn what ``forward`` actually does: which flatten feeds each Linear
(whatever the code: ``nn.Flatten``, ``torch.flatten``, ``x.view``, after ``F.max_pool2d`` or an
``x.permute``) and which modules run in parallel (branches of a functional model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from np2torch.tasks.config import InputSpec
from np2torch.tasks.errors import LoadError, VerifyError
from np2torch.tasks.readers import open_array, scan_source

__all__ = ["make_inputs", "load_reference", "compare", "run_forward", "load_activations", "compare_activation", "Recorder",
           "localise", "ForwardTrace", "trace_forward", "probe_flatten"]


# ---------------------------------------------------------------------------------------------
# inputs and references


def _load_arrays_file(path: Path, what: str) -> list[np.ndarray]:
    if not path.is_file():
        raise VerifyError(f"{what} file does not exist", key=str(path), fix=f"check verify.{what} (relative to the config file)")
    # through the source reader: the same checks (truncation, zip bombs, no pickles) as the weights
    try:
        return [np.asarray(open_array(r)) for r in scan_source(path, fmt="npz" if path.suffix == ".npz" else "npy")]
    except LoadError as exc:
        raise VerifyError(f"cannot read verify.{what}: {exc.message}", key=exc.key or str(path), expected=exc.expected, actual=exc.actual,
                          fix="save it with np.save / np.savez (numeric arrays, no pickles)", problems=exc.problems) from None


def make_inputs(spec: InputSpec | Path | None) -> list[np.ndarray]:
    """The forward pass's positional inputs, generated reproducibly or read from a file."""
    if spec is None:
        raise VerifyError("no verify.input given", key="verify.input",
                          fix="add verify.input: {shape: [...], dtype: float32, seed: 0} or a .npy path")
    if isinstance(spec, Path):
        return _load_arrays_file(spec, "input")
    rng = np.random.default_rng(spec.seed)
    if spec.dtype.startswith("int"):
        return [rng.integers(0, 2, size=spec.shape).astype(spec.dtype)]
    x = rng.standard_normal(spec.shape)
    return [x.astype("float32" if spec.dtype == "bfloat16" else spec.dtype)]


def load_reference(path: Path | None) -> list[np.ndarray] | None:
    return None if path is None else _load_arrays_file(path, "reference_output")


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


# ---------------------------------------------------------------------------------------------
# running and comparing


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten_outputs(v)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return _flatten_outputs(out.to_tuple())
    return []


def _model_float_dtype(model: nn.Module) -> torch.dtype | None:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def run_forward(model: nn.Module, inputs: list[np.ndarray], device: torch.device) -> list[np.ndarray]:
    """Run the model once in eval mode; float inputs take the model's float dtype."""
    fdt = _model_float_dtype(model)
    xs = []
    for x in inputs:
        t = torch.from_numpy(np.array(x, dtype=x.dtype.newbyteorder("="), order="C"))  # native, writable copy (inputs are small)
        if t.is_floating_point() and fdt is not None:
            t = t.to(fdt)
        xs.append(t.to(device))
    model.eval()
    try:
        with torch.no_grad():
            out = model(*xs)
    except Exception as exc:
        shapes = [list(x.shape) for x in xs]
        raise VerifyError(f"the forward pass raised {type(exc).__name__}: {exc}", key="forward",
                          expected="the model to accept the verify input", actual=f"inputs of shape {shapes}",
                          fix="check verify.input's shape and the model's forward (e.g. a missing Flatten)") from None
    outs = _flatten_outputs(out)
    if not outs:
        raise VerifyError(f"forward returned {type(out).__name__}, with no tensors to check", key="forward",
                          fix="return a tensor (or tuple/dict of tensors)")
    return [o.detach().to("cpu", torch.float64).numpy() for o in outs]


def compare(outputs: list[np.ndarray], refs: list[np.ndarray] | None, *, rtol: float, atol: float) -> dict[str, Any]:
    """Elementwise comparison metrics; ``passed`` only when every output is within tolerance."""
    metrics: dict[str, Any] = {
        "n_outputs": len(outputs),
        "output_shapes": [list(o.shape) for o in outputs],
        "finite": bool(all(np.isfinite(o).all() for o in outputs)),
        "rtol": rtol,
        "atol": atol,
        "reference": refs is not None,
    }
    problems = []
    if not metrics["finite"]:
        problems.append("output holds NaN/Inf")
    if refs is None:
        metrics.update(max_abs_error=None, max_rel_error=None, mismatched=None)
    else:
        if len(refs) != len(outputs):
            problems.append(f"{len(outputs)} output(s) but {len(refs)} reference array(s)")
        max_abs = max_rel = 0.0
        mismatched = 0
        for i, (o, r) in enumerate(zip(outputs, refs)):
            r = np.asarray(r, dtype=np.float64)
            if o.shape != r.shape:
                problems.append(f"output {i} has shape {list(o.shape)}, reference {list(r.shape)}")
                continue
            diff = np.abs(o - r)
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            max_rel = max(max_rel, float((diff / np.maximum(np.abs(r), np.finfo(np.float64).tiny)).max(initial=0.0)))
            mismatched += int((~(diff <= atol + rtol * np.abs(r))).sum())
        metrics.update(max_abs_error=max_abs, max_rel_error=max_rel, mismatched=mismatched)
        if mismatched:
            problems.append(f"{mismatched} element(s) outside atol={atol} + rtol={rtol}·|ref| (max abs error {max_abs:.3g})")
    metrics["passed"] = not problems
    metrics["problems"] = problems
    return metrics


def compare_activation(out: np.ndarray, ref: np.ndarray) -> float:
    """Max abs error of a module output against a reference in torch or channels-last layout."""
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape and out.ndim >= 3 and ref.shape == (out.shape[0], *out.shape[2:], out.shape[1]):
        ref = np.moveaxis(ref, -1, 1)  # the source framework is channels-last
    if out.shape != ref.shape:
        return float("inf")
    return float(np.abs(out - ref).max(initial=0.0))


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


class Recorder:
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
            ts = _tensors(out)
            if name not in self.outputs:
                self.order.append(name)
            if ts:
                self.outputs[name] = ts[0].detach().to("cpu", torch.float64).numpy()
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
    rec = Recorder(model, set(activations) if activations else None)
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
# tracing what forward does, on meta


_RESHAPES = {"flatten", "view", "reshape"}
_PASS_THROUGH = {"contiguous", "clone", "dropout", "relu", "gelu", "tanh", "sigmoid", "silu", "elu", "leaky_relu", "relu_", "__getitem__"}
_PERMUTES = {"permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims"}


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", str(func))
    return name if name.startswith("__") else name.strip("_")


@dataclass
class _Made:
    op: str
    inputs: list[torch.Tensor]
    args: tuple


@dataclass
class ForwardTrace:
    """What one forward pass did: the flatten feeding each Linear, and module dependencies."""

    flatten: dict[str, list[int]] = field(default_factory=dict)  # Linear → [C, H, W] of a channels-first flatten
    channels_last_flatten: set[str] = field(default_factory=set)  # Linear fed by a flatten forward permuted to channels-last
    upstream: dict[str, set[str]] = field(default_factory=dict)  # module → modules its inputs depend on
    order: list[str] = field(default_factory=list)  # leaf modules in execution order

    def parallel(self, a: str, b: str) -> bool:
        """Neither module's input depends on the other's output (branches of a functional model)."""
        return a in self.upstream and b in self.upstream and a not in self.upstream[b] and b not in self.upstream[a]


class _Tracer(TorchFunctionMode):
    """Records, per tensor produced, the op and its tensor inputs, and the modules upstream of it."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, _Made] = {}
        self.deps: dict[int, frozenset[str]] = {}
        self.keep: list[torch.Tensor] = []  # ids stay unique while the tensors live

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = _tensors(list(args)) + _tensors(list((kwargs or {}).values()))
        dep = frozenset().union(*[self.deps.get(id(t), frozenset()) for t in ins])
        for o in _tensors(out):
            if id(o) not in self.made:
                self.made[id(o)] = _Made(_op_name(func), ins, tuple(args[1:]))
                self.deps[id(o)] = dep
                self.keep.append(o)
        return out

    def producer(self, t: torch.Tensor) -> _Made | None:
        return self.made.get(id(t))


def _is_channels_last_permute(m: _Made, src: torch.Tensor) -> bool:
    """``x.permute(0, 2, 3, 1)`` (or a transpose/movedim to the same effect) of a (N, C, *S) activation."""
    dims = ([int(a) for a in m.args if isinstance(a, int)]
            or [int(a) for a in (m.args[0] if m.args and isinstance(m.args[0], (list, tuple)) else [])])
    nd = src.dim()
    if m.op == "permute" and len(dims) == nd:
        return dims == [0, *range(2, nd), 1]
    if m.op in ("movedim", "moveaxis") and len(dims) == 2:
        return dims[0] % nd == 1 and dims[1] % nd == nd - 1
    if m.op in ("transpose", "swapaxes", "swapdims") and len(dims) == 2 and nd == 3:
        return sorted(d % nd for d in dims) == [1, 2]
    return False


def _flatten_of(tr: _Tracer, x: torch.Tensor, features: int) -> tuple[str, list[int]] | None:
    """Follow a Linear's input back to the flatten that made it: ('nchw', [C, H, W]) or ('nhwc', [])."""
    t = x
    for _ in range(16):
        m = tr.producer(t)
        if m is None or not m.inputs:
            return None
        src = m.inputs[0]
        if m.op in _PASS_THROUGH and tuple(src.shape) == tuple(t.shape):
            t = src
            continue
        if m.op not in _RESHAPES or src.dim() < 3 or int(np.prod(src.shape[1:])) != features:
            return None
        base = src
        for _ in range(8):  # through .contiguous() to a permute
            pm = tr.producer(base)
            if pm is not None and pm.inputs and pm.op in _PERMUTES and _is_channels_last_permute(pm, pm.inputs[0]):
                return ("nhwc", [])
            if pm is not None and pm.inputs and pm.op in ("contiguous", "clone") and tuple(pm.inputs[0].shape) == tuple(base.shape):
                base = pm.inputs[0]
                continue
            break
        c, spatial = int(src.shape[1]), [int(s) for s in src.shape[2:]]
        if c > 1 and int(np.prod(spatial)) > 1:
            return ("nchw", [c, int(np.prod(spatial[:-1])), spatial[-1]] if len(spatial) > 1 else [c, spatial[0], 1])
        return None
    return None


def _meta_inputs(input_spec: Any) -> list[torch.Tensor] | None:
    shapes = _input_shapes(input_spec)
    if not shapes:
        return None
    out = []
    for s, d in shapes:
        dt = getattr(torch, "float32" if d.startswith("float") or d == "bfloat16" else d)
        out.append(torch.zeros(s, dtype=dt, device="meta") if not dt.is_floating_point else torch.empty(s, dtype=dt, device="meta"))
    return out


def _input_shapes(spec: Any) -> list[tuple[tuple[int, ...], str]] | None:
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


@contextmanager
def _buffers_on_meta(model: nn.Module) -> Iterator[None]:
    """The model's real buffers (the constructor's BatchNorm statistics, position ids …: models are
    built with parameters on meta and buffers real) join the meta parameters for the trace, then
    are put back, so the caller's model is unchanged."""
    saved = [(mod, name, b) for mod in model.modules() for name, b in mod._buffers.items() if b is not None and not b.is_meta]
    for mod, name, b in saved:
        mod._buffers[name] = b.to("meta")
    try:
        yield
    finally:
        for mod, name, b in saved:
            mod._buffers[name] = b


def trace_forward(model: nn.Module, input_spec: Any) -> ForwardTrace | None:
    """Run the (meta) model once under a tracing mode; ``None`` when it cannot run or no input is known.

    Follows the tensors themselves, so functional code in ``forward`` (``F.max_pool2d``,
    ``x.view(n, -1)``, ``torch.flatten``, ``x.permute(0, 2, 3, 1)``) counts as much as modules.
    The model's buffers run on ``meta`` too (and are restored after).
    """
    xs = _meta_inputs(input_spec)
    if xs is None or any(p.device.type != "meta" for p in model.parameters()):
        return None
    tr = _Tracer()
    out = ForwardTrace()
    linear_in: dict[str, torch.Tensor] = {}

    def pre(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            deps = frozenset().union(*[tr.deps.get(id(t), frozenset()) for t in _tensors(list(args))])
            out.upstream[name] = set(deps) | out.upstream.get(name, set())
            if name not in out.order:
                out.order.append(name)
            if isinstance(mod, nn.Linear) and args and isinstance(args[0], torch.Tensor):
                linear_in.setdefault(name, args[0])
        return fn

    def post(name: str):
        def fn(mod: nn.Module, args: tuple, res: Any) -> None:
            for t in _tensors(res):
                tr.deps[id(t)] = tr.deps.get(id(t), frozenset()) | {name}
                tr.keep.append(t)
        return fn

    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    handles = [m.register_forward_pre_hook(pre(n)) for n, m in leaves] + [m.register_forward_hook(post(n)) for n, m in leaves]
    model.eval()
    try:
        with torch.no_grad(), _buffers_on_meta(model), tr:
            model(*xs)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    for name, x in linear_in.items():
        if x.dim() != 2:
            continue
        hit = _flatten_of(tr, x, int(x.shape[1]))
        if hit and hit[0] == "nchw":
            out.flatten[name] = hit[1]
        elif hit:
            out.channels_last_flatten.add(name)
    return out


def graph_upstream(model: nn.Module) -> ForwardTrace | None:
    """Module dependencies from ``torch.fx`` (no input needed); ``None`` when forward is not traceable.

    The fallback of :func:`trace_forward` for pairing ambiguities when no verify input is given:
    only ``upstream``/``order`` are filled (flatten orders need shapes).
    """
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return None
    out = ForwardTrace()
    deps: dict[Any, frozenset[str]] = {}
    for node in gm.graph.nodes:
        ins = frozenset().union(*[deps.get(a, frozenset()) for a in node.all_input_nodes])
        if node.op == "call_module":
            out.upstream[node.target] = set(ins) | out.upstream.get(node.target, set())
            if node.target not in out.order:
                out.order.append(node.target)
            ins = ins | {node.target}
        deps[node] = ins
    return out


def probe_flatten(model: nn.Module, input_spec: Any) -> dict[str, list[int]] | None:
    """``{linear module: [C, H, W]}`` for every Linear fed by a channels-first flatten (see :func:`trace_forward`)."""
    tr = trace_forward(model, input_spec)
    return None if tr is None else tr.flatten
