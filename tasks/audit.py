"""The audit record (SPEC "Audit record"): one JSON object per run, in ``report.json`` and as
one line appended to the audit log, so a conversion can be proven months later.

The log is append-only: each record is one ``os.write`` of one complete line to a file opened
with ``O_APPEND`` under a lock, then fsync'd. A reader only takes newline-terminated lines, so a
write cut short by a kill is never read as a record, and the next writer cuts that torn tail
before appending (it never was a record). A malformed complete line (written by something
else) is skipped and counted.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

from np2torch.tasks.fingerprint import sha256_file
from np2torch.tasks.paths import atomic_write_text, audit_log_path

logger = logging.getLogger(__name__)

__all__ = ["versions", "now", "append_record", "write_report", "read_records", "verify_record"]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def versions() -> dict[str, str]:
    import numpy
    import pandera
    import prefect
    import torch

    from np2torch.tasks import __version__

    return {"np2torch": __version__, "python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
            "prefect": prefect.__version__, "pandera": pandera.__version__}


def append_record(record: dict[str, Any], log: Path | None = None) -> Path:
    """Append ``record`` as one complete line (one ``write`` under the log's lock, then fsync)."""
    log = Path(log or audit_log_path())
    log.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode()  # keys in pipeline order
    with FileLock(str(log) + ".lock"):
        fd = os.open(log, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _drop_torn_tail(fd, log)
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to the audit log ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
    return log


def _drop_torn_tail(fd: int, log: Path) -> None:
    """Cut an unterminated last line: the remains of a writer killed mid-write, never a record.

    Writers hold the lock, so an unterminated tail seen under it belongs to one that died;
    complete lines are never touched (the log stays append-only for every record in it).
    """
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        chunk = os.pread(fd, pos - start, start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            pos = start + nl + 1
            break
        pos = start
    logger.warning("audit log %s ended in a torn line (%d bytes) from an interrupted writer; dropped it", log, size - pos)
    os.ftruncate(fd, pos)


def write_report(record: dict[str, Any], out_dir: Path) -> Path:
    path = Path(out_dir) / "report.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return path


def read_records(log: Path | None = None) -> tuple[list[dict[str, Any]], int]:
    """All complete records in the log, oldest first, and the number of unreadable lines.

    An unterminated last line is a write still in progress (or the remains of a killed one)
    and is not a record: it is neither returned nor counted.
    """
    log = Path(log or audit_log_path())
    if not log.exists():
        return [], 0
    records, bad = [], 0
    with open(log, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
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
