"""Faults that must never wedge the tool (issue 13, items 1 and 2).

A killed run (``kill -9`` at any stage of a conversion or of a batch), a terminated or interrupted
one, and a full / over-quota / read-only disk. After each: the next run succeeds with
byte-identical outputs, ``np2torch audit --verify`` is clean, and nothing is left behind: no
process, no held or stale lock, no work folder, no partial file.

Runs are real ``np2torch`` subprocesses. ``NP2TORCH_TEST_PAUSE_AT=<stage>`` parks a run inside
that stage's work (its work folder written, its locks held; see ``cache.pause_point``) so the
test can kill it exactly there. The slow ones share the session's Prefect test server
(``PREFECT_API_URL``) so that a run does not pay for a temporary server; one test runs without
it, to prove that the temporary server dies with a killed run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import write_batch
from np2torch.cli import main
from np2torch.tasks import audit, cache, locks, stages
from np2torch.tasks.config import load_config
from np2torch.tasks.storage import StorageError

REPO = Path(__file__).resolve().parents[1]
NP2TORCH = shutil.which("np2torch") or str(REPO / ".venv" / "bin" / "np2torch")
STAGES = stages.NAMES
RUN_TIMEOUT = 300  # a wedged run (the bug) fails the test instead of hanging the suite


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def _env(data: Path, api_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "NP2TORCH_TEST_PAUSE_AT")}
    env.update(NP2TORCH_DATA_DIR=str(data), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", **extra)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run([NP2TORCH, *args], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


class Paused:
    """An ``np2torch`` subprocess (its own process group) parked at a stage."""

    def __init__(self, args: list[str], env: dict[str, str], stage: str, log: Path, timeout: float = RUN_TIMEOUT):
        self.log = log
        self.fh = open(log, "wb")
        self.proc = subprocess.Popen([NP2TORCH, *args], env={**env, "NP2TORCH_TEST_PAUSE_AT": stage}, stdout=self.fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while f"paused at {stage}".encode() not in log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"never reached {stage}:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.fh.close()

    def cleanup(self) -> None:
        """Never leave anything behind, even when an assertion failed."""
        with_group = _group(self.pgid)
        for pid in with_group:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.fh.close()


def _group(pgid: int) -> list[int]:
    """Live processes of a process group (from /proc; zombies are dead)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _wait_group_gone(pgid: int, timeout: float = 10) -> float:
    t0 = time.monotonic()
    while _group(pgid):
        assert time.monotonic() - t0 < timeout, f"processes of group {pgid} still alive after {timeout}s: {_group(pgid)}"
        time.sleep(0.1)
    return time.monotonic() - t0


def _hashes(*dirs: Path) -> dict[str, str]:
    """sha256 of every exported file (report.json is the run's own record: its times differ)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(d.iterdir())
            if p.is_file() and p.name != "report.json"}


def _assert_nothing_left(data: Path, *export_dirs: Path) -> None:
    """No lock file (held or stale), no work folder, no staging or temporary file, no torn record."""
    leftovers = [p for p in data.rglob("*.lock")]
    leftovers += [p for p in (data / "cache").rglob(".*") if p.name.endswith((".tmp", ".old"))]
    for d in export_dirs:
        leftovers += [p for p in d.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    for rec in (data / "cache" / "prefect" / "results").glob("*"):
        json.loads(rec.read_bytes())  # every Prefect result record is whole


def _verify_clean(env: dict[str, str]) -> str:
    r = _run(["audit", "--verify"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "chain intact" in r.stdout
    return r.stdout


# ---------------------------------------------------------------------------------------------
# kill -9


@pytest.mark.slow
def test_kill_9_at_each_stage_never_wedges_the_next_run(tiny, api_url: str, tmp_path: Path, isolated_data: Path) -> None:
    cfg = tiny("conv", npy_dir=True)
    out = cfg.parent / "out"
    env = _env(isolated_data, api_url)
    r = _run(["convert", str(cfg)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = _hashes(out)
    for stage in STAGES:  # each run must get past the locks the previous, killed, run held
        run = Paused(["convert", str(cfg), "--refresh"], env, stage, tmp_path / f"{stage}.log")
        try:
            work = list((isolated_data / "cache" / stage).glob(".*.tmp"))
            assert work, f"no work folder in {stage}"  # killed mid-stage, really
            held = [p for p in (isolated_data / "cache").rglob("*.lock") if locks.is_held(p)]
            assert any(p.parent.name == stage for p in held) and any(p.parent.name == "locks" for p in held), held
            run.kill()
            assert run.wait() == -signal.SIGKILL
            _wait_group_gone(run.pgid)
        finally:
            run.cleanup()
    t0 = time.monotonic()
    r = _run(["convert", str(cfg)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.monotonic() - t0 < RUN_TIMEOUT
    assert _hashes(out) == reference  # byte-identical
    _verify_clean(env)
    _assert_nothing_left(isolated_data, out)


@pytest.mark.slow
def test_a_killed_then_a_terminated_batch_then_rerun(tiny, api_url: str, tmp_path: Path, isolated_data: Path) -> None:
    """kill -9, then SIGTERM, of a batch whose conversions are parked in worker threads (SIGTERM
    must not wait for them); the next batch run succeeds with byte-identical outputs."""
    cfgs = [tiny(n, npy_dir=True, name=n) for n in ("tiny-a", "tiny-b")]
    outs = [c.parent / "out" for c in cfgs]
    batch = write_batch(tmp_path / "batch.yaml", cfgs, max_parallel=2)
    env = _env(isolated_data, api_url)
    r = _run(["batch", str(batch)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = _hashes(*outs)
    for sig in (signal.SIGKILL, signal.SIGTERM):
        run = Paused(["batch", str(batch), "--refresh"], env, "convert-to-device", tmp_path / f"batch-{sig}.log")
        try:
            t0 = time.monotonic()
            run.kill(sig)
            code = run.wait(30)
            stopped_after = time.monotonic() - t0
            _wait_group_gone(run.pgid)
        finally:
            run.cleanup()
        print(f"[faults] batch {signal.Signals(sig).name}: exit {code} after {stopped_after:.1f}s")
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig)
        assert stopped_after < 10, stopped_after
    r = _run(["batch", str(batch)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _hashes(*outs) == reference
    _verify_clean(env)
    _assert_nothing_left(isolated_data, *outs)


@pytest.mark.slow
def test_the_temporary_prefect_server_dies_with_a_killed_run(tiny, tmp_path: Path, isolated_data: Path) -> None:
    """No PREFECT_API_URL: the run starts its own server; kill -9 of the run takes it along."""
    cfg = tiny("conv", npy_dir=True)
    run = Paused(["convert", str(cfg)], _env(isolated_data, None), "validate", tmp_path / "run.log")
    try:
        members = _group(run.pgid)
        assert len(members) >= 2, members  # np2torch and its temporary server
        run.kill()
        run.wait()
        gone_after = _wait_group_gone(run.pgid, timeout=10)
        print(f"[faults] temporary server gone {gone_after:.1f}s after kill -9 of np2torch")
        assert gone_after < 10
    finally:
        run.cleanup()


# ---------------------------------------------------------------------------------------------
# SIGTERM / SIGINT


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_run_within_seconds_and_leaves_it_clean(tiny, api_url: str, tmp_path: Path, isolated_data: Path, sig: int) -> None:
    cfg = tiny("conv", npy_dir=True)
    env = _env(isolated_data, api_url)
    run = Paused(["convert", str(cfg)], env, "verify-forward-pass", tmp_path / "run.log")
    try:
        t0 = time.monotonic()
        run.kill(sig)
        code = run.wait(30)
        stopped_after = time.monotonic() - t0
        _wait_group_gone(run.pgid)
    finally:
        run.cleanup()
    log = (tmp_path / "run.log").read_text(errors="replace")
    print(f"[faults] convert {signal.Signals(sig).name}: exit {code} after {stopped_after:.1f}s")
    assert stopped_after < 10, stopped_after
    assert code == 128 + sig, log[-2000:]
    assert f"{signal.Signals(sig).name} received" in log
    records, bad = audit.read_records()
    assert bad == 0 and records[-1]["status"] == "failed" and records[-1]["error"]["stage"] == "verify-forward-pass"
    assert not [p for p in (isolated_data / "cache").rglob("*.lock") if locks.is_held(p)]
    assert not list((isolated_data / "cache").rglob(".*.tmp"))
    r = _run(["convert", str(cfg)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    _verify_clean(env)
    _assert_nothing_left(isolated_data, cfg.parent / "out")


# ---------------------------------------------------------------------------------------------
# the locks themselves


_HOLD = """
import sys, time
from np2torch.tasks import locks
fd = locks.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_whose_holder_was_killed_is_free_at_once(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    proc = _holder(path)
    try:
        assert locks.is_held(path)
        with pytest.raises(locks.LockTimeout, match=rf"held by a running process \(pid {proc.pid}\)"):
            locks.acquire(path, timeout=0.2)
    finally:
        proc.kill()
        proc.wait(10)
    t0 = time.monotonic()
    with locks.held_lock(path, timeout=5):
        assert locks.is_held(path)
    assert time.monotonic() - t0 < 1
    assert not path.exists()  # released: the file goes with it


def test_prefect_lock_manager_serializes_and_survives_a_killed_holder(tmp_path: Path) -> None:
    m = locks.FlockLockManager(tmp_path / "locks")
    proc = _holder(tmp_path / "locks" / "k.lock")
    try:
        assert m.is_locked("k") and not m.acquire_lock("k", "me", acquire_timeout=0.1)
        assert not m.wait_for_lock("k", timeout=0.1)
    finally:
        proc.kill()
        proc.wait(10)
    assert m.acquire_lock("k", "me", acquire_timeout=5) and m.is_lock_holder("k", "me") and m.acquire_lock("k", "me")
    got = []
    t = threading.Thread(target=lambda: got.append(m.acquire_lock("k", "other", acquire_timeout=10)))
    t.start()
    time.sleep(0.3)
    assert not got  # another holder in this process waits
    m.release_lock("k", "me")
    t.join(10)
    assert got == [True] and m.is_lock_holder("k", "other")
    with pytest.raises(ValueError):
        m.release_lock("k", "me")
    m.release_lock("k", "other")
    assert not m.is_locked("k") and not (tmp_path / "locks" / "k.lock").exists()
    m.release_lock("k", "other")  # a second release of a released lock (Prefect re-commits finished children) is a no-op
    assert not m.is_locked("k")


def test_work_folders_of_dead_runs_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    dead, live = "a" * 64, "b" * 64
    for key in (dead, live):
        (root / "convert-to-device" / f".{key}.0123abcd.tmp").mkdir(parents=True)
    (root / "convert-to-device" / f"{dead}.lock").write_text("12345\n")  # a stale lock file (its holder died)
    proc = _holder(root / "convert-to-device" / f"{live}.lock")
    try:
        removed = cache.sweep_stale(root)
        assert [p.name for p in removed] == [f".{dead}.0123abcd.tmp"]
        assert (root / "convert-to-device" / f".{live}.0123abcd.tmp").is_dir()
        assert not (root / "convert-to-device" / f"{dead}.lock").exists()
    finally:
        proc.kill()
        proc.wait(10)
    assert [p.name for p in cache.sweep_stale(root)] == [f".{live}.0123abcd.tmp"]


def test_a_half_written_prefect_result_record_is_recomputed_not_read(tmp_path: Path) -> None:
    from np2torch.tasks.prefect_tasks import _torn

    m = locks.FlockLockManager(tmp_path / "locks")
    good, torn = tmp_path / "good", tmp_path / "torn"
    good.write_text('{"metadata": {}, "result": 1}')
    torn.write_text('{"metadata": {"storage_key": "tor')
    assert not _torn(good, m, "good") and not _torn(tmp_path / "missing", m, "missing")
    assert m.acquire_lock("torn", "writer")  # a live writer: its record is not torn, only unfinished
    assert not _torn(torn, m, "torn")
    m.release_lock("torn", "writer")
    assert _torn(torn, m, "torn")  # the runner then runs the task with refresh_cache: Prefect overwrites it
    assert good.exists() and torn.exists()  # nothing is deleted


# ---------------------------------------------------------------------------------------------
# full, over-quota, read-only disks (item 2)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_cache_is_one_error_naming_the_folder_and_a_rerun_completes(tiny, isolated_data: Path,
                                                                            monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    cfg = load_config(tiny("conv", npy_dir=True))
    real = cache.atomic_write_text

    def full(path, text):  # the record of the convert stage's entry cannot be written
        if "convert-to-device" in str(path):
            raise OSError(code, os.strerror(code))
        return real(path, text)

    monkeypatch.setattr(cache, "atomic_write_text", full)
    with pytest.raises(StorageError) as info:
        stages.run_all(cfg)
    folder = isolated_data / "cache" / "convert-to-device"
    assert info.value.folder == str(folder) and info.value.errno == code and info.value.exit_code == 1
    assert str(folder) in str(info.value) and errno.errorcode[code] in str(info.value)
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob("*.lock"))  # nothing half-written, no lock
    monkeypatch.setattr(cache, "atomic_write_text", real)  # space freed
    recs = stages.run_all(cfg)
    assert [o["path"] for o in recs["export"].outputs]


def test_a_full_audit_log_disk_is_one_error_naming_the_folder(isolated_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    audit.append_record({"name": "before", "status": "success"})

    def quota(fd, log):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    real = audit._drop_torn_tail
    monkeypatch.setattr(audit, "_drop_torn_tail", quota)
    with pytest.raises(StorageError, match=r"could not append to the audit log in .*: the disk quota is exceeded"):
        audit.append_record({"name": "lost", "status": "success"})
    monkeypatch.setattr(audit, "_drop_torn_tail", real)  # space freed
    audit.append_record({"name": "after", "status": "success"})
    assert [r["name"] for r in audit.read_records()[0]] == ["before", "after"]
    assert audit.check_chain().ok and not list(isolated_data.glob("*.lock"))


@pytest.mark.slow
def test_disk_full_through_the_cli_is_exit_1_and_one_message(tiny, prefect_harness, isolated_data: Path,
                                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny("conv", npy_dir=True)
    real = cache.atomic_write_text

    def full(path, text):
        if "verify-forward-pass" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(cache, "atomic_write_text", full)
    assert main(["convert", str(cfg)]) == 1
    err = capsys.readouterr().err
    folder = isolated_data / "cache" / "verify-forward-pass"
    assert f"np2torch: error: [verify-forward-pass] `{folder}`: could not write the verify-forward-pass cache entry in {folder}: " \
           "no space left on the device ([Errno 28] ENOSPC)" in err
    assert "Traceback" not in err
    monkeypatch.setattr(cache, "atomic_write_text", real)
    assert main(["convert", str(cfg)]) == 0
    assert audit.check_chain().ok


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 2 MiB tmpfs (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    """Write until the file system is full, to the last block."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


def test_a_really_full_disk_then_freed(tiny, tiny_tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny_tmpfs / "data"
    monkeypatch.setenv("NP2TORCH_DATA_DIR", str(data))
    cfg = load_config(tiny("conv", npy_dir=True))
    data.mkdir()
    filler = tiny_tmpfs / "filler"
    _fill(filler)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        stages.run_all(cfg)
    assert time.monotonic() - t0 < 30
    assert info.value.folder.startswith(str(data / "cache")) and info.value.errno == errno.ENOSPC
    with pytest.raises(StorageError, match=rf"could not append to the audit log in {data}"):
        audit.append_record({"name": "tiny", "status": "failed"})
    assert not [p for p in data.rglob("*") if p.name.endswith((".tmp", ".old", ".lock"))]
    filler.unlink()  # space freed
    recs = stages.run_all(cfg)
    assert all(Path(o["path"]).is_file() for o in recs["export"].outputs)
    audit.append_record({"name": "tiny", "status": "success"})
    assert audit.check_chain().ok
