"""The Python API: the pipeline's stages called from a script or a notebook.

Four verbs, each a thin layer over the same stage functions the Prefect flow runs, so the
mapping, the checks and the errors are the pipeline's own:

* :func:`load_into` — weights from NumPy files into an ``nn.Module`` you already have (no YAML,
  no Prefect); returns the model and its :class:`Manifest`;
* :func:`plan` — the manifest a conversion would use, as a pandas DataFrame; writes nothing;
* :func:`inspect` — the arrays in a file or folder, as a pandas DataFrame;
* :func:`convert` — a config file through the whole pipeline (cached, audited; as a Prefect flow
  run unless ``orchestrate=False``); returns a :class:`ConversionResult`.

Bad input raises the pipeline's exceptions (:mod:`np2torch.tasks.errors`): a
:class:`~np2torch.tasks.errors.ConfigError` for wrong arguments or config, another
:class:`~np2torch.tasks.errors.ConversionError` (naming the stage, the key and the fix) when a
stage fails.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from np2torch.tasks.errors import ConfigError, ConversionError
from np2torch.tasks.manifest import ManifestRow

if TYPE_CHECKING:  # imported lazily at run time: `import np2torch` stays light
    import pandas as pd
    from torch import nn

    from np2torch.tasks.config import Config

__all__ = ["load_into", "plan", "inspect", "convert", "Manifest", "ConversionResult", "OutputFile", "StageTiming"]

ArrayLike = Any  # a NumPy array, a torch tensor, or anything np.asarray accepts


# ---------------------------------------------------------------------------------------------
# typed results


@dataclass(frozen=True)
class Manifest:
    """Which source array fed which parameter, with which transform, and how sure that is.

    ``rows`` holds one :class:`~np2torch.tasks.manifest.ManifestRow` per target tensor, then one
    per source array no target used. ``df`` is the same as a pandas DataFrame (a notebook shows
    it as a table); ``unverified`` names the targets whose layout the shapes could not pin down
    and no reference confirmed; ``verification`` holds the forward-pass metrics when a
    reference was given.
    """

    rows: tuple[ManifestRow, ...]
    verification: dict[str, Any] | None = None
    name: str = ""

    @classmethod
    def from_dicts(cls, rows: Sequence[Mapping[str, Any]], **kw: Any) -> Manifest:
        return cls(tuple(ManifestRow.from_dict(dict(r)) for r in rows), **kw)

    @property
    def targets(self) -> list[ManifestRow]:
        """The rows of target tensors (state-dict keys), in the model's order."""
        return [r for r in self.rows if r.target_key]

    @property
    def unused(self) -> list[str]:
        """Source keys that no target used (status ``unused`` or ``ignored``)."""
        return [r.source_key for r in self.rows if not r.target_key]

    @property
    def unverified(self) -> list[str]:
        """Target keys whose layout is a guess: several fit the shapes and no reference chose."""
        return [r.target_key for r in self.targets if not r.verified]

    @property
    def df(self) -> pd.DataFrame:
        """The manifest as a DataFrame (shapes as lists, one column per manifest field)."""
        import pandas as pd

        from np2torch.tasks.manifest import COLUMNS

        cells = [r.cells() for r in self.rows]
        extra = [c for c in dict.fromkeys(k for row in cells for k in row) if c not in COLUMNS]
        return pd.DataFrame(cells, columns=[*COLUMNS, *extra])

    def to_csv(self) -> str:
        """The manifest as ``manifest.csv`` holds it."""
        from np2torch.tasks.manifest import to_csv

        return to_csv(list(self.rows))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[ManifestRow]:
        return iter(self.rows)

    def __repr__(self) -> str:
        v = self.verification
        check = ""
        if v:
            check = (f", verified: max abs error {v['max_abs_error']:.3g}" if v.get("reference") else ", verified: shapes and finiteness")
        return (f"<Manifest{' ' + self.name if self.name else ''}: {len(self.targets)} targets, {len(self.unverified)} unverified, "
                f"{len(self.unused)} unused source keys{check}>")

    def _repr_html_(self) -> str:
        cols = ["target_key", "source_key", "transform", "target_shape", "status", "confidence", "verified", "how"]
        return f"<p>{self!r}</p>" + self.df[cols].to_html(index=False)


@dataclass(frozen=True)
class OutputFile:
    """One exported file: where it is, its size and its sha256."""

    path: Path
    bytes: int
    sha256: str


@dataclass(frozen=True)
class StageTiming:
    """How one stage went: answered from a cache or computed, wall seconds, attempts (retries + 1)."""

    cached: bool
    seconds: float
    attempts: int
    failed: bool = False


@dataclass(frozen=True)
class ConversionResult:
    """The outcome of :func:`convert`: the audit record, typed.

    ``record`` is the whole audit record (SPEC "Audit record"), as ``report.json`` and the audit
    log hold it; ``record_path`` is that ``report.json``.
    """

    name: str
    status: str  # "success" (a failed conversion raises instead)
    run_id: str | None  # the Prefect flow run id; None with orchestrate=False
    outputs: list[OutputFile]
    verification: dict[str, Any] | None
    stages: dict[str, StageTiming]
    seconds: float
    config_sha256: str
    mapping_sha256: str | None
    record_path: Path | None
    record: dict[str, Any] = field(repr=False)

    @classmethod
    def from_record(cls, record: dict[str, Any], *, record_path: Path | None) -> ConversionResult:
        return cls(
            name=record["name"], status=record["status"], run_id=record.get("run_id"),
            outputs=[OutputFile(Path(o["path"]), int(o["bytes"]), o["sha256"]) for o in record.get("outputs") or []],
            verification=record.get("verification"),
            stages={k: StageTiming(bool(s.get("cached")), float(s.get("seconds", 0.0)), int(s.get("attempts", 0)), bool(s.get("failed")))
                    for k, s in (record.get("stages") or {}).items()},
            seconds=float(record.get("seconds", 0.0)), config_sha256=record.get("config_sha256", ""),
            mapping_sha256=record.get("mapping_sha256"), record_path=record_path, record=record,
        )

    @property
    def files(self) -> dict[str, Path]:
        """Exported files by name: ``result.files["model.safetensors"]``."""
        return {o.path.name: o.path for o in self.outputs}

    @property
    def cache_hits(self) -> int:
        return sum(s.cached for s in self.stages.values())


# ---------------------------------------------------------------------------------------------
# load_into: an existing model instance through the stages, without Prefect

# model instances handed to load_into, reachable by the stage functions as the model target
# "np2torch.api:_instance_N" (they build models from targets)
_INSTANCES: dict[str, Any] = {}
_counter = itertools.count()


def __getattr__(name: str) -> Any:
    if name in _INSTANCES:
        return _INSTANCES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _clone(model: nn.Module, device: Any) -> nn.Module:
    """The model's structure with its state-dict tensors on ``device``: empty on ``meta``, copied elsewhere.

    Non-persistent buffers (not in the state dict, so not loaded) keep their values.
    """
    import torch
    from torch import nn

    def moved(t: Any) -> Any:
        if device.type == "meta":
            return torch.empty_like(t, device="meta")
        # a model built on meta has no values to copy: zeros (the stages overwrite every loaded tensor)
        return torch.zeros_like(t, device=device) if t.device.type == "meta" else t.detach().to(device, copy=True)

    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(moved(p), requires_grad=p.requires_grad)
    for b in model.buffers():
        if id(b) in persistent:
            memo[id(b)] = moved(b)
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _registered(model: nn.Module) -> Iterator[str]:
    """A model target for ``model``: every build returns a fresh clone (on meta when asked), never the instance."""
    import torch

    name = f"_instance_{next(_counter)}"

    def factory(**_: Any) -> nn.Module:
        # build_model asks for meta with `with torch.device("meta")`; a new tensor tells which
        dev = torch.empty(()).device
        return _clone(model, dev if dev.type == "meta" else torch.device("cpu"))

    _INSTANCES[name] = factory
    try:
        yield f"{__name__}:{name}"
    finally:
        _INSTANCES.pop(name, None)


@contextlib.contextmanager
def _read_only() -> Iterator[None]:
    """Leave no files behind: the readers' stat cache is neither read into nor written."""
    old = os.environ.get("NP2TORCH_READ_ONLY")
    os.environ["NP2TORCH_READ_ONLY"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NP2TORCH_READ_ONLY", None)
        else:
            os.environ["NP2TORCH_READ_ONLY"] = old


def _arrays(value: Any, what: str) -> list[Any]:
    import numpy as np

    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for i, v in enumerate(items):
        if hasattr(v, "detach"):  # a torch tensor
            v = v.detach().cpu().numpy()
        a = np.asarray(v)
        if a.dtype.kind not in "fiub":
            raise ConfigError(f"reference {what} {i} has dtype {a.dtype}", key=f"reference[{what}]", expected="numeric arrays",
                              actual=str(a.dtype), fix="pass NumPy arrays (or torch tensors) of numbers")
        out.append(a)
    return out


def _dtype_name(dtype: Any, model: nn.Module) -> str:
    """The convert dtype: the one asked for, else the model's own float dtype ("keep" when mixed)."""
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    floats = {str(t.dtype).removeprefix("torch.") for t in model.state_dict().values() if t.is_floating_point()}
    return floats.pop() if len(floats) == 1 else "keep"


def _instance_config(model: nn.Module, source: str | Path, target: str, tmp: Path, *, preset: str | None, strategy: str,
                     rules: Sequence[Any], ignore: Sequence[str], allow_missing: Sequence[str], reference: Any, dtype: Any,
                     device: Any, source_format: str, allow_pickle: bool, key_prefix: str, allow_nonfinite: bool, rtol: float,
                     atol: float) -> Config:
    """The arguments of :func:`load_into` as a pipeline config (validated like a YAML file's)."""
    import numpy as np
    from pydantic import ValidationError

    from np2torch.tasks.config import Config

    verify: dict[str, Any] = {"rtol": rtol, "atol": atol}
    if reference is not None:
        if not (isinstance(reference, (tuple, list)) and len(reference) == 2):
            raise ConfigError("reference must be a pair (inputs, expected outputs)", key="reference", actual=type(reference).__name__,
                              fix="pass reference=(x, y): the source model's input(s) and its output(s) for them (y may be None)")
        np.savez(tmp / "input.npz", *_arrays(reference[0], "input"))
        verify["input"] = str(tmp / "input.npz")
        if reference[1] is not None:
            np.savez(tmp / "reference.npz", *_arrays(reference[1], "output"))
            verify["reference_output"] = str(tmp / "reference.npz")
    data = {
        "name": "load-into",
        "source": {"path": str(Path(source).expanduser().resolve()), "format": source_format, "allow_pickle": allow_pickle,
                   "key_prefix": key_prefix, "allow_nonfinite": allow_nonfinite},
        "model": {"target": target},
        "mapping": {"strategy": strategy, "preset": preset or "none", "ignore": list(ignore), "allow_missing": list(allow_missing),
                    "rules": [r.model_dump() if hasattr(r, "model_dump") else dict(r) for r in rules]},
        "convert": {"dtype": _dtype_name(dtype, model), "device": str(device) if device is not None else "cpu"},
        "verify": verify,
        "export": {"dir": str(tmp / "out")},
    }
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        from np2torch.tasks.config import _pydantic_to_config_error

        raise _pydantic_to_config_error(exc, "the load_into arguments") from None


def _run_uncached(cfg: Config, work: Path, until: str) -> dict[str, Any]:
    """The pipeline's runner up to ``until``, cache off: every artifact in ``work`` (a temporary folder)."""
    from np2torch.tasks import stages

    return stages.run_all(cfg, call=stages.Local(cache=False, work=work), until=until)


def _manifest_rows(cfg: Config, work: Path) -> tuple[list[Any], list[ManifestRow]]:
    """Stages 1 and 2 (load-arrays, infer-mapping, evidence included): the array records and the manifest rows."""
    from np2torch.tasks import stages
    from np2torch.tasks.manifest import read_manifest

    recs = _run_uncached(cfg, work, "infer-mapping")
    return stages.read_records(recs["load-arrays"]), read_manifest(recs["infer-mapping"].path("manifest.json"))


def load_into(model: nn.Module, source: str | Path, *, preset: str | None = None, strategy: str = "auto", rules: Sequence[Any] = (),
              reference: tuple[Any, Any] | None = None, dtype: Any = None, device: Any = None, ignore: Sequence[str] = (),
              allow_missing: Sequence[str] = (), source_format: str = "auto", allow_pickle: bool = False, key_prefix: str = "",
              allow_nonfinite: bool = False, rtol: float = 1e-5, atol: float = 1e-6) -> tuple[nn.Module, Manifest]:
    """Load NumPy-saved weights into an existing model, checked as the pipeline checks them.

    The source is read, mapped onto ``model``'s state dict, validated (every failure at once),
    converted, loaded strictly and, with a ``reference``, run forward and compared, by the same
    stage functions as ``np2torch convert``. Nothing is written but temporary files; no Prefect.

    Args:
        model: the ``nn.Module`` to fill (its parameters are copied into in place; a model built on
            ``meta`` gets real tensors).
        source: a ``.npz``, ``.npy``, a folder of ``.npy`` files, a pickled ``get_weights()`` list
            (with ``allow_pickle=True``) or a flat vector.
        preset: naming and layout conventions of the source: ``"keras"`` / ``"tf"`` (kernels
            transposed or HWIO → OIHW, ``gamma``/``beta``/``moving_mean`` → ``weight``/``bias``/…),
            ``"flax"``, or None (names as in PyTorch).
        strategy: ``"auto"`` (rules, names, structure, order, shapes), ``"name"``, ``"order"`` or ``"shape"``.
        rules: mapping rules applied first, as in the config:
            ``{"source": r"dense_(\\d+)/kernel", "target": r"fc\\1.weight", "transform": ["transpose"]}``.
        reference: ``(inputs, expected_outputs)`` computed by the source model (arrays, tensors, or
            lists of them; outputs may be None to check only shapes and finiteness). Chooses
            layouts the shapes cannot (a square kernel, a Linear after a channels-last flatten)
            and proves the result: ``|out - ref| <= atol + rtol * |ref|``.
        dtype: cast floating tensors to this dtype (``torch.float16``, ``"bfloat16"`` …); None keeps the model's.
        device: move the model there (``"cuda"``, ``"cuda:1"``, ``"mps"``); None keeps it where it is.
        ignore / allow_missing: regexes of source keys to leave unused / target keys that keep their value.
        rtol, atol: the reference tolerance (default 1e-5, 1e-6; float32 models compared with a
            float64 NumPy reference often need ``atol=1e-5``).
        source_format, allow_pickle, key_prefix, allow_nonfinite: as ``source.format``,
            ``source.allow_pickle``, ``source.key_prefix`` and ``source.allow_nonfinite`` in a config.

    Returns:
        ``(model, manifest)``: the same model object, loaded, and its :class:`Manifest`
        (``manifest.df``, ``manifest.unverified``, ``manifest.verification``).

    Raises:
        ConfigError: an argument is wrong (names it: ``mapping.preset`` …).
        LoadError, MappingError, ValidationError, ConvertError, VerifyError: the stage that failed,
            with the key(s), expected vs actual and the fix; the model is left unchanged.

    Example::

        model, manifest = np2torch.load_into(Net(), "weights.npz", preset="keras", reference=(x, y))
        manifest.df[["target_key", "source_key", "transform", "confidence"]]
    """
    import torch
    from torch import nn

    from np2torch.tasks.manifest import read_manifest
    from np2torch.tasks.state_dict import check_device

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not an nn.Module", key="model", fix="pass a model instance, e.g. Net()")
    with tempfile.TemporaryDirectory(prefix="np2torch-load-into-") as tmp, _read_only(), _registered(model) as target:
        cfg = _instance_config(model, source, target, Path(tmp), preset=preset, strategy=strategy, rules=rules, ignore=ignore,
                               allow_missing=allow_missing, reference=reference, dtype=dtype, device=device, source_format=source_format,
                               allow_pickle=allow_pickle, key_prefix=key_prefix, allow_nonfinite=allow_nonfinite, rtol=rtol, atol=atol)
        dev = check_device(cfg.convert.device) if device is not None else None
        # load-arrays … convert-to-device (cast and transform into a file, proven to load strictly into a clone),
        # then verify-forward-pass on a clone loaded from that file when there is a reference
        recs = _run_uncached(cfg, Path(tmp) / "work", "verify-forward-pass" if cfg.verify.input is not None else "convert-to-device")
        rows = read_manifest(recs["validate"].path("manifest.json"))
        verified = recs.get("verify-forward-pass")
        cast = None if dtype is None or cfg.convert.dtype == "keep" else getattr(torch, cfg.convert.dtype)
        _fill(model, recs["convert-to-device"].file, rows, dtype=cast, device=dev)
    return model, Manifest(tuple(rows), verification=verified.metrics if verified else None)


def _fill(model: nn.Module, weights: Path, rows: list[ManifestRow], *, dtype: Any, device: Any) -> None:
    """Copy the converted tensors into ``model`` (assigned when it is on meta); allowed-missing targets keep their values."""
    from safetensors.torch import load_file

    from np2torch.tasks.model import describe_targets
    from np2torch.tasks.state_dict import load_into_model

    state = load_file(str(weights))  # a copy in memory: nothing refers to the temporary file afterwards
    on_meta = any(t.device.type == "meta" for t in model.state_dict().values())
    if on_meta:
        load_into_model(model, {k: v.to(device) if device is not None else v for k, v in state.items()}, describe_targets(model))
        return
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None:
        model.to(device)
    keep = {r.target_key for r in rows if r.status == "allowed_missing"}
    result = model.load_state_dict({k: v for k, v in state.items() if k not in keep}, strict=False)
    left = [k for k in result.missing_keys if k not in keep]
    if left or result.unexpected_keys:  # convert_to_device proved the keys on a clone: this is a bug, not user input
        raise RuntimeError(f"load_state_dict: missing {left}, unexpected {result.unexpected_keys}")


# ---------------------------------------------------------------------------------------------
# plan and inspect: tables, nothing written


def _validated(rows: list[ManifestRow], allow_nonfinite: bool) -> ConversionError | None:
    from np2torch.tasks.validate import validate_manifest

    try:
        validate_manifest(rows, allow_nonfinite=allow_nonfinite)
    except ConversionError as exc:
        return exc
    return None


def plan_rows(config: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, list[ManifestRow], ConversionError | None]:
    """The config, the manifest rows it would use, and the validate stage's verdict (None: valid).

    The typed rows of :func:`plan`, without pandas for the table; ``np2torch plan`` prints them.
    """
    from np2torch.tasks.config import load_config

    cfg = load_config(config, list(overrides))
    with tempfile.TemporaryDirectory(prefix="np2torch-plan-") as tmp, _read_only():
        records, rows = _manifest_rows(cfg, Path(tmp))
        return cfg, rows, _validated(rows, cfg.source.allow_nonfinite) or _meaning(cfg, records, rows)


def _meaning(cfg: Config, records: list[Any], rows: list[ManifestRow]) -> ConversionError | None:
    """A valid manifest's differences of meaning: the source's stated configuration, the reference's diagnosis (issue 19)."""
    from np2torch.tasks.diagnose import plan_check

    return plan_check(cfg, records, rows)


# load_into's options and their defaults: plan(model, source, ...) takes the same
_LOAD_OPTIONS: dict[str, Any] = {"preset": None, "strategy": "auto", "rules": (), "ignore": (), "allow_missing": (), "reference": None,
                                 "dtype": None, "device": None, "source_format": "auto", "allow_pickle": False, "key_prefix": "",
                                 "allow_nonfinite": False, "rtol": 1e-5, "atol": 1e-6}


def _instance_plan_rows(model: nn.Module, source: str | Path, options: dict[str, Any]) -> tuple[list[ManifestRow], ConversionError | None]:
    unknown = sorted(set(options) - set(_LOAD_OPTIONS))
    if unknown:
        raise TypeError(f"plan() got unexpected option(s) {unknown}; it takes load_into's: {sorted(_LOAD_OPTIONS)}")
    opts = {**_LOAD_OPTIONS, **options}
    with tempfile.TemporaryDirectory(prefix="np2torch-plan-") as tmp, _read_only(), _registered(model) as target:
        cfg = _instance_config(model, source, target, Path(tmp), **opts)
        records, rows = _manifest_rows(cfg, Path(tmp) / "work")
        return rows, _validated(rows, opts["allow_nonfinite"]) or _meaning(cfg, records, rows)


def plan(config: str | Path | nn.Module, source: str | Path | None = None, *, overrides: Sequence[str] = (),
         **load_options: Any) -> pd.DataFrame:
    """The manifest a conversion would use, one row per target tensor then one per unused source key.

    ``plan(config_path, overrides=[...])`` plans a config file's conversion;
    ``plan(model, source, preset=..., reference=...)`` plans what :func:`load_into` would do
    with the same options, without touching the model. Runs load-arrays and infer-mapping
    (evidence included) and the validate checks; writes nothing.

    A manifest that fails validation is still returned: ``df.attrs["valid"]`` is False and
    ``df.attrs["problems"]`` lists every failure (key, reason, expected, actual, fix).
    ``df.attrs["unverified"]`` names the rows whose layout is a guess.

    Example::

        df = np2torch.plan("configs/examples/keras-cnn.yaml", overrides=["convert.dtype=float16"])
        df[df.status != "mapped"]
    """
    if isinstance(config, (str, Path)):
        if source is not None or load_options:
            raise TypeError("plan(config_path) takes only overrides=; pass a model instance to plan load_into's options")
        cfg, rows, problem = plan_rows(config, overrides)
        name = cfg.name
    else:
        if source is None:
            raise TypeError("plan(model, source, ...): give the source file or folder of the weights")
        rows, problem = _instance_plan_rows(config, source, load_options)
        name = type(config).__name__
    m = Manifest(tuple(rows), name=name)
    df = m.df
    df.attrs.update(name=name, valid=problem is None, unverified=m.unverified,
                    problems=[dict(p) for p in problem.problems] if problem is not None and problem.problems
                    else ([{"key": problem.key, "reason": problem.message}] if problem is not None else []))
    return df


def array_rows(path: str | Path, *, allow_pickle: bool = False, source_format: str = "auto") -> list[dict[str, Any]]:
    """One dict per array of a file or folder (headers and statistics; the stored form of :func:`inspect`)."""
    from np2torch.tasks.load_arrays import scan_source

    with _read_only():
        records = scan_source(Path(path), fmt=source_format, allow_pickle=allow_pickle)
    return [{"key": r.key, "shape": list(r.shape), "dtype": r.dtype, "byte_order": r.byte_order, "order": "F" if r.fortran_order else "C",
             "nbytes": r.nbytes, "nonfinite": r.n_nonfinite, "absmax": r.absmax,
             "file": Path(r.file).name + (f"::{r.member}" if r.member else ""),
             "offset": r.offset if r.offset >= 0 else ("pickled" if r.index is not None else "compressed"), "fingerprint": r.fingerprint}
            for r in records]


def inspect(path: str | Path, *, allow_pickle: bool = False, source_format: str = "auto") -> pd.DataFrame:
    """The arrays in a file or folder: key, shape, dtype, byte order, size, NaN/Inf count, |max|, fingerprint.

    Reads headers and streams values for the statistics; never loads a pickle unless
    ``allow_pickle`` (and then only through the restricted unpickler). Writes nothing.

    Example::

        np2torch.inspect("weights.npz").sort_values("nbytes", ascending=False).head()
    """
    import pandas as pd

    rows = array_rows(path, allow_pickle=allow_pickle, source_format=source_format)
    return pd.DataFrame(rows, columns=["key", "shape", "dtype", "byte_order", "order", "nbytes", "nonfinite", "absmax", "file", "offset",
                                       "fingerprint"])


# ---------------------------------------------------------------------------------------------
# convert: a config through the whole pipeline


def convert(config: str | Path, *, overrides: Sequence[str] = (), refresh: bool = False, orchestrate: bool = True,
            verbose: bool = False) -> ConversionResult:
    """Run the conversion a config file describes; return its audit record, typed.

    With ``orchestrate=True`` (the default) it is a Prefect flow run, as ``np2torch convert``
    (task caching, retries, artifacts in the UI; a temporary local API server unless
    ``PREFECT_API_URL`` points at one). With ``orchestrate=False`` the six stages run as plain
    functions in this process: same content cache, same outputs and audit record, no Prefect.

    Args:
        config: path of the YAML config (relative paths inside are relative to it).
        overrides: ``"KEY=VALUE"`` strings with dotted keys, as ``--set``: ``["convert.dtype=float16"]``.
        refresh: recompute every stage, ignoring the caches.
        verbose: also show Prefect's own log lines ("attempt 1 of 4", …) here; they always reach the
            run in the UI and the log file in the np2torch home.

    Returns:
        :class:`ConversionResult`: ``status``, ``outputs`` (path, bytes, sha256), ``verification``,
        ``stages`` (cached or computed, seconds, attempts), ``record_path`` (``report.json``).

    Raises:
        ConfigError: the config or an override is wrong (before anything runs).
        ConversionError: a stage failed (its subclass names the stage); the failed run's audit
            record is in the audit log.

    Example::

        result = np2torch.convert("configs/examples/mlp.yaml", overrides=["convert.dtype=float16"])
        result.files["model.safetensors"], result.verification["max_abs_error"]
    """
    from np2torch.tasks.config import load_config

    cfg = load_config(config, list(overrides))  # config errors surface before anything starts: parsed once
    if orchestrate:
        from np2torch.flows.runtime import configure_prefect, quiet_expected_tracebacks

        configure_prefect()
        from np2torch.flows.convert import convert_config
        from np2torch.flows.preflight import check_config

        quiet_expected_tracebacks(verbose=verbose)
        check_config(cfg)
        record = convert_config(cfg, refresh=refresh)
    else:
        from np2torch.tasks.stages import run_conversion

        record = run_conversion(cfg, refresh=refresh)  # the same runner and audit record, stages as plain functions
    report = Path(cfg.export.dir) / "report.json"
    return ConversionResult.from_record(record, record_path=report if report.is_file() else None)
