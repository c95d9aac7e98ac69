"""The audit record (SPEC "Audit record"): one JSON object per run, in ``report.json`` and as
one line appended to the audit log, so a conversion can be proven months later.

The log is append-only: each record is one ``os.write`` of one complete line to a file opened
with ``O_APPEND`` under a lock (a ``flock``: a killed writer never blocks the next), then
fsync'd. A reader only takes newline-terminated lines, so a write cut short by a kill is never
read as a record, and the next writer cuts that torn tail before appending (it never was a
record).

The log proves itself. Every record carries ``chain``: ``seq`` (its number in the chain),
``prev`` (sha256 of the previous line's bytes, or of nothing for the first line) and ``sha256``
(of its own content, ``seq`` and ``prev``). :func:`check_chain` walks the log and names the line
of every edited record (its content no longer matches its hash), removed record (a gap in
``seq``; the next line's ``prev`` does not match), inserted line (unchained, or chained in the
wrong place) and garbled line (not JSON). A torn last line is reported as such and is not an
error. A log written before chaining existed stays readable: its leading unchained records are
reported as "unchained" (they cannot be proven, and are not failed); the first chained record
links to the last of them, so nothing can be slipped in between. The chain detects edits made
without recomputing it; it is not a signature (a tool rewriting every hash from the edit
onwards, or cutting the last records off, is not detected: keep a copy of the log, or of the
last line's hash, elsewhere for that).

``np2torch audit --verify`` re-hashes each output against the *latest* successful record that
wrote that path: an earlier run's output, overwritten since by a later np2torch run of the same
export folder, is reported as superseded (by which run), never as tampered. The same holds for
inputs (a source updated and converted again supersedes the earlier run's view of it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from np2torch.tasks import locks
from np2torch.tasks.fingerprint import sha256_file
from np2torch.tasks.paths import atomic_write_text, audit_log_path
from np2torch.tasks.storage import storage_errors

logger = logging.getLogger(__name__)

__all__ = ["versions", "now", "append_record", "write_report", "read_records", "last_record", "verify_record", "check_chain", "ChainReport",
           "verify_log", "LogVerification", "record_hash"]

_GENESIS = hashlib.sha256(b"").hexdigest()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def versions() -> dict[str, str]:
    """Versions of what made the outputs; read from the installed distributions, so a run whose
    every stage is a cache hit need not import torch or pandera to record them."""
    from np2torch.tasks import __version__

    return {"np2torch": __version__, "python": platform.python_version(),
            **{name: _version_of(name) for name in ("numpy", "torch", "prefect", "pandera")}}


def _version_of(name: str) -> str:
    mod = sys.modules.get(name)
    if mod is not None and isinstance(getattr(mod, "__version__", None), str):
        return mod.__version__
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def record_hash(record: dict[str, Any], seq: int, prev: str) -> str:
    """sha256 of a record's content (without ``chain``), its ``seq`` and the previous line's hash."""
    body = json.dumps({k: v for k, v in record.items() if k != "chain"}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{seq}\n{prev}\n{body}".encode()).hexdigest()


def append_record(record: dict[str, Any], log: Path | None = None) -> Path:
    """Append ``record``, chained to the last line, as one complete line (one ``write`` under the
    log's lock, then fsync). ``record`` itself is not changed."""
    log = Path(log or audit_log_path())
    with storage_errors(log.parent, what="append to the audit log", stage="audit"):
        log.parent.mkdir(parents=True, exist_ok=True)
        with locks.held_lock(str(log) + ".lock"):
            fd = os.open(log, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _drop_torn_tail(fd, log)
                last = _last_line(fd)
                prev = hashlib.sha256(last).hexdigest() if last is not None else _GENESIS
                seq = _last_seq(fd, last) + 1
                body = {k: v for k, v in record.items() if k != "chain"}
                plain = json.loads(json.dumps(body, default=str))  # what a reader will see, exactly
                chained = {**body, "chain": {"seq": seq, "prev": prev, "sha256": record_hash(plain, seq, prev)}}
                line = (json.dumps(chained, default=str) + "\n").encode()  # keys in pipeline order
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"short write to the audit log ({written} of {len(line)} bytes)")
                os.fsync(fd)
            finally:
                os.close(fd)
    return log


def _line_start_before(fd: int, end: int) -> int:
    """Offset just after the last newline before ``end`` (0 when there is none): where that line starts."""
    pos = end
    while pos > 0:
        start = max(0, pos - 65536)
        nl = os.pread(fd, pos - start, start).rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        pos = start
    return 0


def _last_line(fd: int) -> bytes | None:
    """The last complete line (without its newline), or None for an empty log."""
    size = os.fstat(fd).st_size
    if not size:
        return None
    end = size - 1  # the final newline
    start = _line_start_before(fd, end)
    return os.pread(fd, end - start, start)


def _seq_of(line: bytes | None) -> int | None:
    """The chain number of a line: 0 for no line, None for an unchained or unreadable one."""
    if not line:
        return 0
    try:
        seq = json.loads(line).get("chain", {}).get("seq")
        return seq if isinstance(seq, int) else None
    except (ValueError, AttributeError):
        return None


def _last_seq(fd: int, last: bytes | None, window: int = 4 << 20) -> int:
    """The last chain number in the log: of the last line, or (past lines that are not chained
    records, e.g. a garbled one) of the last chained line within the final ``window`` bytes."""
    seq = _seq_of(last)
    if seq is not None:
        return seq
    size = os.fstat(fd).st_size
    start = max(0, size - window)
    for line in reversed(os.pread(fd, size - start, start).split(b"\n")):
        seq = _seq_of(line) if line.strip() else None
        if seq:
            return seq
    return 0


def _drop_torn_tail(fd: int, log: Path) -> None:
    """Cut an unterminated last line: the remains of a writer killed mid-write, never a record.

    Writers hold the lock, so an unterminated tail seen under it belongs to one that died;
    complete lines are never touched (the log stays append-only for every record in it).
    """
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    pos = _line_start_before(fd, size)
    logger.warning("audit log %s ended in a torn line (%d bytes) from an interrupted writer; dropped it", log, size - pos)
    os.ftruncate(fd, pos)


def write_report(record: dict[str, Any], out_dir: Path) -> Path:
    path = Path(out_dir) / "report.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return path


def read_records(log: Path | None = None) -> tuple[list[dict[str, Any]], int]:
    """All complete records in the log, oldest first (without ``chain``), and the number of
    unreadable lines. :func:`check_chain` says whether they are the records np2torch wrote.

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
                rec = json.loads(raw)
            except ValueError:
                bad += 1
                continue
            if not isinstance(rec, dict):
                bad += 1
                continue
            rec.pop("chain", None)
            records.append(rec)
    return records, bad


def last_record(*, name: str | None = None, run_id: str | None = None, log: Path | None = None) -> dict[str, Any] | None:
    """The latest record of the conversion ``name`` and/or of the flow run ``run_id``; None when there is none."""
    records, _ = read_records(log)
    for rec in reversed(records):
        if (name is None or rec.get("name") == name) and (run_id is None or rec.get("run_id") == run_id):
            return rec
    return None


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


# ---------------------------------------------------------------------------------------------
# the chain


@dataclass
class ChainReport:
    """What :func:`check_chain` found: counts, a torn tail, and one problem per bad line."""

    lines: int = 0  # complete lines
    chained: int = 0
    unchained: int = 0  # records written before chaining existed (leading the log)
    torn_tail: int = 0  # bytes of an unterminated last line (an interrupted write); 0: none
    problems: list[dict[str, Any]] = field(default_factory=list)  # {"line", "problem", "detail"}
    entries: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (line number, record without chain)

    @property
    def ok(self) -> bool:
        return not self.problems


def _problem(rep: ChainReport, line: int, problem: str, detail: str) -> None:
    rep.problems.append({"line": line, "problem": problem, "detail": detail})


def _check_link(rep: ChainReport, n: int, rec: dict[str, Any], chain: Any, prev_line: bytes | None, expect: int | None,
                prev_reported: bool) -> tuple[int | None, bool]:
    """Check one chained record; return the next expected seq and whether this line was reported."""
    if not (isinstance(chain, dict) and isinstance(chain.get("seq"), int) and isinstance(chain.get("prev"), str)):
        _problem(rep, n, "edited", "its `chain` field is malformed")
        return expect, True
    seq, prev = chain["seq"], chain["prev"]
    reported = False
    if record_hash(rec, seq, prev) != chain.get("sha256"):
        _problem(rep, n, "edited", f"record #{seq} ({rec.get('name')}, run {str(rec.get('run_id'))[:8]}) no longer matches its hash: "
                                   "it was changed after it was written")
        reported = True
    expected_prev = hashlib.sha256(prev_line).hexdigest() if prev_line is not None else _GENESIS
    if expect is not None and seq > expect:
        _problem(rep, n, "removed", f"{seq - expect} record(s) missing before this line (chain jumps from #{expect - 1} to #{seq})")
        reported = True
    elif expect is not None and seq < expect:
        _problem(rep, n, "inserted", f"record #{seq} appears after #{expect - 1}: inserted or copied here")
        rep.chained += 1
        return expect, True  # the chain goes on from the record before it
    elif prev != expected_prev and not prev_reported and not reported:
        if prev_line is None:
            _problem(rep, n, "removed", "the record(s) this first line was chained to are gone")
        else:
            _problem(rep, n - 1, "edited", f"line {n - 1} was changed after record #{seq} (line {n}) was chained to it")
        reported = True
    rep.chained += 1
    return seq + 1, reported


def check_chain(log: Path | None = None) -> ChainReport:
    """Walk the log; name every edited, removed, inserted or garbled line (see module doc)."""
    log = Path(log or audit_log_path())
    rep = ChainReport()
    if not log.exists():
        return rep
    prev_line: bytes | None = None
    expect: int | None = None  # the next seq, once the chain has begun
    prev_reported = False
    with open(log, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.endswith(b"\n"):
                rep.torn_tail = len(raw)
                break
            rep.lines += 1
            content = raw[:-1]
            try:
                rec = json.loads(content)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError:
                _problem(rep, n, "garbled", f"line {n} is not a JSON record ({len(content)} bytes: {content[:40]!r}…)")
                prev_line, prev_reported = content, True
                continue
            chain = rec.pop("chain", None)
            if chain is None:
                if expect is None:
                    rep.unchained += 1  # written before chaining existed
                    reported = False
                else:
                    _problem(rep, n, "inserted", f"an unchained record ({rec.get('name')}) after the chain began")
                    reported = True
            else:
                expect, reported = _check_link(rep, n, rec, chain, prev_line, expect, prev_reported)
            rep.entries.append((n, rec))
            prev_line, prev_reported = content, reported
    return rep


# ---------------------------------------------------------------------------------------------
# verification of the files: each against the latest successful record that wrote it


@dataclass
class LogVerification:
    chain: ChainReport
    results: list[dict[str, Any]]  # per record: line, record, findings, superseded, checked

    @property
    def failing(self) -> int:
        return sum(1 for r in self.results if r["findings"])

    @property
    def ok(self) -> bool:
        return self.chain.ok and not self.failing


def _run_label(rec: dict[str, Any], line: int) -> str:
    return f"{rec.get('name')} run {str(rec.get('run_id') or '?')[:8]} (line {line}, {str(rec.get('finished_at') or '')[:19]})"


def verify_log(log: Path | None = None, *, last: int = 0) -> LogVerification:
    """Check the chain, then re-hash the files of the (last ``last``) successful records.

    A file is checked against the latest successful record that recorded it; an earlier
    record's file that a later np2torch run recorded with other bytes is superseded by that run.
    """
    chain = check_chain(log)
    latest: dict[tuple[str, str], int] = {}  # (kind, path) → index of the latest successful record
    for i, (_, rec) in enumerate(chain.entries):
        if rec.get("status") == "success":
            for kind in ("inputs", "outputs"):
                for f in rec.get(kind) or []:
                    latest[(kind, str(f.get("path")))] = i
    selected = list(enumerate(chain.entries))
    selected = selected[-last:] if last else selected
    results = []
    for i, (line, rec) in selected:
        res: dict[str, Any] = {"line": line, "record": rec, "findings": [], "superseded": [], "checked": rec.get("status") == "success"}
        for kind in ("inputs", "outputs") if res["checked"] else ():
            for f in rec.get(kind) or []:
                j = latest.get((kind, str(f.get("path"))), i)
                later = chain.entries[j][1]
                if j != i and _sha_of(later, kind, f.get("path")) != f.get("sha256"):
                    res["superseded"].append({"kind": kind, "path": f.get("path"), "by": _run_label(later, chain.entries[j][0])})
                else:
                    res["findings"] += verify_record({kind: [f]})
        results.append(res)
    return LogVerification(chain, results)


def _sha_of(rec: dict[str, Any], kind: str, path: Any) -> str | None:
    for f in rec.get(kind) or []:
        if f.get("path") == path:
            return f.get("sha256")
    return None
