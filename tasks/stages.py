"""The six stages as plain functions: config + the previous stage's record → this stage's record.

Each computes its content key from exactly what it depends on, then runs the stage through the
content-addressed cache (:mod:`np2torch.tasks.cache`). Records are small JSON dicts (paths, shapes,
fingerprints, metrics); arrays and tensors never leave the stage that made them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from np2torch.tasks import cache, load_arrays, manifest, readers
from np2torch.tasks.config import Config
from np2torch.tasks.fingerprint import file_fingerprint, sha256_file, cached_by_stat
from np2torch.tasks.progress import track

__all__ = ["STAGES", "KEYS", "STILL_VALID", "run_all", "load_arrays_stage", "infer_mapping_stage", "validate_stage", "convert_stage",
           "verify_stage", "export_stage", "source_files_of", "model_fingerprint", "read_records", "config_content_digest"]

# The stage modules that need torch or pandera (infer_mapping, validate, convert, verify, export)
# are imported inside the stage's compute function, and their code enters the cache keys by
# file (cache.code_version of module names): a run whose every stage is a cache hit imports
# neither torch nor pandera (about 3 s of a cached command).
_T = "np2torch.tasks."

STAGES = ["load-arrays", "infer-mapping", "validate", "convert-to-device", "verify-forward-pass", "export"]


def _entry(rec: dict[str, Any], name: str) -> Path:
    return Path(rec["_entry"]) / name


# ---------------------------------------------------------------------------------------------
# 1. load-arrays


def source_files_of(cfg: Config) -> tuple[Path, list[Path]]:
    """The source root and every file the source consists of (what its cache key hashes)."""
    return readers.source_files(cfg.source.path, cfg.source.format)


def read_records(loaded: dict[str, Any]) -> list[load_arrays.ArrayRecord]:
    """The array table of a load record, with file paths rebased onto the current source root."""
    root = Path(loaded["root"])
    out = []
    for r in load_arrays.read_table(_entry(loaded, "table.json")):
        out.append(load_arrays.ArrayRecord(**{**r.__dict__, "file": str(root / r.file)}))
    return out


def _fingerprints(files: list[Path]) -> list[dict[str, Any]]:
    """sha256 (and the scan's statistics) of every source file, with a progress bar in bytes."""
    total = sum(f.stat().st_size for f in files if f.is_file())
    with track("load-arrays", "load-arrays (hashing sources)", total, unit="B") as cb:
        return load_arrays.fingerprint_files(files, progress=cb)


def load_arrays_key(cfg: Config) -> str:
    """Content key of load-arrays: source options + (relative name, sha256) of every source file."""
    root, files = source_files_of(cfg)
    src = cfg.source
    return cache.stage_key(
        "load-arrays",
        code=cache.code_version(load_arrays, _T + "safe_pickle", _T + "dtypes", *load_arrays.READER_MODULES),
        source={"format": src.format, "allow_pickle": src.allow_pickle, "key_prefix": src.key_prefix, "is_dir": src.path.is_dir()},
        # names relative to the source root plus content: the same bytes at another path still hit
        # one read per file: sha256 plus what the scan needs, remembered in the stat cache
        files=[[f.relative_to(root).as_posix(), i["sha256"]] for f, i in zip(files, _fingerprints(files))],
    )


def load_arrays_stage(cfg: Config, *, refresh: bool = False) -> dict[str, Any]:
    root, files = source_files_of(cfg)
    if not cfg.source.path.exists():
        load_arrays.scan_source(cfg.source.path)  # raises the clear "does not exist" error
    src = cfg.source
    key = load_arrays_key(cfg)

    def compute(work: Path) -> dict[str, Any]:
        records = load_arrays.scan_source(src.path, fmt=src.format, allow_pickle=src.allow_pickle, key_prefix=src.key_prefix)
        rel = [load_arrays.ArrayRecord(**{**r.__dict__, "file": Path(r.file).relative_to(root).as_posix()}) for r in records]
        load_arrays.write_table(rel, work / "table.json")
        return {"n_arrays": len(records), "bytes": sum(r.nbytes for r in records),
                "source_fingerprint": hashlib.sha256(json.dumps([[r.key, r.fingerprint] for r in records]).encode()).hexdigest()}

    rec = cache.run_cached("load-arrays", key, compute, refresh=refresh)
    # where the source lives now (not part of the key): the array table is rebased onto it
    return {**rec, "key": key, "root": str(root), "inputs": [file_fingerprint(f) for f in files]}


# ---------------------------------------------------------------------------------------------
# 2. infer-mapping


def model_fingerprint(cfg: Config) -> dict[str, Any]:
    """What identifies the model's code: the target's file content (not its path) and kwargs."""
    mod, _, attr = cfg.model.target.rpartition(":")
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
    return {"module": Path(mod).name if path is not None else mod, "attr": attr, "sha256": fp, "kwargs": cfg.model.kwargs}


def _evidence_digest(cfg: Config) -> str:
    """What the evidence step reads: the verify input, references and tolerances, by content."""
    v = cfg.verify
    if v.reference_output is None and v.reference_activations is None:
        return "no-reference"  # nothing to weigh candidates against: the input does not matter
    inputs = {"input": _file_part(v.input) if isinstance(v.input, Path) else v.model_dump(mode="json")["input"],
              "reference_output": _file_part(v.reference_output) if v.reference_output else None,
              "reference_activations": _file_part(v.reference_activations) if v.reference_activations else None}
    # rtol/atol are left out: evidence picks the candidate with the smallest error, which no
    # tolerance changes; a manifest whose best candidate missed the tolerance was never cached.
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def infer_mapping_key(cfg: Config, loaded: dict[str, Any]) -> str:
    # The verify files are deliberately not in the key: most manifests have no ambiguous row and
    # must not rerun when verify.atol changes. A manifest that did depend on them (ambiguous rows,
    # resolved or not) records their digest, and mapping_still_valid rejects it when they change.
    return cache.stage_key(
        "infer-mapping", prev=loaded["key"], code=cache.code_version(*(_T + m for m in ("infer_mapping", "strategies", "layouts", "evidence", "forward", "presets", "kinds", "transforms",
                                                                      "source_tensor", "manifest", "model"))),
        mapping=cfg.mapping.model_dump(mode="json"), model=model_fingerprint(cfg), dtype=cfg.convert.dtype,
    )


def mapping_still_valid(cfg: Config, rec: dict[str, Any]) -> bool:
    return rec.get("evidence_digest") in (None, _evidence_digest(cfg))


def infer_mapping_stage(cfg: Config, loaded: dict[str, Any], *, refresh: bool = False) -> dict[str, Any]:
    key = infer_mapping_key(cfg, loaded)

    def compute(work: Path) -> dict[str, Any]:
        from np2torch.tasks import infer_mapping

        rows = infer_mapping.build_manifest(cfg, read_records(loaded))
        manifest.write_manifest(rows, work / "manifest.json")
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        ambiguous = any(r["target_key"] and (json.loads(r["candidates"]) or r["evidence"] not in ("", "{}")) for r in rows)
        return {"n_targets": len(manifest.target_rows(rows)), "status_counts": counts,
                "unverified": [r["target_key"] for r in rows if r["target_key"] and not r["verified"]],
                "evidence_digest": _evidence_digest(cfg) if ambiguous else None}

    rec = cache.run_cached("infer-mapping", key, compute, refresh=refresh, still_valid=lambda r: mapping_still_valid(cfg, r))
    return {**rec, "key": key}


# ---------------------------------------------------------------------------------------------
# 3. validate


def validate_key(cfg: Config, mapped: dict[str, Any]) -> str:
    return cache.stage_key("validate", prev=mapped["key"], code=cache.code_version(_T + "validate", _T + "dtypes"), allow_nonfinite=cfg.source.allow_nonfinite)


def validate_stage(cfg: Config, mapped: dict[str, Any], *, refresh: bool = False) -> dict[str, Any]:
    key = validate_key(cfg, mapped)

    def compute(work: Path) -> dict[str, Any]:
        from np2torch.tasks import validate

        rows = manifest.read_manifest(_entry(mapped, "manifest.json"))
        validate.validate_manifest(rows, allow_nonfinite=cfg.source.allow_nonfinite)
        manifest.write_manifest(rows, work / "manifest.json")
        (work / "manifest.csv").write_text(manifest.to_csv(rows))
        mapping_sha = hashlib.sha256(manifest.to_csv(rows).encode()).hexdigest()
        return {"n_rows": len(rows), "mapping_sha256": mapping_sha}

    rec = cache.run_cached("validate", key, compute, refresh=refresh)
    return {**rec, "key": key}


# ---------------------------------------------------------------------------------------------
# 4. convert-to-device


def convert_key(cfg: Config, loaded: dict[str, Any], validated: dict[str, Any]) -> str:
    code = cache.code_version(*(_T + m for m in ("convert", "st_write", "source_tensor", "bytework", "st_io", "transforms", "state_dict")))
    return cache.stage_key("convert-to-device", prev=validated["key"], code=code, convert=cfg.convert.model_dump(mode="json"),
                           model=model_fingerprint(cfg), max_shard_size=cfg.export.max_shard_size)


def convert_stage(cfg: Config, loaded: dict[str, Any], validated: dict[str, Any], *, refresh: bool = False) -> dict[str, Any]:
    key = convert_key(cfg, loaded, validated)

    def compute(work: Path) -> dict[str, Any]:
        from np2torch.tasks import convert

        rows = manifest.read_manifest(_entry(validated, "manifest.json"))
        res = convert.convert_to_device(rows, read_records(loaded), model_target=cfg.model.target, model_kwargs=cfg.model.kwargs,
                                        device=cfg.convert.device, out_path=work / "model.safetensors",
                                        # the export's header up front: export then links this file instead of copying it
                                        metadata=export_metadata(cfg, loaded), allow_unsafe_load=cfg.model.allow_unsafe_load,
                                        max_shard_size=cfg.export.max_shard_size)
        res["path"] = Path(res["path"]).name  # model.safetensors, or the shards' index
        return res

    rec = cache.run_cached("convert-to-device", key, compute, refresh=refresh)
    return {**rec, "key": key, "file": str(_entry(rec, rec["path"]))}


# ---------------------------------------------------------------------------------------------
# 5. verify-forward-pass


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


def verify_key(cfg: Config, converted: dict[str, Any]) -> str:
    return cache.stage_key("verify-forward-pass", prev=converted["key"], code=cache.code_version(_T + "verify", _T + "forward", _T + "state_dict"), verify=_verify_spec(cfg),
                           device=cfg.convert.device)


def verify_stage(cfg: Config, converted: dict[str, Any], *, refresh: bool = False) -> dict[str, Any]:
    v = cfg.verify
    key = verify_key(cfg, converted)

    def compute(work: Path) -> dict[str, Any]:
        from np2torch.tasks import verify

        metrics = verify.verify_forward_pass(model_target=cfg.model.target, model_kwargs=cfg.model.kwargs, weights=Path(converted["file"]),
                                             spec=v, device=cfg.convert.device, allow_unsafe_load=cfg.model.allow_unsafe_load)
        return {"metrics": metrics}

    rec = cache.run_cached("verify-forward-pass", key, compute, refresh=refresh)
    return {**rec, "key": key}


# ---------------------------------------------------------------------------------------------
# 6. export


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


def export_metadata(cfg: Config, loaded: dict[str, Any]) -> dict[str, str]:
    from np2torch.tasks import __version__

    return {"format": "pt", "np2torch_version": __version__, "config_content_sha256": config_content_digest(cfg), "name": cfg.name,
            "source_fingerprint": loaded["source_fingerprint"]}


def export_key(cfg: Config, loaded: dict[str, Any], validated: dict[str, Any], converted: dict[str, Any], verified: dict[str, Any]) -> str:
    return cache.stage_key("export", prev=verified["key"], code=cache.code_version(_T + "export", _T + "st_io"), export=cfg.export.model_dump(mode="json"),
                           metadata=export_metadata(cfg, loaded))


def exports_intact(cfg: Config, rec: dict[str, Any]) -> bool:
    """An export entry is only a hit while the exported files still hash as recorded."""
    try:
        return all(Path(o["path"]).is_file() and file_fingerprint(o["path"])["sha256"] == o["sha256"] for o in rec["outputs"])
    except (OSError, KeyError, TypeError):
        return False


def export_stage(cfg: Config, loaded: dict[str, Any], validated: dict[str, Any], converted: dict[str, Any], verified: dict[str, Any], *,
                 refresh: bool = False) -> dict[str, Any]:
    meta = export_metadata(cfg, loaded)
    key = export_key(cfg, loaded, validated, converted, verified)

    def compute(work: Path) -> dict[str, Any]:
        from np2torch.tasks import export

        rows = manifest.read_manifest(_entry(validated, "manifest.json"))
        outputs = export.export_outputs(converted=Path(converted["file"]), tensors=converted["tensors"], manifest_rows=rows,
                                        out_dir=cfg.export.dir, formats=list(cfg.export.formats), metadata=meta)
        return {"outputs": outputs}

    rec = cache.run_cached("export", key, compute, refresh=refresh, still_valid=lambda r: exports_intact(cfg, r))
    return {**rec, "key": key}


# ---------------------------------------------------------------------------------------------
# the stage table: what the Prefect cache policy and plain callers use

# stage name → key function (same positional arguments as the stage after ``cfg``)
KEYS = {"load-arrays": load_arrays_key, "infer-mapping": infer_mapping_key, "validate": validate_key,
        "convert-to-device": convert_key, "verify-forward-pass": verify_key, "export": export_key}
# stage name → extra check a cache hit must pass besides its own artifacts' hashes
# (cfg, record) → bool
STILL_VALID = {"infer-mapping": mapping_still_valid, "export": exports_intact}


def run_all(cfg: Config, *, refresh: bool = False) -> dict[str, dict[str, Any]]:
    """The six stages in order without Prefect (tests, benchmarks): stage name → record."""
    out: dict[str, dict[str, Any]] = {}
    out["load-arrays"] = loaded = load_arrays_stage(cfg, refresh=refresh)
    out["infer-mapping"] = mapped = infer_mapping_stage(cfg, loaded, refresh=refresh)
    out["validate"] = validated = validate_stage(cfg, mapped, refresh=refresh)
    out["convert-to-device"] = converted = convert_stage(cfg, loaded, validated, refresh=refresh)
    out["verify-forward-pass"] = verified = verify_stage(cfg, converted, refresh=refresh)
    out["export"] = export_stage(cfg, loaded, validated, converted, verified, refresh=refresh)
    return out
