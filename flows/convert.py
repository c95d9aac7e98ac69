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
from np2torch.tasks.progress import RunProgress, current_run
from np2torch.tasks.errors import STATE_LIMIT, ConversionError, ValidationError, short
from np2torch.tasks.prefect_tasks import attempts_of, configured_tasks
from np2torch.tasks.stages import STAGES

__all__ = ["convert_flow", "run_conversion", "convert_config"]

# the manifest table in the UI: the columns a reviewer checks, narrow enough for 1440 px
# (source shape, fingerprints and evidence are in manifest.csv and `np2torch plan`)
_TABLE_COLUMNS = ["target_key", "source_key", "transform", "target_shape", "status", "confidence"]


def _stage_entry(rec: dict[str, Any]) -> dict[str, Any]:
    return {"cached": bool(rec.get("_cached")), "seconds": round(float(rec.get("_seconds", 0.0)), 4), "attempts": int(rec.get("_attempts", 1)),
            "key": rec.get("key"), "prefect_cached": bool(rec.get("_prefect_cached")), "wall_seconds": round(float(rec.get("_wall_seconds", 0.0)), 4)}


class _StageFailed(Exception):
    """Carries a failed stage's timing and attempts to the audit record (never escapes)."""


def _call(t: Any, stage: str, attempts: dict[str, dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run one stage task; note how it went (cached, seconds, attempts) even when it fails."""
    run = current_run()
    if run is not None:
        run.stage_begin(stage)
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
        # ``_seconds`` stays the stage's own time, the one its "computed in X s" log line
        # printed; the task call's wall time (Prefect's bookkeeping included) is kept beside it
        rec.update(_attempts=n, _compute_seconds=rec.get("_seconds"))
    rec["_wall_seconds"] = seconds
    if run is not None:
        run.stage_end(stage, f"{'cache hit' if rec.get('_cached') else 'computed'} in {float(rec['_seconds']):.3g} s")
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


def _g3(x: Any) -> str:
    """A float at three significant digits (summaries are read, not computed with)."""
    return f"{x:.3g}" if isinstance(x, float) else ("" if x is None else str(x))


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
        lines.append(f"| {name} | {how} | {_g3(s.get('seconds'))} | {s.get('attempts', '')} |")
    v = record.get("verification")
    if v:
        if v.get("reference"):
            lines += ["", f"Verification: {'passed' if v.get('passed', True) else 'FAILED'}; max abs error {_g3(v.get('max_abs_error'))}, "
                          f"max rel error {_g3(v.get('max_rel_error'))} (rtol {_g3(v.get('rtol'))}, atol {_g3(v.get('atol'))})"]
        else:
            lines += ["", f"Verification: no reference output; output shapes {v.get('output_shapes')}, all finite: {v.get('finite')}"]
    if record.get("mapping_sha256"):
        lines += ["", f"Manifest sha256 `{record['mapping_sha256']}`"]
    for title, files in (("input", record.get("inputs")), ("output", record.get("outputs"))):
        if files:
            lines += ["", f"| {title} | bytes | sha256 |", "|---|---|---|"]
            lines += [f"| {f['path']} | {f['bytes']} | `{f['sha256']}` |" for f in files]
    return "\n".join(lines)


def _state_message(exc: BaseException, name: str) -> str:
    """What the UI shows beside a failed run: stage, key and cause on one line, then the fix."""
    if isinstance(exc, ConversionError):
        where = f"{exc.stage}" + (f", `{short(exc.key)}`" if exc.key else "")
        text = f"{name} failed in {where}: {exc.message}"
        if exc.expected is not None or exc.actual is not None:
            text += f" (expected {short(str(exc.expected))}, got {short(str(exc.actual))})"
        return short(text + (f". Fix: {exc.fix}" if exc.fix else ""), STATE_LIMIT)
    return short(f"{name} failed: {type(exc).__name__}: {exc}", STATE_LIMIT)


@flow(name="np2torch-convert", validate_parameters=False)
def convert_flow(config_path: str, overrides: list[str] | None = None, refresh: bool = False) -> Any:
    """Convert one model described by a config file (SPEC stages, cached, retried, audited)."""
    from prefect.context import TagsContext
    from prefect.runtime import flow_run
    from prefect.states import Failed

    cfg = load_config(config_path, overrides or [])
    exc: BaseException | None = None
    record: dict[str, Any] = {}
    try:
        # the run's tags (name, dtype, device) stay on the flow run: a tagged task run would ask the
        # API for tag concurrency slots at each start (~0.4 s per stage against a local server)
        with TagsContext(current_tags=set()), RunProgress(key=f"{cfg.name}-progress", description=f"np2torch {cfg.name}"):
            record = run_conversion(cfg, refresh=refresh, run_id=str(flow_run.id) if flow_run.id else None)
        return record
    except ConversionError as e:
        exc = e
        # a Failed state whose message names the stage, the key and the cause (the UI shows it
        # beside the run); the exception itself still travels with the state
        return Failed(message=_state_message(e, cfg.name), data=e)
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


def run_tags(cfg: Config) -> list[str]:
    """Tags of a convert run, to filter runs in the UI: the conversion, its dtype and its device."""
    return ["np2torch", cfg.name, f"dtype:{cfg.convert.dtype}", f"device:{cfg.convert.device}"]


def convert_config(config_path: str | Path, overrides: list[str] | None = None, refresh: bool = False) -> dict[str, Any]:
    """Check everything that needs no stage, pick the Prefect API, then run the flow (named and tagged
    after the conversion); print the run's UI address when it went to a lasting server."""
    import sys

    from prefect import tags

    from np2torch.flows.preflight import check_config
    from np2torch.flows.server import choose_api, run_url, using_api

    cfg = load_config(config_path, overrides or [])  # config errors surface before Prefect starts
    check_config(cfg)
    api = choose_api()
    with using_api(api), tags(*run_tags(cfg)):
        state = convert_flow.with_options(flow_run_name=cfg.name)(config_path=str(Path(config_path).resolve()), overrides=list(overrides or []),
                                                                  refresh=refresh, return_state=True)
    url = run_url(api, str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None)
    if url:
        print(f"np2torch: run in the Prefect UI: {url}", file=sys.stderr)
    return state.result(raise_on_failure=True)
