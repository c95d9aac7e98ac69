"""Retries: transient I/O is retried with exponential backoff and jitter, every attempt logged
and counted in the audit record; deterministic failures fail once."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from np2torch.tasks import audit, load_arrays, prefect_tasks
from np2torch.tasks.errors import LoadError, TransientIOError


def test_transient_errors_are_told_apart_from_deterministic_ones() -> None:
    import httpx

    assert prefect_tasks.is_transient(OSError(errno.EIO, "Input/output error"))
    assert prefect_tasks.is_transient(OSError(errno.EAGAIN, "Resource temporarily unavailable"))
    assert prefect_tasks.is_transient(TransientIOError("flaky mount"))
    assert prefect_tasks.is_transient(httpx.ConnectError("connection refused"))
    busy = httpx.HTTPStatusError("busy", request=httpx.Request("GET", "http://x"), response=httpx.Response(503))
    assert prefect_tasks.is_transient(busy)
    assert not prefect_tasks.is_transient(OSError(errno.ENOENT, "No such file or directory"))
    assert not prefect_tasks.is_transient(OSError(errno.EACCES, "Permission denied"))
    assert not prefect_tasks.is_transient(LoadError("bad header", key="w.npy"))
    assert not prefect_tasks.is_transient(ValueError("shape mismatch"))


def test_retry_policy_is_exponential_backoff_with_jitter(tmp_path: Path) -> None:
    tasks = prefect_tasks.configured_tasks(root=tmp_path)
    for t in tasks.values():
        assert t.retries == 3
        assert t.retry_delay_seconds == [0.5, 1.0, 2.0]
        assert t.retry_jitter_factor == 0.5
        assert t.retry_condition_fn is not None


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same policy, shorter waits: 10, 20, 40 ms (± jitter)."""
    monkeypatch.setattr(prefect_tasks, "BACKOFF_FACTOR", 0.01)


def _logs(run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # ship the buffered run logs to the API before reading them back
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return [log.message for log in logs]


def _flaky(real, failures: dict[str, int]):
    """``real``, failing with EIO while ``failures["left"]`` lasts (a flaky disk)."""

    def call(*args, **kwargs):  # noqa: ANN002, ANN003 - same signature as the real one
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error", "weights/fc1.weight.npy")
        return real(*args, **kwargs)

    return call


def _last_record() -> dict:
    records, bad = audit.read_records()
    assert bad == 0
    return records[-1]


def test_a_reader_that_fails_twice_is_retried_and_counted(tiny, prefect_harness, fast_retries,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from np2torch.flows.convert import convert_config

    monkeypatch.setattr(load_arrays, "scan_source", _flaky(load_arrays.scan_source, {"left": 2}))
    record = convert_config(tiny("conv", npy_dir=True))
    assert record["status"] == "success"
    assert record["stages"]["load-arrays"]["attempts"] == 3
    assert all(record["stages"][s]["attempts"] == 1 for s in record["stages"] if s != "load-arrays")
    assert _last_record()["stages"]["load-arrays"]["attempts"] == 3
    logs = _logs(record["run_id"])
    assert sum("attempt 1 failed with a transient error, retrying: OSError" in m for m in logs) == 1
    assert sum("attempt 2 failed with a transient error" in m for m in logs) == 1
    assert any("load-arrays: attempt 3 of 4" in m for m in logs)


def test_a_transient_error_while_hashing_the_sources_for_the_key_is_retried(tiny, prefect_harness, fast_retries,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The key is computed by the runner before the task starts: a flaky read there is retried too."""
    from np2torch.flows.convert import convert_config

    failures = {"left": 1}
    monkeypatch.setattr(load_arrays, "fingerprint_files", _flaky(load_arrays.fingerprint_files, failures))
    record = convert_config(tiny("conv", npy_dir=True))
    assert record["status"] == "success" and failures["left"] == 0


def test_a_deterministic_failure_fails_once(tiny, prefect_harness, fast_retries) -> None:
    from np2torch.flows.convert import convert_config
    from np2torch.tasks.errors import ConversionError

    # the model is built with a hidden size the saved arrays do not have: shape mismatch
    with pytest.raises(ConversionError, match=r"(?s)\[validate\] `fc1.weight`: the manifest fails 7 check\(s\).*"
                       r"source fc1.weight \[4,3\] with transform \[\] gives the wrong shape \(expected \[7,3\], got \[4,3\]\)"):
        convert_config(tiny("conv", npy_dir=True), ["model.kwargs.hidden=7"])
    rec = _last_record()
    assert rec["status"] == "failed"
    assert rec["error"]["stage"] == "validate"
    assert rec["stages"]["validate"] == {**rec["stages"]["validate"], "failed": True, "attempts": 1}
    assert "not retried" in " ".join(_logs(rec["run_id"]))


def test_a_write_that_keeps_failing_is_retried_then_fails_with_every_attempt_counted(tiny,
        prefect_harness, fast_retries, monkeypatch: pytest.MonkeyPatch) -> None:
    from np2torch.flows.convert import convert_config
    from np2torch.tasks import export

    calls = {"n": 0}

    def failing_write(src: Path, dst: Path, metadata: dict) -> None:
        calls["n"] += 1
        raise OSError(errno.EIO, "Input/output error", str(dst))

    monkeypatch.setattr(export, "write_safetensors_with_metadata", failing_write)
    cfg = tiny("conv", npy_dir=True)
    with pytest.raises(OSError, match="Input/output error"):
        convert_config(cfg)
    assert calls["n"] == 4
    rec = _last_record()
    assert rec["status"] == "failed"
    assert rec["error"]["stage"] == "export" and rec["error"]["type"] == "OSError"
    assert rec["stages"]["export"]["attempts"] == 4 and rec["stages"]["export"]["failed"]
    assert rec["stages"]["verify-forward-pass"]["attempts"] == 1
    assert not (cfg.parent / "out" / "model.safetensors").exists()
    logs = _logs(rec["run_id"])
    assert sum("failed with a transient error, retrying" in m for m in logs) == 3
