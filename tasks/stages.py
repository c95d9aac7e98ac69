"""The pipeline, written once: the stage table (:data:`STAGES`) and the runner that drives it.

Each :class:`Stage` declares its name, its domain module, the config fields it reads, the
earlier stages whose records it uses, its compute function and how a cached entry is re-checked.
Its content key is derived from those declarations only (:func:`key_of`): the declared fields'
values (a file by its content, never its path), the previous stage's key, and a hash of the code
of its domain module's np2torch import closure (:func:`np2torch.tasks.imports.closure`).

One runner (:func:`run_all`, and :func:`run_conversion` around it for the audit record) drives
the table for every caller: the Prefect flow (whose executor, :mod:`np2torch.tasks.prefect_tasks`,
adds caching, retries and logging), ``np2torch.convert(orchestrate=False)``, ``load_into`` and
``plan`` (cache off, temporary files). Each stage's result is a typed :class:`StageRecord`;
arrays and tensors never leave the stage that made them.

The stage modules that need torch or pandera are imported inside the compute functions and
their code enters the keys by file (read, never imported): a run whose every stage is a cache
hit imports neither (about 3 s of a cached command).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from np2torch.tasks import cache, imports, load_arrays, manifest, readers
from np2torch.tasks.config import Config
from np2torch.tasks.errors import ConversionError
from np2torch.tasks.fingerprint import cached_by_stat, file_fingerprint, sha256_file
from np2torch.tasks.progress import current_run, track

__all__ = [
    "NAMES",
    "STAGES",
    "Converted",
    "Exported",
    "Loaded",
    "Local",
    "Mapped",
    "Stage",
    "StageRecord",
    "Trail",
    "Validated",
    "Verified",
    "config_content_digest",
    "config_fields",
    "export_metadata",
    "key_of",
    "model_fingerprint",
    "read_records",
    "run_all",
    "run_conversion",
    "source_files_of",
]


# ---------------------------------------------------------------------------------------------
# typed stage records


@dataclass
class StageRecord:
    """How a stage went (its content key, cache hit or not, seconds: its key's included, attempts) plus its own fields."""

    key: str = ""
    cached: bool = False
    seconds: float = 0.0
    entry: str = ""  # the stage cache entry (or work folder) holding its artifacts
    attempts: int = 1
    RUN_FIELDS: ClassVar[tuple[str, ...]] = ("key", "cached", "seconds", "entry", "attempts")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def own(self) -> dict[str, Any]:
        """The stage's own fields (what its cache entry stores)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUN_FIELDS}

    def path(self, name: str) -> Path:
        return Path(self.entry) / name

    def chain(self) -> str:
        """What the next stage's key builds on: this key, plus whatever a re-check accepted outside it."""
        return self.key


@dataclass
class Loaded(StageRecord):
    n_arrays: int = 0
    bytes: int = 0
    source_fingerprint: str = ""
    root: str = ""  # where the source lives now (not in the key): the array table is rebased onto it
    inputs: list[dict[str, Any]] = field(default_factory=list)  # path, bytes, sha256 of every source file


@dataclass
class Mapped(StageRecord):
    n_targets: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    unverified: list[str] = field(default_factory=list)
    evidence_digest: str | None = None  # the verify files' digest when evidence decided a row

    def chain(self) -> str:
        # the verify files are not in the key (most manifests never read them); one that did may have
        # been recomputed under the same key for other files: what follows must not reuse the old one
        return self.key if self.evidence_digest is None else cache.stage_key("infer-mapping", key=self.key, evidence=self.evidence_digest)


@dataclass
class Validated(StageRecord):
    n_rows: int = 0
    mapping_sha256: str = ""


@dataclass
class Converted(StageRecord):
    device: str = ""
    placed_on: list[str] = field(default_factory=list)
    tensors: dict[str, Any] = field(default_factory=dict)
    n_tensors: int = 0
    transfer: dict[str, Any] = field(default_factory=dict)  # host-to-device copy figures (CUDA)
    checkpoint: str = "model.safetensors"  # the file in the entry, or the shards' index (export.max_shard_size)
    files: list[str] = field(default_factory=list)  # the shards, when sharded

    @property
    def file(self) -> Path:
        return self.path(self.checkpoint)


@dataclass
class Verified(StageRecord):
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Exported(StageRecord):
    outputs: list[dict[str, Any]] = field(default_factory=list)


Records = dict[str, StageRecord]


# ---------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # the domain module: its np2torch import closure is hashed into the key
    reads: tuple[str, ...]  # config fields ("convert.dtype"), sections ("mapping") or "*" (all)
    needs: tuple[str, ...]  # earlier stages whose records compute reads
    compute: Callable[[Config, Records, Path], dict[str, Any]]  # writes artifacts into the folder, returns its own fields
    record: type[StageRecord]
    weight: float  # share of a conversion's work (the UI's progress bar)
    still_valid: Callable[[Config, dict[str, Any]], bool] | None = None  # extra check a cache hit must pass
    rechecks: tuple[str, ...] = ()  # config fields still_valid reads (not in the key)
    locate: Callable[[Config, Records], dict[str, Any]] | None = None  # fields that say where things are now (not cached)
    plugins: Callable[[], list[str]] | None = None  # modules registered at run time (readers) whose code the result depends on

    def execute(self, cfg: Config, deps: Records, key: str, *, refresh: bool = False, root: Path | None = None) -> StageRecord:
        """Run through the content cache (``key``); without a key, compute into ``root/<name>`` (cache off)."""
        t0 = time.perf_counter()
        if not key:
            work = Path(root or tempfile.mkdtemp(prefix="np2torch-")) / self.name
            work.mkdir(parents=True, exist_ok=True)
            own = self.compute(cfg, deps, work)
            return self.record(cached=False, seconds=time.perf_counter() - t0, entry=str(work), **own)
        check = (lambda r: self.still_valid(cfg, r)) if self.still_valid else None
        hit = cache.run_cached(self.name, key, lambda work: self.compute(cfg, deps, work), refresh=refresh, root=root, still_valid=check)
        return self.record.from_dict({**hit.record, "key": key, "cached": hit.cached, "seconds": hit.seconds, "entry": str(hit.entry)})


# ---- 1. load-arrays


def source_files_of(cfg: Config) -> tuple[Path, list[Path]]:
    """The source root and every file the source consists of (what its cache key hashes)."""
    return readers.source_files(cfg.source.path, cfg.source.format)


def _root(cfg: Config) -> Path:
    p = cfg.source.path
    return p if p.is_dir() else p.parent


def read_records(loaded: Loaded) -> list[load_arrays.ArrayRecord]:
    """The array table of a load record, with file paths rebased onto the current source root."""
    root = Path(loaded.root)
    table = load_arrays.read_table(loaded.path("table.json"))
    return [load_arrays.ArrayRecord(**{**r.__dict__, "file": str(root / r.file)}) for r in table]


def _source_content(cfg: Config) -> dict[str, Any]:
    """What load-arrays' key hashes of ``source.path``: (relative name, sha256) of every file, never the location."""
    if not cfg.source.path.exists():
        load_arrays.scan_source(cfg.source.path)  # raises the clear "does not exist" error
    _, files = source_files_of(cfg)
    root = _root(cfg)
    total = sum(f.stat().st_size for f in files if f.is_file())
    # one read per file: sha256 plus what the scan needs, remembered in the stat cache
    with track("load-arrays", "load-arrays (hashing sources)", total, unit="B") as cb:
        fps = load_arrays.fingerprint_files(files, progress=cb)
    named = [[f.relative_to(root).as_posix(), i["sha256"]] for f, i in zip(files, fps, strict=True)]
    return {"is_dir": cfg.source.path.is_dir(), "files": named}


def _load(cfg: Config, deps: Records, work: Path) -> dict[str, Any]:
    src, root = cfg.source, _root(cfg)
    records = load_arrays.scan_source(src.path, fmt=src.format, allow_pickle=src.allow_pickle, key_prefix=src.key_prefix)
    rel = [load_arrays.ArrayRecord(**{**r.__dict__, "file": Path(r.file).relative_to(root).as_posix()}) for r in records]
    load_arrays.write_table(rel, work / "table.json")
    return {"n_arrays": len(records), "bytes": sum(r.nbytes for r in records),
            "source_fingerprint": hashlib.sha256(json.dumps([[r.key, r.fingerprint] for r in records]).encode()).hexdigest()}


def _locate_source(cfg: Config, deps: Records) -> dict[str, Any]:
    return {"root": str(_root(cfg)), "inputs": [file_fingerprint(f) for f in source_files_of(cfg)[1]]}


# ---- 2. infer-mapping


def _target_fingerprint(target: str) -> dict[str, Any]:
    """What identifies the model's code: the target's file content (not its path) and the name in it."""
    mod, _, attr = target.rpartition(":")
    fp = None
    path = Path(mod) if mod.endswith((".py", ".pt", ".pth")) else None
    if path is None:
        import importlib.util

        try:
            spec = importlib.util.find_spec(mod)
            if spec is not None and spec.origin and Path(spec.origin).is_file():
                path = Path(spec.origin)
        except (ImportError, ValueError):
            path = None
    if path is not None and path.is_file():
        fp = cached_by_stat(path, "sha256", lambda: sha256_file(path))
    return {"module": Path(mod).name if path is not None else mod, "attr": attr, "sha256": fp}


def model_fingerprint(cfg: Config) -> dict[str, Any]:
    """The model target by content, with its kwargs."""
    return {**_target_fingerprint(cfg.model.target), "kwargs": cfg.model.kwargs}


def _file_part(p: Any) -> Any:
    if isinstance(p, Path) or (isinstance(p, str) and p and Path(p).is_file()):
        return {"name": Path(p).name, "sha256": file_fingerprint(p)["sha256"]} if Path(p).is_file() else str(p)
    return p


def _verify_spec(cfg: Config) -> dict[str, Any]:
    v = cfg.verify
    spec = v.model_dump(mode="json")
    spec["input"] = _file_part(v.input) if isinstance(v.input, Path) else spec["input"]
    spec["reference_output"] = _file_part(v.reference_output) if v.reference_output else None
    spec["reference_activations"] = _file_part(v.reference_activations) if v.reference_activations else None
    return spec


_EVIDENCE_FIELDS = ("verify.input", "verify.reference_output", "verify.reference_activations")


def _evidence_digest(cfg: Config) -> str:
    """What the evidence step reads: the verify input and references, by content."""
    v = cfg.verify
    if v.reference_output is None and v.reference_activations is None:
        return "no-reference"  # nothing to weigh candidates against: the input does not matter
    spec = _verify_spec(cfg)
    # rtol/atol are left out: evidence picks the candidate with the smallest error, which no
    # tolerance changes; a manifest whose best candidate missed the tolerance was never cached.
    inputs = {k: spec[k] for k in ("input", "reference_output", "reference_activations")}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def mapping_still_valid(cfg: Config, rec: dict[str, Any]) -> bool:
    # The verify files are not in the key: most manifests have no ambiguous row and must not
    # rerun when a reference changes. One that did depend on them records their digest.
    return rec.get("evidence_digest") in (None, _evidence_digest(cfg))


def _map(cfg: Config, deps: Records, work: Path) -> dict[str, Any]:
    from np2torch.tasks import infer_mapping

    rows = infer_mapping.build_manifest(cfg, read_records(deps["load-arrays"]))
    manifest.write_manifest(rows, work / "manifest.json")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    ambiguous = any(r.target_key and (r.candidates or r.evidence) for r in rows)
    return {"n_targets": len(manifest.target_rows(rows)), "status_counts": counts,
            "unverified": [r.target_key for r in rows if r.target_key and not r.verified],
            "evidence_digest": _evidence_digest(cfg) if ambiguous else None}


# ---- 3. validate


def _validate(cfg: Config, deps: Records, work: Path) -> dict[str, Any]:
    from np2torch.tasks import validate

    rows = manifest.read_manifest(deps["infer-mapping"].path("manifest.json"))
    validate.validate_manifest(rows, allow_nonfinite=cfg.source.allow_nonfinite)
    manifest.write_manifest(rows, work / "manifest.json")
    csv = manifest.to_csv(rows)
    (work / "manifest.csv").write_text(csv)
    return {"n_rows": len(rows), "mapping_sha256": hashlib.sha256(csv.encode()).hexdigest()}


# ---- 4. convert-to-device


def _convert(cfg: Config, deps: Records, work: Path) -> dict[str, Any]:
    from np2torch.tasks import convert

    rows = manifest.read_manifest(deps["validate"].path("manifest.json"))
    res = convert.convert_to_device(rows, read_records(deps["load-arrays"]), model_target=cfg.model.target, model_kwargs=cfg.model.kwargs,
                                    device=cfg.convert.device, out_path=work / "model.safetensors",
                                    # the export's header up front, a hint: export links this file when it matches, else rewrites
                                    # the header (so the header's inputs are not this stage's key, and its size not its record)
                                    metadata=export_metadata(cfg, deps["load-arrays"]), allow_unsafe_load=cfg.model.allow_unsafe_load,
                                    max_shard_size=cfg.export.max_shard_size)
    mine = ("device", "placed_on", "tensors", "n_tensors")
    return {**{k: res[k] for k in mine}, "checkpoint": Path(res["path"]).name, "files": res.get("files", []),
            "transfer": {k: v for k, v in res.items() if k not in (*mine, "path", "bytes", "files")}}


# ---- 5. verify-forward-pass


def _verify(cfg: Config, deps: Records, work: Path) -> dict[str, Any]:
    from np2torch.tasks import verify

    converted = deps["convert-to-device"]
    assert isinstance(converted, Converted)
    m = cfg.model
    return {"metrics": verify.verify_forward_pass(model_target=m.target, model_kwargs=m.kwargs, weights=converted.file, spec=cfg.verify,
                                                  device=cfg.convert.device, allow_unsafe_load=m.allow_unsafe_load)}


# ---- 6. export


def config_content_digest(cfg: Config) -> str:
    """sha256 of the config with every location replaced by the content it points to.

    Not the audit record's ``config_sha256`` (:meth:`Config.digest`, the config as written): this
    one is ``config_content_sha256`` in ``model.safetensors``'s metadata: the same conversion exported into
    another folder, or run from a copied tree, gives byte-identical files. ``export.dir`` is
    dropped (where the files go never changes them); the source, model file and verify files
    are represented by their fingerprints.
    """
    data = cfg.model_dump(mode="json")
    data["export"].pop("dir", None)
    data["export"].pop("max_shard_size", None)  # how the tensors are split into files never changes them
    data["source"].pop("path", None)
    data["model"]["target"] = model_fingerprint(cfg)
    data["verify"] = _verify_spec(cfg)
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def export_metadata(cfg: Config, loaded: StageRecord) -> dict[str, str]:
    from np2torch.tasks import __version__

    assert isinstance(loaded, Loaded)
    return {"format": "pt", "np2torch_version": __version__, "config_content_sha256": config_content_digest(cfg), "name": cfg.name,
            "source_fingerprint": loaded.source_fingerprint}


def exports_intact(cfg: Config, rec: dict[str, Any]) -> bool:
    """An export entry is only a hit while the exported files still hash as recorded."""
    try:
        return all(Path(o["path"]).is_file() and file_fingerprint(o["path"])["sha256"] == o["sha256"] for o in rec["outputs"])
    except (OSError, KeyError, TypeError):
        return False


def _export(cfg: Config, deps: Records, work: Path) -> dict[str, Any]:
    from np2torch.tasks import export

    converted = deps["convert-to-device"]
    assert isinstance(converted, Converted)
    rows = manifest.read_manifest(deps["validate"].path("manifest.json"))
    return {"outputs": export.export_outputs(converted=converted.file, tensors=converted.tensors, manifest_rows=rows,
                                             out_dir=cfg.export.dir, formats=list(cfg.export.formats),
                                             metadata=export_metadata(cfg, deps["load-arrays"]))}


_T = "np2torch.tasks."

# The pipeline, in order. ``reads`` is every config field the stage's result depends on; the key
# test (tests/test_cache.py) changes each field and checks exactly these rerun. Weights measured
# on the 1.6 GB benchmark: reading/hashing and converting dominate, mapping and validation are small.
STAGES: tuple[Stage, ...] = (
    Stage("load-arrays", _T + "load_arrays", ("source.path", "source.format", "source.allow_pickle", "source.key_prefix"), (),
          _load, Loaded, 0.30, locate=_locate_source, plugins=readers.reader_modules),
    Stage("infer-mapping", _T + "infer_mapping", ("mapping", "model.target", "model.kwargs", "model.allow_unsafe_load", "convert.dtype"),
          ("load-arrays",), _map, Mapped, 0.04, still_valid=mapping_still_valid, rechecks=_EVIDENCE_FIELDS),
    Stage("validate", _T + "validate", ("source.allow_nonfinite",), ("infer-mapping",), _validate, Validated, 0.04),
    Stage("convert-to-device", _T + "convert",
          ("convert", "export.max_shard_size", "model.target", "model.kwargs", "model.allow_unsafe_load"),
          ("load-arrays", "validate"), _convert, Converted, 0.40),
    Stage("verify-forward-pass", _T + "verify", ("verify", "convert.device", "model.target", "model.kwargs", "model.allow_unsafe_load"),
          ("convert-to-device",), _verify, Verified, 0.07),
    # the exported header carries the config's content digest: every field
    Stage("export", _T + "export", ("*",), ("load-arrays", "validate", "convert-to-device"), _export, Exported, 0.15,
          still_valid=exports_intact),
)
NAMES = [s.name for s in STAGES]
BY_NAME = {s.name: s for s in STAGES}


# ---------------------------------------------------------------------------------------------
# keys


def config_fields() -> list[str]:
    """Every leaf field of a config ("source.path", "model.kwargs", ...): what ``reads`` may name."""
    from pydantic import BaseModel

    out = []
    for name, f in Config.model_fields.items():
        ann = f.annotation
        out += [f"{name}.{s}" for s in ann.model_fields] if isinstance(ann, type) and issubclass(ann, BaseModel) else [name]
    return out


def expand(reads: tuple[str, ...]) -> list[str]:
    """The leaf fields a declaration names (a section: all of its fields; ``*``: every field)."""
    every = config_fields()
    out = [f for r in reads for f in (every if r == "*" else [x for x in every if x == r or x.startswith(r + ".")])]
    unknown = [r for r in reads if r != "*" and not any(x == r or x.startswith(r + ".") for x in every)]
    if unknown:
        raise KeyError(f"stage table names unknown config fields {unknown}")
    return list(dict.fromkeys(out))


class _Values:
    """Each config field's value as a key sees it (files by content), computed once per run."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.memo, self.data = cfg, {}, cfg.model_dump(mode="json")

    def __getitem__(self, name: str) -> Any:
        if name not in self.memo:
            self.memo[name] = self._value(name)
        return self.memo[name]

    def _value(self, name: str) -> Any:
        cfg = self.cfg
        if name == "source.path":
            return _source_content(cfg)
        if name == "model.target":
            return _target_fingerprint(cfg.model.target)
        if name in _EVIDENCE_FIELDS:
            return _verify_spec(cfg)[name.split(".", 1)[1]]
        node: Any = self.data
        for part in name.split("."):
            node = node[part]
        return node


def _code_version(stage: Stage) -> str:
    files = imports.modules()
    closure = imports.closure(stage.module)
    extra = [m for m in (stage.plugins() if stage.plugins else []) if m not in closure]
    return cache.code_version(*(files[m] for m in closure), *extra, stage.compute)


def key_of(stage: Stage, cfg: Config, prev_key: str | None, values: _Values | None = None) -> str:
    """The stage's content key: its declared fields' values, the previous stage's key, its code."""
    values = values or _Values(cfg)
    return cache.stage_key(stage.name, prev=prev_key, code=_code_version(stage), config={f: values[f] for f in expand(stage.reads)})


# ---------------------------------------------------------------------------------------------
# the runner


class Local:
    """Runs a stage in this process, through the content cache or, with ``cache=False``, into ``work/<stage>``."""

    attempts = 1

    def __init__(self, *, cache: bool = True, work: Path | None = None, root: Path | None = None) -> None:
        self.cache, self.work, self.root = cache, work, root

    def __call__(self, stage: Stage, cfg: Config, deps: Records, key: str, refresh: bool) -> StageRecord:
        self.attempts = 1
        return stage.execute(cfg, deps, key, refresh=refresh, root=self.root if self.cache else self.work)


@dataclass
class Trail:
    """What a run got to: the records so far, the stage running, how the failing one went."""

    records: Records = field(default_factory=dict)
    current: str = ""
    failed: dict[str, Any] = field(default_factory=dict)


def run_all(cfg: Config, *, refresh: bool = False, call: Callable[..., StageRecord] | None = None, until: str | None = None,
            trail: Trail | None = None) -> Records:
    """Drive the stage table in order (up to ``until``): stage name → record.

    ``call`` runs one stage (:class:`Local` by default; the flow passes Prefect's executor). The
    time spent computing a stage's key (hashing its sources) is counted in that stage.
    """
    call = call or Local()
    keyed = getattr(call, "cache", True)
    trail = trail if trail is not None else Trail()
    values = _Values(cfg)
    prev: str | None = None
    for stage in STAGES:
        trail.current = stage.name
        run = current_run()
        if run is not None:
            run.stage_begin(stage.name)
        t0 = time.perf_counter()
        try:
            keying = getattr(call, "key", lambda compute: compute())  # an executor may retry a transient read here
            key = keying(lambda stage=stage, prev=prev: key_of(stage, cfg, prev, values)) if keyed else ""
            key_seconds = time.perf_counter() - t0
            rec = call(stage, cfg, {n: trail.records[n] for n in stage.needs}, key, refresh)
            t1 = time.perf_counter()
            rec = dataclasses.replace(rec, **(stage.locate(cfg, trail.records) if stage.locate else {}))
        except BaseException:
            trail.failed = {"seconds": round(time.perf_counter() - t0, 4), "attempts": getattr(call, "attempts", 1)}
            raise
        # the stage's own time (as its executor measured it) plus its key's and its locating
        rec.seconds += key_seconds + (time.perf_counter() - t1)
        trail.records[stage.name] = rec
        if run is not None:
            run.stage_end(stage.name, f"{'cache hit' if rec.cached else 'computed'} in {rec.seconds:.3g} s")
        prev = rec.chain()
        if stage.name == until:
            break
    return trail.records


# ---------------------------------------------------------------------------------------------
# the audit record, built here only


def _stage_entry(rec: StageRecord) -> dict[str, Any]:
    return {"cached": rec.cached, "seconds": round(rec.seconds, 4), "attempts": rec.attempts, "key": rec.key or None}


def run_conversion(cfg: Config, *, refresh: bool = False, run_id: str | None = None,
                   call: Callable[..., StageRecord] | None = None) -> dict[str, Any]:
    """Run the whole pipeline; always write the audit record (report.json on success); return it."""
    from np2torch.tasks import audit

    record: dict[str, Any] = {"run_id": run_id, "name": cfg.name, "started_at": audit.now(), "status": "running",
                              "config_sha256": cfg.digest(), "config": cfg._raw, "overrides": list(cfg._overrides), "refresh": refresh,
                              "inputs": [], "mapping_sha256": None, "outputs": [], "verification": None, "stages": {},
                              "versions": audit.versions(), "error": None}
    trail = Trail()
    t0 = time.perf_counter()
    try:
        recs = run_all(cfg, refresh=refresh, call=call, trail=trail)
        record.update(status="success", inputs=recs["load-arrays"].inputs, mapping_sha256=recs["validate"].mapping_sha256,
                      verification=recs["verify-forward-pass"].metrics, outputs=recs["export"].outputs)
    except ConversionError as exc:
        record.update(status="failed", error=exc.to_record())
        raise
    except BaseException as exc:
        record.update(status="failed", error={"type": type(exc).__name__, "stage": trail.current, "message": str(exc)})
        raise
    finally:
        record["stages"] = {name: _stage_entry(r) for name, r in trail.records.items()}
        if record["status"] == "failed":
            record["stages"][trail.current] = {**trail.failed, "cached": False, "failed": True}
        record["finished_at"] = audit.now()
        record["seconds"] = round(time.perf_counter() - t0, 4)
        mapped = trail.records.get("infer-mapping")
        record["manifest_path"] = str(mapped.path("manifest.json")) if mapped else None
        if record["status"] == "success":
            audit.write_report(record, cfg.export.dir)
        audit.append_record(record)
    return record
