"""Write a PyTorch module from a Keras architecture read as data (``np2torch port``).

The architecture comes from a Keras 3 ``.keras`` zip (``config.json``) or a legacy ``.h5``
(the ``model_config`` attribute). It is parsed as JSON and nothing more: no class it names is
imported, no ``Lambda`` bytecode is decoded, no ``module`` / ``registered_name`` is looked up.

:data:`LAYERS` is the one table: Keras layer class → how its torch module is built, what its
``forward`` line computes, and which Keras variables become which torch parameters. A new layer
is one row. Every identifier written into the generated file is checked against
``[A-Za-z_][A-Za-z0-9_]*`` and every value is a number or bool the generator formats itself, so
the file cannot carry text from the source into code.

Layouts: inside ``forward`` every image-like tensor (rank ≥ 3, fed to a convolution, pooling or
BatchNorm) is channels-first; sequence tensors (Embedding, RNN, attention, Dense on the last
axis) stay batch-first ``(N, T, C)``. Each tensor carries which of the two it is in; a layer
that needs the other one gets a ``permute`` on its argument, and Flatten / Reshape permute back
to Keras's order first, so the element order is Keras's.
"""

from __future__ import annotations

import json
import keyword
import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from np2torch.tasks.errors import ConversionError

__all__ = ["LAYERS", "Generated", "PortError", "generate", "read_keras_config"]

MAX_CONFIG_BYTES = 64 << 20  # an architecture, not weights: a ConvNeXt-XL config is ~1 MB
MAX_MEMBERS = 10_000
LINE = 120
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PortError(ConversionError):
    stage = "port"


# ---------------------------------------------------------------------------------------------
# reading the architecture, as data


def _zip_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a ``.keras`` zip, read in memory after checking every member."""
    fix = "re-save the model with Keras (model.save('model.keras'))"
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PortError(f"not a readable .keras zip: {exc}", key=str(path), fix=fix) from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise PortError("too many zip members", key=str(path), expected=f"<= {MAX_MEMBERS}", actual=len(infos), fix=fix)
        seen: set[str] = set()
        for info in infos:
            name = info.filename
            mode = info.external_attr >> 16
            if name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name) or re.match(r"^[A-Za-z]:", name):
                raise PortError("zip member escapes the archive (absolute path or '..')", key=f"{path}:{name}", fix=fix)
            if (mode & 0o170000) == 0o120000:
                raise PortError("zip member is a symbolic link", key=f"{path}:{name}", fix=fix)
            if name in seen:
                raise PortError("zip member appears twice", key=f"{path}:{name}", fix=fix)
            seen.add(name)
        if "config.json" not in seen:
            raise PortError(".keras zip has no config.json", key=str(path), actual=sorted(seen)[:10], fix=fix)
        info = zf.getinfo("config.json")
        if info.file_size > MAX_CONFIG_BYTES:
            raise PortError("config.json is too large", key=f"{path}:config.json", expected=f"<= {MAX_CONFIG_BYTES} bytes",
                            actual=info.file_size, fix=fix)
        with zf.open(info) as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)  # the declared size may lie: bound what inflates
        if len(raw) > MAX_CONFIG_BYTES:
            raise PortError("config.json inflates past its bound", key=f"{path}:config.json", expected=f"<= {MAX_CONFIG_BYTES} bytes",
                fix=fix)
        return _json(raw, f"{path}:config.json")


def _h5_config(path: Path) -> dict[str, Any]:
    import h5py

    fix = "save the whole model (model.save('model.h5') or 'model.keras'); a weights-only file has no architecture"
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except OSError as exc:
        raise PortError(f"not a readable HDF5 file: {exc}", key=str(path), fix=fix) from None
    if raw is None:
        raise PortError("HDF5 file has no 'model_config' attribute (weights only?)", key=str(path), fix=fix)
    raw = raw.encode() if isinstance(raw, str) else bytes(raw)
    if len(raw) > MAX_CONFIG_BYTES:
        raise PortError("model_config is too large", key=str(path), expected=f"<= {MAX_CONFIG_BYTES} bytes", actual=len(raw), fix=fix)
    return _json(raw, f"{path}:model_config")


def _json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PortError(f"architecture is not valid JSON: {exc}", key=where, fix="re-save the model with Keras") from None
    if not isinstance(data, dict) or "class_name" not in data:
        raise PortError("architecture JSON has no top-level class_name", key=where, fix="re-save the model with Keras")
    return data


def read_keras_config(path: str | Path) -> dict[str, Any]:
    """The model's architecture as plain JSON data, from a ``.keras`` zip or a legacy ``.h5``."""
    path = Path(path)
    if not path.is_file():
        raise PortError("source is not a regular file", key=str(path), fix="give a .keras or legacy .h5 file saved with model.save")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] == b"PK\x03\x04":
        return _zip_config(path)
    if head == b"\x89HDF\r\n\x1a\n":
        return _h5_config(path)
    raise PortError("source is neither a .keras zip nor an HDF5 file", key=str(path), actual=head[:8].hex(),
                    fix="give a file written by model.save('model.keras') or model.save('model.h5')")


# ---------------------------------------------------------------------------------------------
# values from the config, checked before they reach code


def _unsupported(layer: Layer, why: str, keys: tuple[str, ...] = ()) -> PortError:
    def brief(v: Any) -> Any:  # what a key holds, never the bytecode or a long blob
        if isinstance(v, dict):
            return "<Python bytecode, not shown>" if v.get("class_name") == "__lambda__" else f"<{str(v.get('class_name', 'dict'))[:40]}>"
        return v if not isinstance(v, str) or len(v) <= 60 else v[:60] + "…"

    shown = {k: brief(layer.cfg.get(k)) for k in keys if k in layer.cfg}
    return PortError(f"layer {layer.keras_name!r} ({layer.cls}): {why}" + (f"; config {json.dumps(shown)[:300]}" if shown else ""),
                     key=layer.keras_name,
                         fix="write this part by hand, or run `np2torch port --allow-placeholders` to get the rest of the "
                     "module with a clearly marked placeholder for it")


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or abs(v) > 1 << 40:
        raise ValueError(f"{what} must be an integer, got {v!r}")
    return v


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _ints(v: Any, n: int, what: str) -> tuple[int, ...]:
    v = [v] * n if isinstance(v, int) else list(v)
    if len(v) != n:
        raise ValueError(f"{what} must have {n} values, got {v!r}")
    return tuple(_int(x, what) for x in v)


def _tup(v: tuple[int, ...]) -> str:
    return str(v[0]) if len(set(v)) == 1 else f"({', '.join(map(str, v))})"


def ident(name: str) -> str | None:
    return name if isinstance(name, str) and _IDENT.fullmatch(name) and not keyword.iskeyword(name) else None


def class_name(name: str) -> str:
    parts = re.findall(r"[A-Za-z0-9]+", name if isinstance(name, str) else "")
    out = "".join(p[:1].upper() + p[1:] for p in parts) or "KerasModel"
    return out if out[0].isalpha() else f"Keras{out}"


# ---------------------------------------------------------------------------------------------
# tensors and layers as the generator sees them


@dataclass
class T:
    """One tensor in ``forward``: its variable, its shape in torch (from tracing on ``meta``), and
    whether it is channels-first (the Keras tensor's last axis moved to position 1)."""

    var: str
    shape: tuple[int, ...]
    cf: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape)

    def keras_shape(self) -> tuple[int, ...]:
        s = self.shape
        return (*s[:1], *s[2:], s[1]) if self.cf and len(s) >= 3 else s

    def to(self, cf: bool) -> str:
        """This tensor's expression in the wanted layout."""
        if self.rank < 3 or self.cf == cf:
            return self.var
        r = self.rank
        perm = (0, r - 1, *range(1, r - 1)) if cf else (0, *range(2, r), 1)
        return f"{self.var}.permute({', '.join(map(str, perm))})"

    def dim(self, axis: int) -> int:
        """The torch dim of Keras axis ``axis`` of this tensor."""
        a = axis % self.rank
        if not self.cf or self.rank < 3 or a == 0:
            return a
        return 1 if a == self.rank - 1 else a + 1


@dataclass
class Layer:
    keras_name: str
    name: str  # python identifier: attribute and variable
    cls: str
    cfg: dict[str, Any]
    inputs: list[T] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    args: list[Any] = field(default_factory=list)  # the call's positional arguments: tensors (T), numbers, lists of them

    def get(self, key: str, default: Any = None) -> Any:
        return self.cfg.get(key, default)

    @property
    def x(self) -> T:
        return self.inputs[0]


# ---------------------------------------------------------------------------------------------
# activations (Keras's definitions)

_ACT: dict[str, str] = {
    "linear": "{x}", "relu": "F.relu({x})", "relu6": "F.relu6({x})", "sigmoid": "torch.sigmoid({x})", "tanh": "torch.tanh({x})",
    "swish": "F.silu({x})", "silu": "F.silu({x})", "hard_swish": "F.hardswish({x})", "hard_silu": "F.hardswish({x})",
    # Keras 3: hard_sigmoid(x) = relu6(x + 3) / 6, torch's hardsigmoid
    "hard_sigmoid": "F.hardsigmoid({x})", "gelu": "F.gelu({x})", "elu": "F.elu({x})", "selu": "F.selu({x})",
    "softplus": "F.softplus({x})", "softsign": "F.softsign({x})", "exponential": "torch.exp({x})", "mish": "F.mish({x})",
    "leaky_relu": "F.leaky_relu({x}, 0.2)",  # Keras 3's default negative_slope
    "softmax": "F.softmax({x}, dim={dim})", "log_softmax": "F.log_softmax({x}, dim={dim})",
}


def _act_name(v: Any) -> str | None:
    if v is None:
        return "linear"
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("config"), str) and str(v.get("module", "keras")).startswith("keras"):
        return v["config"]  # {"module": "keras.activations", "class_name": "function", "config": "relu"}
    return None


def activation(layer: Layer, expr: str, t: T, key: str = "activation") -> str:
    name = _act_name(layer.get(key))
    if name not in _ACT:
        raise _unsupported(layer, f"activation {str(name or layer.get(key))[:60]!r} is not one np2torch knows", (key,))
    return _ACT[name].format(x=expr, dim=t.dim(-1))


# ---------------------------------------------------------------------------------------------
# padding as Keras computes it


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TF/Keras 'same': total padding split with the extra one after."""
    eff = (k - 1) * d + 1
    total = max((math.ceil(size / s) - 1) * s + eff - size, 0)
    return total // 2, total - total // 2


def _spatial(layer: Layer, n: int) -> tuple[int, ...]:
    return layer.x.keras_shape()[1:1 + n]


def _padded(layer: Layer, x: str, n: int, k: tuple[int, ...], s: tuple[int, ...], d: tuple[int, ...],
            value: str = "") -> tuple[str, tuple[int, ...] | int]:
    """(input expression, the symmetric padding the op itself applies) for Keras's padding mode."""
    mode = layer.get("padding", "valid")
    if mode == "valid":
        return x, 0
    if mode == "causal":
        return f"F.pad({x}, ({(k[0] - 1) * d[0]}, 0){value})", 0
    if mode != "same":
        raise _unsupported(layer, f"padding {str(mode)[:20]!r}", ("padding",))
    pads = [_same_pads(sz, kk, ss, dd) for sz, kk, ss, dd in zip(_spatial(layer, n), k, s, d, strict=True)]
    if all(a == b for a, b in pads):
        return x, tuple(a for a, _ in pads) if any(a for a, _ in pads) else 0
    flat = [p for a, b in reversed(pads) for p in (a, b)]  # F.pad: last dim first
    return f"F.pad({x}, ({', '.join(map(str, flat))}){value})", 0


# ---------------------------------------------------------------------------------------------
# the rows


@dataclass(frozen=True)
class Row:
    """How one Keras layer class becomes torch: ``module`` (constructor code or None for a
    parameter-free layer), ``forward`` (the expression of its output and whether that is
    channels-first), ``weights`` (Keras variable → torch parameter, as the keras preset maps them)."""

    module: Callable[[Layer], str | None]
    forward: Callable[[Layer], tuple[str, bool]]
    weights: dict[str, str] = field(default_factory=dict)
    # mapping rules for variables whose layout no preset can guess: (layer, torch prefix) → config rules
    rules: Callable[[Layer, str], list[dict[str, Any]]] | None = None


def _none(layer: Layer) -> None:
    return None


def _dims(cls: str) -> int:
    m = re.search(r"([123])D", cls)
    return int(m.group(1)) if m else 2


def _conv_args(layer: Layer, n: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    k = _ints(layer.get("kernel_size"), n, "kernel_size")
    s = _ints(layer.get("strides", 1), n, "strides")
    d = _ints(layer.get("dilation_rate", 1), n, "dilation_rate")
    if layer.get("data_format", "channels_last") != "channels_last":
        raise _unsupported(layer, "data_format other than channels_last", ("data_format",))
    return k, s, d


def _conv_module(layer: Layer) -> str:
    n = _dims(layer.cls)
    k, s, d = _conv_args(layer, n)
    cin = layer.x.keras_shape()[-1]
    depthwise = layer.cls.startswith("Depthwise")
    groups = cin if depthwise else _int(layer.get("groups", 1), "groups")
    cout = cin * _int(layer.get("depth_multiplier", 1), "depth_multiplier") if depthwise else _int(layer.get("filters"), "filters")
    pad = _padded(layer, "x", n, k, s, d)[1]
    args = [str(cin), str(cout), _tup(k)]
    args += [f"stride={_tup(s)}"] if any(v != 1 for v in s) else []
    args += [f"padding={_tup(pad)}"] if pad else []
    args += [f"dilation={_tup(d)}"] if any(v != 1 for v in d) else []
    args += [f"groups={groups}"] if groups != 1 else []
    args += [] if layer.get("use_bias", True) else ["bias=False"]
    return f"nn.Conv{n}d({', '.join(args)})"


def _conv_forward(layer: Layer) -> tuple[str, bool]:
    n = _dims(layer.cls)
    k, s, d = _conv_args(layer, n)
    x, _ = _padded(layer, layer.x.to(True), n, k, s, d)
    return activation(layer, f"self.{layer.name}({x})", T("", (0,) * (n + 2), True)), True


def _separable_module(layer: Layer) -> str:
    n = _dims(layer.cls)
    k, s, d = _conv_args(layer, n)
    cin = layer.x.keras_shape()[-1]
    mid = cin * _int(layer.get("depth_multiplier", 1), "depth_multiplier")
    pad = _padded(layer, "x", n, k, s, d)[1]
    dw = [str(cin), str(mid), _tup(k)] + ([f"stride={_tup(s)}"] if any(v != 1 for v in s) else []) + (
        [f"padding={_tup(pad)}"] if pad else []) + ([f"dilation={_tup(d)}"] if any(v != 1 for v in d) else []) + [f"groups={cin}",
            "bias=False"]
    pw = [str(mid), str(_int(layer.get("filters"), "filters")), "1"] + ([] if layer.get("use_bias", True) else ["bias=False"])
    return f"Separable(nn.Conv{n}d({', '.join(dw)}), nn.Conv{n}d({', '.join(pw)}))"


def _dense_module(layer: Layer) -> str:
    bias = "" if layer.get("use_bias", True) else ", bias=False"
    return f"nn.Linear({layer.x.keras_shape()[-1]}, {_int(layer.get('units'), 'units')}{bias})"


def _dense_forward(layer: Layer) -> tuple[str, bool]:
    return activation(layer, f"self.{layer.name}({layer.x.to(False)})", T("", layer.x.shape, False)), False


def _norm_axis(layer: Layer) -> None:
    axis = layer.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    if not isinstance(axis, int) or axis % layer.x.rank != layer.x.rank - 1:
        raise _unsupported(layer, "normalisation over an axis other than the last (channels) one", ("axis",))


def _bn_module(layer: Layer) -> str:
    _norm_axis(layer)
    n = {2: 1, 3: 1, 4: 2, 5: 3}.get(layer.x.rank)
    if n is None:
        raise _unsupported(layer, f"BatchNormalization of a rank-{layer.x.rank} tensor")
    if layer.get("renorm"):
        raise _unsupported(layer, "batch renormalisation", ("renorm",))
    affine = "" if layer.get("center", True) or layer.get("scale", True) else ", affine=False"
    return f"nn.BatchNorm{n}d({layer.x.keras_shape()[-1]}, eps={_float(layer.get('epsilon', 1e-3), 'epsilon')!r}{affine})"


def _ln_module(layer: Layer) -> str:
    _norm_axis(layer)
    if layer.get("rms_scaling"):
        raise _unsupported(layer, "rms_scaling", ("rms_scaling",))
    affine = "" if layer.get("center", True) or layer.get("scale", True) else ", elementwise_affine=False"
    bias = "" if layer.get("center", True) or not layer.get("scale", True) else ", bias=False"
    return f"nn.LayerNorm({layer.x.keras_shape()[-1]}, eps={_float(layer.get('epsilon', 1e-3), 'epsilon')!r}{affine}{bias})"


def _pool_forward(layer: Layer) -> tuple[str, bool]:
    n = _dims(layer.cls)
    k = _ints(layer.get("pool_size"), n, "pool_size")
    s = _ints(layer.get("strides") or k, n, "strides")
    if layer.get("data_format", "channels_last") not in (None, "channels_last"):
        raise _unsupported(layer, "data_format other than channels_last", ("data_format",))
    x = layer.x.to(True)
    if layer.cls.startswith("Max"):
        xp, pad = _padded(layer, x, n, k, s, (1,) * n, value=", value=float(\"-inf\")")
        p = f", padding={_tup(pad)}" if pad else ""
        return f"F.max_pool{n}d({xp}, {_tup(k)}, {_tup(s)}{p})", True
    xp, pad = _padded(layer, x, n, k, s, (1,) * n)
    if xp != x:  # asymmetric 'same': Keras averages over the real inputs only
        ones = xp.replace(x, f"torch.ones_like({x}[:1, :1])", 1)
        return f"F.avg_pool{n}d({xp}, {_tup(k)}, {_tup(s)}) / F.avg_pool{n}d({ones}, {_tup(k)}, {_tup(s)})", True
    p = f", padding={_tup(pad)}, count_include_pad=False" if pad else ""
    return f"F.avg_pool{n}d({x}, {_tup(k)}, {_tup(s)}{p})", True


def _global_pool_forward(layer: Layer) -> tuple[str, bool]:
    t = layer.x
    dims = tuple(t.dim(a) for a in range(1, t.rank - 1))
    keep = bool(layer.get("keepdims", False))
    op = "amax" if "Max" in layer.cls else "mean"
    d = dims[0] if len(dims) == 1 else f"({', '.join(map(str, dims))})"
    return f"{t.var}.{op}({'dim=' if op == 'amax' else ''}{d}{', keepdim=True' if keep else ''})", t.cf and keep


def _zero_pad_forward(layer: Layer) -> tuple[str, bool]:
    n = _dims(layer.cls)
    p = layer.get("padding", 1)
    pads = [(v, v) for v in _ints(p, n, "padding")] if isinstance(p, int) or (isinstance(p, list) and all(isinstance(v, int) for v in p)
                                                                              and n > 1) else None
    if pads is None:
        pads = [tuple(_ints(v, 2, "padding")) for v in (p if n > 1 else [p])]
    flat = [v for a, b in reversed(pads) for v in (a, b)]
    return f"F.pad({layer.x.to(True)}, ({', '.join(map(str, flat))}))", True


def _cropping_forward(layer: Layer) -> tuple[str, bool]:
    n = _dims(layer.cls)
    c = layer.get("cropping")
    crops = [tuple(_ints(v, 2, "cropping")) for v in (c if n > 1 else [c])] if not isinstance(c, int) else [(c, c)] * n
    sl = ", ".join(f"{a}:{-b if b else ''}" for a, b in crops)
    return f"{layer.x.to(True)}[:, :, {sl}]", True


def _upsampling_forward(layer: Layer) -> tuple[str, bool]:
    n = _dims(layer.cls)
    size = _ints(layer.get("size", 2), n, "size")
    mode = layer.get("interpolation", "nearest")
    if mode not in ("nearest", "bilinear"):
        raise _unsupported(layer, f"interpolation {str(mode)[:20]!r}", ("interpolation",))
    extra = ", mode=\"bilinear\", align_corners=False" if mode == "bilinear" else ""
    return f"F.interpolate({layer.x.to(True)}, scale_factor={_tup(size)}{extra})", True


def _common(layer: Layer) -> tuple[list[str], bool]:
    """The operands in one layout: a merge layer's list argument, or an op's arguments (tensors and numbers)."""
    ops = layer.args[0] if len(layer.args) == 1 and isinstance(layer.args[0], list) else layer.args
    cf = any(t.cf for t in ops if isinstance(t, T))
    return [t.to(cf) if isinstance(t, T) else repr(_float(t, "operand")) for t in ops], cf


def _merge(op: str) -> Callable[[Layer], tuple[str, bool]]:
    def forward(layer: Layer) -> tuple[str, bool]:
        xs, cf = _common(layer)
        if op in ("-", "/"):
            return f"{xs[0]} {op} {xs[1]}", cf
        if op in ("+", "*"):
            return f" {op} ".join(xs), cf
        fn = {"avg": "mean", "max": "amax", "min": "amin"}[op]
        return f"torch.stack([{', '.join(xs)}]).{fn}(0)", cf
    return forward


def _concat_forward(layer: Layer) -> tuple[str, bool]:
    xs, cf = _common(layer)
    t = T("", layer.x.shape, cf)
    return f"torch.cat([{', '.join(xs)}], dim={t.dim(_int(layer.get('axis', -1), 'axis'))})", cf


def _flatten_forward(layer: Layer) -> tuple[str, bool]:
    return f"torch.flatten({layer.x.to(False)}, 1)", False


def _reshape_forward(layer: Layer) -> tuple[str, bool]:
    shape = [_int(v, "target_shape") for v in layer.get("target_shape")]
    return f"{layer.x.to(False)}.reshape(-1, {', '.join(map(str, shape))})", False


def _permute_forward(layer: Layer) -> tuple[str, bool]:
    dims = [_int(v, "dims") for v in layer.get("dims")]
    return f"{layer.x.to(False)}.permute(0, {', '.join(map(str, dims))})", False


def _identity(layer: Layer) -> tuple[str, bool]:
    return layer.x.var, layer.x.cf


def _const(layer: Layer, key: str) -> str:
    v = layer.get(key)
    if isinstance(v, list):
        vals = [_float(x, key) for x in v]
        shape = [len(vals)] + [1] * (layer.x.rank - 2) if layer.x.cf else [len(vals)]
        return f"torch.tensor({vals!r}).reshape({', '.join(map(str, shape))})"
    return repr(_float(v, key))


def _rescaling_forward(layer: Layer) -> tuple[str, bool]:
    t, off = layer.x, _const(layer, "offset")
    off = "" if off == "0.0" else f" - {off[1:]}" if off.startswith("-") else f" + {off}"
    return f"{t.var} * {_const(layer, 'scale')}{off}", t.cf


def _activation_forward(layer: Layer) -> tuple[str, bool]:
    return activation(layer, layer.x.var, layer.x), layer.x.cf


def _relu_forward(layer: Layer) -> tuple[str, bool]:
    t = layer.x
    m, slope, th = layer.get("max_value"), _float(layer.get("negative_slope", 0.0), "negative_slope"), _float(
        layer.get("threshold", 0.0), "threshold")
    if slope == 0 and th == 0:
        if m is None:
            return f"F.relu({t.var})", t.cf
        m = _float(m, "max_value")
        return (f"F.relu6({t.var})" if m == 6 else f"{t.var}.clamp(0.0, {m!r})"), t.cf
    expr = f"torch.where({t.var} >= {th!r}, {t.var}, {slope!r} * ({t.var} - {th!r}))"
    return (expr if m is None else f"{expr}.clamp(max={_float(m, 'max_value')!r})"), t.cf


def _softmax_forward(layer: Layer) -> tuple[str, bool]:
    axis = layer.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    return f"F.softmax({layer.x.var}, dim={layer.x.dim(_int(axis, 'axis'))})", layer.x.cf


def _leaky_forward(layer: Layer) -> tuple[str, bool]:
    slope = layer.get("negative_slope", layer.get("alpha", 0.3))
    return f"F.leaky_relu({layer.x.var}, {_float(slope, 'negative_slope')!r})", layer.x.cf


def _elu_forward(layer: Layer) -> tuple[str, bool]:
    return f"F.elu({layer.x.var}, {_float(layer.get('alpha', 1.0), 'alpha')!r})", layer.x.cf


def _channel_dim(layer: Layer) -> int:
    _norm_axis(layer)
    return layer.x.dim(-1)


def _normalization_module(layer: Layer) -> str:
    c, extra = layer.x.keras_shape()[-1], ""
    if layer.get("mean") is not None:  # constants written in the config, not variables
        mean, var = (layer.get(k) for k in ("mean", "variance"))
        mean, var = ([_float(v, k) for v in (x if isinstance(x, list) else [x] * c)] for x, k in ((mean, "mean"), (var, "variance")))
        extra = f", mean={mean!r}, variance={var!r}"
    inv = ", invert=True" if layer.get("invert") else ""
    return f"Normalization({c}, dim={_channel_dim(layer)}{extra}{inv})"


def _embedding_module(layer: Layer) -> str:
    if layer.get("mask_zero"):
        raise _unsupported(layer, "mask_zero=True: Keras's later layers skip the masked steps, which the port does not do", ("mask_zero",))
    return f"nn.Embedding({_int(layer.get('input_dim'), 'input_dim')}, {_int(layer.get('output_dim'), 'output_dim')})"


_RNN = {"LSTM": "LSTM", "GRU": "GRU", "SimpleRNN": "RNN"}


def _rnn_check(layer: Layer, cfg: dict[str, Any], cls: str) -> None:
    inner = Layer(layer.keras_name, layer.name, cls, cfg)
    if cls not in _RNN:
        raise _unsupported(inner, "only LSTM, GRU and SimpleRNN are ported inside Bidirectional")
    for key, want in (("return_state", False), ("stateful", False), ("time_major", False)):
        if bool(cfg.get(key, False)) != want:
            raise _unsupported(inner, f"{key}={cfg.get(key)}", (key,))
    if _act_name(cfg.get("activation", "tanh")) != "tanh" and not (cls == "SimpleRNN" and _act_name(cfg.get("activation")) == "relu"):
        raise _unsupported(inner, "an activation other than tanh (torch's LSTM/GRU use tanh)", ("activation",))
    if cls != "SimpleRNN" and _act_name(cfg.get("recurrent_activation", "sigmoid")) != "sigmoid":
        raise _unsupported(inner, "a recurrent_activation other than sigmoid", ("recurrent_activation",))
    if cls == "GRU" and not cfg.get("reset_after", True):
        raise _unsupported(inner, "GRU(reset_after=False): torch's nn.GRU applies the reset gate after the matmul (reset_after=True)",
                           ("reset_after",))


def _rnn_module_code(layer: Layer, cfg: dict[str, Any], cls: str, bidirectional: bool) -> str:
    _rnn_check(layer, cfg, cls)
    args = [str(layer.x.keras_shape()[-1]), str(_int(cfg.get("units"), "units")), "batch_first=True"]
    args += [] if cfg.get("use_bias", True) else ["bias=False"]
    args += ["nonlinearity=\"relu\""] if cls == "SimpleRNN" and _act_name(cfg.get("activation")) == "relu" else []
    args += ["bidirectional=True"] if bidirectional else []
    return f"nn.{_RNN[cls]}({', '.join(args)})"


def _rnn_forward(layer: Layer) -> tuple[str, bool]:
    x = layer.x.to(False)
    x = f"{x}.flip(1)" if layer.get("go_backwards") else x
    return f"self.{layer.name}({x})[0]" + ("" if layer.get("return_sequences") else "[:, -1]"), False


def _inner(layer: Layer) -> tuple[dict[str, Any], str]:
    inner = layer.get("layer") or {}
    return (inner.get("config") or {}), str(inner.get("class_name"))


def _bidirectional_module(layer: Layer) -> str:
    cfg, cls = _inner(layer)
    back = layer.get("backward_layer")
    keys = ("units", "activation", "recurrent_activation", "use_bias", "return_sequences", "return_state", "reset_after")
    if isinstance(back, dict) and any((back.get("config") or {}).get(k) != cfg.get(k) for k in keys):
        raise _unsupported(layer, "a backward_layer configured unlike the forward one", ("backward_layer",))
    if cfg.get("go_backwards"):
        raise _unsupported(layer, "a forward layer with go_backwards=True", ("layer",))
    return _rnn_module_code(layer, cfg, cls, True)


def _bidirectional_forward(layer: Layer) -> tuple[str, bool]:
    cfg, _ = _inner(layer)
    mode = {"concat": "concat", "sum": "sum", "mul": "mul", "ave": "ave"}.get(layer.get("merge_mode", "concat"))
    if mode is None:
        raise _unsupported(layer, "merge_mode None (two outputs)", ("merge_mode",))
    last = not cfg.get("return_sequences", False)
    return f"merge_directions(self.{layer.name}({layer.x.to(False)})[0], \"{mode}\", last={last})", False


def _mha_dims(layer: Layer) -> tuple[int, int, int, int]:
    for key, ok in (("attention_axes", lambda v: v in (None, [1], 1)), ("use_gate", lambda v: not v), ("sliding_window",
        lambda v: v is None)):
        if not ok(layer.get(key)):
            raise _unsupported(layer, f"{key}={str(layer.get(key))[:30]}", (key,))
    heads, kd = _int(layer.get("num_heads"), "num_heads"), _int(layer.get("key_dim"), "key_dim")
    vd = _int(layer.get("value_dim") or kd, "value_dim")
    out = layer.get("output_shape")
    out = layer.x.keras_shape()[-1] if out is None else _int(out[0] if isinstance(out, list) and len(out) == 1 else out, "output_shape")
    return heads, kd, vd, out


def _mha_tensors(layer: Layer) -> tuple[T, T, T | None]:
    ts = [a for a in layer.args if isinstance(a, T)]
    q, v = ts[0], layer.kwargs.get("value", ts[1] if len(ts) > 1 else None)
    k = layer.kwargs.get("key", ts[2] if len(ts) > 2 else None)
    if not isinstance(v, T) or layer.kwargs.get("attention_mask") is not None or layer.kwargs.get("return_attention_scores"):
        raise _unsupported(layer, "a call without value, or with attention_mask / return_attention_scores")
    return q, v, k if isinstance(k, T) else None


def _mha_module(layer: Layer) -> str:
    heads, kd, vd, out = _mha_dims(layer)
    q, v, k = _mha_tensors(layer)
    dims = [q.keras_shape()[-1], v.keras_shape()[-1], (k or v).keras_shape()[-1], heads, kd, vd, out]
    return f"MultiHeadAttention({', '.join(map(str, dims))}{'' if layer.get('use_bias', True) else ', bias=False'})"


def _mha_forward(layer: Layer) -> tuple[str, bool]:
    q, v, k = _mha_tensors(layer)
    args = [q.to(False), v.to(False)] + ([f"key={k.to(False)}"] if k is not None else [])
    args += ["causal=True"] if layer.kwargs.get("use_causal_mask") is True else []
    return f"self.{layer.name}({', '.join(args)})", False


def _mha_rules(layer: Layer, prefix: str) -> list[dict[str, Any]]:
    """Keras keeps heads as an axis ((C, H, D) kernels, (H, D) biases); the port's Linears hold (H*D, C)."""
    heads, kd, vd, out = _mha_dims(layer)
    q, v, k = _mha_tensors(layer)
    src = f"(.*/)?{re.escape(layer.keras_name)}/"  # a Keras 3 .weights.h5 may leave these variables numbered (0, 1)
    rules = []
    for part, cin, d in (("query", q.keras_shape()[-1], kd), ("key", (k or v).keras_shape()[-1], kd), ("value", v.keras_shape()[-1], vd)):
        rules.append({"source": f"{src}{part}/(kernel|0)(:0)?", "target": f"{prefix}{layer.name}.{part}.weight",
                      "transform": [{"reshape": [cin, heads * d]}, "transpose"]})
        if layer.get("use_bias", True):
            rules.append({"source": f"{src}{part}/(bias|1)(:0)?", "target": f"{prefix}{layer.name}.{part}.bias",
                "transform": [{"reshape": [heads * d]}]})
    rules.append({"source": f"{src}attention_output/(kernel|0)(:0)?", "target": f"{prefix}{layer.name}.attention_output.weight",
                  "transform": [{"reshape": [heads * vd, out]}, "transpose"]})
    if layer.get("use_bias", True):
        rules.append({"source": f"{src}attention_output/(bias|1)(:0)?", "target": f"{prefix}{layer.name}.attention_output.bias"})
    return rules


_CONV = Row(_conv_module, _conv_forward, {"kernel": "weight", "bias": "bias"})
_SEPARABLE = Row(_separable_module, _conv_forward,
                 {"depthwise_kernel": "depthwise.weight", "pointwise_kernel": "pointwise.weight", "bias": "pointwise.bias"})
_BN = Row(_bn_module, lambda la: (f"self.{la.name}({la.x.to(True)})", la.x.rank >= 3),
          {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"})
_POOL = Row(_none, _pool_forward)
_GPOOL = Row(_none, _global_pool_forward)
_IDENTITY = Row(_none, _identity)

LAYERS: dict[str, Row] = {
    "Dense": Row(_dense_module, _dense_forward, {"kernel": "weight", "bias": "bias"}),
    **{f"Conv{n}D": _CONV for n in (1, 2, 3)},
    **{f"DepthwiseConv{n}D": _CONV for n in (1, 2)},
    **{f"SeparableConv{n}D": _SEPARABLE for n in (1, 2)},
    "BatchNormalization": _BN,
    "LayerNormalization": Row(_ln_module, lambda la: (f"self.{la.name}({la.x.to(False)})", False), {"gamma": "weight", "beta": "bias"}),
    **{f"{k}Pooling{n}D": _POOL for k in ("Max", "Average") for n in (1, 2, 3)},
    **{f"Global{k}Pooling{n}D": _GPOOL for k in ("Max", "Average") for n in (1, 2, 3)},
    **{f"ZeroPadding{n}D": Row(_none, _zero_pad_forward) for n in (1, 2, 3)},
    **{f"Cropping{n}D": Row(_none, _cropping_forward) for n in (1, 2, 3)},
    **{f"UpSampling{n}D": Row(_none, _upsampling_forward) for n in (1, 2, 3)},
    "Activation": Row(_none, _activation_forward),
    "ReLU": Row(_none, _relu_forward),
    "Softmax": Row(_none, _softmax_forward),
    "LeakyReLU": Row(_none, _leaky_forward),
    "ELU": Row(_none, _elu_forward),
    "Add": Row(_none, _merge("+")), "Multiply": Row(_none, _merge("*")), "Subtract": Row(_none, _merge("-")),
    "Divide": Row(_none, _merge("/")), "TrueDivide": Row(_none, _merge("/")),
    "Average": Row(_none, _merge("avg")), "Maximum": Row(_none, _merge("max")), "Minimum": Row(_none, _merge("min")),
    "Concatenate": Row(_none, _concat_forward),
    "Flatten": Row(_none, _flatten_forward),
    "Reshape": Row(_none, _reshape_forward),
    "Permute": Row(_none, _permute_forward),
    "Rescaling": Row(_none, _rescaling_forward),
    "Normalization": Row(_normalization_module, lambda la: (f"self.{la.name}({la.x.var})", la.x.cf), {"mean": "mean",
        "variance": "variance"}),
    "LayerScale": Row(lambda la: f"LayerScale({la.x.keras_shape()[-1]}, dim={_channel_dim(la)})",
                      lambda la: (f"self.{la.name}({la.x.var})", la.x.cf), {"gamma": "weight"}),
    "Embedding": Row(_embedding_module, lambda la: (f"self.{la.name}({la.x.var}.long())", False), {"embeddings": "weight"}),
    **{k: Row(lambda la: _rnn_module_code(la, la.cfg, la.cls, False), _rnn_forward,
              {"kernel": "weight_ih_l0", "recurrent_kernel": "weight_hh_l0", "bias": "bias_ih_l0 (+ bias_hh_l0: GRU row 1, else zeros)"})
       for k in _RNN},
    "MultiHeadAttention": Row(_mha_module, _mha_forward, {"query/kernel (C, H, D)": "query.weight (H*D, C)"}, _mha_rules),
    "Bidirectional": Row(_bidirectional_module, _bidirectional_forward,
                         {"forward_*": "*_l0", "backward_*": "*_l0_reverse"}),
    **{k: _IDENTITY for k in ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
                              "GaussianNoise", "AlphaDropout", "ActivityRegularization")},
}

# a rank-3 model input that feeds one of these is a sequence (N, T, C) and stays batch-first in
# both layouts; any other rank >= 3 input is an image / signal / volume, channels-first by default
_SEQUENCE = re.compile(r"^(Embedding|LSTM|GRU|SimpleRNN|Bidirectional|MultiHeadAttention|Attention|Dense|LayerNormalization|"
                       r"TimeDistributed)$")


# ---------------------------------------------------------------------------------------------
# the graph: Sequential or Functional config → inputs, calls in order, outputs

Ref = tuple[str, int, int]  # (layer name, node index, tensor index): Keras's keras_history

def _ref(v: Any) -> Ref | None:
    if isinstance(v, dict) and v.get("class_name") == "__keras_tensor__":
        h = v.get("config", {}).get("keras_history")
        if isinstance(h, list) and len(h) == 3 and isinstance(h[0], str):
            return (h[0], _int(h[1], "node index"), _int(h[2], "tensor index"))
    if isinstance(v, list) and len(v) >= 3 and isinstance(v[0], str) and isinstance(v[1], int) and isinstance(v[2], int):
        return (v[0], v[1], v[2])  # Keras 2 form [name, node, tensor, kwargs]
    return None


def _refs(v: Any) -> list[Ref]:
    r = _ref(v)
    if r is not None:
        return [r]
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _refs(item)]
    if isinstance(v, dict) and "class_name" not in v:
        return [x for item in v.values() for x in _refs(item)]
    return []


def _raw(v: Any) -> Any:
    """A call argument with each tensor as its Ref; numbers kept; anything else None."""
    r = _ref(v)
    if r is not None:
        return r
    if isinstance(v, list):
        return [_raw(x) for x in v]
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _node_inputs(node: Any) -> tuple[list[Ref], dict[str, Ref], list[Any]]:
    """Positional tensor inputs, tensor keyword arguments and the raw positional arguments of one call."""
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}; bool keywords (use_causal_mask) kept as they are
        kw = {k: r[0] if len(r := _refs(v)) == 1 else v for k, v in (node.get("kwargs") or {}).items() if len(_refs(v)) == 1 or v is True}
        return _refs(node.get("args", [])), kw, [_raw(a) for a in node.get("args", [])]
    refs = _refs(node)  # Keras 2: [[name, node, tensor, kwargs], ...]
    return refs, {}, [refs] if len(refs) > 1 else refs


def _refs_list(v: Any) -> list[Ref]:
    if isinstance(v, list) and v and isinstance(v[0], str):
        v = [v]
    return [(x[0], _int(x[1], "node"), _int(x[2], "tensor")) for x in v or []]


def _input_shape(cfg: dict[str, Any]) -> tuple[Any, ...] | None:
    s = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    return tuple(s) if isinstance(s, list) else None


@dataclass
class Graph:
    name: str
    inputs: list[tuple[str, tuple[Any, ...], str]]  # (layer name, batch shape, dtype)
    calls: list[tuple[dict[str, Any], int, list[Ref], dict[str, Ref], list[Any]]]  # (layer, node, tensor args, kwargs, raw args)
    outputs: list[Ref]


def parse_graph(model: dict[str, Any]) -> Graph:
    cls, cfg = model.get("class_name"), model.get("config") or {}
    layers = cfg.get("layers")
    if not isinstance(layers, list):
        raise PortError(f"model class {str(cls)[:40]!r} has no layer list", key=str(cfg.get("name", "model"))[:80],
                        fix="np2torch port reads Sequential and Functional models saved with model.save")
    name = cfg.get("name") if isinstance(cfg.get("name"), str) else "model"
    if cls == "Sequential":
        inputs, calls = [], []
        prev: Ref | None = None
        for i, layer in enumerate(layers):
            lc = layer.get("config") or {}
            if layer.get("class_name") == "InputLayer" or prev is None:
                shape = _input_shape(lc) or (cfg.get("build_input_shape") and tuple(cfg["build_input_shape"])) or (
                    tuple((layer.get("build_config") or {}).get("input_shape") or ()) or None)
                if shape is None:
                    raise PortError("the Sequential model has no input shape", key=name[:80],
                        fix="build the model (model.build or an Input) before saving")
                iname = lc.get("name", "input") if layer.get("class_name") == "InputLayer" else "inputs"
                inputs.append((iname, shape, str(lc.get("dtype", "float32"))))
                prev = (iname, 0, 0)
                if layer.get("class_name") == "InputLayer":
                    continue
            layer = {**layer, "name": lc.get("name", layer.get("name", f"layer_{i}"))}
            calls.append((layer, 0, [prev], {}, [prev]))
            prev = (layer["name"], 0, 0)
        return Graph(name, inputs, calls, [prev] if prev else [])
    inputs = []
    input_names = {r[0] for r in _refs_list(cfg.get("input_layers"))}
    calls = []
    for layer in layers:
        lname = layer.get("name") or (layer.get("config") or {}).get("name")
        if not isinstance(lname, str):
            raise PortError("a layer has no name", key=name[:80], fix="re-save the model with Keras")
        layer = {**layer, "name": lname}
        if layer.get("class_name") == "InputLayer" or lname in input_names and not layer.get("inbound_nodes"):
            shape = _input_shape(layer.get("config") or {})
            if shape is None:
                raise PortError("an input layer has no shape", key=lname[:80], fix="give keras.Input a shape")
            inputs.append((lname, shape, str((layer.get("config") or {}).get("dtype", "float32"))))
            continue
        for k, node in enumerate(layer.get("inbound_nodes") or []):
            calls.append((layer, k, *_node_inputs(node)))
    return Graph(name, inputs, _toposort(calls, {i[0] for i in inputs}), _refs_list(cfg.get("output_layers")))


def _toposort(calls: list, available: set[str]) -> list:
    """Calls in an order where every input is computed first (Keras's own order when it is one)."""
    done = {(n, 0) for n in available}
    out, pending = [], list(calls)
    while pending:
        rest = []
        for c in pending:
            if all((r[0], r[1]) in done for r in [*c[2], *(v for v in c[3].values() if isinstance(v, tuple))]):
                out.append(c)
                done.add((c[0]["name"], c[1]))
            else:
                rest.append(c)
        if len(rest) == len(pending):
            missing = sorted({r[0] for c in rest for r in c[2] if (r[0], r[1]) not in done})[:5]
            raise PortError("the layer graph has calls whose inputs are never computed", key=rest[0][0]["name"][:80], actual=missing,
                            fix="re-save the model with Keras; nested models and shared layers across models are not supported yet")
        pending = rest
    return out


# ---------------------------------------------------------------------------------------------
# generation: each line traced on `meta` tensors as it is written


@dataclass
class Generated:
    source: str
    class_name: str
    inputs: list[tuple[str, bool]]  # (argument, channels-first?) per model input, in order
    outputs: list[bool]  # channels-first? per model output, in order
    allow_missing: list[str]  # torch state Keras has no variable for (BatchNorm without center/scale)
    placeholders: list[str]
    layers: int
    input_specs: list[tuple[list[int], str]]  # (torch shape with N=1, dtype) per input: the traced example
    rules: list[dict[str, Any]] = field(default_factory=list)  # mapping rules for what the keras preset cannot guess


def _shape_comment(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(["N", *map(str, shape[1:])]) + ")"


def _wrap(line: str, indent: int) -> list[str]:
    """Split a too-long line inside brackets (implicit continuation): after ', ' or after an opening bracket."""
    if len(line) <= LINE:
        return [line]
    code, _, comment = line.partition("  # ")
    out = ([" " * indent + "# " + comment] if comment else [])
    cont = " " * (indent + 4)
    while len(code) > LINE:
        depth, cut, skip = 0, -1, 0
        for i, ch in enumerate(code[:LINE]):
            depth += ch in "([{"
            depth -= ch in ")]}"
            if depth > 0 and code.startswith(", ", i):
                cut, skip = i + 1, 1
            elif ch in "([{" and i > len(cont):
                cut, skip = i + 1, 0
        if cut < 0:
            break
        out.append(code[:cut])
        code = cont + code[cut + skip:]
    return [*out, code]


_NESTED = ("Sequential", "Functional", "Model")


class _Writer:
    """Writes one class per (sub)model, tracing each line on ``meta`` tensors as it is written."""

    def __init__(self, layout: str, allow_placeholders: bool) -> None:
        import torch
        import torch.nn.functional as F
        from torch import nn

        from np2torch import port_runtime

        self.torch, self.nn, self.runtime = torch, nn, port_runtime
        self.layout, self.allow_placeholders = layout, allow_placeholders
        self.ns: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, **port_runtime.HELPERS}
        self.ns["placeholder"] = lambda layer, *xs: xs[0]  # traced as identity; the written file raises
        self.reserved = {"self", "torch", "nn", "F", *port_runtime.HELPERS} | set(dir(nn.Module))
        self.classes: list[list[str]] = []  # class sources, nested models first
        self.class_names: set[str] = set()
        self.helpers: set[str] = set()
        self.allow_missing: list[str] = []
        self.rules: list[dict[str, Any]] = []
        self.placeholders: list[str] = []
        self.n_calls = 0
        self.uses_f = False
        ns = self.ns

        class Replay(nn.Module):
            """A written class as traced: its submodules, and its forward lines evaluated in order."""

            def forward(self, *xs: Any) -> Any:
                env = dict(zip(self.inputs, xs, strict=True))
                for var, expr in self.steps:
                    env[var] = eval(expr, {**ns, "self": self}, env)  # our own lines, as written into the file
                return env[self.steps[-1][0]]

        self.Replay = Replay

    def write_class(self, graph: Graph, given: list[T] | None = None, prefix: str = "") -> tuple[str, Any, list[T], list[T]]:
        """(class name, traced module, input tensors, output tensors) of one (sub)model's class."""
        torch = self.torch
        root = self.Replay()
        root.steps, root.inputs = [], []
        used: set[str] = set()

        def unique(name: str) -> str:
            base = ident(name) or "layer"
            base = base + "_" if base in self.reserved else base
            out, i = base, 1
            while out in used:
                out, i = f"{base}_{i}", i + 1
            used.add(out)
            return out

        consumers: dict[str, list[str]] = {}
        for layer, _k, args, kwargs, _raw_args in graph.calls:
            for r in [*args, *(v for v in kwargs.values() if isinstance(v, tuple))]:
                consumers.setdefault(r[0], []).append(layer.get("class_name", ""))
        tensors: dict[tuple[str, int, int], T] = {}
        env: dict[str, Any] = {}
        inputs: list[T] = []
        if given is not None and len(given) != len(graph.inputs):
            raise PortError(f"nested model {graph.name[:60]!r} takes {len(graph.inputs)} inputs, is given {len(given)}",
                key=graph.name[:80])
        for j, (iname, shape, dtype) in enumerate(graph.inputs):
            var = unique(iname)
            if given is not None:  # a nested model works in its caller's layout
                t = T(var, given[j].shape, given[j].cf)
                env[var] = torch.zeros(t.shape, device="meta", dtype=self.env_of[given[j].var].dtype)
            else:
                kshape = tuple(1 if i == 0 else (8 if d is None else _int(d, "input shape")) for i, d in enumerate(shape))
                cf = self.layout == "channels_first" and (
                    len(kshape) >= 4 or len(kshape) == 3 and not any(_SEQUENCE.match(c) for c in consumers.get(iname, [])))
                t = T(var, (kshape[0], kshape[-1], *kshape[1:-1]) if cf else kshape, cf)
                env[var] = torch.zeros(t.shape, dtype=torch.int64 if "int" in dtype else torch.float32, device="meta")
            tensors[(iname, 0, 0)] = t
            inputs.append(t)
            root.inputs.append(var)

        init_lines: list[str] = []
        fwd_lines: list[str] = []
        attr_of: dict[str, str] = {}
        nested: dict[str, tuple[list[T], list[T]]] = {}
        for layer_dict, k, args, kwargs, raw_args in graph.calls:
            self.n_calls += 1
            kname, cls = layer_dict["name"], str(layer_dict.get("class_name"))
            cfg = layer_dict.get("config") if isinstance(layer_dict.get("config"), dict) else {}
            try:
                ins = [tensors[(r[0], r[1], r[2])] for r in args]
                kw = {key: tensors[(r[0], r[1], r[2])] if isinstance(r, tuple) else r for key, r in kwargs.items()}
            except KeyError as exc:
                raise PortError(f"layer {kname!r} reads a tensor no layer produced: {exc}", key=kname[:80],
                                fix="layers with several outputs are not supported yet") from None
            if kname not in attr_of:
                attr_of[kname] = unique(kname)
            name = attr_of[kname]
            var = name if k == 0 else unique(f"{name}_{k}")

            def resolve(v: Any) -> Any:
                return tensors[v] if isinstance(v, tuple) else [resolve(x) for x in v] if isinstance(v, list) else v

            layer = Layer(kname, name, cls, cfg, ins, kw, [resolve(a) for a in raw_args])
            row = LAYERS.get(cls)
            comment_extra = ""
            try:
                if cls in _NESTED and isinstance(cfg.get("layers"), list):
                    if k == 0:
                        self.env_of = {**getattr(self, "env_of", {}), **env}
                        sub_name, sub_root, sub_ins, sub_outs = self.write_class(parse_graph(layer_dict), ins, f"{prefix}{name}.")
                        setattr(root, name, sub_root)
                        init_lines.append(f"self.{name} = {sub_name}()")
                        nested[kname] = (sub_ins, sub_outs)
                    sub_ins, sub_outs = nested[kname]
                    if len(sub_outs) != 1:
                        raise _unsupported(layer, "a nested model with several outputs")
                    # a shared nested model takes each call's inputs in the layout it was written for
                    expr, cf = f"self.{name}({', '.join(t.to(s.cf) for t, s in zip(ins, sub_ins, strict=True))})", sub_outs[0].cf
                elif row is None:
                    if not self.allow_placeholders:
                        why = {"Lambda": "a Lambda layer holds Python bytecode, which np2torch never runs or translates",
                               "TFOpLambda": "a TF op recorded as a layer, which np2torch never runs"}.get(
                            cls, f"class {cls[:60]!r} is not in np2torch's layer table (a custom layer, or one not supported yet)")
                        keys = tuple(k2 for k2 in ("function", "module", "registered_name", "arguments") if k2 in cfg or k2 in layer_dict)
                        raise _unsupported(Layer(kname, name, cls, {**layer_dict, **cfg}), why, keys)
                    self.placeholders.append(f"{kname} ({cls})")
                    self.helpers.add("placeholder")
                    expr, cf = f"placeholder(\"{name}\", {', '.join(t.var for t in ins)})", ins[0].cf if ins else False
                    comment_extra = f"  PLACEHOLDER: Keras {ident(cls) or 'unknown'} layer not ported, write it by hand"
                else:
                    if k == 0:
                        code = row.module(layer)
                        if code is not None:
                            self.helpers |= {h for h in self.runtime.HELPERS if f"{h}(" in code}
                            with torch.device("meta"):
                                setattr(root, name, eval(code, self.ns).eval())  # generated from checked numbers and identifiers
                            init_lines.append(f"self.{name} = {code}")
                            self.rules += row.rules(layer, prefix) if row.rules else []
                            if cls == "BatchNormalization" and cfg.get("center", True) != cfg.get("scale", True):
                                leaf = "bias" if not cfg.get("center", True) else "weight"
                                self.allow_missing.append(re.escape(f"{prefix}{name}.{leaf}"))
                    expr, cf = row.forward(layer)
                    self.helpers |= {h for h in self.runtime.HELPERS if f"{h}(" in expr}
                    comment_extra = "  Keras " + cls + ": identity at inference" if row is _IDENTITY else ""
            except ValueError as exc:
                raise _unsupported(layer, str(exc)) from None
            try:
                value = eval(expr, {**self.ns, "self": root}, env)  # our own expression, traced on meta tensors
            except Exception as exc:  # noqa: BLE001 - a shape the row did not expect: name the layer
                raise PortError(f"layer {kname!r} ({cls}): the generated line does not run on its input shapes: {exc}", key=kname[:80],
                                actual=[t.keras_shape() for t in ins],
                                    fix="report this model to np2torch; write the layer by hand") from None
            env[var] = value
            root.steps.append((var, expr))
            t = T(var, tuple(value.shape), cf and value.dim() >= 3)
            tensors[(kname, k, 0)] = t
            fwd_lines.append(f"{var} = {expr}  # {_shape_comment(t.shape)}{comment_extra}")

        outs = [tensors[(r[0], r[1], r[2])] for r in graph.outputs]
        top = given is None
        ret = [t.to(False) if top and self.layout == "channels_last" else t.var for t in outs]
        if top:
            outs = [T(t.var, t.shape, t.cf and self.layout != "channels_last") for t in outs]
        fwd_lines.append("return " + (ret[0] if len(ret) == 1 else ", ".join(ret)))
        self.uses_f |= any("F." in line for line in fwd_lines)

        cname = class_name(graph.name)
        while cname in self.class_names:
            cname += "_"
        self.class_names.add(cname)
        shown = graph.name if ident(graph.name) else "(unnamed)"
        src = [f"class {cname}(nn.Module):", f'    """Keras model {shown}: {len(graph.calls)} layer calls."""', "",
               "    def __init__(self) -> None:", "        super().__init__()"]
        for line in init_lines:
            src += _wrap("        " + line, 8)
        ret_t = "torch.Tensor" if len(ret) == 1 else f"tuple[{', '.join(['torch.Tensor'] * len(ret))}]"
        src += ["", f"    def forward(self, {', '.join(f'{t.var}: torch.Tensor' for t in inputs)}) -> {ret_t}:"]
        for line in fwd_lines:
            src += _wrap("        " + line, 8)
        self.classes.append(src)
        self.env_of = {**getattr(self, "env_of", {}), **env}
        return cname, root, inputs, outs


def generate(model: dict[str, Any], *, layout: str = "channels_first", allow_placeholders: bool = False) -> Generated:
    """The source of ``model.py`` for a Keras model config (plus what the config and verify need)."""
    import inspect

    w = _Writer(layout, allow_placeholders)
    cname, _root, inputs, outs = w.write_class(parse_graph(model))
    doc_in = ", ".join(f"{t.var} {_shape_comment(t.shape)}" + (" channels-first" if t.cf else "") for t in inputs)
    src = ['"""PyTorch port of a Keras model, written by `np2torch port` from the model\'s saved architecture.', "",
           f"Inputs: {doc_in} (N: batch).", "Weights: load the `model.safetensors` np2torch wrote next to this file.", '"""', "",
           "import torch", *(["import torch.nn.functional as F"] if w.uses_f else []), "from torch import nn"]
    for h, fn in w.runtime.HELPERS.items():  # their source, as defined (and traced) in np2torch.port_runtime
        if h in w.helpers:
            src += ["", "", *inspect.getsource(fn).rstrip("\n").split("\n")]
    for cls_src in w.classes:
        src += ["", "", *cls_src]
    specs = [(list(t.shape), "int64" if w.env_of[t.var].dtype == w.torch.int64 else "float32") for t in inputs]
    return Generated("\n".join(src) + "\n", cname, [(t.var, t.cf) for t in inputs], [t.cf for t in outs], w.allow_missing,
                     w.placeholders, w.n_calls, specs, w.rules)
