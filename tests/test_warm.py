"""The warm runner's guards: when a command may run in it, and when it must run in its own process.

The end-to-end use (a real server, a real runner, a convert typed by a user, a failure, another
environment) is in tests/test_server_local.py::test_server_start_status_stop_round_trip.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from np2torch import warm


def _request(**over: object) -> dict:
    env = {"PATH": "/usr/bin", "PREFECT_API_URL": "http://127.0.0.1:4200/api", "HOME": "/home/u", "TERM": "xterm"}
    return {"protocol": warm.PROTOCOL, "executable": sys.executable, "env": env, "limits": warm._limits(), **over}


def test_a_command_in_the_runners_environment_is_accepted():
    req = _request()
    assert warm._incompatible(req, warm._compared_env(req["env"])) is None
    # variables read only while a command runs may differ (terminal, progress, the runner switch)
    other = _request(env={**req["env"], "TERM": "dumb", "COLUMNS": "80", "NP2TORCH_PROGRESS": "0", "SHLVL": "3"})
    assert warm._incompatible(other, warm._compared_env(req["env"])) is None


@pytest.mark.parametrize("name, value", [("PREFECT_API_URL", "http://elsewhere:4200/api"), ("PREFECT_LOGGING_LEVEL", "DEBUG"),
                                         ("NP2TORCH_DATA_DIR", "/other"), ("OMP_NUM_THREADS", "1"), ("CUDA_VISIBLE_DEVICES", ""),
                                         ("PYTHONPATH", "/somewhere"), ("HOME", "/root")])
def test_a_variable_read_at_import_time_sends_the_command_to_its_own_process(name: str, value: str):
    base = _request()
    changed = _request(env={**base["env"], name: value})
    assert warm._incompatible(changed, warm._compared_env(base["env"])) == "environment"


def test_another_interpreter_or_protocol_is_refused():
    snap = warm._compared_env(_request()["env"])
    assert warm._incompatible(_request(executable="/usr/bin/python3.12"), snap) == "interpreter"
    assert warm._incompatible(_request(protocol=warm.PROTOCOL + 1), snap) == "protocol"


def test_a_changed_module_file_is_noticed(tmp_path: Path):
    f = tmp_path / "m.py"
    f.write_text("x = 1\n")
    st = f.stat()
    snap = {str(f): (st.st_mtime_ns, st.st_size)}
    assert warm._changed(snap) is None
    f.write_text("x = 22\n")
    assert warm._changed(snap) == str(f)
    f.unlink()
    assert warm._changed(snap) == str(f)


def test_no_runner_means_the_command_runs_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NP2TORCH_DATA_DIR", str(tmp_path))
    assert warm.try_delegate(["convert", "x.yaml"]) is None
    monkeypatch.setenv("NP2TORCH_WARM", "0")
    assert warm.try_delegate(["convert", "x.yaml"]) is None


def test_a_dead_socket_file_means_the_command_runs_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NP2TORCH_DATA_DIR", str(tmp_path))
    path = warm.socket_path()
    path.parent.mkdir(parents=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file is there, nobody listens: a runner that was killed
    assert warm.try_delegate(["convert", "x.yaml"]) is None


def test_the_socket_path_fits_a_unix_socket_even_under_a_deep_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("NP2TORCH_DATA_DIR", str(deep))
    p = warm.socket_path()
    assert len(str(p).encode()) < 108 and str(os.getuid()) in p.name
    monkeypatch.setenv("NP2TORCH_DATA_DIR", str(tmp_path / "other"))
    assert warm.socket_path() != p or len(str(tmp_path / "other" / "prefect-server" / "runner.sock")) < 100


def test_a_command_under_other_resource_limits_runs_in_its_own_process():
    """`ulimit -v 8000000; np2torch convert …` must be bounded by that limit, not by the runner's."""
    snap = warm._compared_env(_request()["env"])
    limits = warm._limits()
    assert warm._incompatible(_request(), snap, limits) is None
    lower = {**limits, "RLIMIT_AS": [8_000_000_000, limits["RLIMIT_AS"][1]]}
    assert warm._incompatible(_request(limits=lower), snap, limits) == "resource limits"
