"""The conversion config (SPEC "Config file"): a strict pydantic model.

Unknown keys are errors that name the key; relative paths are resolved against the config
file's folder; ``--set a.b=value`` overrides are applied before validation so they are checked
like everything else.

A config is small, plain YAML, and parsing one is bounded: a file over
:data:`MAX_CONFIG_BYTES` is refused before it is read, YAML aliases (``*name``: the "billion
laughs" expansion) are refused, and so is nesting deeper than :data:`MAX_CONFIG_DEPTH`. Every
failure to read or parse is one :class:`ConfigError` (exit status 2) naming the file, the line
and the fix; no ``RecursionError``/``MemoryError`` traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from np2torch.tasks.errors import ConfigError, short
from np2torch.tasks.readers import formats

__all__ = [
    "Config",
    "SourceSpec",
    "ModelSpec",
    "MappingSpec",
    "Rule",
    "ConvertSpec",
    "VerifySpec",
    "InputSpec",
    "ExportSpec",
    "BatchConfig",
    "BatchEntry",
    "load_config",
    "load_batch_config",
    "apply_overrides",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
]

from np2torch.tasks.transforms import TRANSFORMS as _TRANSFORMS  # noqa: E402  (one table: configs may name every transform)

_TRANSFORM_NAMES = set(_TRANSFORMS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    path: Path  # a file or a folder, absolute after loading
    format: str = "auto"  # "auto" or a row of the readers table (np2torch.tasks.readers.formats())
    allow_pickle: bool = False  # object arrays / pickled lists load only when true
    key_prefix: str = ""  # stripped from every source key when present
    allow_nonfinite: bool = False  # NaN/Inf in source arrays are an error unless true

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in formats():
            raise ValueError(f"source.format {v!r} is not a format np2torch reads; use one of {' | '.join(formats())}")
        return v


class ModelSpec(_Strict):
    target: str  # "pkg.module:attr" or "path/to/file.py:attr"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    allow_unsafe_load: bool = False  # a pickled nn.Module (torch.load without weights_only) only when true

    @field_validator("target")
    @classmethod
    def _has_attr(cls, v: str) -> str:
        if ":" not in v:
            raise ValueError(f"model.target {v!r} must look like 'pkg.module:Class' or 'path/file.py:Class'")
        return v


class Rule(_Strict):
    source: str | list[str] | None = None  # regex full-match on source keys; a list joins with concat
    target: str  # target key; \1 etc. refer to the source match groups
    transform: list[str | dict[str, Any]] = Field(default_factory=list)
    concat: int | None = None  # axis to join a list source on

    @field_validator("transform")
    @classmethod
    def _known_transforms(cls, v: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        for item in v:
            name = item if isinstance(item, str) else (next(iter(item)) if len(item) == 1 else None)
            if name not in _TRANSFORM_NAMES:
                raise ValueError(
                    f"unknown transform {item!r}; use one of {sorted(_TRANSFORM_NAMES)}, "
                    "written as a bare name or a one-key mapping such as {reshape: [2, 10]}"
                )
        return v

    @model_validator(mode="after")
    def _source_or_zeros(self) -> Rule:
        names = [t if isinstance(t, str) else next(iter(t)) for t in self.transform]
        if self.source is None and "zeros" not in names:
            raise ValueError(f"rule for {self.target!r} has no source; give `source:` or `transform: [zeros]`")
        if isinstance(self.source, list) and self.concat is None and len(self.source) > 1:
            raise ValueError(f"rule for {self.target!r} lists several sources; say how to join them with `concat: AXIS`")
        return self


class MappingSpec(_Strict):
    strategy: Literal["auto", "name", "order", "shape"] = "auto"
    preset: Literal["none", "keras", "tf", "flax"] = "none"
    rules: list[Rule] = Field(default_factory=list)  # applied first, in order
    ignore: list[str] = Field(default_factory=list)  # source keys to leave unused (regex)
    allow_missing: list[str] = Field(default_factory=list)  # target keys that may keep their initial value (regex)

    @field_validator("ignore", "allow_missing")
    @classmethod
    def _regexes_compile(cls, v: list[str]) -> list[str]:
        for pat in v:
            try:
                re.compile(pat)
            except re.error as exc:
                raise ValueError(f"{pat!r} is not a valid regular expression: {exc}") from None
        return v


class ConvertSpec(_Strict):
    dtype: Literal["keep", "float32", "float16", "bfloat16", "float64"] = "float32"
    device: str = "cpu"  # cpu | cuda | cuda:N | mps

    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"device {v!r} must be cpu, cuda, cuda:N or mps")
        return v


class InputSpec(_Strict):
    shape: list[int]
    dtype: Literal["float32", "float16", "bfloat16", "float64", "int64", "int32"] = "float32"
    seed: int = 0


class VerifySpec(_Strict):
    input: InputSpec | Path | None = None  # generated from shape/dtype/seed, or a .npy/.npz of inputs
    reference_output: Path | None = None  # without it only shapes and finiteness are checked
    # optional .npz of the source model's intermediate outputs for the same input, keyed by the
    # torch module path (e.g. conv1, encoder.layer.0): per-layer evidence and divergence localisation
    reference_activations: Path | None = None
    rtol: float = 1e-5
    atol: float = 1e-6


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(v: Any) -> int:
    """Bytes from an int or a string like ``"5GB"`` / ``"500MB"`` / ``"2GiB"`` (units as transformers reads them)."""
    if isinstance(v, bool):
        raise ValueError(f"size {v!r} is not a number of bytes")
    if isinstance(v, int):
        n = v
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(v), re.IGNORECASE)
        if m is None:
            raise ValueError(f"size {v!r}: give bytes (an integer) or a number with a unit: 500MB, 5GB, 2GiB")
        n = int(float(m[1]) * _SIZE_UNITS[(m[2] or "").upper()])
    if n < 0:
        raise ValueError(f"size {v!r} is negative")
    return n


class ExportSpec(_Strict):
    dir: Path
    formats: list[Literal["safetensors", "pt"]] = Field(default_factory=lambda: ["safetensors"])
    # above this many tensor bytes: model-0000K-of-0000N.safetensors + model.safetensors.index.json
    # (transformers' save_pretrained default); 0: always one file
    max_shard_size: int = 5 * 10**9

    _size_form = field_validator("max_shard_size", mode="before")(classmethod(lambda cls, v: parse_size(v)))

    @field_validator("formats")
    @classmethod
    def _always_safetensors(cls, v: list[str]) -> list[str]:
        return ["safetensors"] + sorted({f for f in v if f != "safetensors"})


class Config(_Strict):
    name: str
    source: SourceSpec
    model: ModelSpec
    mapping: MappingSpec = Field(default_factory=MappingSpec)
    convert: ConvertSpec = Field(default_factory=ConvertSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    export: ExportSpec
    # the config as written (after --set, before path resolution): what the digest covers, so
    # the same config gives the same digest on every machine and in every folder
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _overrides: list[str] = PrivateAttr(default_factory=list)  # the --set items, as given (audit records show them)

    @field_validator("name")
    @classmethod
    def _name_form(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9-]+", v):
            raise ValueError(f"name {short(repr(v), 80)} must match [a-z0-9-]+ (it names the outputs and the Prefect run)")
        return v

    def digest(self) -> str:
        """sha256 of the config's canonical JSON, as written (relative paths), with overrides applied."""
        return hashlib.sha256(_canonical(self._raw or self.model_dump(mode="json")).encode()).hexdigest()


def _check_overrides(v: list[str]) -> list[str]:
    for item in v:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"{item!r} must look like KEY=VALUE, e.g. convert.dtype=float16")
    return v


class BatchEntry(_Strict):
    """One conversion of a batch: its config, and ``--set`` overrides applied to it (after the batch's)."""

    config: Path
    overrides: list[str] = Field(default_factory=list, alias="set")

    _overrides_form = field_validator("overrides")(classmethod(lambda cls, v: _check_overrides(v)))


class BatchConfig(_Strict):
    """A batch: ``conversions`` are config paths or ``{config: PATH, set: [KEY=VALUE, ...]}``;
    ``set`` applies to every conversion, before the conversion's own."""

    conversions: list[BatchEntry]
    overrides: list[str] = Field(default_factory=list, alias="set")
    max_parallel: int = Field(default=2, ge=1)
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = None  # an existing scheduler, e.g. tcp://10.0.0.5:8786; None = local cluster
    dask_workers: int = Field(default=2, ge=1)

    _overrides_form = field_validator("overrides")(classmethod(lambda cls, v: _check_overrides(v)))

    @field_validator("conversions", mode="before")
    @classmethod
    def _paths_are_entries(cls, v: Any) -> Any:
        """A bare path is an entry without overrides."""
        if isinstance(v, list):
            return [{"config": c} if isinstance(c, (str, Path)) else c for c in v]
        return v


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# ---------------------------------------------------------------------------------------------
# loading


MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: a config is a few kB; large lists belong in files it points to
MAX_CONFIG_DEPTH = 64  # nesting of mappings/lists; a real config uses 4 or 5


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases and deep nesting while composing (before any
    expansion or recursion can cost memory or stack)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"uses the YAML alias *{event.anchor}; aliases are not allowed in np2torch "
                                                          "configs (write the value out where it is used)", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nests deeper than {MAX_CONFIG_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _safe_yaml(text: str) -> Any:
    """Parse YAML with the bounds above; a YAMLError for anything else that goes wrong."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except (RecursionError, MemoryError) as exc:  # belt and braces: the bounds should come first
        raise yaml.YAMLError(f"too large or too deeply nested to parse ({type(exc).__name__})") from None
    finally:
        loader.dispose()


def _parse_value(text: str) -> Any:
    try:
        return _safe_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE, e.g. convert.dtype=float16", key=item)
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {dotted}: `{part}` is not a section", key=dotted)
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return data


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    def rel(p: Any) -> Any:
        if isinstance(p, str) and p:
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (base / q).resolve())
        return p

    src = data.get("source")
    if isinstance(src, dict) and "path" in src:
        src["path"] = rel(src["path"])
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("target"), str):
        mod, sep, attr = model["target"].rpartition(":")
        if mod.endswith((".py", ".pt", ".pth")):  # a file: relative to the config, like every other path
            model["target"] = f"{rel(mod)}:{attr}"
    ver = data.get("verify")
    if isinstance(ver, dict):
        if isinstance(ver.get("input"), str):
            ver["input"] = rel(ver["input"])
        for k in ("reference_output", "reference_activations"):
            if ver.get(k):
                ver[k] = rel(ver[k])
    exp = data.get("export")
    if isinstance(exp, dict) and "dir" in exp:
        exp["dir"] = rel(exp["dir"])
    return data


def _did_you_mean(loc: tuple, model: Any) -> str:
    """``did you mean `verify.rtol`?`` from the keys allowed where the unknown one stands, else the list of them."""
    import difflib

    for part in loc[:-1]:
        ann = getattr(model, "model_fields", {}).get(part)
        model = (next((t for t in getattr(ann.annotation, "__args__", (ann.annotation,)) if hasattr(t, "model_fields")), None)
                 if ann else None)
        if model is None:
            return "remove it or check its spelling"
    allowed = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    where = ".".join(str(p) for p in loc[:-1])
    if close:
        return f"did you mean `{where + '.' if where else ''}{close[0]}`?"
    return f"remove it; {'`' + where + '`' if where else 'the top level'} takes: {', '.join(sorted(allowed))}"


def _pydantic_to_config_error(exc: ValidationError, where: str, overrides: list[str] | tuple[str, ...] = ()) -> ConfigError:
    lines = []
    first_key = None
    model = {"Config": Config, "BatchConfig": BatchConfig, "BatchEntry": BatchEntry}.get(exc.title, Config)
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int) or True)
        first_key = first_key or loc
        if err["type"] == "extra_forbidden":
            line = f"unknown key `{loc}` — {_did_you_mean(err['loc'], model)}"
        elif err["type"] == "missing":
            line = f"missing required key `{loc}`"
        else:
            line = f"`{loc}`: {err['msg']} (got {err.get('input')!r})"
        # an override's key names this key or a section above it: say which --set did it
        came_from = [o for o in overrides if (loc + ".").startswith(o.split("=", 1)[0].strip() + ".")]
        lines.append(line + (f" (from --set {came_from[-1]})" if came_from else ""))
    msg = f"{where} is not a valid config:\n  - " + "\n  - ".join(lines)
    return ConfigError(msg, key=first_key, fix="correct the keys listed above")


def _read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist", key=str(path), fix="check the path")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file", key=str(path), fix="give the path of a .yaml file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {size:,} bytes; a config may be at most {MAX_CONFIG_BYTES:,} bytes", key=str(path),
                          expected=f"<= {MAX_CONFIG_BYTES:,} bytes", actual=f"{size:,} bytes",
                          fix="a config describes one conversion in a few kB: put large data in files and point to them")
    try:
        with open(path, "rb") as fh:
            text = fh.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start})", key=str(path), fix="save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", key=str(path),
                          fix="check the path and its permissions") from None
    if len(text) > MAX_CONFIG_BYTES:  # grew while we looked
        raise ConfigError(f"{path} is over {MAX_CONFIG_BYTES:,} bytes", key=str(path), fix="keep configs small")
    try:
        data = _safe_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_message(exc)}", key=str(path),
                          fix="correct the YAML at the line shown (configs are plain YAML: no aliases, no tags)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level", key=str(path))
    return data


def _yaml_message(exc: yaml.YAMLError) -> str:
    """One line: what and where (PyYAML's own text repeats the context over several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        return f"{where}{what}"[:300]
    return str(exc)[:300]


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override, resolve and validate a conversion config."""
    path = Path(path).resolve()
    data = apply_overrides(_read_yaml(path), list(overrides or []))
    raw = json.loads(_canonical(data))
    data = _resolve_paths(data, path.parent)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_to_config_error(exc, str(path), list(overrides or [])) from None
    cfg._raw = raw
    cfg._overrides = list(overrides or [])
    return cfg


_ENTRY_FIX = ("write each conversion as a config path or as {config: PATH, set: [KEY=VALUE, ...]} "
              "(the same KEY=VALUE as `np2torch convert --set`)")


def load_batch_config(path: str | Path, overrides: list[str] | None = None) -> BatchConfig:
    """Read a batch config; conversion paths are relative to the batch file's folder, or the cwd."""
    path = Path(path).resolve()
    data = apply_overrides(_read_yaml(path), list(overrides or []))
    convs = data.get("conversions")
    if isinstance(convs, list):
        resolved: list[Any] = []
        for i, c in enumerate(convs):
            entry = {"config": c} if isinstance(c, str) else c
            label = f"conversions[{i}]" + (f" ({entry['config']})" if isinstance(entry, dict) and entry.get("config") else "")
            try:  # each entry on its own, so that an error names it
                if not isinstance(entry, dict):
                    raise ConfigError(f"{path} {label} is {entry!r}, not a config path or a mapping", key=f"conversions[{i}]")
                BatchEntry.model_validate(entry)
            except (ValidationError, ConfigError) as exc:
                msg = _pydantic_to_config_error(exc, f"{path} {label}").message if isinstance(exc, ValidationError) else exc.message
                raise ConfigError(msg, key=f"conversions[{i}]", fix=_ENTRY_FIX) from None
            p = Path(str(entry["config"])).expanduser()
            if not p.is_absolute():
                cand = path.parent / p
                p = cand if cand.exists() else (Path.cwd() / p)
            resolved.append({**entry, "config": str(p.resolve())})
        data["conversions"] = resolved
    try:
        return BatchConfig.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_to_config_error(exc, str(path), list(overrides or [])) from None
