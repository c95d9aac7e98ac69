"""Differences of meaning: when every weight loads and the outputs still differ, name the cause.

The weights are rarely what is wrong. Two frameworks can mean different things by the same
layer: BatchNorm's epsilon, TF's ``padding="same"`` with a stride, GELU's approximation, a
final softmax inside the source model, a channels-last input. No weight carries these, so no
mapping rule fixes them. :data:`TABLE` lists the known ones, one :class:`Row` each, with the
source-side default, PyTorch's, the reason, a test and the fix; adding a known difference is
one row.

:func:`diagnose` runs only after a failed comparison (never on a passing conversion). It runs
the model once to learn the execution order, the input shape of each module and which
module calls which function, localises the first diverging module when reference activations
are given, then tries every row's candidate changes on a *copy* of the model (float64, CPU), in
execution order, and reports the first that reproduces the reference (greedily combining two
or three when no single one does). A source that carries its configuration (a legacy Keras
``.h5`` with ``model_config``) is compared with the model's modules before any forward pass
(:func:`config_differences`). :func:`architecture_headline` turns a shape/count mismatch into
one first line, as ``load_state_dict`` does.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from np2torch.tasks.errors import ConversionError, Problem
from np2torch.tasks.forward import _flatten_outputs, compare, localise, run_forward

__all__ = ["TABLE", "Candidate", "Finding", "Row", "architecture_headline", "config_differences", "diagnose", "explain", "plan_check"]

Apply = Callable[[nn.Module, list[np.ndarray]], tuple[nn.Module, list[np.ndarray]]]  # on a copy: (model, inputs) → what to run
_MAX_COMBINED = 3  # candidates combined greedily when no single one reproduces the reference
_MAX_ELEMENTS = 1 << 26  # parameters and buffers: past this (0.5 GB in float64, copied per trial) the diagnosis is not attempted
_FIT_STEPS = 12  # Gauss-Newton iterations of the input-map fit: an exact affine map converges in a few; more only costs time


# ---------------------------------------------------------------------------------------------
# what one forward pass tells: execution order, input shapes, functions called inside each module


@dataclass
class Context:
    model: nn.Module
    order: list[str] = field(default_factory=list)  # leaf modules in execution order
    in_shapes: dict[str, list[int]] = field(default_factory=dict)
    calls: dict[str, list[str]] = field(default_factory=dict)  # function name → innermost modules that called it
    raised: str | None = None  # the forward pass raised (e.g. an input in the wrong layout)

    def of_kind(self, kinds: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
        mods = dict(self.model.named_modules())
        seen = [n for n in self.order if isinstance(mods[n], kinds)]
        rest = [n for n, m in mods.items() if n and isinstance(m, kinds) and n not in seen]
        return [(n, mods[n]) for n in seen + rest]


class _Calls(TorchFunctionMode):
    def __init__(self, stack: list[str], calls: dict[str, list[str]]):
        super().__init__()
        self.stack, self.calls = stack, calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.stack and name == "gelu":  # functional calls a row changes (F.gelu inside a module's forward)
            hit = self.calls.setdefault(name, [])
            if self.stack[-1] not in hit:
                hit.append(self.stack[-1])
        return func(*args, **(kwargs or {}))


def _probe(model: nn.Module, inputs: list[np.ndarray]) -> Context:
    ctx = Context(model)
    stack: list[str] = []

    def pre(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            stack.append(name)
            if not any(True for _ in mod.children()) and name not in ctx.in_shapes:
                ctx.order.append(name)
                ctx.in_shapes[name] = list(args[0].shape) if args and isinstance(args[0], torch.Tensor) else []
        return fn

    def post(_m: nn.Module, _a: tuple, _o: Any) -> None:
        stack.pop()

    handles = [h for n, m in model.named_modules() if n for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post))]
    try:
        with _Calls(stack, ctx.calls):
            run_forward(model, inputs, torch.device("cpu"))
    except ConversionError as exc:
        ctx.raised = exc.message
    finally:
        for h in handles:
            h.remove()
    return ctx


# ---------------------------------------------------------------------------------------------
# the table


@dataclass
class Candidate:
    """One change to try: the modules it touches (execution order), what differs, the fix."""

    row: Row
    modules: list[str]
    what: str
    fix: str
    apply: Apply
    wraps: bool = False  # applies by wrapping the model (after every in-place change of its modules)


@dataclass(frozen=True)
class Row:
    """A known difference of meaning between a source framework and PyTorch."""

    name: str  # "eps differs"
    kinds: tuple[type, ...]  # the module kinds it applies to; () for the whole model
    source: str  # the source side's default(s)
    torch_default: str
    reason: str
    candidates: Callable[[Row, Context], Iterator[Candidate]]
    expressible: bool = True  # False: no setting of the PyTorch module reproduces it
    config: Callable[[dict[str, Any], nn.Module], tuple[str, str] | None] | None = None  # a Keras layer config vs the module: (what, fix)
    keras: tuple[str, ...] = ()  # the Keras class names the config check reads
    fix_text: str = ""  # the fix, as the table in the docs states it


def _g(v: float) -> str:
    return f"{v:.4g}"


def _set_each(names: list[str], attr: str, value: Any) -> Apply:
    def apply(m: nn.Module, xs: list[np.ndarray]) -> tuple[nn.Module, list[np.ndarray]]:
        for n in names:
            setattr(m.get_submodule(n), attr, value)
        return m, xs
    return apply


def _eps_candidates(values: tuple[float, ...]) -> Callable[[Row, Context], Iterator[Candidate]]:
    def gen(row: Row, ctx: Context) -> Iterator[Candidate]:
        mods = ctx.of_kind(row.kinds)
        for v in values:
            names = [n for n, m in mods if not math.isclose(m.eps, v, rel_tol=1e-6)]
            if names:
                m0 = ctx.model.get_submodule(names[0])
                yield Candidate(row, names, f"the source used {_g(v)}, the model {_g(m0.eps)}",
                                f"nn.{type(m0).__name__}(..., eps={_g(v)}) for {_list(names)} "
                                "(the weights are right: no mapping rule changes this)",
                                _set_each(names, "eps", v))
    return gen


def _eps_config(cfg: dict[str, Any], mod: nn.Module) -> tuple[str, str] | None:
    e = cfg.get("epsilon")
    if e is None or math.isclose(float(e), mod.eps, rel_tol=1e-6):
        return None
    return f"source epsilon {_g(float(e))}, model eps {_g(mod.eps)}", f"nn.{type(mod).__name__}(..., eps={_g(float(e))})"


class _Post(nn.Module):
    """The model followed by a function of each output tensor."""

    def __init__(self, inner: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *xs: Any) -> Any:
        return tuple(self.fn(o) for o in _flatten_outputs(self.inner(*xs)))


def _final_activation(row: Row, ctx: Context) -> Iterator[Candidate]:
    last = ctx.order[-1:] if ctx.order else []
    fns = [("softmax", "torch.softmax(x, dim=-1)", lambda t: torch.softmax(t, -1)), ("sigmoid", "torch.sigmoid(x)", torch.sigmoid),
           ("softmax over dim 1", "torch.softmax(x, dim=1)", lambda t: torch.softmax(t, 1) if t.dim() > 2 else t)]
    for what, code, fn in fns:
        yield Candidate(row, last, f"the reference is {what} of the output: the source model applies it inside (Keras Dense(..., "
                        f"activation=\"{what.split()[0]}\")), the model returns logits",
                        f"end forward with `x = {code}`, or compare logits (a reference saved without the final activation)",
                        lambda m, xs, fn=fn: (_Post(m, fn), xs), wraps=True)


def _tf_same_pads(mod: nn.Module, shape: list[int]) -> list[int]:
    """F.pad's argument for TF's "same": total padding split with the extra row/column at the bottom/right."""
    pads: list[int] = []
    for i in reversed(range(len(mod.kernel_size))):
        n, s, k, d = shape[2 + i], mod.stride[i], mod.kernel_size[i], mod.dilation[i]
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


def _same_padding(row: Row, ctx: Context) -> Iterator[Candidate]:
    mods = [(n, m) for n, m in ctx.of_kind(row.kinds) if max(m.stride) > 1 and any(m.padding) and n in ctx.in_shapes
            and isinstance(m.padding, tuple) and m.padding_mode == "zeros"]
    if not mods:
        return
    pads = {n: _tf_same_pads(m, ctx.in_shapes[n]) for n, m in mods}
    mods = [(n, m) for n, m in mods if pads[n] != [p for d in reversed(m.padding) for p in (d, d)]]  # an even total is symmetric in TF too
    if not mods:
        return

    def apply(m: nn.Module, xs: list[np.ndarray]) -> tuple[nn.Module, list[np.ndarray]]:
        for n, p in pads.items():
            conv = m.get_submodule(n)
            conv.padding = (0,) * len(conv.padding)
            conv.register_forward_pre_hook(lambda _m, args, p=p: (F.pad(args[0], p), *args[1:]))
        return m, xs
    n0, m0 = mods[0]
    yield Candidate(row, [n for n, _ in mods], f"the source pads {pads[n0]} (TF \"same\" with stride {list(m0.stride)} pads bottom/right "
                    f"only), the model pads {list(m0.padding)} on every side",
                    f"padding=0 on {_list([n for n, _ in mods])} and `x = F.pad(x, {pads[n0]})` before {n0}"
                    + ("" if len(mods) == 1 else " (each with its own input size)")
                    + "; torch's padding=\"same\" does not allow stride > 1",
                    apply)


class _GeluTanh(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", "") == "gelu":
            kwargs["approximate"] = "tanh"
        return func(*args, **kwargs)


class _UnderMode(nn.Module):
    def __init__(self, inner: nn.Module, mode: type[TorchFunctionMode]):
        super().__init__()
        self.inner, self.mode = inner, mode

    def forward(self, *xs: Any) -> Any:
        with self.mode():
            return self.inner(*xs)


def _gelu(row: Row, ctx: Context) -> Iterator[Candidate]:
    names = [n for n, m in ctx.of_kind(row.kinds) if m.approximate == "none"] + [n for n in ctx.calls.get("gelu", []) if
                                                                                not isinstance(ctx.model.get_submodule(n), nn.GELU)]
    if names:
        yield Candidate(row, names, "the source uses the tanh approximation (approximate=True, GPT-2's gelu_new), the model erf",
                        f"nn.GELU(approximate=\"tanh\") (or F.gelu(x, approximate=\"tanh\")) in {_list(names)}",
                        lambda m, xs: (_UnderMode(m, _GeluTanh), xs), wraps=True)


def _count_include_pad(row: Row, ctx: Context) -> Iterator[Candidate]:
    names = [n for n, m in ctx.of_kind(row.kinds) if m.count_include_pad and any(np.atleast_1d(m.padding))]
    if names:
        yield Candidate(row, names, "the source averages over the window inside the input only (Keras padding=\"same\"), "
                        "the model counts the zero padding (count_include_pad=True)",
                        f"count_include_pad=False on {_list(names)}", _set_each(names, "count_include_pad", False))


# recurrent semantics nn.LSTM / nn.GRU cannot express: the same weights run by a cell written out


def _hard_sigmoid_k3(t: torch.Tensor) -> torch.Tensor:
    return F.relu6(t + 3) / 6  # Keras 3's hard_sigmoid


def _hard_sigmoid_k2(t: torch.Tensor) -> torch.Tensor:
    return torch.clamp(0.2 * t + 0.5, 0, 1)  # Keras 2's hard_sigmoid


class _Cell(nn.Module):
    """A one-layer, one-direction nn.LSTM / nn.GRU run step by step with another gate or reset rule."""

    def __init__(self, rnn: nn.RNNBase, gate: Callable[[torch.Tensor], torch.Tensor], reset_after: bool):
        super().__init__()
        self.rnn, self.gate, self.reset_after = rnn, gate, reset_after

    def forward(self, x: torch.Tensor, hx: Any = None) -> Any:
        r = self.rnn
        xs = x if r.batch_first else x.transpose(0, 1)  # (B, T, F)
        b, u = xs.shape[0], r.hidden_size
        h = xs.new_zeros(b, u)
        c = xs.new_zeros(b, u)
        b_ih = r.bias_ih_l0 if r.bias else 0
        b_hh = r.bias_hh_l0 if r.bias else 0
        outs = []
        for t in range(xs.shape[1]):
            gi = xs[:, t] @ r.weight_ih_l0.T + b_ih
            if isinstance(r, nn.LSTM):
                i, f, g, o = (gi + h @ r.weight_hh_l0.T + b_hh).chunk(4, 1)
                c = self.gate(f) * c + self.gate(i) * torch.tanh(g)
                h = self.gate(o) * torch.tanh(c)
            else:
                ir, iz, inn = gi.chunk(3, 1)
                w_r, w_z, w_n = r.weight_hh_l0.chunk(3, 0)
                bh = b_hh.chunk(3, 0) if r.bias else (0, 0, 0)
                rr = self.gate(ir + h @ w_r.T + bh[0])
                z = self.gate(iz + h @ w_z.T + bh[1])
                n = torch.tanh(inn + (rr * (h @ w_n.T + bh[2]) if self.reset_after else (rr * h) @ w_n.T + bh[2]))
                h = (1 - z) * n + z * h
            outs.append(h)
        out = torch.stack(outs, 1)
        out = out if r.batch_first else out.transpose(0, 1)
        return (out, (h[None], c[None])) if isinstance(r, nn.LSTM) else (out, h[None])


def _replace(m: nn.Module, names: list[str], make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    for n in names:
        parent, _, leaf = n.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, make(m.get_submodule(n)))
    return m


def _recurrent(row: Row, ctx: Context) -> Iterator[Candidate]:
    mods = [(n, m) for n, m in ctx.of_kind(row.kinds) if m.num_layers == 1 and not m.bidirectional and not getattr(m, "proj_size", 0)]
    lstm = [n for n, m in mods if isinstance(m, nn.LSTM)]
    gru = [n for n, m in mods if isinstance(m, nn.GRU)]
    for label, gate in (("hard_sigmoid (Keras 3: relu6(x + 3) / 6)", _hard_sigmoid_k3), ("hard_sigmoid (Keras 2: clip(0.2·x + 0.5, 0, 1))",
                                                                                         _hard_sigmoid_k2)):
        for names, kind in ((lstm, "nn.LSTM"), (gru, "nn.GRU")):
            if names:
                yield Candidate(row, names, f"the source's recurrent_activation is {label}, {kind} uses sigmoid",
                                f"{kind} cannot express it: keep the weights and run them in a custom cell whose gates use that "
                                f"hard_sigmoid (or save the source with recurrent_activation=\"sigmoid\")",
                                lambda m, xs, names=names, gate=gate: (_replace(m, names, lambda r: _Cell(r, gate, True)), xs))
    if gru:
        yield Candidate(row, gru, "the source GRU applies the reset gate before the recurrent matrix (Keras 2 reset_after=False), "
                        "nn.GRU after it (reset_after=True)",
                        "nn.GRU cannot express reset_after=False: keep the weights and run them in a custom GRU cell "
                        "(n = tanh(W_in·x + b_in + W_hn·(r * h) + b_hn)), or use the source with reset_after=True",
                        lambda m, xs: (_replace(m, gru, lambda r: _Cell(r, torch.sigmoid, False)), xs))


def _recurrent_config(cfg: dict[str, Any], mod: nn.Module) -> tuple[str, str] | None:
    act, kind = cfg.get("recurrent_activation", "sigmoid"), type(mod).__name__
    fix = f"nn.{kind} cannot express it: run the same weights in a custom cell with the source's equations"
    if act != "sigmoid":
        return f"source recurrent_activation {act}, nn.{kind} uses sigmoid (not expressible by nn.{kind})", fix
    if cfg.get("reset_after") is False and isinstance(mod, nn.GRU):
        return "source reset_after=False, nn.GRU is reset-after (not expressible by nn.GRU)", fix
    return None


def _channels_first(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, -1, 1)) if x.ndim >= 3 and x.dtype.kind == "f" else x


def _input_layout(row: Row, ctx: Context) -> Iterator[Candidate]:
    yield Candidate(row, [], "the verify input is channels-last (NHWC); the model takes channels-first (NCHW)",
                    "save the verify input channels-first: np.save(path, np.moveaxis(x, -1, 1)) (the weights are right)",
                    lambda m, xs: (m, [_channels_first(x) for x in xs]))


class _Affine(nn.Module):
    def __init__(self, inner: nn.Module, scale: torch.Tensor, shift: torch.Tensor, axis: int):
        super().__init__()
        self.inner, self.axis = inner, axis
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor, *rest: Any) -> Any:
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return self.inner(x * self.scale.view(shape) + self.shift.view(shape), *rest)


_SCALINGS = ((1 / 255, 0.0, "Rescaling(1/255)"), (1 / 127.5, -1.0, "Rescaling(1/127.5, offset=-1)"))


def _input_scaling(row: Row, ctx: Context) -> Iterator[Candidate]:
    for a, b, layer in _SCALINGS:
        yield Candidate(row, [], f"the source model scales its input first (Keras {layer}); the model does not",
                        f"start forward with `x = x * {_g(a)} + {_g(b)}`, or scale the input before calling the model",
                        lambda m, xs, a=a, b=b: (m, [x * a + b if x.dtype.kind == "f" else x for x in xs]))
    yield Candidate(row, [], "the source model maps its input by an affine map first (Keras Normalization/Rescaling); the model does not",
                    "", _fit_affine, wraps=True)


def _affine(m: nn.Module, xt: list[torch.Tensor]) -> bool:
    """The model is affine in its first input on these values: f(2x) − 2·f(x) + f(0) = 0."""
    with torch.no_grad():
        f = [_flatten_outputs(m(k * xt[0], *xt[1:])) for k in (0.0, 1.0, 2.0)]
    return all(torch.allclose(b2 - 2 * b1 + b0, torch.zeros_like(b1), atol=1e-9 * (1 + float(b1.abs().max())))
               for b0, b1, b2 in zip(*f))


def _fit_affine(m: nn.Module, xs: list[np.ndarray], refs: list[np.ndarray] | None = None) -> tuple[nn.Module, list[np.ndarray]]:
    """A per-channel ``x * scale + shift`` before the model, fitted to the reference (Gauss-Newton, float64).

    Least squares over 2·C numbers with a central-difference Jacobian: no autograd and no
    ``torch.optim`` (whose first use imports TorchDynamo, seconds on its own).
    """
    x = xs[0]
    axis = 1 if x.ndim >= 3 else x.ndim - 1
    n = x.shape[axis]
    wrapped = _Affine(m, torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), axis)
    xt = [torch.from_numpy(np.asarray(v, dtype=np.float64)) for v in xs]
    if refs is None or sum(np.size(r) for r in refs) < 8 * n or _affine(m, xt):
        return wrapped, xs  # too few reference values for 2·C parameters, or an affine model (any output offset would "fit"): no fit
    ref = np.concatenate([np.ravel(np.asarray(r, dtype=np.float64)) for r in refs])

    def residual(theta: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            wrapped.scale.copy_(torch.from_numpy(theta[:n]))
            wrapped.shift.copy_(torch.from_numpy(theta[n:]))
            out = np.concatenate([o.numpy().ravel() for o in _flatten_outputs(wrapped(*xt))])
        return out - ref if out.shape == ref.shape else np.full_like(ref, np.inf)

    theta = np.concatenate([np.ones(n), np.zeros(n)])
    r0 = residual(theta)
    for _ in range(_FIT_STEPS):
        h = 1e-6 * np.maximum(1.0, np.abs(theta))
        jac = np.stack([(residual(theta + h[i] * e) - residual(theta - h[i] * e)) / (2 * h[i]) for i, e in enumerate(np.eye(2 * n))], 1)
        if not np.isfinite(jac).all() or not np.isfinite(r0).all():
            break
        step = np.linalg.lstsq(jac, -r0, rcond=None)[0]
        before = np.linalg.norm(r0)
        for t in (1.0, 0.5, 0.25):  # damped: accept a step only if it lowers the residual
            r1 = residual(theta + t * step)
            if np.linalg.norm(r1) < before:
                theta, r0 = theta + t * step, r1
                break
        else:
            break
        if np.linalg.norm(r0) > 0.5 * before or np.linalg.norm(t * step) <= 1e-12 * (1 + np.linalg.norm(theta)):
            break  # stalled (an exact map converges fast: Gauss-Newton on a zero residual), or converged
    residual(theta)  # leave the best parameters in the wrapper
    return wrapped, xs


TABLE: list[Row] = [
    Row("input layout differs", (), "the reference input saved channels-last (NHWC)", "the model takes NCHW",
        "a Keras/TF/Flax user saves the input the source model took; a conv model in PyTorch takes channels first", _input_layout,
        fix_text="say so; save the verify input channels-first (np.moveaxis(x, -1, 1))"),
    Row("eps differs", (nn.modules.batchnorm._BatchNorm,), "Keras 1e-3, keras.applications 1.001e-5", "1e-5",
        "BatchNorm divides by sqrt(var + eps); eps is a constructor argument, in no weight file", _eps_candidates((1e-3, 1.001e-5, 1e-5)),
        config=_eps_config, keras=("BatchNormalization",), fix_text="`eps=` on the named module"),
    Row("eps differs", (nn.LayerNorm, nn.GroupNorm), "Keras 1e-3, TF BERT 1e-12, Flax 1e-6", "1e-5",
        "LayerNorm divides by sqrt(var + eps); eps is a constructor argument, in no weight file",
        _eps_candidates((1e-3, 1e-12, 1e-6, 1e-5)),
        config=_eps_config, keras=("LayerNormalization", "GroupNormalization"), fix_text="`eps=` on the named module"),
    Row("padding differs", (nn.Conv1d, nn.Conv2d, nn.Conv3d), "padding=\"same\" with stride > 1: TF pads bottom/right only",
        "symmetric padding=", "the extra row/column of an odd total padding goes after the input in TF", _same_padding,
        fix_text="the exact F.pad before the conv (torch's padding=\"same\" refuses stride > 1)"),
    Row("GELU approximation differs", (nn.GELU,), "tanh (approximate=True, GPT-2's gelu_new)", "erf",
        "the two GELUs differ by up to ~1e-3", _gelu, fix_text="nn.GELU(approximate=\"tanh\")"),
    Row("average pooling at the border differs", (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
        "Keras padding=\"same\" excludes the padding from the average", "count_include_pad=True",
        "the border windows divide by a different count", _count_include_pad, fix_text="count_include_pad=False"),
    Row("recurrent semantics differ", (nn.LSTM, nn.GRU), "Keras 2 GRU reset_after=False; LSTM recurrent_activation=\"hard_sigmoid\"",
        "torch GRU is reset-after; sigmoid gates", "no argument of nn.GRU/nn.LSTM changes the cell's equations", _recurrent,
        expressible=False, config=_recurrent_config, keras=("LSTM", "GRU"),
        fix_text="say it cannot be expressed by nn.GRU/nn.LSTM; a custom cell can (same weights)"),
    Row("final activation differs", (), "Keras Dense(..., activation=\"softmax\"/\"sigmoid\")", "the model returns logits",
        "the source model's last layer includes its activation; a PyTorch model usually leaves it to the loss", _final_activation,
        fix_text="\"the reference is softmax of the output\": add it, or compare logits"),
    Row("input scaling differs", (), "Keras Rescaling(1/255) / Normalization layers inside the model", "not in the torch model",
        "preprocessing layers carry no weight a Linear or Conv could take", _input_scaling,
        fix_text="the affine map that reproduces the reference"),
]


def _list(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# diagnosis


@dataclass
class Finding:
    """The change(s) that reproduce the reference, and the error with them."""

    steps: list[Candidate]
    error: float
    kinds: dict[str, str]  # module → class name

    def message(self) -> str:
        parts = []
        for c in self.steps:
            where = f"{c.modules[0]} ({self.kinds[c.modules[0]]})" if c.modules else "input"
            also = f" (also {_list(c.modules[1:])})" if len(c.modules) > 1 else ""
            tail = ("" if c.row.expressible
                    else f" (not expressible by nn.{self.kinds.get(c.modules[0], 'Module') if c.modules else 'Module'})")
            parts.append(f"{where}: {c.row.name}: {c.what}{also}{tail}")
        return "; and ".join(parts) + f" — reproduces the reference to {self.error:.1g}"

    def fix(self) -> str:
        return "; ".join(c.fix for c in self.steps)

    def as_error(self, cls: type[ConversionError]) -> ConversionError:
        """The caller's error class (its stage), the cause on the first line and the fix on the second."""
        return cls(self.message(), fix=self.fix())


def _round(v: np.ndarray, digits: int) -> np.ndarray:
    return np.array([0.0 if abs(x) < 10.0 ** -digits else float(f"{x:.{digits}g}") for x in v])


def _snapped(trials: _Trials, steps: list[Candidate], c: Candidate, fitted: _Affine) -> Candidate:
    """The fitted affine map with the fewest digits that still reproduces the reference, stated as the fix."""
    a, b = fitted.scale.detach().numpy(), fitted.shift.detach().numpy()
    for digits in (2, 3, 4, 6, 9):
        ra, rb = _round(a, digits), _round(b, digits)
        def apply(m, xs, ra=ra, rb=rb):
            return _Affine(m, torch.from_numpy(ra), torch.from_numpy(rb), fitted.axis), xs

        if trials.run([*steps, Candidate(c.row, [], "", "", apply, wraps=True)])[1]:
            break
    fa, fb = (f"[{', '.join(_g(x) for x in v)}]" if len(set(v)) > 1 else _g(v[0]) for v in (ra, rb))
    return Candidate(c.row, c.modules, f"{c.what}: x * {fa} + {fb}",
                     f"start forward with `x = x * scale + shift` (scale {fa}, shift {fb}, over axis {fitted.axis}: the source model's "
                     "Normalization/Rescaling layer), or map the input so before calling the model", apply, wraps=True)


class _Trials:
    """Runs candidates on copies of the model; the reference comparison as the caller's."""

    def __init__(self, model: nn.Module, inputs: list[np.ndarray], refs: list[np.ndarray], rtol: float, atol: float):
        self.base = copy.deepcopy(model).to("cpu", torch.float64).eval()
        self.inputs, self.refs, self.rtol, self.atol = inputs, refs, rtol, atol

    def run(self, steps: list[Candidate]) -> tuple[float, bool, nn.Module | None]:
        """(max abs error, reproduces?, the model as run) with ``steps`` applied to a fresh copy."""
        m, xs = copy.deepcopy(self.base), list(self.inputs)
        for c in sorted(steps, key=lambda c: c.wraps):
            m, xs = c.apply(m, xs, self.refs) if c.apply is _fit_affine else c.apply(m, xs)
        try:
            outs = run_forward(m, xs, torch.device("cpu"))
        except ConversionError:
            return float("inf"), False, None
        r = compare(outs, self.refs, rtol=self.rtol, atol=self.atol)
        shapes_ok = len(outs) == len(self.refs) and all(o.shape == np.shape(x) for o, x in zip(outs, self.refs))
        return (float(r["max_abs_error"]) if shapes_ok else float("inf")), bool(r["passed"]), m


def _order(ctx: Context, first: str | None) -> Callable[[Candidate], tuple]:
    """The input rows, then in execution order of their first module (the localised module's first),
    then the model-level rows; the fitted input map last (it is the least specific)."""
    pos = {n: i for i, n in enumerate(ctx.order)}

    def key(c: Candidate) -> tuple:
        if not c.modules:
            return (2 if c.apply is _fit_affine else (0 if c.row.name.startswith("input layout") else 1), 0)
        return (1, -1 if first in c.modules else min(pos.get(n, len(pos)) for n in c.modules) + 1)
    return key


def _candidates(ctx: Context, first: str | None) -> list[Candidate]:
    cands = [c for row in TABLE for c in row.candidates(row, ctx)]
    return sorted([c for c in cands if not c.modules] if ctx.raised else cands, key=_order(ctx, first))


def _elements(model: nn.Module) -> int:
    return sum(t.numel() for t in [*model.parameters(), *model.buffers()])


def diagnose(model: nn.Module, inputs: list[np.ndarray], refs: list[np.ndarray] | None, *, rtol: float, atol: float,
             activations: dict[str, np.ndarray] | None = None) -> Finding | None:
    """The known difference(s) of meaning that make ``model`` reproduce ``refs``, or ``None``.

    Call it only after a failed comparison. ``model`` is never changed: every trial runs on a
    float64 CPU copy. ``None`` also when the unchanged copy already reproduces the reference
    (the failure was float rounding, not meaning).
    """
    if refs is None or _elements(model) > _MAX_ELEMENTS:
        return None
    trials = _Trials(model, inputs, refs, rtol, atol)
    best, passed, _ = trials.run([])
    if passed:
        return None
    ctx = _probe(copy.deepcopy(trials.base), inputs)
    first = None
    if activations and not ctx.raised:
        where = localise(copy.deepcopy(trials.base), inputs, activations, rtol=rtol, atol=atol)
        first = where["module"] if where else None
    kinds = {n: type(m).__name__ for n, m in trials.base.named_modules()}
    cands = _candidates(ctx, first)
    fits = [c for c in cands if c.apply is _fit_affine]  # the least specific and the costliest: alone, and last
    steps: list[Candidate] = []
    for _ in range(_MAX_COMBINED):
        scored = []
        for c in cands:
            if c.apply is _fit_affine or any(s.row is c.row for s in steps):
                continue
            err, ok, _ = trials.run([*steps, c])
            if ok:
                return Finding(sorted([*steps, c], key=_order(ctx, first)), err, kinds)
            scored.append((err, len(scored), c))
        better = [s for s in scored if s[0] < 0.5 * best]  # a step that halves the error, at least
        if not better:
            break
        best, _, c = min(better, key=lambda s: s[:2])
        steps.append(c)
    for c in fits:
        err, ok, ran = trials.run([c])
        if ok:
            return Finding([_snapped(trials, [], c, ran)], err, kinds)
    return None


def explain(model: nn.Module, inputs: list[np.ndarray], refs: list[np.ndarray] | None, *, rtol: float, atol: float,
            activations: dict[str, np.ndarray] | None, error: type[ConversionError]) -> None:
    """After a failed comparison: raise ``error`` naming the difference of meaning that explains it, if one does."""
    found = diagnose(model, inputs, refs, rtol=rtol, atol=atol, activations=activations)
    if found is not None:
        raise found.as_error(error) from None


def plan_check(cfg: Any, records: list[Any], rows: list[dict[str, Any]]) -> ConversionError | None:
    """``plan``'s check of meaning on a valid manifest: the source's stated configuration against the
    model's modules, then, with a reference, the mapped model's output and its diagnosis."""
    from np2torch.tasks import evidence
    from np2torch.tasks.errors import MappingError, VerifyError
    from np2torch.tasks.forward import load_activations, load_reference, make_inputs
    from np2torch.tasks.model import build_model

    model = build_model(cfg.model.target, cfg.model.kwargs, allow_unsafe_load=cfg.model.allow_unsafe_load)  # on meta: no memory
    diffs = config_differences(cfg.source.path, rows, model)
    if diffs:
        more = f" (and {len(diffs) - 1} more difference(s) of meaning)" if len(diffs) > 1 else ""
        return MappingError(f"{diffs[0]['key']}: {diffs[0]['reason']}{more}", problems=diffs[1:],
                            fix=f"{diffs[0]['fix']} (the source states its configuration; the weights are right)")
    v = cfg.verify
    if v.input is None or v.reference_output is None or _elements(model) > _MAX_ELEMENTS:
        return None
    inputs, refs = make_inputs(v.input), load_reference(v.reference_output)
    model = build_model(cfg.model.target, cfg.model.kwargs, device="cpu", allow_unsafe_load=cfg.model.allow_unsafe_load)
    trial = evidence._Trial(rows, records, model, inputs, refs, {}, v.rtol, v.atol)
    trial.recorder.close()
    err, passed, _ = trial.run()
    if passed:
        return None
    try:
        explain(trial.model, inputs, refs, rtol=v.rtol, atol=v.atol, activations=load_activations(v.reference_activations),
                error=VerifyError)
    except VerifyError as exc:
        return exc
    return VerifyError(f"the mapped model does not reproduce the reference (max abs error {err:.3g}) and no known difference of meaning "
                       "explains it", key="verify.reference_output", fix="give verify.reference_activations to localise the first "
                       "diverging layer; check the rows of that layer")


# ---------------------------------------------------------------------------------------------
# the source's own configuration (legacy Keras .h5), before any forward pass


def _keras_layers(cfg: Any) -> Iterator[dict[str, Any]]:
    if isinstance(cfg, dict):
        if isinstance(cfg.get("class_name"), str) and isinstance(cfg.get("config"), dict) and "name" in cfg["config"]:
            yield cfg
        for v in cfg.values():
            yield from _keras_layers(v)
    elif isinstance(cfg, list):
        for v in cfg:
            yield from _keras_layers(v)


def _source_config(path: Path) -> Any:
    """The model configuration a legacy Keras ``.h5`` carries (``model_config``), as JSON data (never deserialized), or None."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
        return None if raw is None else json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except (OSError, ValueError, ImportError):
        return None


def config_differences(source: Path, rows: list[dict[str, Any]], model: nn.Module) -> list[Problem]:
    """``bn1: source epsilon 0.001, model eps 1e-05`` for each module whose source layer's stated configuration differs.

    Layers and modules are paired through the manifest: a module is paired with the Keras layer
    whose name is a segment of its rows' source keys.
    """
    cfg = _source_config(Path(source))
    if cfg is None:
        return []
    layers = {layer["config"]["name"]: layer for layer in _keras_layers(cfg)}
    mods = dict(model.named_modules())
    out: list[Problem] = []
    seen: set[str] = set()
    for r in rows:
        mod_name = (r["target_key"] or "").rpartition(".")[0]
        if not mod_name or mod_name in seen or mod_name not in mods or not r["source_key"]:
            continue
        layer = next((layers[s] for s in str(r["source_key"]).replace(":", "/").split("/") if s in layers), None)
        if layer is None:
            continue
        seen.add(mod_name)
        for row in TABLE:
            if row.config and layer["class_name"] in row.keras and isinstance(mods[mod_name], row.kinds):
                said = row.config(layer["config"], mods[mod_name])
                if said:
                    out.append(Problem(mod_name, f"{said[0]} (source layer {layer['config']['name']})", fix=f"{said[1]} for {mod_name}"))
    return out


# ---------------------------------------------------------------------------------------------
# the wrong architecture, as one diff


def _shape(s: Any) -> list[int] | None:
    try:
        v = json.loads(s) if isinstance(s, str) else s
    except ValueError:
        return None
    return [int(d) for d in v] if isinstance(v, list) and all(isinstance(d, int) for d in v) else None  # not a list of shapes (a concat)


def _as_layout(shape: list[int]) -> list[int] | None:
    if len(shape) == 2:
        return shape[::-1]
    if len(shape) in (3, 4, 5):  # channels-last kernel (*S, I, O) → (O, I, *S)
        return [shape[-1], shape[-2], *shape[:-2]]
    return None


def _prefix(key: str) -> str:
    return key.replace("/", ".").rpartition(".")[0]


def _same_tensor_pairs(missing: list[dict[str, Any]], unused: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Missing targets and unused sources that are one tensor in two sizes: a kernel of the same rank
    sharing a dimension (in row order), then the other tensors of the same module and source layer."""
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    free = list(unused)
    for r in missing:
        t = _shape(r["target_shape"]) or []
        hit = next((u for u in free if len(t) >= 2 and len(_shape(u["source_shape"]) or []) == len(t)
                    and set(t) & set(_shape(u["source_shape"]))), None)
        if hit is not None:
            free.remove(hit)
            pairs.append((r, hit))
    layers = {(_prefix(r["target_key"]), _prefix(u["source_key"])) for r, u in pairs}
    for r in missing:
        if any(r is p[0] for p in pairs):
            continue
        t = _shape(r["target_shape"]) or []
        hit = next((u for u in free if (_prefix(r["target_key"]), _prefix(u["source_key"])) in layers
                    and len(_shape(u["source_shape"]) or []) == len(t)), None)
        if hit is not None:
            free.remove(hit)
            pairs.append((r, hit))
    return pairs


def architecture_headline(rows: list[dict[str, Any]]) -> tuple[str, str, str, set[str]] | None:
    """When model and source disagree in shape or count: the key and the first line (``fc2.weight``:
    ``model [10, 64], source dense_1/kernel [64, 16] (as [16, 64])``, then the missing and unexpected
    keys grouped), the fix, and the keys that exist on both sides in another shape (never to be
    allowed missing nor ignored)."""
    targets = [r for r in rows if r["target_key"]]
    wrong = [r for r in targets if r["status"] == "mapped" and r["how"] != "tied" and r["result_shape"] != r["target_shape"]
             and _shape(r["source_shape"]) and _shape(r["result_shape"])
             and math.prod(_shape(r["result_shape"]) or [0]) != math.prod(_shape(r["target_shape"]) or [0])]
    # (the same count is a layout problem, not a size; a transform that does not apply is not a size either)
    missing = [r for r in targets if r["status"] == "missing"]
    unused = [r for r in rows if not r["target_key"] and r["status"] == "unused"]
    pairs = [(r, r) for r in wrong] + _same_tensor_pairs(missing, unused)
    if not pairs:
        return None
    diffs, implied = [], []
    for r, src in pairs:
        s = _shape(src["source_shape"]) or []
        implied.append((_shape(r["result_shape"] or "") if src is r else _as_layout(s)) or s)  # the target shape the source implies
        diffs.append(f"{r['target_key']}: model {_shape(r['target_shape'])}, source {src['source_key']} {s}"
                     + (f" (as {implied[-1]})" if implied[-1] != s else ""))
    others = [r["target_key"] for r, _ in pairs[1:]]
    head = diffs[0] + (f"; {len(others)} more tensor(s) differ in shape ({_list(others)})" if others else "")
    rest_missing = [r["target_key"] for r in missing if all(r is not p[0] for p in pairs)]
    rest_unused = [u["source_key"] for u in unused if all(u is not p[1] for p in pairs)]
    if rest_missing:
        head += f"; missing in the source: {_list(rest_missing, 8)}"
    if rest_unused:
        head += f"; unexpected in the source: {_list(rest_unused, 8)}"
    fix = ("the model's architecture differs from the source's: build it with the source's sizes (the constructor arguments that make "
           f"{pairs[0][0]['target_key']} {implied[0]}); "
           "allowing these targets missing would leave them untrained")
    return pairs[0][0]["target_key"], head, fix, {r["target_key"] for r, _ in pairs} | {s["source_key"] for _, s in pairs}
