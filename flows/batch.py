"""The ``batch`` flow: many conversions, one parent flow run, one child flow run per conversion.

The parent reads the batch config, picks the task runner it asks for (a thread pool, or Dask:
a local cluster or an existing scheduler), and keeps at most ``max_parallel`` conversions in
flight. Each conversion is a ``convert-one`` task that calls :func:`np2torch.flows.convert.convert_flow`,
so each becomes a real child flow run of the batch, named after the conversion, wherever the
task runs (a thread here, or a Dask worker process on another machine). A conversion's failure
is recorded and never stops the others; at the end the batch publishes one table row per
conversion and fails, naming the failed ones, if any did.

Only small records travel between the parent and the workers: config paths in, the audit
record's summary out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.logging import get_run_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from np2torch.flows.convert import convert_flow, flow_config, run_tags
from np2torch.flows.reporting import print_table
from np2torch.tasks import audit
from np2torch.tasks.config import BatchConfig, load_batch_config, load_config
from np2torch.tasks.errors import ConfigError, ConversionError

__all__ = ["batch_flow", "run_batch", "run_batch_cli", "BatchError", "make_task_runner", "plan_batch", "batch_tags"]


class BatchError(ConversionError):
    """One or more conversions of a batch failed (exit status 1); ``rows`` holds the summary."""

    stage = "batch"

    def __init__(self, message: str, *, rows: list[dict[str, Any]] | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.rows = list(rows or [])

    def __reduce__(self):  # the summary rows must survive pickling like the other fields
        return (_rebuild_batch_error, (self.message, self.fix, self.rows))


def _rebuild_batch_error(message: str, fix: str | None, rows: list[dict[str, Any]]) -> BatchError:
    return BatchError(message, fix=fix, rows=rows)


# ---------------------------------------------------------------------------------------------
# planning (no Prefect): which conversions, under which names


def plan_batch(bc: BatchConfig) -> list[dict[str, Any]]:
    """One job per conversion: its config path, its overrides and the name its child flow run gets.

    A conversion's overrides are the batch's ``set`` then the entry's own, applied as
    ``np2torch convert --set`` applies them (relative paths resolve against the conversion
    config's folder). Each conversion is loaded with its overrides here, so that overrides that
    break a good config are a config error of the batch, naming the entry, before anything runs.
    A config that does not load by itself still gets a job (named after its file, or the
    entry's ``name=``), so that its failure is reported as that conversion's failure rather
    than stopping the batch. Two conversions that would write the same outputs, after their
    overrides, are a config error of the batch itself.
    """
    jobs: list[dict[str, Any]] = []
    seen_names: dict[str, str] = {}
    seen_dirs: dict[str, str] = {}
    for i, entry in enumerate(bc.conversions):
        path, overrides = entry.config, [*bc.overrides, *entry.overrides]
        label = f"conversions[{i}] ({path})"
        try:
            cfg = load_config(path, overrides)
            name, export_dir = cfg.name, str(cfg.export.dir)
        except ConfigError as exc:
            if overrides and _loads(path):  # the config is fine: its overrides broke it
                raise ConfigError(f"{label} with set {overrides}: {exc.message}", key=f"conversions[{i}]",
                                  fix="correct the batch's or the entry's `set:` (KEY=VALUE, as `np2torch convert --set`)") from None
            name, export_dir = _name_override(overrides) or Path(path).stem, ""
        if name in seen_names:
            raise ConfigError(f"{seen_names[name]} and {label} are both named {name!r}", key="conversions",
                              fix="give every conversion of a batch its own `name:` (it names its outputs and its flow run), "
                                  "e.g. set: [name=OTHER] on one entry")
        if export_dir and export_dir in seen_dirs:
            raise ConfigError(f"{seen_dirs[export_dir]} and {label} both export to {export_dir}", key="conversions",
                              fix="give every conversion of a batch its own `export.dir`, e.g. set: [export.dir=OTHER] on one entry")
        seen_names[name] = label
        if export_dir:
            seen_dirs[export_dir] = label
        jobs.append({"name": name, "config_path": str(path), "overrides": overrides})
    return jobs


def _loads(path: Path) -> bool:
    try:
        load_config(path)
        return True
    except ConfigError:
        return False


def _name_override(overrides: list[str]) -> str | None:
    """The last ``name=`` of the overrides: a broken config's job keeps the name its entry gives it."""
    names = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "name"]
    return names[-1] if names else None


def make_task_runner(bc: BatchConfig, dask: str | None = None) -> TaskRunner:
    """The runner the batch asks for; ``dask`` ("local" or a scheduler address) overrides the config."""
    use_dask = dask is not None or bc.task_runner == "dask"
    if not use_dask:
        return ThreadPoolTaskRunner(max_workers=bc.max_parallel)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # an optional dependency: say how to get it (the CLI's preflight said so before Prefect started)
        from np2torch.flows.preflight import dask_problem

        raise (dask_problem() or ConfigError(f"the Dask task runner failed to import: {exc}", key="task_runner")) from None
    address = dask if dask not in (None, "local") else bc.dask_address
    if address:
        return DaskTaskRunner(address=address)
    # one thread per worker process: a conversion already uses every core torch gives it, and a
    # process per conversion keeps one model's memory from another's
    return DaskTaskRunner(cluster_kwargs={"n_workers": bc.dask_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "silence_logs": _dask_log_level()})


def _dask_log_level() -> int:
    """Dask's own logs (worker start/stop, heartbeats) stay quiet unless NP2TORCH_DASK_LOGS=1 asks for them."""
    level = logging.INFO if os.environ.get("NP2TORCH_DASK_LOGS", "") not in ("", "0") else logging.ERROR
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.worker", "distributed.core"):
        logging.getLogger(name).setLevel(level)
    return level


# ---------------------------------------------------------------------------------------------
# one conversion, as a task that runs the child flow


def summary_row(name: str, record: dict[str, Any], *, status: str, flow_run_id: str | None, error: str = "",
                seconds: float | None = None) -> dict[str, Any]:
    """One row of the batch table from a conversion's audit record."""
    stages = record.get("stages") or {}
    v = record.get("verification") or {}
    if not v:
        verification = "—"
    elif v.get("reference"):
        verification = (f"{'passed' if v.get('passed') else 'FAILED'} (max abs {v.get('max_abs_error', 0):.3g}, "
                        f"max rel {v.get('max_rel_error', 0):.3g})")
    else:
        verification = f"{'passed' if v.get('passed') else 'FAILED'} (shapes and finiteness; no reference)"
    outputs = record.get("outputs") or []
    return {
        "name": name,
        "status": status,
        "seconds": _sig3(float(record.get("seconds", seconds or 0.0))),
        "cache_hits": f"{sum(1 for s in stages.values() if s.get('cached'))}/{len(stages)}",
        "verification": verification,
        "outputs": _outputs_text([o["path"] for o in outputs]),
        "error": error,
        "flow_run_id": flow_run_id or "",
    }


def _sig3(x: float) -> float:
    """Three significant digits: 12.3, 0.0123 (summaries, not measurements)."""
    return float(f"{x:.3g}")


def _outputs_text(paths: list[str]) -> str:
    """``DIR/{a, b}``: the export folder once, then the file names."""
    if not paths:
        return ""
    parents = {str(Path(p).parent) for p in paths}
    if len(parents) > 1:
        return ", ".join(paths)
    return f"{parents.pop()}/{{{', '.join(Path(p).name for p in paths)}}}"


@task(name="convert-one", task_run_name="convert-{name}", cache_policy=NO_CACHE, persist_result=False)
def convert_one(config_path: str, name: str, overrides: list[str] | None = None, refresh: bool = False) -> dict[str, Any]:
    """Run one conversion as a child flow run named after it; return its summary row, never raise."""
    from prefect import tags

    t0 = time.perf_counter()
    try:
        cfg = load_config(config_path, list(overrides or []))
        run_tag, params = run_tags(cfg), {"config": flow_config(cfg)}  # the child runs this parse
    except ConversionError:  # a broken config still runs, and fails in its own child run
        run_tag, params = ["np2torch", name], {"config_path": config_path, "overrides": list(overrides or [])}
    with tags(*run_tag):
        state = convert_flow.with_options(flow_run_name=name)(**params, refresh=refresh, return_state=True)
    flow_run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    if state.is_completed():
        return summary_row(name, state.result(), status="success", flow_run_id=flow_run_id)
    record = (audit.last_record(run_id=flow_run_id) if flow_run_id else None) or {}  # the child flow writes one on failure too
    err = record.get("error") or {}
    message = err.get("message") or state.message or state.name
    if err.get("key"):
        message = f"`{err['key']}`: {message}"
    if err.get("stage"):
        message = f"[{err['stage']}] {message}"
    get_run_logger().error("conversion %s failed: %s", name, message)
    return summary_row(name, record, status="failed", flow_run_id=flow_run_id, error=message, seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# the parent flow


@contextlib.contextmanager
def _api_url_for_workers(use_dask: bool) -> Iterator[None]:
    """Make the API address explicit so that Dask worker processes report to this server.

    Without ``PREFECT_API_URL`` this process talks to a temporary server it started itself; the
    task's serialized settings carry the address to the workers only if it is a setting.
    """
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ctx = FlowRunContext.get()
    if not use_dask or PREFECT_API_URL.value() or ctx is None or ctx.client is None:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: str(ctx.client.api_url).rstrip("/")}):
        yield


def _api_only(run_logger: Any) -> Any:
    """The run logger, sending to the Prefect API only (Prefect's console handler would print
    a line a second time that the batch already printed)."""
    from prefect.logging.handlers import APILogHandler

    lg = logging.getLogger("np2torch.batch.progress")
    if not any(isinstance(h, APILogHandler) for h in lg.handlers):
        lg.addHandler(APILogHandler())
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return type(run_logger)(lg, run_logger.extra)


def _progress_line(done: int, total: int, row: dict[str, Any]) -> str:
    width = 20
    filled = round(width * done / total) if total else width
    return (f"np2torch batch [{'#' * filled}{'.' * (width - filled)}] {done}/{total}  {row['name']}: {row['status']} "
            f"in {row['seconds']:.2f}s (cache {row['cache_hits']})")


def _batch_run_name() -> str:
    """``nightly.yaml: 6 conversions, 2026-12-06 17:05:12`` for every run, scheduled, triggered from the UI
    or from the CLI: each run of one batch has its own name."""
    import datetime

    from prefect.runtime import flow_run

    path = Path(str(flow_run.parameters.get("batch_config", "batch")))
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    try:
        n = len(load_batch_config(path, list(flow_run.parameters.get("overrides") or [])).conversions)
    except (ConversionError, OSError):
        return f"{path.name}, {when}"
    return f"{path.name}: {n} conversion{'s' if n != 1 else ''}, {when}"


def batch_tags(batch_config: str | Path) -> list[str]:
    """Tags of a batch run, like a conversion's: to filter runs in the UI (its conversions carry them too)."""
    return ["np2torch", "batch", f"batch:{Path(batch_config).stem}"]


@flow(name="np2torch-batch", flow_run_name=_batch_run_name, validate_parameters=False)
def batch_flow(batch_config: str, overrides: list[str] | None = None, dask: str | None = None,
               refresh: bool = False) -> list[dict[str, Any]]:
    """Convert every model of a batch config, each in its own child flow run; publish a summary.

    ``dask``: None runs as the batch config says; "local" starts a local Dask cluster; an
    address (tcp://host:8786) uses that scheduler.
    """
    logger = get_run_logger()
    api_log = _api_only(logger)
    bc = load_batch_config(batch_config, overrides or [])
    jobs = plan_batch(bc)
    total = len(jobs)
    runner = make_task_runner(bc, dask)
    use_dask = type(runner).__name__ == "DaskTaskRunner"
    logger.info("batch of %d conversion(s) on %s, at most %d at a time", total, type(runner).__name__, bc.max_parallel)
    progress_id = create_progress_artifact(progress=0.0, key="np2torch-batch-progress",
                                           description=f"np2torch batch {Path(batch_config).name}: conversions finished")
    rows: dict[str, dict[str, Any]] = {}
    # 1. submit at most max_parallel conversions; 2. as each finishes, record it and submit the next
    with _api_url_for_workers(use_dask), runner:
        queue = list(jobs)
        pending: dict[PrefectFuture, dict[str, Any]] = {}
        while queue or pending:
            while queue and len(pending) < bc.max_parallel:
                job = queue.pop(0)
                pending[runner.submit(convert_one, parameters={**job, "refresh": refresh})] = job
            finished = next(as_completed(list(pending)))
            job = pending.pop(finished)
            try:
                row = finished.result()
            except Exception as exc:  # the task itself died (e.g. a Dask worker was lost): still only this conversion
                logger.error("conversion %s crashed: %s: %s", job["name"], type(exc).__name__, exc)
                row = summary_row(job["name"], {}, status="failed", flow_run_id=None, error=f"{type(exc).__name__}: {exc}")
            rows[row["name"]] = row
            update_progress_artifact(artifact_id=progress_id, progress=100.0 * len(rows) / total,
                                     description=f"np2torch batch {Path(batch_config).name}: {len(rows)} of {total} conversions finished")
            line = _progress_line(len(rows), total, row)
            print(line, file=sys.stderr, flush=True)  # the terminal, once
            api_log.info(line)  # the run's logs in the UI, without a second copy on the terminal
    ordered = [rows[j["name"]] for j in jobs]  # the batch file's order, not completion order
    # 3. one row per conversion, and a short summary
    create_table_artifact(key="np2torch-batch-summary", table=ordered,
                          description=f"np2torch batch {Path(batch_config).name}: one row per conversion")
    failed = [r["name"] for r in ordered if r["status"] != "success"]
    create_markdown_artifact(key="np2torch-batch-report", markdown=_report_markdown(batch_config, ordered, failed),
                             description="np2torch batch outcome")
    if failed:
        raise BatchError(f"{len(failed)} of {total} conversion(s) failed: {', '.join(failed)}", rows=ordered,
                         fix="see each failed conversion's child flow run (or `np2torch audit`) for its stage, key and fix")
    return ordered


def _report_markdown(batch_config: str, rows: list[dict[str, Any]], failed: list[str]) -> str:
    head = f"# np2torch batch {Path(batch_config).name}: {len(rows) - len(failed)} of {len(rows)} succeeded"
    lines = [head, ""]
    if failed:
        lines += [f"**Failed:** {', '.join(failed)}", ""]
    lines += ["| conversion | status | seconds | cache hits | verification |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} | {r['cache_hits']} | {r['verification']} |" for r in rows]
    errors = [r for r in rows if r["error"]]
    if errors:
        lines += ["", "## Errors", ""] + [f"- **{r['name']}**: {r['error']}" for r in errors]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# entry points


def run_batch(batch_config: str | Path, overrides: list[str] | None = None, *, dask: str | None = None,
              refresh: bool = False) -> tuple[list[dict[str, Any]], BatchError | None]:
    """Validate the batch config, run the flow; return its rows and the failure, if any."""
    from np2torch.flows.runtime import choose_api, run_url, using_api

    path = Path(batch_config).resolve()
    plan_batch(load_batch_config(path, overrides or []))  # config errors surface before Prefect starts
    api = choose_api()
    from prefect import tags

    with using_api(api), tags(*batch_tags(path)):
        state = batch_flow(batch_config=str(path), overrides=list(overrides or []), dask=dask, refresh=refresh, return_state=True)
    url = run_url(api, str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None)
    if url:
        print(f"np2torch: batch run in the Prefect UI: {url}", file=sys.stderr)
    try:
        return state.result(raise_on_failure=True), None
    except BatchError as exc:
        return exc.rows, exc


def run_batch_cli(args: Any) -> int:
    """``np2torch batch``: print the summary table; exit 1 naming the failed conversions."""
    rows, failure = run_batch(args.batch_config, args.set, dask=args.dask, refresh=args.refresh)
    print()
    print_table(rows, ["name", "status", "seconds", "cache_hits", "verification", "outputs"])
    if failure is not None:
        for r in rows:
            if r["error"]:
                print(f"\n{r['name']}: {r['error']}", file=sys.stderr)
        print(f"\nnp2torch: error: {failure}", file=sys.stderr)
        return failure.exit_code
    print(f"\n{len(rows)} conversion(s) succeeded")
    return 0
