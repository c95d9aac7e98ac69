"""The six stages as plain functions: config + the previous stage's record → this stage's record.

Each computes its content key from exactly what it depends on, then runs the stage through the
content-addressed cache (:mod:`tasks.cache`). Records are small JSON dicts (paths, shapes,
fingerprints, metrics); arrays and tensors never leave the stage that made them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tasks import cache, convert, export, infer_mapping, load_arrays, manifest, safe_pickle, st_io, transforms, validate, verify
from tasks import model as model_mod
from tasks import presets
from tasks.config import Config
from tasks.fingerprint import file_fingerprint, sha256_file, cached_by_stat

__all__ = ["STAGES", "load_arrays_stage", "infer_mapping_stage", "validate_stage", "convert_stage", "verify_stage", "export_stage",
           "source_files_of", "model_fingerprint", "read_records"]

STAGES = ["load-arrays", "infer-mapping", "validate", "convert-to-device", "verify-forward-pass", "export"]


def _entry(rec: dict[str, Any], name: str) -> Path:
    return Path(rec["_entry"]) / name


# ---------------------------------------------------------------------------------------------
# 1. load-arrays


def source_files_of(cfg: Config) -> tuple[Path, list[Path]]:
    """The source root and every file the source consists of (what its cache key hashes)."""
    p = cfg.source.path
    if p.is_dir():
        return p, sorted(f for f in p.rglob("*.npy") if f.is_file())
    return p.parent, [p] if p.exists() else []


def read_records(loaded: dict[str, Any]) -> list[load_arrays.ArrayRecord]:
    """The array table of a load record, with file paths rebased onto the current source root."""
    root = Path(loaded["root"])
    out = []
    for r in load_arrays.read_table(_entry(loaded, "table.json")):
        out.append(load_arrays.ArrayRecord(**{**r.__dict__, "file": str(root / r.file)}))
    return out


def load_arrays_stage(cfg: Config, *, refresh: bool = False) -> dict[str, Any]:
    root, files = source_files_of(cfg)
    if not cfg.source.path.exists():
        load_arrays.scan_source(cfg.source.path)  # raises the clear "does not exist" error
    inputs = load_arrays.fingerprint_files(files)  # one read per file: sha256 + what the scan needs
    src = cfg.source
    key = cache.stage_key(
        "load-arrays",
        code=cache.code_version(load_arrays, safe_pickle),
        source={"format": src.format, "allow_pickle": src.allow_pickle, "key_prefix": src.key_prefix, "is_dir": src.path.is_dir()},
        # names relative to the source root plus content: the same bytes at another path still hit
        files=[[f.relative_to(root).as_posix(), i["sha256"]] for f, i in zip(files, inputs)],
    )

    def compute(work: Path) -> dict[str, Any]:
        records = load_arrays.scan_source(src.path, fmt=src.format, allow_pickle=src.allow_pickle, key_prefix=src.key_prefix)
        rel = [load_arrays.ArrayRecord(**{**r.__dict__, "file": Path(r.file).relative_to(root).as_posix()}) for r in records]
        load_arrays.write_table(rel, work / "table.json")
        return {"n_arrays": len(records), "bytes": sum(r.nbytes for r in records),
                "source_fingerprint": hashlib.sha256(json.dumps([[r.key, r.fingerprint] for r in records]).encode()).hexdigest()}

    rec = cache.run_cached("load-arrays", key, compute, refresh=refresh)
    return {**rec, "key": key, "root": str(root), "inputs": inputs}


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


def infer_mapping_stage(cfg: Config, loaded: dict[str, Any], *, refresh: bool = False) -> dict[str, Any]:
    key = cache.stage_key(
        "infer-mapping", prev=loaded["key"], code=cache.code_version(infer_mapping, presets, transforms, manifest, model_mod),
        mapping=cfg.mapping.model_dump(mode="json"), model=model_fingerprint(cfg), dtype=cfg.convert.dtype,
    )

    def compute(work: Path) -> dict[str, Any]:
        records = read_records(loaded)
        m = model_mod.build_model(cfg.model.target, cfg.model.kwargs, allow_unsafe_load=cfg.model.allow_unsafe_load)
        targets = model_mod.describe_targets(m)
        rows = infer_mapping.infer_manifest(records, targets, cfg.mapping, convert_dtype=cfg.convert.dtype)
        manifest.write_manifest(rows, work / "manifest.json")
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return {"n_targets": len(targets), "status_counts": counts,
                "unverified": [r["target_key"] for r in rows if r["target_key"] and not r["verified"]]}

    rec = cache.run_cached("infer-mapping", key, compute, refresh=refresh)
    return {**rec, "key": key}


# ---------------------------------------------------------------------------------------------
# 3. validate


def validate_stage(cfg: Config, mapped: dict[str, Any], *, refresh: bool = False) -> dict[str, Any]:
    key = cache.stage_key("validate", prev=mapped["key"], code=cache.code_version(validate), allow_nonfinite=cfg.source.allow_nonfinite)

    def compute(work: Path) -> dict[str, Any]:
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


def convert_stage(cfg: Config, loaded: dict[str, Any], validated: dict[str, Any], *, refresh: bool = False) -> dict[str, Any]:
    key = cache.stage_key("convert-to-device", prev=validated["key"], code=cache.code_version(convert, st_io, transforms),
                          convert=cfg.convert.model_dump(mode="json"), model=model_fingerprint(cfg))

    def compute(work: Path) -> dict[str, Any]:
        rows = manifest.read_manifest(_entry(validated, "manifest.json"))
        res = convert.convert_to_device(rows, read_records(loaded), model_target=cfg.model.target, model_kwargs=cfg.model.kwargs,
                                        device=cfg.convert.device, out_path=work / "model.safetensors",
                                        # the export's header up front: export then links this file instead of copying it
                                        metadata=export_metadata(cfg, loaded), allow_unsafe_load=cfg.model.allow_unsafe_load)
        res["path"] = "model.safetensors"
        return res

    rec = cache.run_cached("convert-to-device", key, compute, refresh=refresh)
    return {**rec, "key": key, "file": str(_entry(rec, "model.safetensors"))}


# ---------------------------------------------------------------------------------------------
# 5. verify-forward-pass


def _file_part(p: Any) -> Any:
    if isinstance(p, Path) or (isinstance(p, str) and p and Path(p).is_file()):
        return {"name": Path(p).name, "sha256": file_fingerprint(p)["sha256"]} if Path(p).is_file() else str(p)
    return p


def verify_stage(cfg: Config, converted: dict[str, Any], *, refresh: bool = False) -> dict[str, Any]:
    v = cfg.verify
    spec = v.model_dump(mode="json")
    spec["input"] = _file_part(v.input) if isinstance(v.input, Path) else spec["input"]
    spec["reference_output"] = _file_part(v.reference_output) if v.reference_output else None
    key = cache.stage_key("verify-forward-pass", prev=converted["key"], code=cache.code_version(verify), verify=spec, device=cfg.convert.device)

    def compute(work: Path) -> dict[str, Any]:
        metrics = verify.verify_forward_pass(model_target=cfg.model.target, model_kwargs=cfg.model.kwargs, weights=Path(converted["file"]),
                                             spec=v, device=cfg.convert.device, allow_unsafe_load=cfg.model.allow_unsafe_load)
        return {"metrics": metrics}

    rec = cache.run_cached("verify-forward-pass", key, compute, refresh=refresh)
    return {**rec, "key": key}


# ---------------------------------------------------------------------------------------------
# 6. export


def export_metadata(cfg: Config, loaded: dict[str, Any]) -> dict[str, str]:
    from tasks import __version__

    return {"format": "pt", "np2torch_version": __version__, "config_sha256": cfg.digest(), "name": cfg.name,
            "source_fingerprint": loaded["source_fingerprint"]}


def export_stage(cfg: Config, loaded: dict[str, Any], validated: dict[str, Any], converted: dict[str, Any], verified: dict[str, Any], *,
                 refresh: bool = False) -> dict[str, Any]:
    meta = export_metadata(cfg, loaded)
    key = cache.stage_key("export", prev=verified["key"], code=cache.code_version(export, st_io), export=cfg.export.model_dump(mode="json"),
                          metadata=meta)

    def compute(work: Path) -> dict[str, Any]:
        rows = manifest.read_manifest(_entry(validated, "manifest.json"))
        outputs = export.export_outputs(converted=Path(converted["file"]), tensors=converted["tensors"], manifest_rows=rows,
                                        out_dir=cfg.export.dir, formats=list(cfg.export.formats), metadata=meta)
        return {"outputs": outputs}

    def still_valid(rec: dict[str, Any]) -> bool:
        try:
            return all(Path(o["path"]).is_file() and file_fingerprint(o["path"])["sha256"] == o["sha256"] for o in rec["outputs"])
        except OSError:
            return False

    rec = cache.run_cached("export", key, compute, refresh=refresh, still_valid=still_valid)
    return {**rec, "key": key}
