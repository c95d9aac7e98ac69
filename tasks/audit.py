"""The audit record (SPEC "Audit record"): one JSON object per run, in ``report.json`` and as
one line appended to the audit log, so a conversion can be proven months later.

The log is append-only: each record is one ``os.write`` of one complete line to a file opened
with ``O_APPEND`` under a lock, so a crash never leaves a torn line; a torn line left by
something else is skipped (and reported) when the log is read.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

from tasks.fingerprint import sha256_file
from tasks.paths import atomic_write_text, audit_log_path

__all__ = ["versions", "now", "append_record", "write_report", "read_records", "verify_record"]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def versions() -> dict[str, str]:
    import numpy
    import pandera
    import prefect
    import torch

    from tasks import __version__

    return {"np2torch": __version__, "python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
            "prefect": prefect.__version__, "pandera": pandera.__version__}


def append_record(record: dict[str, Any], log: Path | None = None) -> Path:
    log = Path(log or audit_log_path())
    log.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode()  # keys in pipeline order
    with FileLock(str(log) + ".lock"):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # a previous crash may have left a torn last line: start ours on a fresh line
            size = os.fstat(fd).st_size
            if size:
                with open(log, "rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to the audit log ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
    return log


def write_report(record: dict[str, Any], out_dir: Path) -> Path:
    path = Path(out_dir) / "report.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return path


def read_records(log: Path | None = None) -> tuple[list[dict[str, Any]], int]:
    """All complete records in the log, oldest first, and the number of unreadable lines."""
    log = Path(log or audit_log_path())
    if not log.exists():
        return [], 0
    records, bad = [], 0
    with open(log, "rb") as fh:
        for raw in fh:
            raw = raw.strip()
            if not raw:
                continue
            try:
                records.append(json.loads(raw))
            except ValueError:
                bad += 1
    return records, bad


def verify_record(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Re-hash every recorded input and output; one finding per file that changed or is gone."""
    findings = []
    for kind in ("inputs", "outputs"):
        for f in record.get(kind) or []:
            p = Path(f["path"])
            if not p.exists():
                findings.append({"kind": kind, "path": str(p), "problem": "missing"})
                continue
            actual = sha256_file(p)  # no stat cache here: proof must read the bytes
            if actual != f["sha256"]:
                findings.append({"kind": kind, "path": str(p), "problem": "changed", "expected": f["sha256"], "actual": actual})
    return findings
