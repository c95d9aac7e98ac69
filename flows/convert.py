"""The ``convert`` flow: one model, six stages, one audit record.

The flow only calls the stages in order (each a Prefect task with retries for transient I/O),
then records what happened, success or failure, in ``report.json`` and the audit log, and
publishes the manifest table and a summary to the Prefect UI.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from np2torch.tasks import audit, manifest
from np2torch.tasks.config import Config, load_config
from np2torch.tasks.errors import ConversionError, ValidationError
from np2torch.tasks.prefect_tasks import attempts_of, configured_tasks
from np2torch.tasks.stages import STAGES

__all__ = ["convert_flow", "run_conversion", "convert_config"]

_TABLE_COLUMNS = ["target_key", "source_key", "transform", "target_shape", "target_dtype", "status", "confidence", "verified", "how"]


def _stage_entry(rec: dict[str, Any]) -> dict[str, Any]:
    return {"cached": bool(rec.get("_cached")), "seconds": round(float(rec.get("_seconds", 0.0)), 4), "attempts": int(rec.get("_attempts", 1)),
            "key": rec.get("key"), "prefect_cached": bool(rec.get("_prefect_cached"))}


class _StageFailed(Exception):
    """Carries a failed stage's timing and attempts to the audit record (never escapes)."""


def _call(t: Any, stage: str, attempts: dict[str, dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run one stage task; note how it went (cached, seconds, attempts) even when it fails."""
    t0 = time.perf_counter()
    state = t(*args, return_state=True)
    seconds = time.perf_counter() - t0
    n = attempts_of(state.state_details.task_run_id) if state.state_details.task_run_id else 0
    prefect_cached = state.name == "Cached"
    attempts[stage] = {"cached": prefect_cached, "seconds": round(seconds, 4), "attempts": n}
    rec = dict(state.result(raise_on_failure=True))  # raises the stage's own exception
    if prefect_cached:
        get_run_logger().info("%s: cache hit (artifacts re-checked) in %.3fs", stage, seconds)
        # Prefect answered from its record (after the policy proved the artifacts intact):
        # nothing ran, so this run's timing and attempts replace the stored ones
        rec.update(_cached=True, _prefect_cached=True, _seconds=seconds, _attempts=0)
    else:
        # wall time of the task call (retries and Prefect's bookkeeping included), as for a hit
        rec.update(_attempts=n, _compute_seconds=rec.get("_seconds"), _seconds=seconds)
    return rec


def run_conversion(cfg: Config, *, refresh: bool = False, run_id: str | None = None) -> dict[str, Any]:
    """Run the six stages in order; always write the audit record; return it."""
    record: dict[str, Any] = {"run_id": run_id, "name": cfg.name, "started_at": audit.now(), "status": "running",
                              "config_sha256": cfg.digest(), "config": cfg._raw, "overrides": list(cfg._overrides), "refresh": refresh,
                              "inputs": [], "mapping_sha256": None, "outputs": [],
                              "verification": None, "stages": {}, "versions": audit.versions(), "error": None}
    recs: dict[str, dict[str, Any]] = {}
    tried: dict[str, dict[str, Any]] = {}
    t = configured_tasks(refresh=refresh)
    t0 = time.perf_counter()
    current = STAGES[0]
    try:
        # 1. headers and fingerprints of every source array
        current = "load-arrays"
        recs[current] = loaded = _call(t[current], current, tried, cfg, refresh)
        record["inputs"] = loaded["inputs"]
        # 2. the manifest: which source feeds which target, with which transform
        current = "infer-mapping"
        recs[current] = mapped = _call(t[current], current, tried, cfg, loaded, refresh)
        # 3. every check on the manifest at once
        current = "validate"
        recs[current] = validated = _call(t[current], current, tried, cfg, mapped, refresh)
        record["mapping_sha256"] = validated["mapping_sha256"]
        # 4. cast, transform, write; strict load on the device
        current = "convert-to-device"
        recs[current] = converted = _call(t[current], current, tried, cfg, loaded, validated, refresh)
        # 5. forward pass against the reference
        current = "verify-forward-pass"
        recs[current] = verified = _call(t[current], current, tried, cfg, converted, refresh)
        record["verification"] = verified["metrics"]
        # 6. files, atomically, re-checked
        current = "export"
        recs[current] = exported = _call(t[current], current, tried, cfg, loaded, validated, converted, verified, refresh)
        record["outputs"] = exported["outputs"]
        record["status"] = "success"
    except ConversionError as exc:
        record["status"] = "failed"
        record["error"] = exc.to_record()
        raise
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = {"type": type(exc).__name__, "stage": current, "message": str(exc)}
        raise
    finally:
        record["stages"] = {name: _stage_entry(r) for name, r in recs.items()}
        if record["status"] == "failed":
            record["stages"][current] = {**tried.get(current, {"seconds": 0.0, "attempts": 0}), "cached": False, "failed": True}
        record["finished_at"] = audit.now()
        record["seconds"] = round(time.perf_counter() - t0, 4)
        record["manifest_path"] = str(Path(recs["infer-mapping"]["_entry"]) / "manifest.json") if "infer-mapping" in recs else None
        if record["status"] == "success":
            audit.write_report(record, cfg.export.dir)
        audit.append_record(record)
    return record


def _publish(cfg: Config, record: dict[str, Any], exc: BaseException | None) -> None:
    """Manifest table, failure table and a markdown summary in the Prefect UI."""
    mpath = record.get("manifest_path")
    if mpath and Path(mpath).exists():
        rows = manifest.read_manifest(mpath)
        create_table_artifact(key=f"{cfg.name}-manifest", table=[{c: r[c] for c in _TABLE_COLUMNS} for r in rows],
                              description=f"np2torch manifest of {cfg.name}: one row per target tensor")
    if isinstance(exc, ValidationError) and exc.problems:
        create_table_artifact(key=f"{cfg.name}-validation-failures", table=[{k: str(v) for k, v in p.items()} for p in exc.problems],
                              description="pandera checks that failed (all of them, lazy validation)")
    create_markdown_artifact(key=f"{cfg.name}-summary", markdown=summary_markdown(record), description=f"np2torch run of {cfg.name}")


def summary_markdown(record: dict[str, Any]) -> str:
    """The run as the Prefect UI shows it: outcome, stages (cache hits), verification, files."""
    stages_ = record.get("stages") or {}
    hits = sum(1 for s in stages_.values() if s.get("cached"))
    lines = [f"# np2torch: {record['name']} — {record['status']}", "",
             f"Run `{record.get('run_id')}`, {record.get('started_at')} → {record.get('finished_at')}; "
             f"config sha256 `{record.get('config_sha256')}`; cache hits {hits}/{len(stages_)}", ""]
    if record.get("error"):
        e = record["error"]
        lines += [f"**Failed in `{e.get('stage')}`**: {e.get('message')}", ""]
        if e.get("fix"):
            lines += [f"Fix: {e['fix']}", ""]
    lines += ["| stage | cache | seconds | attempts |", "|---|---|---|---|"]
    for name, s in stages_.items():
        how = "failed" if s.get("failed") else ("hit" if s.get("cached") else "computed")
        lines.append(f"| {name} | {how} | {s.get('seconds', '')} | {s.get('attempts', '')} |")
    v = record.get("verification")
    if v:
        if v.get("reference"):
            lines += ["", f"Verification: {'passed' if v.get('passed', True) else 'FAILED'}; max abs error {v.get('max_abs_error')}, "
                          f"max rel error {v.get('max_rel_error')} (rtol {v.get('rtol')}, atol {v.get('atol')})"]
        else:
            lines += ["", f"Verification: no reference output; output shapes {v.get('output_shapes')}, all finite: {v.get('finite')}"]
    if record.get("mapping_sha256"):
        lines += ["", f"Manifest sha256 `{record['mapping_sha256']}`"]
    for title, files in (("input", record.get("inputs")), ("output", record.get("outputs"))):
        if files:
            lines += ["", f"| {title} | bytes | sha256 |", "|---|---|---|"]
            lines += [f"| {f['path']} | {f['bytes']} | `{f['sha256']}` |" for f in files]
    return "\n".join(lines)


@flow(name="np2torch-convert", validate_parameters=False)
def convert_flow(config_path: str, overrides: list[str] | None = None, refresh: bool = False) -> dict[str, Any]:
    """Convert one model described by a config file (SPEC stages, cached, retried, audited)."""
    from prefect.runtime import flow_run

    cfg = load_config(config_path, overrides or [])
    exc: BaseException | None = None
    record: dict[str, Any] = {}
    try:
        record = run_conversion(cfg, refresh=refresh, run_id=str(flow_run.id) if flow_run.id else None)
        return record
    except BaseException as e:
        exc = e
        raise
    finally:
        try:
            last = record or _last_record_for(cfg.name)
            if last:
                _publish(cfg, last, exc)
        except Exception as pub_exc:  # the UI summary must never hide the conversion's own outcome
            get_run_logger().warning("could not publish artifacts: %s", pub_exc)


def _last_record_for(name: str) -> dict[str, Any] | None:
    records, _ = audit.read_records()
    for r in reversed(records):
        if r.get("name") == name:
            return r
    return None


def convert_config(config_path: str | Path, overrides: list[str] | None = None, refresh: bool = False) -> dict[str, Any]:
    """Validate the config, then run the flow with the run named after the conversion."""
    cfg = load_config(config_path, overrides or [])  # config errors surface before Prefect starts
    return convert_flow.with_options(flow_run_name=cfg.name)(config_path=str(Path(config_path).resolve()), overrides=list(overrides or []),
                                                             refresh=refresh)
