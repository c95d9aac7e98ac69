"""The audit log and ``np2torch audit``: one complete line per record, provable outputs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import flip_byte
from np2torch.cli import main
from np2torch.tasks import audit, stages
from np2torch.tasks.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _record(name: str, *, status: str = "success", outputs: list | None = None, inputs: list | None = None, **extra) -> dict:
    return {"run_id": f"{name}-0000-run", "name": name, "started_at": audit.now(), "finished_at": audit.now(), "status": status,
            "inputs": inputs or [], "outputs": outputs or [], "stages": {"load-arrays": {"cached": True}, "export": {"cached": False}},
            "error": None, **extra}


@pytest.fixture
def converted(tiny) -> dict:
    """A real conversion's stage records (plain stages, no Prefect): real inputs and outputs."""
    return stages.run_all(load_config(tiny("conv", npy_dir=True)))


def test_record_lines_round_trip_and_each_is_one_complete_line(isolated_data: Path) -> None:
    a, b = _record("first"), _record("second", status="failed", error={"stage": "validate", "message": "bad"})
    log = audit.append_record(a)
    audit.append_record(b)
    raw = log.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 2
    lines = [json.loads(line) for line in raw.splitlines()]
    assert [{k: v for k, v in r.items() if k != "chain"} for r in lines] == [a, b]
    assert [r["chain"]["seq"] for r in lines] == [1, 2]
    assert lines[1]["chain"]["prev"] == hashlib.sha256(raw.splitlines()[0]).hexdigest()
    assert audit.read_records() == ([a, b], 0)
    assert "chain" not in a  # the caller's record is not changed


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


def test_a_malformed_complete_line_is_listed_around_but_fails_verify(isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    log = audit.append_record(_record("one"))
    with open(log, "ab") as fh:
        fh.write(b"not json at all\n")
    audit.append_record(_record("two"))
    records, bad = audit.read_records()
    assert [r["name"] for r in records] == ["one", "two"] and bad == 1
    assert main(["audit"]) == 0  # listing still shows what can be read
    assert "warning: 1 unreadable line(s) in the audit log were skipped" in capsys.readouterr().err
    assert main(["audit", "--verify"]) == 1
    err = capsys.readouterr().err
    assert "line 2: garbled: line 2 is not a JSON record" in err
    assert "line 3" not in err  # the record after it is not blamed for the garbage before it


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
    assert out[0].split() == ["when", "name", "status", "dtype", "overrides", "cache_hits", "outputs", "run_id"]
    assert out[2].split()[2:] == ["mlp", "success", "-", "-", "1/2", "model.safetensors", "mlp-0000"]
    assert out[3].split()[2:] == ["cnn", "failed", "in", "validate", "-", "-", "1/2", "-", "cnn-0000"]
    assert main(["audit", "--last", "1"]) == 0
    assert "mlp" not in capsys.readouterr().out


def test_audit_verify_passes_then_catches_a_modified_and_a_missing_output(converted: dict, isolated_data: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    outputs, inputs = converted["export"].outputs, converted["load-arrays"].inputs
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
    inputs = converted["load-arrays"].inputs
    audit.append_record(_record("tiny", outputs=converted["export"].outputs, inputs=inputs))
    flip_byte(Path(inputs[0]["path"]))
    assert main(["audit", "--verify"]) == 1
    assert f"input {inputs[0]['path']} changed" in capsys.readouterr().err


def test_verify_record_reads_the_bytes_not_the_stat_cache(converted: dict) -> None:
    outputs = converted["export"].outputs
    p = Path(outputs[0]["path"])
    st = p.stat()
    flip_byte(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # a change that hides from (size, mtime)
    findings = audit.verify_record({"outputs": outputs})
    assert [(f["problem"], f["path"]) for f in findings] == [("changed", str(p))]


# ---------------------------------------------------------------------------------------------
# a log that proves itself (issue 13, item 7)


def _three(isolated_data: Path) -> Path:
    for name in ("one", "two", "three"):
        log = audit.append_record(_record(name))
    return log


def _lines(log: Path) -> list[bytes]:
    return log.read_bytes().splitlines(keepends=True)


def _verify(capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["audit", "--verify"])
    c = capsys.readouterr()
    return code, c.out, c.err


def test_an_intact_chain_verifies(isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    _three(isolated_data)
    code, out, err = _verify(capsys)
    assert code == 0, err
    assert "3 chained record(s), chain intact" in out


@pytest.mark.parametrize("field,value", [("status", "failed"), ("name", "renamed"), ("config", {"convert": {"dtype": "float16"}})])
def test_an_edited_record_is_named(isolated_data: Path, capsys: pytest.CaptureFixture, field: str, value) -> None:
    log = _three(isolated_data)
    lines = _lines(log)
    rec = json.loads(lines[1])
    rec[field] = value
    lines[1] = (json.dumps(rec) + "\n").encode()
    log.write_bytes(b"".join(lines))
    code, out, err = _verify(capsys)
    assert code == 1
    assert "line 2: edited: record #2" in err and "changed after it was written" in err
    assert "line 3" not in err  # only the edited line is blamed


def test_an_edited_last_record_is_named(isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    log = _three(isolated_data)
    log.write_bytes(log.read_bytes().replace(b'"name": "three", "started_at"', b'"name": "thrice", "started_at"'))
    code, _, err = _verify(capsys)
    assert code == 1 and "line 3: edited: record #3" in err


def test_a_removed_record_is_named(isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    log = _three(isolated_data)
    lines = _lines(log)
    log.write_bytes(lines[0] + lines[2])
    code, _, err = _verify(capsys)
    assert code == 1 and "line 2: removed: 1 record(s) missing before this line (chain jumps from #1 to #3)" in err


def test_removing_the_first_record_is_named(isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    log = _three(isolated_data)
    log.write_bytes(b"".join(_lines(log)[1:]))
    code, _, err = _verify(capsys)
    assert code == 1 and "line 1: removed" in err


@pytest.mark.parametrize("how", ["unchained", "copied"])
def test_an_inserted_record_is_named(isolated_data: Path, capsys: pytest.CaptureFixture, how: str) -> None:
    log = _three(isolated_data)
    lines = _lines(log)
    extra = (json.dumps(_record("forged")) + "\n").encode() if how == "unchained" else lines[0]
    log.write_bytes(lines[0] + lines[1] + extra + lines[2])
    code, _, err = _verify(capsys)
    assert code == 1 and "line 3: inserted" in err
    assert "line 4" not in err


def test_reformatting_a_line_is_caught_by_the_next_record(isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    log = _three(isolated_data)
    lines = _lines(log)
    lines[0] = (json.dumps(json.loads(lines[0]), indent=None, separators=(",", ":")) + "\n").encode()  # same content, other bytes
    log.write_bytes(b"".join(lines))
    code, _, err = _verify(capsys)
    assert code == 1 and "line 1: edited: line 1 was changed after record #2 (line 2) was chained to it" in err


def test_a_torn_last_line_is_reported_and_tolerated(isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    log = _three(isolated_data)
    with open(log, "ab") as fh:
        fh.write(b'{"name": "killed", "sta')
    code, out, err = _verify(capsys)
    assert code == 0, err
    assert "the last line is torn (23 bytes from an interrupted write): not a record, ignored" in out
    audit.append_record(_record("four"))  # the next writer cuts the torn tail; the chain goes on
    code, out, _ = _verify(capsys)
    assert code == 0 and "4 chained record(s), chain intact" in out


def test_an_old_unchained_log_stays_readable_and_new_records_chain_onto_it(isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    log = audit.audit_log_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"".join((json.dumps(_record(n)) + "\n").encode() for n in ("old-1", "old-2")))  # as np2torch wrote before chaining
    code, out, err = _verify(capsys)
    assert code == 0, err
    assert "0 chained record(s), chain intact; 2 older unchained record(s)" in out
    audit.append_record(_record("new"))
    code, out, err = _verify(capsys)
    assert code == 0, err
    assert "1 chained record(s), chain intact; 2 older unchained record(s)" in out
    lines = _lines(log)  # an old record edited now breaks the link of the first chained one
    log.write_bytes(lines[0] + lines[1].replace(b"old-2", b"old-X") + lines[2])
    code, _, err = _verify(capsys)
    assert code == 1 and "line 2: edited" in err


# ---------------------------------------------------------------------------------------------
# superseded is not tampered (item 8)


def _with_outputs(name: str, run: str, outputs: list, **extra) -> dict:
    return {**_record(name, outputs=outputs, **extra), "run_id": run}


def test_a_later_run_supersedes_an_earlier_runs_outputs(converted: dict, isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    outputs = converted["export"].outputs
    older = [{**o, "sha256": "f" * 64} for o in outputs]  # what an earlier run (other dtype) wrote to the same paths
    audit.append_record(_with_outputs("tiny", "aaaaaaaa-older", older))
    audit.append_record(_with_outputs("tiny", "bbbbbbbb-latest", outputs))
    code, out, err = _verify(capsys)
    assert code == 0, err
    assert "2 record(s) verified, 0 with changed or missing files" in out
    assert f"tiny aaaaaaaa: output {outputs[0]['path']} superseded by tiny run bbbbbbbb (line 2" in out
    flip_byte(Path(outputs[0]["path"]))  # now a change outside np2torch: the latest record catches it
    code, out, err = _verify(capsys)
    assert code == 1
    assert f"tiny bbbbbbbb: output {outputs[0]['path']} changed" in err and "changed outside np2torch" in err
    assert "aaaaaaaa: output" not in err


@pytest.mark.slow
def test_the_readme_sequence_verifies_clean(tiny, prefect_harness, isolated_data: Path, capsys: pytest.CaptureFixture) -> None:
    """convert; convert --set convert.dtype=float16; convert --refresh: every output is accounted for."""
    cfg = tiny("conv", npy_dir=True)
    cfg.write_text(cfg.read_text().replace("rtol: 1.0e-05", "rtol: 0.01").replace("atol: 1.0e-06", "atol: 0.001"))  # float16 passes too
    assert main(["convert", str(cfg)]) == 0
    assert main(["convert", str(cfg), "--set", "convert.dtype=float16"]) == 0
    assert main(["convert", str(cfg), "--refresh"]) == 0
    capsys.readouterr()
    code, out, err = _verify(capsys)
    assert code == 0, out + err
    assert "3 record(s) verified, 0 with changed or missing files" in out
    assert out.count("superseded by tiny run") >= 2  # the float32 and float16 runs' outputs, each superseded
    assert main(["audit", "--last", "3"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:5]
    assert [r.split()[4:6] for r in rows] == [["float32", "-"], ["float16", "convert.dtype=float16"], ["float32", "--refresh"]]
