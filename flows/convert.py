"""The ``convert`` flow: one model, six stages, one audit record.

The flow runs the pipeline's one runner (:func:`np2torch.tasks.stages.run_conversion`) with each
stage as a Prefect task (retries for transient I/O), which records what happened, success or
failure, in ``report.json`` and the audit log; the flow publishes the manifest table and a
summary to the Prefect UI. It runs the config the caller checked (:func:`flow_config`), never
reading the file again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from np2torch.tasks import audit, manifest, stages
from np2torch.tasks.config import Config, load_config
from np2torch.tasks.errors import ConversionError, ValidationError, one_line, short
from np2torch.tasks.prefect_tasks import Orchestrated
from np2torch.tasks.progress import RunProgress

__all__ = ["convert_flow", "run_conversion", "convert_config", "flow_config"]

# the manifest table in the UI: the columns a reviewer checks, narrow enough for 1440 px
# (source shape, fingerprints and evidence are in manifest.csv and `np2torch plan`)
_TABLE_COLUMNS = ["target_key", "source_key", "transform", "target_shape", "status", "confidence"]


def run_conversion(cfg: Config, *, refresh: bool = False, run_id: str | None = None) -> dict[str, Any]:
    """The pipeline with each stage as a Prefect task (:class:`Orchestrated`); the audit record as every caller's."""
    return stages.run_conversion(cfg, refresh=refresh, run_id=run_id, call=Orchestrated())


def flow_config(cfg: Config) -> dict[str, Any]:
    """A checked config as the flow's parameter: small, JSON, resolved (the flow does not read the file again)."""
    return {"resolved": cfg.model_dump(mode="json"), "raw": cfg._raw, "overrides": list(cfg._overrides)}


def _from_flow_config(params: dict[str, Any]) -> Config:
    cfg = Config.model_validate(params["resolved"])
    cfg._raw, cfg._overrides = params["raw"], list(params["overrides"])
    return cfg


def _publish(cfg: Config, record: dict[str, Any], exc: BaseException | None) -> None:
    """Manifest table, failure table and a markdown summary in the Prefect UI."""
    mpath = record.get("manifest_path")
    if mpath and Path(mpath).exists():
        rows = manifest.read_manifest(mpath)
        create_table_artifact(key=f"{cfg.name}-manifest", table=[{c: r.to_dict()[c] for c in _TABLE_COLUMNS} for r in rows],
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
        return one_line(text + (f". Fix: {exc.fix}" if exc.fix else ""))
    return one_line(f"{name} failed: {type(exc).__name__}: {exc}")


@flow(name="np2torch-convert", validate_parameters=False)
def convert_flow(config: dict[str, Any] | None = None, refresh: bool = False, config_path: str | None = None,
                 overrides: list[str] | None = None) -> Any:
    """Convert one model (SPEC stages, cached, retried, audited): ``config`` as :func:`flow_config` gives it.

    ``config_path`` (+ ``overrides``) instead only for a config the caller could not load (a
    batch entry), so that its error is this run's failure.
    """
    from prefect.context import TagsContext
    from prefect.runtime import flow_run
    from prefect.states import Failed

    cfg = _from_flow_config(config) if config is not None else load_config(config_path, overrides or [])
    exc: BaseException | None = None
    record: dict[str, Any] = {}
    try:
        # the run's tags (name, dtype, device) stay on the flow run: a tagged task run would ask the
        # API for tag concurrency slots at each start (~0.4 s per stage against a local server)
        with TagsContext(current_tags=set()), RunProgress(key=f"{cfg.name}-progress", description=f"np2torch {cfg.name}",
                                                                 weights={s.name: s.weight for s in stages.STAGES}):
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


def convert_config(config: str | Path | Config, overrides: list[str] | None = None, refresh: bool = False) -> dict[str, Any]:
    """Check everything that needs no stage, pick the Prefect API, then run the flow (named and tagged
    after the conversion); print the run's UI address when it went to a lasting server.

    ``config`` is a path (loaded here, with ``overrides``) or a config already loaded and checked
    (the CLI's preflight result): either way the flow runs that one parse.
    """
    import sys

    from prefect import tags

    from np2torch.flows.preflight import check_config
    from np2torch.flows.runtime import choose_api, run_url, using_api

    if isinstance(config, Config):
        cfg = config
    else:
        cfg = load_config(config, overrides or [])  # config errors surface before Prefect starts
        check_config(cfg)
    api = choose_api()
    with using_api(api), tags(*run_tags(cfg)):
        state = convert_flow.with_options(flow_run_name=cfg.name)(config=flow_config(cfg), refresh=refresh, return_state=True)
    url = run_url(api, str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None)
    if url:
        print(f"np2torch: run in the Prefect UI: {url}", file=sys.stderr)
    return state.result(raise_on_failure=True)
