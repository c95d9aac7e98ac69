"""Import and build the target model (SPEC ``model.target``), and describe its state dict.

The model's *parameters* are built on the ``meta`` device wherever its constructor allows: the
mapping stage needs only names, shapes and dtypes, and the convert stage loads real tensors with
``load_state_dict(assign=True)``, so parameters are never allocated twice. Its *buffers* are
built for real (what accelerate's ``init_empty_weights(include_buffers=False)`` does): the
constructor computes non-persistent ones that no checkpoint holds (transformers'
``position_ids``/``token_type_ids``, rotary ``inv_freq``, causal masks), and they must keep those
values. A non-persistent buffer the constructor derives from a parameter is neither in the
state dict nor computable: building such a model is a :class:`ModelError` naming it.

A Hugging Face ``PreTrainedModel`` class given as ``model.target`` takes ``model.kwargs`` as
its config's fields (``transformers:BertModel`` with ``{hidden_size: 32, …}``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from np2torch.tasks.errors import ModelError

__all__ = ["TargetInfo", "import_target", "build_model", "describe_targets", "materialize_missing", "params_on_meta", "finish_load"]


@dataclass(frozen=True)
class TargetInfo:
    key: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix
    is_buffer: bool
    module: str  # owning module path ("" for the root)
    module_type: str  # owning module's class name (Linear, Conv2d, BatchNorm2d, …)
    tied_to: str | None = None  # first key sharing this tensor's storage (tied weights)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return getattr(torch, self.dtype).is_floating_point


def _import_file(path: Path) -> Any:
    if not path.is_file():  # a config error (exit 2) with a did-you-mean, as the preflight check says it
        from np2torch.flows.preflight import missing_model_file

        raise missing_model_file(path, str(path))
    name = "np2torch_user_model_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError("cannot import this file as a Python module", key=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ModelError(f"importing the model file failed: {type(exc).__name__}: {exc}", key=str(path),
                         fix="fix the error in the model file") from None
    return module


def import_target(target: str, *, allow_unsafe_load: bool = False) -> Any:
    """Resolve ``pkg.module:attr`` or ``path/file.py:attr`` (or a pickled ``.pt`` module) to an object."""
    mod_name, _, attr = target.rpartition(":")
    if target.endswith((".pt", ".pth")) or mod_name.endswith((".pt", ".pth")):
        return _load_pickled_module(Path(mod_name if mod_name.endswith((".pt", ".pth")) else target), allow_unsafe_load)
    if mod_name.endswith(".py"):
        module = _import_file(Path(mod_name))
    else:
        try:
            module = importlib.import_module(mod_name)
        except Exception as exc:
            raise ModelError(f"cannot import module {mod_name!r}: {type(exc).__name__}: {exc}", key=target,
                             fix="check model.target: 'pkg.module:Class' must be importable, or use 'path/to/file.py:Class'") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            avail = sorted(n for n in dir(module) if not n.startswith("_"))[:20]
            raise ModelError(f"{mod_name} has no attribute {attr!r}", key=target, expected=f"one of {avail}", actual=attr,
                             fix="check the name after ':' in model.target")
        obj = getattr(obj, part)
    return obj


def _load_pickled_module(path: Path, allow_unsafe_load: bool) -> Any:
    if not path.is_file():
        from np2torch.flows.preflight import missing_model_file

        raise missing_model_file(path, str(path))
    if not allow_unsafe_load:
        raise ModelError(
            "a pickled model architecture (torch.save of an nn.Module) can run arbitrary code when loaded; refused",
            key=str(path),
            fix="give the architecture as code ('path/to/file.py:Class'), or set model.allow_unsafe_load: true if you trust this file",
        )
    warnings.warn(f"loading pickled model {path} with weights_only=False: this runs code from the file", stacklevel=2)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"torch.load failed: {type(exc).__name__}: {exc}", key=str(path)) from None
    if not isinstance(obj, nn.Module):
        raise ModelError(f"file holds a {type(obj).__name__}, not an nn.Module", key=str(path),
                         fix="point model.target at a model class instead")
    return lambda **_: obj


# ---------------------------------------------------------------------------------------------
# parameters on meta, buffers real


_META = threading.local()  # per-thread depth: Prefect runs tasks in threads; only the building one is affected
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_ORIGINAL_REGISTER = nn.Module.register_parameter


def _register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _ORIGINAL_REGISTER(self, name, param)
    p = self._parameters.get(name)
    if getattr(_META, "depth", 0) > 0 and p is not None and not p.is_meta and not isinstance(p, nn.parameter.UninitializedParameter):
        extra = dict(getattr(p, "__dict__", {}))
        self._parameters[name] = (type(p)(p.to("meta"), requires_grad=p.requires_grad, **extra) if extra
                                  else type(p)(p.to("meta"), p.requires_grad))


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside (in this thread) moves to ``meta``; buffers stay where made.

    Like accelerate's ``init_empty_weights(include_buffers=False)``, but only for the calling
    thread, so a model built at the same time in another thread is unaffected.
    """
    global _PATCH_USERS
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _PATCH_USERS += 1
    _META.depth = getattr(_META, "depth", 0) + 1
    try:
        yield
    finally:
        _META.depth -= 1
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0:
                nn.Module.register_parameter = _ORIGINAL_REGISTER  # type: ignore[method-assign]


def _config_factory(factory: Any, kwargs: dict[str, Any]) -> Any:
    """A transformers ``PreTrainedModel`` class is built from a config made of ``kwargs``."""
    config_class = getattr(factory, "config_class", None)
    if not (inspect.isclass(factory) and isinstance(factory, type) and inspect.isclass(config_class) and "config" not in kwargs):
        return None
    params = list(inspect.signature(factory.__init__).parameters)
    if len(params) < 2 or params[1] != "config":
        return None
    return lambda: factory(config_class(**kwargs))


def build_model(target: str, kwargs: dict[str, Any] | None = None, *, device: str = "meta", allow_unsafe_load: bool = False) -> nn.Module:
    """Instantiate the model; with ``device="meta"`` its parameters on ``meta`` (no memory) and its
    buffers computed by the constructor, else all on the CPU (the constructor's own values).

    Falls back to a CPU build when the constructor cannot run with meta parameters (it computes
    on them, e.g. ``.item()``). Raises :class:`ModelError` when a non-persistent buffer stays on
    ``meta`` (derived from a parameter: no checkpoint and no constructor can give its value).
    """
    factory = import_target(target, allow_unsafe_load=allow_unsafe_load)
    if not callable(factory):
        raise ModelError(f"{target} is a {type(factory).__name__}, not a class or factory", key=target,
                         fix="point model.target at an nn.Module class or a function returning one")
    kwargs = dict(kwargs or {})
    build = _config_factory(factory, kwargs) or (lambda: factory(**kwargs))

    def make(dev: str) -> nn.Module:
        torch.manual_seed(0)  # initial values of allowed-missing tensors are then reproducible
        with params_on_meta() if dev == "meta" else contextlib.nullcontext():
            return build()

    try:
        model = make(device)
    except Exception as exc:
        if device == "meta":
            try:  # some constructors compute on their tensors (e.g. .item()): build for real
                model = make("cpu")
            except Exception:
                model = None
        else:
            model = None
        if model is None:
            raise ModelError(f"building the model failed: {type(exc).__name__}: {exc}", key=target,
                             fix="check model.kwargs against the constructor's signature") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{target} returned a {type(model).__name__}, not an nn.Module", key=target,
                         fix="return an nn.Module from the factory")
    _check_buffers(model, target)
    return model


def _check_buffers(model: nn.Module, target: str) -> None:
    persistent = set(model.state_dict(keep_vars=True))
    lost = [k for k, b in model.named_buffers() if b.is_meta and k not in persistent]
    if lost:
        raise ModelError(f"non-persistent buffer(s) {lost} are neither in the state dict nor computed by the constructor "
                         "(they are derived from parameters on the meta device)", key=lost[0],
                         expected="a buffer the constructor computes, or a persistent one", actual="a meta tensor",
                         fix=f"register {lost[0]!r} with persistent=True (then it is mapped like a parameter), or compute it "
                         "in __init__ from plain values rather than from a parameter")


def finish_load(model: nn.Module, device: torch.device | str) -> nn.Module:
    """After ``load_state_dict(assign=True)``: buffers the state dict does not hold (the constructor's
    non-persistent ones) move to ``device``; any tensor still on ``meta`` is a :class:`ModelError`
    naming it (its value came from nowhere)."""
    dev = torch.device(device)
    left = [k for k, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)] if t.is_meta]
    if left:
        raise ModelError(f"{len(left)} tensor(s) still on the meta device after loading: {left[:5]}", key=left[0],
                         expected="a loaded or computed value", actual="a meta tensor",
                         fix=f"map {left[0]!r} (or allow it with mapping.allow_missing), or make the constructor compute it")
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != dev:
                mod._buffers[name] = b.to(dev)
    return model


def describe_targets(model: nn.Module) -> list[TargetInfo]:
    """Every state-dict entry (parameters and persistent buffers) in registration order."""
    owners: dict[str, tuple[str, str]] = {}
    for mname, mod in model.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            owners[f"{mname}.{pname}" if mname else pname] = (mname, type(mod).__name__)
    buffers = {k for k, _ in model.named_buffers()}
    seen: dict[int, str] = {}
    out = []
    for key, t in model.state_dict(keep_vars=True).items():
        ident = id(t)
        tied = seen.get(ident)
        seen.setdefault(ident, key)
        mname, mtype = owners.get(key, (key.rpartition(".")[0], "?"))
        out.append(TargetInfo(key, tuple(t.shape), str(t.dtype).removeprefix("torch."), key in buffers, mname, mtype, tied))
    return out


def materialize_missing(model_target: str, kwargs: dict[str, Any], keys: list[str], *,
                        allow_unsafe_load: bool = False) -> dict[str, torch.Tensor]:
    """Initial values of the targets allowed to stay missing (seeded, so reproducible).

    Buffers are the constructor's own values already (built for real). For parameters, only the
    submodules that own them are materialised (empty on the CPU, then their own ``reset_parameters``),
    each seeded from its name, so a 20 GB model whose
    ``num_batches_tracked`` counters may stay missing never exists on the CPU. When an owner
    cannot initialise itself that way, the whole model is built on the CPU instead.
    """
    if not keys:
        return {}
    model = build_model(model_target, kwargs, allow_unsafe_load=allow_unsafe_load)
    values = _materialize_owners(model, keys)
    if values is not None:
        return values
    model = build_model(model_target, kwargs, device="cpu", allow_unsafe_load=allow_unsafe_load)
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in keys}


def _materialize_owners(model: nn.Module, keys: list[str]) -> dict[str, torch.Tensor] | None:
    """The keys' values from their owners alone, or None when some owner cannot do it."""
    sd = model.state_dict(keep_vars=True)
    owners: dict[str, list[str]] = {}
    for k in keys:
        if k not in sd:
            return None
        owners.setdefault(k.rpartition(".")[0], []).append(k)
    out: dict[str, torch.Tensor] = {}
    for path, ks in owners.items():
        mod = model.get_submodule(path) if path else model
        if not any(sd[k].is_meta for k in ks):  # buffers, or a model built for real: the constructor's values
            out.update({k: sd[k].detach().clone() for k in ks})
            continue
        reset = getattr(mod, "reset_parameters", None)
        if not callable(reset) or path == "":
            return None  # only the constructor knows these initial values
        for name, p in list(mod._parameters.items()):  # buffers are real already: keep the constructor's values
            if p is not None and p.is_meta:
                mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
        torch.manual_seed(int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "little"))
        try:
            with torch.no_grad():
                reset()
        except Exception:
            return None
        msd = model.state_dict(keep_vars=True)
        if any(msd[k].is_meta for k in ks):
            return None
        out.update({k: msd[k].detach().clone() for k in ks})
    return out
