"""``np2torch`` command line (SPEC "CLI").

Exit status: 0 success; 1 the conversion failed (one message naming the stage, the key(s) and
the fix); 2 the command line or the config is wrong. No traceback for an expected failure.
``plan``, ``inspect`` and ``audit`` never start Prefect.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from np2torch.tasks.errors import ConversionError

__all__ = ["main"]


def _print_table(rows: list[dict[str, Any]], columns: list[str], *, out=None, max_width: dict[str, int] | None = None) -> None:
    out = out or sys.stdout
    if not rows:
        print("(none)", file=out)
        return
    widths = {c: min((max_width or {}).get(c, 60), max(len(c), *(len(str(r.get(c, ""))) for r in rows))) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns), file=out)
    print("  ".join("-" * widths[c] for c in columns), file=out)
    for r in rows:
        cells = []
        for c in columns:
            s = str(r.get(c, ""))
            cells.append((s if len(s) <= widths[c] else s[: widths[c] - 1] + "…").ljust(widths[c]))
        print("  ".join(cells).rstrip(), file=out)


# ---------------------------------------------------------------------------------------------
# commands


def _quiet_expected_tracebacks() -> None:
    """Prefect prints the traceback of a failed flow to the terminal; for a ConversionError the
    message says everything (the traceback still reaches the Prefect API and UI)."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, PrefectConsoleHandler) and not getattr(h, "_np2torch_quiet", False):
                orig = h.format

                def fmt(record: logging.LogRecord, _orig=orig) -> str:
                    if record.exc_info and isinstance(record.exc_info[1], ConversionError):
                        saved = record.exc_info, record.exc_text
                        record.exc_info, record.exc_text = None, None
                        try:
                            return _orig(record)
                        finally:
                            record.exc_info, record.exc_text = saved
                    return _orig(record)

                h.format = fmt  # type: ignore[method-assign]
                h._np2torch_quiet = True  # type: ignore[attr-defined]


def cmd_convert(args: argparse.Namespace) -> int:
    from np2torch.flows.convert import convert_config

    _quiet_expected_tracebacks()
    record = convert_config(args.config, args.set, refresh=args.refresh)
    v = record.get("verification") or {}
    print(f"np2torch: {record['name']} converted ({record['status']}) in {record['seconds']:.2f}s")
    for name, s in record["stages"].items():
        print(f"  {name:<20} {'cached  ' if s['cached'] else 'computed'} {s['seconds']:8.3f}s  attempts {s['attempts']}")
    if v:
        if v.get("reference"):
            print(f"  verification: passed, max abs error {v['max_abs_error']:.3g}, max rel error {v['max_rel_error']:.3g} "
                  f"(rtol {v['rtol']}, atol {v['atol']})")
        else:
            print(f"  verification: passed (no reference: output shapes {v['output_shapes']}, all finite)")
    for o in record["outputs"]:
        print(f"  wrote {o['path']}  ({o['bytes']} bytes, sha256 {o['sha256'][:16]}…)")
    return 0


def _plan_rows(config: str, overrides: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    from np2torch.tasks import infer_mapping, load_arrays
    from np2torch.tasks.config import load_config

    cfg = load_config(config, overrides)
    src = cfg.source
    records = load_arrays.scan_source(src.path, fmt=src.format, allow_pickle=src.allow_pickle, key_prefix=src.key_prefix)
    return cfg, infer_mapping.build_manifest(cfg, records)  # what the mapping stage would produce, evidence included


def _status_cell(r: dict[str, Any]) -> str:
    if r["status"] != "mapped":
        return r["status"]
    return "mapped" if r["verified"] else "mapped, UNVERIFIED"


def _candidates_cell(r: dict[str, Any]) -> str:
    """``[transpose] 3e-08 (chosen) | [as-is] 1.2`` with evidence, else the plain list of layouts."""
    cands = json.loads(r["candidates"])
    if not cands:
        return ""
    ev = json.loads(r["evidence"] or "{}")
    errors = ev.get("errors", {})
    cells = []
    for c in cands:
        d = _desc(c)
        e = errors.get(d)
        mark = " (chosen)" if ev.get("chosen") == d else ""
        cells.append(f"[{d}]" + (f" err {e:.2g}" if e is not None else "") + mark)
    return " | ".join(cells)


def cmd_plan(args: argparse.Namespace) -> int:
    from np2torch.tasks.manifest import target_rows, to_csv, unused_rows
    from np2torch.tasks.validate import validate_manifest

    os.environ["NP2TORCH_READ_ONLY"] = "1"  # plan writes nothing, not even the stat cache
    cfg, rows = _plan_rows(args.config, args.set)
    problem: ConversionError | None = None
    try:
        validate_manifest(rows, allow_nonfinite=cfg.source.allow_nonfinite)
    except ConversionError as exc:
        problem = exc
    unverified = [r["target_key"] for r in target_rows(rows) if not r["verified"]]
    if args.format == "csv":
        sys.stdout.write(to_csv(rows))
    elif args.format == "json":
        print(json.dumps({"name": cfg.name, "rows": rows, "valid": problem is None, "unverified": unverified,
                          "unused": [r["source_key"] for r in unused_rows(rows) if r["status"] == "unused"],
                          "problems": problem.to_record()["problems"] if problem else []}, indent=2))
    else:
        trows = [{**r, "source": r["source_key"] or ("(" + r["tied_to"] + ")" if r["tied_to"] else ""), "shape": r["target_shape"],
                  "transform": r["transform"] or ("as-is" if r["status"] == "mapped" and r["how"] != "tied" else ""),
                  "confidence": f"{float(r['confidence']):.2f}", "candidates": _candidates_cell(r), "status": _status_cell(r)}
                 for r in target_rows(rows)]
        print(f"Manifest for {cfg.name} ({len(trows)} targets, {len(unverified)} unverified):")
        _print_table(trows, ["target_key", "source", "transform", "shape", "how", "confidence", "candidates", "status"],
                     max_width={"candidates": 160})
        unused = unused_rows(rows)
        print(f"\nUnused source keys ({len(unused)}):")
        _print_table(unused, ["source_key", "source_shape", "source_dtype", "status", "note"])
        if unverified:
            print(f"\n{len(unverified)} row(s) are unverified: several layouts fit their shapes. Give verify.reference_output "
                  "(and verify.input) so np2torch can choose by evidence, or state the layout with a rule.")
    if problem is not None:
        print(f"\n{problem}", file=sys.stderr)
        return 1
    return 0


def _desc(spec: list) -> str:
    from np2torch.tasks.transforms import describe

    return describe(spec) or "as-is"


def cmd_inspect(args: argparse.Namespace) -> int:
    from np2torch.tasks.load_arrays import scan_source

    os.environ["NP2TORCH_READ_ONLY"] = "1"
    records = scan_source(Path(args.path), fmt=args.format, allow_pickle=args.allow_pickle)
    rows = [{"key": r.key, "shape": list(r.shape), "dtype": r.dtype, "byte_order": r.byte_order, "order": "F" if r.fortran_order else "C",
             "MB": f"{r.nbytes / 1e6:.3f}", "offset": r.offset if r.offset >= 0 else ("pickled" if r.index is not None else "compressed"),
             "nonfinite": r.n_nonfinite, "absmax": f"{r.absmax:.4g}", "file": Path(r.file).name + (f"::{r.member}" if r.member else ""),
             "fingerprint": r.fingerprint[:12]} for r in records]
    if args.format_out == "json":
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, ["key", "shape", "dtype", "byte_order", "order", "MB", "nonfinite", "absmax", "file", "offset", "fingerprint"])
        print(f"\n{len(rows)} arrays, {sum(r.nbytes for r in records) / 1e6:.3f} MB")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from np2torch.tasks.audit import read_records, verify_record

    records, bad = read_records(Path(args.log) if args.log else None)
    records = records[-args.last:] if args.last else records
    rows = []
    failing = 0
    found: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for r in records:
        stages = r.get("stages") or {}
        hits = sum(1 for s in stages.values() if s.get("cached"))
        row = {"when": (r.get("finished_at") or "")[:19].replace("T", " "), "name": r.get("name"), "status": r.get("status"),
               "cache_hits": f"{hits}/{len(stages)}", "outputs": ", ".join(Path(o["path"]).name for o in r.get("outputs") or []) or "-",
               "run_id": (r.get("run_id") or "")[:8]}
        if r.get("status") == "failed" and r.get("error"):
            row["status"] = f"failed in {r['error'].get('stage')}"
        if args.verify:
            findings = verify_record(r)  # re-reads every byte: the proof
            found.append((r, findings))
            row["verify"] = "ok" if not findings else "; ".join(f"{f['kind'][:-1]} {f['path']} {f['problem']}" for f in findings)
            failing += bool(findings)
        rows.append(row)
    cols = ["when", "name", "status", "cache_hits", "outputs", "run_id"] + (["verify"] if args.verify else [])
    _print_table(rows, cols)
    if bad:
        print(f"\nwarning: {bad} unreadable line(s) in the audit log were skipped", file=sys.stderr)
    if args.verify:
        print(f"\n{len(rows) - failing} record(s) verified, {failing} with changed or missing files")
        for r, findings in found:
            for f in findings:
                detail = f" (recorded sha256 {f['expected'][:16]}…, now {f['actual'][:16]}…)" if f["problem"] == "changed" else ""
                print(f"  {r.get('name')} {(r.get('run_id') or '')[:8]}: {f['kind'][:-1]} {f['path']} {f['problem']}{detail}", file=sys.stderr)
        return 1 if failing else 0
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from np2torch.flows.batch import run_batch_cli

    return run_batch_cli(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from np2torch.flows.serve import serve_cli

    return serve_cli(args)


# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 with a short usage line, as argparse does
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="np2torch", description="Turn NumPy-saved parameters into a verified PyTorch checkpoint.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("convert", help="run the flow for one conversion")
    c.add_argument("config")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. convert.dtype=float16")
    c.add_argument("--refresh", action="store_true", help="recompute every stage, ignoring the cache")
    c.set_defaults(func=cmd_convert)

    pl = sub.add_parser("plan", help="print the manifest it would use; write nothing")
    pl.add_argument("config")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--format", choices=["table", "csv", "json"], default="table")
    pl.set_defaults(func=cmd_plan)

    i = sub.add_parser("inspect", help="table of the arrays in a file or folder")
    i.add_argument("path")
    i.add_argument("--allow-pickle", action="store_true", help="allow pickled lists/object arrays (restricted unpickler)")
    i.add_argument("--source-format", dest="format", default="auto", choices=["auto", "npz", "npy", "npy-dir", "pickle-list", "flat"])
    i.add_argument("--format", dest="format_out", choices=["table", "json"], default="table")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("batch", help="convert many; one child flow run per model")
    b.add_argument("batch_config")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a batch key, e.g. max_parallel=4")
    b.add_argument("--dask", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the conversions on Dask: a local cluster, or an existing scheduler address (tcp://host:8786)")
    b.add_argument("--refresh", action="store_true")
    b.set_defaults(func=cmd_batch)

    s = sub.add_parser("serve", help="a scheduled deployment, visible in the Prefect UI")
    s.add_argument("batch_config")
    s.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    s.add_argument("--name", default=None, help="deployment name (default: the batch file's stem)")
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser("audit", help="list audit records; re-hash their outputs")
    a.add_argument("--last", type=int, default=0, metavar="N")
    a.add_argument("--verify", action="store_true", help="re-hash every recorded input and output; exit 1 if any changed")
    a.add_argument("--log", default=None, help="audit log path (default $NP2TORCH_AUDIT_LOG or data/audit.jsonl)")
    a.set_defaults(func=cmd_audit)
    return p


def main(argv: list[str] | None = None) -> int:
    # Prefect's anonymous usage heartbeat only adds noise ("database is locked") to a CLI run
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # the temporary API server can take longer than Prefect's 20 s default on a busy 2-core box
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConversionError as exc:
        print(f"np2torch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("np2torch: interrupted; no output was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
