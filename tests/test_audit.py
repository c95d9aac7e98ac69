"""The audit log and ``np2torch audit``: one complete line per record, provable outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from np2torch.flows.cli import main
from np2torch.tasks import audit, stages
from np2torch.tasks.config import load_config
from tiny_conversion import flip_byte, make_tiny

REPO = Path(__file__).resolve().parents[1]


def _record(name: str, *, status: str = "success", outputs: list | None = None, inputs: list | None = None, **extra) -> dict:
    return {"run_id": f"{name}-0000-run", "name": name, "started_at": audit.now(), "finished_at": audit.now(), "status": status,
            "inputs": inputs or [], "outputs": outputs or [], "stages": {"load-arrays": {"cached": True}, "export": {"cached": False}},
            "error": None, **extra}


@pytest.fixture
def converted(tmp_path: Path) -> dict:
    """A real conversion's stage records (plain stages, no Prefect): real inputs and outputs."""
    return stages.run_all(load_config(make_tiny(tmp_path / "conv")))


def test_record_lines_round_trip_and_each_is_one_complete_line(isolated_data: Path) -> None:
    a, b = _record("first"), _record("second", status="failed", error={"stage": "validate", "message": "bad"})
    log = audit.append_record(a)
    audit.append_record(b)
    raw = log.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 2
    assert [json.loads(line) for line in raw.splitlines()] == [a, b]
    assert audit.read_records() == ([a, b], 0)


def test_a_torn_last_line_is_not_a_record_and_the_next_append_starts_clean(isolated_data: Path) -> None:
    log = audit.append_record(_record("before-crash"))
    with open(log, "ab") as fh:  # what a writer killed mid-write leaves behind
        fh.write(b'{"name": "killed", "status": "succ')
    records, bad = audit.read_records()
    assert [r["name"] for r in records] == ["before-crash"] and bad == 0
    audit.append_record(_record("after-crash"))
    lines = log.read_bytes().splitlines(keepends=True)
    assert [json.loads(line)["name"] for line in lines] == ["before-crash", "after-crash"]
    assert all(line.endswith(b"\n") for line in lines)


def test_a_malformed_complete_line_is_skipped_and_reported(isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    log = audit.append_record(_record("one"))
    with open(log, "ab") as fh:
        fh.write(b"not json at all\n")
    audit.append_record(_record("two"))
    records, bad = audit.read_records()
    assert [r["name"] for r in records] == ["one", "two"] and bad == 1
    assert main(["audit"]) == 0
    assert "warning: 1 unreadable line(s) in the audit log were skipped" in capsys.readouterr().err


_WRITER = """
import sys
from np2torch.tasks.audit import append_record
i = 0
while True:
    append_record({"name": f"run-{i}", "status": "success", "padding": "x" * 200_000})
    i += 1
    if i == 3:
        print("ready", flush=True)
"""


def test_the_log_survives_a_writer_killed_mid_run(isolated_data: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    records, bad = audit.read_records()
    assert bad == 0 and len(records) >= 3
    assert [r["name"] for r in records] == [f"run-{i}" for i in range(len(records))]
    audit.append_record(_record("after-kill"))
    records, bad = audit.read_records()
    assert bad == 0 and records[-1]["name"] == "after-kill"
    assert audit.audit_log_path().read_bytes().endswith(b"\n")
    assert all(json.loads(line) for line in audit.audit_log_path().read_bytes().splitlines())


def test_audit_lists_name_status_when_outputs_and_cache_hits(isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    audit.append_record(_record("mlp", outputs=[{"path": "/x/model.safetensors", "bytes": 1, "sha256": "0" * 64}]))
    audit.append_record(_record("cnn", status="failed", error={"stage": "validate", "message": "bad"}))
    assert main(["audit"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["when", "name", "status", "cache_hits", "outputs", "run_id"]
    assert out[2].split()[2:] == ["mlp", "success", "1/2", "model.safetensors", "mlp-0000"]
    assert out[3].split()[2:] == ["cnn", "failed", "in", "validate", "1/2", "-", "cnn-0000"]
    assert main(["audit", "--last", "1"]) == 0
    assert "mlp" not in capsys.readouterr().out


def test_audit_verify_passes_then_catches_a_modified_and_a_missing_output(converted: dict, isolated_data: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    outputs, inputs = converted["export"]["outputs"], converted["load-arrays"]["inputs"]
    audit.append_record(_record("tiny", outputs=outputs, inputs=inputs))
    assert main(["audit", "--verify"]) == 0
    assert "1 record(s) verified, 0 with changed or missing files" in capsys.readouterr().out

    st = Path(outputs[0]["path"])
    flip_byte(st)  # same size, same second: only re-hashing the bytes can tell
    Path(outputs[-1]["path"]).unlink()
    assert main(["audit", "--verify"]) == 1
    captured = capsys.readouterr()
    assert "0 record(s) verified, 1 with changed or missing files" in captured.out
    assert f"output {st} changed (recorded sha256 {outputs[0]['sha256'][:16]}" in captured.err
    assert f"output {outputs[-1]['path']} missing" in captured.err


def test_audit_verify_catches_a_changed_input(converted: dict, isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = converted["load-arrays"]["inputs"]
    audit.append_record(_record("tiny", outputs=converted["export"]["outputs"], inputs=inputs))
    flip_byte(Path(inputs[0]["path"]))
    assert main(["audit", "--verify"]) == 1
    assert f"input {inputs[0]['path']} changed" in capsys.readouterr().err


def test_verify_record_reads_the_bytes_not_the_stat_cache(converted: dict) -> None:
    outputs = converted["export"]["outputs"]
    p = Path(outputs[0]["path"])
    st = p.stat()
    flip_byte(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # a change that hides from (size, mtime)
    findings = audit.verify_record({"outputs": outputs})
    assert [(f["problem"], f["path"]) for f in findings] == [("changed", str(p))]
