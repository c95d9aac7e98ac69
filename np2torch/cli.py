"""``np2torch`` command line (SPEC "CLI").

Exit status: 0 success; 1 the conversion failed (one message naming the stage, the key(s) and
the fix); 2 the command line or the config is wrong. No traceback for an expected failure.
``plan``, ``inspect`` and ``audit`` never start Prefect.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from np2torch.flows.reporting import fmt3, print_table
from np2torch.tasks.errors import ConversionError

if TYPE_CHECKING:
    from np2torch.tasks.manifest import ManifestRow

__all__ = ["main", "build_parser"]

# ---------------------------------------------------------------------------------------------
# commands (each imports what it needs: `np2torch --help` and `inspect` never import Prefect or torch)


def _rejected_audited(args: argparse.Namespace, config: str, check: Any, *check_args: Any) -> Any:
    """Run a preflight check; a command it rejects (no stage ran) still leaves an audit line: ``status: rejected`` and why."""
    try:
        return check(*check_args)
    except ConversionError as exc:
        from np2torch.tasks import audit

        now = audit.now()
        record = {"run_id": None, "name": Path(config).stem, "command": args.command, "argv": args.argv, "config_path": str(config),
                  "started_at": now, "finished_at": now, "status": "rejected", "reason": str(exc).splitlines()[0],
                  "error": exc.to_record(), "stages": {}, "inputs": [], "outputs": []}
        try:
            audit.append_record(record)
        except (ConversionError, OSError) as why:  # an unwritable home must not hide the reason the command was refused
            print(f"np2torch: warning: could not append to the audit log: {str(why).splitlines()[0]}", file=sys.stderr)
        raise


def _starter(args: argparse.Namespace) -> Any:
    """What starts the lasting local server when none runs (None with ``--no-server``): handed to the flows' API choice."""
    if args.no_server:
        return None
    from np2torch.server import autostart_server

    return autostart_server


def cmd_convert(args: argparse.Namespace) -> int:
    from np2torch.flows.preflight import preflight_convert

    # config, paths, model target, Prefect API: before Prefect starts
    cfg, api = _rejected_audited(args, args.config, preflight_convert, args.config, args.set, _starter(args))
    code = _in_warm_runner(api, args)
    if code is not None:
        return code
    early = _early_server(api)  # starts while this process imports Prefect and torch
    from np2torch.flows.convert import convert_config
    from np2torch.flows.runtime import quiet_expected_tracebacks

    if early is not None:
        early.wait()

    quiet_expected_tracebacks(verbose=args.verbose)
    record = convert_config(cfg, refresh=args.refresh)
    for line in summary_lines(record, time.time() - _started(), terminal=sys.stdout.isatty()):
        print(line)
    return 0


def cmd_port(args: argparse.Namespace) -> int:
    from np2torch.porting import cli_port

    return cli_port(args, convert=cmd_convert)
def _started() -> float:
    """When this command started (epoch seconds): the process's start (or, in the warm runner, the command's,
    passed as ``NP2TORCH_T0``), so the time shown is the command's, not only the stages'."""
    if os.environ.get("NP2TORCH_T0"):
        return float(os.environ["NP2TORCH_T0"])
    try:  # Linux: the process's start time, in clock ticks after boot
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


def summary_lines(record: dict[str, Any], command_s: float, *, terminal: bool) -> list[str]:
    """What a successful ``convert`` prints: at most 9 lines on a terminal (one per stage), 4 otherwise.

    The head says whether the stages were cached and both times (the command's, the stages');
    the outputs of a cached export were not written by this command: they are "kept (unchanged)";
    ``report.json`` (written by every successful run) is listed.
    """
    stages = record["stages"]
    n_cached = sum(1 for st in stages.values() if st["cached"])
    how = (f"all {len(stages)} stages cached" if n_cached == len(stages) else "computed" if not n_cached
           else f"{n_cached} of {len(stages)} stages cached")
    where = ", warm runner" if os.environ.get("NP2TORCH_IN_RUNNER") else ""
    lines = [f"np2torch: {record['name']} converted ({record['status']}, {how}) in {command_s:.1f}s "
             f"(stages {record['seconds']:.2f}s{where})"]

    def stage(name: str, st: dict[str, Any], width: int = 0, state: bool = True) -> str:
        retried = f", {st['attempts']} attempts" if st.get("attempts", 1) > 1 else ""
        word = ("cached  " if st["cached"] else "computed") if width else "cached" if st["cached"] else "computed"
        return f"{name:<{width}} " + (f"{word} " if state else "") + f"{st['seconds']:.3f}s{retried}"

    if terminal:
        lines += [f"  {stage(n, st, 20)}" for n, st in stages.items()]
    else:  # one line; when every stage was cached (or none), the head says it
        lines.append("  stages: " + ", ".join(stage(n, st, state=0 < n_cached < len(stages)) for n, st in stages.items()))
    v = record.get("verification") or {}
    if v.get("reference"):
        lines.append(f"  verification: passed, max abs error {fmt3(v['max_abs_error'])}, max rel error {fmt3(v['max_rel_error'])} "
                     f"(rtol {v['rtol']}, atol {v['atol']})")
    elif v:
        lines.append(f"  verification: passed (no reference: output shapes {v['output_shapes']}, all finite)")
    outputs = [Path(o["path"]) for o in record["outputs"]]
    kept = bool(stages.get("export", {}).get("cached"))
    folder = outputs[0].parent if outputs else None
    names = ", ".join(str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p) for p in outputs)
    if outputs:
        lines.append(f"  {'kept (unchanged, export cached)' if kept else 'wrote'} in {folder}/: {names}"
                     + ("; wrote report.json" if kept else ", report.json"))
    return lines


def _in_warm_runner(api: Any, args: argparse.Namespace) -> int | None:
    """With np2torch's local server, the warm runner it started runs this command (no imports to wait
    for); None when it cannot (see :mod:`np2torch.warm`), and the command runs here."""
    if getattr(api, "mode", None) not in ("local", "env"):  # the runner itself checks it reports to the same API
        return None
    from np2torch.warm import try_delegate

    if os.environ.get("NP2TORCH_T0"):  # this is the runner's child: it has the command's start already
        return try_delegate(args.argv)
    os.environ["NP2TORCH_T0"] = str(_started())  # the command's start, for the time its summary shows
    try:
        return try_delegate(args.argv)
    finally:
        os.environ.pop("NP2TORCH_T0", None)


def _early_server(api: Any) -> Any:
    from np2torch.server import start_temporary_early

    return start_temporary_early(api)


def _status_cell(r: ManifestRow) -> str:
    if r.status != "mapped":
        return r.status
    return "mapped" if r.verified else "mapped, UNVERIFIED"


def _candidates_cell(r: ManifestRow) -> str:
    """``[transpose] 3e-08 (chosen) | [as-is] 1.2`` with evidence, else the plain list of layouts."""
    cands = r.candidates
    if not cands:
        return ""
    ev = r.evidence
    errors = ev.get("errors", {})
    cells = []
    for c in cands:
        d = _desc(c)
        e = errors.get(d)
        mark = " (chosen)" if ev.get("chosen") == d else ""
        cells.append(f"[{d}]" + (f" err {fmt3(e)}" if e is not None else "") + mark)
    return " | ".join(cells)


def _plan_table_rows(rows: list[ManifestRow]) -> list[dict[str, Any]]:
    """The target rows as the table prints them (list cells as the manifest writes them)."""
    from np2torch.tasks.manifest import target_rows

    return [{**r.to_dict(), "source": r.source_key or ("(" + r.tied_to + ")" if r.tied_to else ""), "shape": r.to_dict()["target_shape"],
             "transform": r.transform or ("as-is" if r.status == "mapped" and r.how != "tied" else ""),
             "confidence": f"{float(r.confidence):.2f}", "candidates": _candidates_cell(r), "status": _status_cell(r)}
            for r in target_rows(rows)]


def cmd_plan(args: argparse.Namespace) -> int:
    from np2torch.api import plan_rows
    from np2torch.tasks.manifest import target_rows, to_csv, unused_rows

    os.environ["NP2TORCH_READ_ONLY"] = "1"  # plan writes nothing, not even the stat cache
    cfg, rows, problem = plan_rows(args.config, args.set)
    unverified = [r.target_key for r in target_rows(rows) if not r.verified]
    if args.format == "csv":
        sys.stdout.write(to_csv(rows))
    elif args.format == "json":
        print(json.dumps({"name": cfg.name, "rows": [r.to_dict() for r in rows], "valid": problem is None, "unverified": unverified,
                          "unused": [r.source_key for r in unused_rows(rows) if r.status == "unused"],
                          "problems": problem.to_record()["problems"] if problem else []}, indent=2))
    else:
        trows = _plan_table_rows(rows)
        width = None if args.wide else shutil.get_terminal_size((120, 24)).columns
        cols = ["target_key", "source", "transform", "shape", "confidence", "status"]
        if args.wide:
            cols[4:4] = ["how"]
            cols.insert(-1, "candidates")
        print(f"Manifest for {cfg.name} ({len(trows)} targets, {len(unverified)} unverified):")
        # keys give way before the transform: a cut transform would hide what the row does
        print_table(trows, cols, max_width={"candidates": 160, "transform": 80}, total_width=width, shrink_first=["source", "target_key"])
        unused = unused_rows(rows)
        print(f"\nUnused source keys ({len(unused)}):")
        print_table([r.to_dict() for r in unused], ["source_key", "source_shape", "source_dtype", "status", "note"], total_width=width)
        if unverified:
            print(f"\n{len(unverified)} row(s) are unverified: several layouts fit their shapes. Give verify.reference_output "
                  "(and verify.input) so np2torch can choose by evidence, or state the layout with a rule"
                  + ("." if args.wide else "; --wide shows each candidate layout."))
    if problem is not None:
        print(f"\n{problem}", file=sys.stderr)
        return 1
    return 0


def _desc(spec: list) -> str:
    from np2torch.tasks.transforms import describe

    return describe(spec) or "as-is"


class _SourceFormats:
    """``source.format``'s values, read from the readers table only when argparse checks or lists them (not for --help)."""

    def _names(self) -> tuple[str, ...]:
        from np2torch.tasks.readers import formats

        return formats()

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __iter__(self):
        return iter(self._names())


def cmd_inspect(args: argparse.Namespace) -> int:
    from np2torch.api import array_rows

    rows = array_rows(args.path, allow_pickle=args.allow_pickle, source_format=args.format)
    if args.format_out == "json":
        print(json.dumps(rows, indent=2))
        return 0
    total = sum(r["nbytes"] for r in rows)
    table = [{**r, "MB": f"{r['nbytes'] / 1e6:.3f}", "absmax": fmt3(r["absmax"]), "fingerprint": r["fingerprint"][:12]} for r in rows]
    print_table(table, ["key", "shape", "dtype", "byte_order", "order", "MB", "nonfinite", "absmax", "file", "offset", "fingerprint"])
    print(f"\n{len(rows)} arrays, {total / 1e6:.3f} MB")
    return 0


AUDIT_COLUMNS = ["when", "name", "status", "dtype", "overrides", "cache_hits", "outputs", "run_id"]


def _dtype_of(rec: dict[str, Any]) -> str:
    conv = (rec.get("config") or {}).get("convert") or {}
    if conv.get("dtype"):
        return str(conv["dtype"])
    if not rec.get("config"):
        return "-"  # a record without its config cannot say
    from np2torch.tasks.config import ConvertSpec

    return str(ConvertSpec.model_fields["dtype"].default)


def _audit_row(rec: dict[str, Any]) -> dict[str, Any]:
    """One row of ``np2torch audit``: enough to tell runs apart (dtype, overrides, --refresh)."""
    stages = rec.get("stages") or {}
    hits = sum(1 for s in stages.values() if s.get("cached"))
    overrides = list(rec.get("overrides") or []) + (["--refresh"] if rec.get("refresh") else [])
    row = {"when": (rec.get("finished_at") or "")[:19].replace("T", " "), "name": rec.get("name"), "status": rec.get("status"),
           "dtype": _dtype_of(rec), "overrides": " ".join(overrides) or "-", "cache_hits": f"{hits}/{len(stages)}",
           "outputs": ", ".join(Path(o["path"]).name for o in rec.get("outputs") or []) or "-", "run_id": (rec.get("run_id") or "")[:8]}
    if rec.get("status") in ("failed", "rejected") and rec.get("error"):
        row["status"] = f"{rec['status']} in {rec['error'].get('stage')}"
    return row


def _verify_cell(res: dict[str, Any]) -> str:
    if not res["checked"]:
        return "-"
    cell = "ok" if not res["findings"] else "; ".join(f"{f['kind'][:-1]} {Path(f['path']).name} {f['problem']}" for f in res["findings"])
    return cell + (f" ({len(res['superseded'])} superseded)" if res["superseded"] else "")


def cmd_audit(args: argparse.Namespace) -> int:
    """``np2torch audit [--last N] [--verify]``: the table, then (with --verify) the proof; the exit status."""
    from np2torch.tasks.audit import read_records, verify_log
    from np2torch.tasks.paths import audit_log_path, home_line

    log, last, err = Path(args.log) if args.log else None, args.last, sys.stderr
    if not args.verify:
        records, bad = read_records(log)
        print_table([_audit_row(r) for r in (records[-last:] if last else records)], AUDIT_COLUMNS)
        print(f"\naudit log {log or audit_log_path()}; {home_line()}")
        if bad:
            print(f"\nwarning: {bad} unreadable line(s) in the audit log were skipped (`np2torch audit --verify` says where)", file=err)
        return 0
    v = verify_log(log, last=last)
    print_table([{**_audit_row(r["record"]), "verify": _verify_cell(r)} for r in v.results], [*AUDIT_COLUMNS, "verify"])
    c = v.chain
    state = "intact" if c.ok else f"BROKEN ({len(c.problems)} problem(s))"
    print(f"\naudit log {log or audit_log_path()}: {c.chained} chained record(s), chain {state}"
          + (f"; {c.unchained} older unchained record(s) (written before chaining; listed, not provable)" if c.unchained else ""))
    print(home_line())
    if c.torn_tail:
        print(f"  the last line is torn ({c.torn_tail} bytes from an interrupted write): not a record, ignored")
    for p in c.problems:
        print(f"  line {p['line']}: {p['problem']}: {p['detail']}", file=err)
    checked = [r for r in v.results if r["checked"]]
    print(f"{len(checked) - v.failing} record(s) verified, {v.failing} with changed or missing files")
    for r in v.results:
        rec = r["record"]
        for s in r["superseded"]:
            print(f"  {rec.get('name')} {(rec.get('run_id') or '')[:8]}: {s['kind'][:-1]} {s['path']} superseded by {s['by']}")
        for f in r["findings"]:
            detail = f" (recorded sha256 {f['expected'][:16]}…, now {f['actual'][:16]}…)" if f["problem"] == "changed" else ""
            print(f"  {rec.get('name')} {(rec.get('run_id') or '')[:8]}: {f['kind'][:-1]} {f['path']} {f['problem']}{detail} "
                  "— changed outside np2torch", file=err)
    return 0 if v.ok else 1


def cmd_batch(args: argparse.Namespace) -> int:
    from np2torch.flows.preflight import preflight_batch

    # config, the Dask extra, Prefect API: before Prefect starts
    api = _rejected_audited(args, args.batch_config, preflight_batch, args.batch_config, args.set, args.dask, _starter(args))
    code = _in_warm_runner(api, args)
    if code is not None:
        return code
    early = _early_server(api)
    from np2torch.flows.batch import run_batch_cli
    from np2torch.flows.runtime import quiet_expected_tracebacks

    if early is not None:
        early.wait()
    quiet_expected_tracebacks(verbose=args.verbose)
    return run_batch_cli(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from prefect import serve

    from np2torch.flows.serve import batch_flow, build_deployment

    deployment = build_deployment(args.batch_config, cron=args.cron, name=args.name)  # checked before Prefect starts serving
    print(f"np2torch: serving deployment '{batch_flow.name}/{deployment.name}' on cron {args.cron!r} (UTC). "
          f"Trigger a run now with: prefect deployment run '{batch_flow.name}/{deployment.name}'")
    serve(deployment)
    return 0


# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 with a short usage line, as argparse does
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


_EXIT = "exit status: 0 {ok}; 1 {fail}; 2 the command line or the config is wrong"


_FAILED = "the conversion failed (the message names the stage, the key and the fix)"


def _epilog(example: str, ok: str = "success", fail: str = _FAILED) -> str:
    return f"example:\n  {example}\n\n" + _EXIT.format(ok=ok, fail=fail)


def _sub(sub: Any, name: str, help_: str, example: str, **exit_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".", epilog=_epilog(example, **exit_text),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    from np2torch import __version__

    p = _Parser(prog="np2torch", description="Turn NumPy-saved parameters into a verified PyTorch checkpoint.",
                epilog="example:\n  np2torch inspect weights.npz && np2torch plan conversion.yaml && np2torch convert conversion.yaml\n\n"
                       "Run `np2torch COMMAND --help` for a command's options, example and exit status.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"np2torch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    c = _sub(sub, "convert", "run the flow for one conversion", "np2torch convert conversion.yaml --set convert.dtype=float16")
    c.add_argument("config", help="the conversion's YAML config")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. convert.dtype=float16")
    c.add_argument("--refresh", action="store_true", help="recompute every stage, ignoring the cache")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="also show Prefect's own log lines (always in the run's UI page and the home's log file)")
    c.add_argument("--no-server", action="store_true",
                   help="with no server running, use a temporary one; do not start the lasting local server (also NP2TORCH_NO_SERVER=1)")
    c.set_defaults(func=cmd_convert)

    po = _sub(sub, "port", "write a PyTorch module for a Keras .keras/.h5 model, then convert and verify its weights",
              "np2torch port model.keras --out ported --input x.npy --reference y.npy",
              fail="the model cannot be ported (the message names the layer and what to do) or its conversion failed")
    po.add_argument("source", help="a Keras 3 .keras file or a legacy .h5 saved with model.save")
    po.add_argument("--out", required=True, metavar="DIR", help="folder for model.py, config.yaml and out/")
    po.add_argument("--input", default=None, metavar="X.npy", help="what the Keras model was given (Keras's layout; .npz for several)")
    po.add_argument("--reference", default=None, metavar="Y.npy", help="what it answered (model.predict)")
    po.add_argument("--layout", choices=["channels_first", "channels_last"], default="channels_first",
                    help="channels_first: images (N, C, H, W) as torch expects (default); channels_last: Keras's own layout")
    po.add_argument("--allow-placeholders", action="store_true", help="write placeholders for layers np2torch cannot port (not run)")
    po.add_argument("-v", "--verbose", action="store_true", help="also show Prefect's own log lines, as for convert")
    po.add_argument("--no-server", action="store_true", help="as for convert: never start the lasting local server")
    po.set_defaults(func=cmd_port)

    pl = _sub(sub, "plan", "print the manifest it would use; write nothing", "np2torch plan conversion.yaml --wide",
              ok="the manifest is valid", fail="the manifest fails a check (all failures are listed)")
    pl.add_argument("config", help="the conversion's YAML config")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, as for convert")
    pl.add_argument("--format", choices=["table", "csv", "json"], default="table", help="table (default), or every column as csv / json")
    pl.add_argument("--wide", action="store_true",
                    help="table with every candidate layout and how each row was matched (wider than 120 columns)")
    pl.set_defaults(func=cmd_plan)

    i = _sub(sub, "inspect", "table of the arrays in a file or folder", "np2torch inspect weights.npz --format json",
             ok="the arrays were read", fail="the file cannot be read safely (the message says why)")
    i.add_argument("path", help="a weights file or folder, in any format --source-format lists (pickles only with --allow-pickle)")
    i.add_argument("--allow-pickle", action="store_true", help="allow pickled lists/object arrays (restricted unpickler)")
    i.add_argument("--source-format", dest="format", default="auto", choices=_SourceFormats(), metavar="FORMAT",
                   help="how to read PATH: %(choices)s (default: auto)")
    i.add_argument("--format", dest="format_out", choices=["table", "json"], default="table")
    i.set_defaults(func=cmd_inspect)

    b = _sub(sub, "batch", "convert many; one child flow run per model", "np2torch batch configs/batch.yaml --set max_parallel=4",
             fail="one or more conversions failed (each is named, with its stage and key)")
    b.add_argument("batch_config")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a batch key, e.g. max_parallel=4")
    b.add_argument("--dask", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the conversions on Dask: a local cluster, or an existing scheduler address (tcp://host:8786)")
    b.add_argument("--refresh", action="store_true", help="recompute every stage of every conversion")
    b.add_argument("-v", "--verbose", action="store_true", help="also show Prefect's own log lines, as for convert")
    b.add_argument("--no-server", action="store_true",
                   help="with no server running, use a temporary one; do not start the lasting local server (also NP2TORCH_NO_SERVER=1)")
    b.set_defaults(func=cmd_batch)

    s = _sub(sub, "serve", "a scheduled deployment, visible in the Prefect UI", 'np2torch serve configs/batch.yaml --cron "0 2 * * *"',
             ok="stopped cleanly", fail="the deployment could not be served")
    s.add_argument("batch_config")
    s.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    s.add_argument("--name", default=None, help="deployment name (default: the batch file's stem)")
    s.set_defaults(func=cmd_serve)

    a = _sub(sub, "audit", "list audit records; re-hash their outputs", "np2torch audit --last 5 --verify",
             ok="listed (with --verify: every file still hashes as recorded)", fail="with --verify, a recorded file changed or is missing")
    a.add_argument("--last", type=int, default=0, metavar="N", help="only the last N records")
    a.add_argument("--verify", action="store_true", help="re-hash every recorded input and output; exit 1 if any changed")
    a.add_argument("--log", default=None, help="audit log path (default $NP2TORCH_AUDIT_LOG or data/audit.jsonl)")
    a.set_defaults(func=cmd_audit)

    from np2torch.housekeeping import add_cache_parser
    from np2torch.server import add_server_parser  # stdlib only: --help stays fast

    add_server_parser(sub)
    add_cache_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from np2torch.flows.runtime import configure_prefect

    configure_prefect()  # the same Prefect settings as the Python API
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from np2torch.tasks.lifecycle import handle_termination

    restore_signals = handle_termination()  # SIGTERM/SIGINT: stop within seconds, as cleanly as a kill
    try:
        return int(args.func(args) or 0)
    except ConversionError as exc:
        print(f"np2torch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print("np2torch: interrupted; no output was left half-written", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    finally:
        restore_signals()


if __name__ == "__main__":
    raise SystemExit(main())
