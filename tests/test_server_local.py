"""``np2torch server``: which Prefect API a run uses, a dead API in one line, and a real
start/status/stop round trip of the lasting local server (marked ``server``)."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from np2torch import server
from np2torch.flows import runtime
from np2torch.tasks.paths import data_dir
from np2torch.tasks.procs import pid_alive

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200 if self.path.endswith("/health") else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_api() -> Iterator[str]:
    """Something that answers /api/health like a Prefect server: http://127.0.0.1:PORT"""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def no_prefect_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PREFECT_API_URL from the environment, a profile, or a harness in this process."""
    # choose_api() writes PREFECT_API_URL into os.environ: setenv first, so that teardown puts back
    # the value before this test (or its absence) instead of leaking this test's server to the next
    monkeypatch.setenv("PREFECT_API_URL", "unset-by-fixture")
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "no-profiles.toml"))
    monkeypatch.setattr(runtime, "_configured_in_process", lambda: None)
    monkeypatch.setattr(runtime, "_HINT_SHOWN", False)


def _write_state(url: str, pid: int) -> None:
    d = runtime.server_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "server.json").write_text(json.dumps({"pid": pid, "url": url, "api_url": f"{url}/api", "home": str(d / "home"),
                                               "log": str(d / "server.log"), "started_at": "now"}))


def test_without_any_server_a_temporary_one_is_used_with_one_hint(no_prefect_config, capsys: pytest.CaptureFixture[str]) -> None:
    first = runtime.choose_api()
    second = runtime.choose_api()
    assert first.mode == second.mode == "temporary" and not first.lasting
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line, once per process
    assert "np2torch server start" in err and "http://127.0.0.1:4200" in err and "temporary" in err


def test_a_running_local_server_is_chosen_and_reported_to(no_prefect_config, fake_api: str, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _write_state(fake_api, os.getpid())
    choice = runtime.choose_api()
    assert (choice.mode, choice.api_url, choice.ui_url) == ("local", f"{fake_api}/api", fake_api)
    assert os.environ["PREFECT_API_URL"] == f"{fake_api}/api"  # Prefect, imported later, reads it
    monkeypatch.delenv("PREFECT_API_URL")
    assert runtime.run_url(choice, "abc") == f"{fake_api}/runs/flow-run/abc"
    assert capsys.readouterr().err == ""


def test_a_stale_state_file_is_not_a_server(no_prefect_config, fake_api: str) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_state(fake_api, dead.pid)  # answers, but the recorded process is gone
    assert runtime.choose_api(hint=False).mode == "temporary"
    _write_state(f"http://127.0.0.1:{_free_port()}", os.getpid())  # alive, but nothing answers
    assert runtime.choose_api(hint=False).mode == "temporary"


def test_prefect_api_url_wins_over_the_local_server(no_prefect_config, fake_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_state(f"http://127.0.0.1:{_free_port()}", os.getpid())
    monkeypatch.setenv("PREFECT_API_URL", f"{fake_api}/api")
    choice = runtime.choose_api()
    assert (choice.mode, choice.ui_url) == ("env", fake_api)
    assert runtime.run_url(choice, "r1") == f"{fake_api}/runs/flow-run/r1"


def test_a_profile_setting_counts_like_the_environment(no_prefect_config, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}/api"
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'active = "work"\n[profiles.work]\nPREFECT_API_URL = "{dead}"\n')
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(profiles))
    with pytest.raises(runtime.ApiUnreachable, match="unreachable"):
        runtime.choose_api()


def test_a_dead_prefect_api_url_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """``PREFECT_API_URL`` on a closed port: which URL, unreachable, what to do; no traceback, before Prefect starts."""
    dead = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": dead, "NP2TORCH_DATA_DIR": str(tmp_path / "data")}
    code = ("import sys\nfrom np2torch.cli import main\nrc = main(['convert', sys.argv[1]])\n"
            "print('prefect imported' if 'prefect' in sys.modules else 'prefect not imported')\nsys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(REPO / "configs" / "examples" / "keras-cnn.yaml")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert dead in lines[0] and "unreachable" in lines[0] and "np2torch server start" in lines[0] and "unset PREFECT_API_URL" in lines[0]
    assert "Traceback" not in r.stderr
    assert r.stdout.strip() == "prefect not imported"


def test_time_wait_sockets_of_a_stopped_server_do_not_block_its_port() -> None:
    """Item 8: only a real listener is "another program"; the TIME_WAIT a stopped server leaves is not."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    assert not server._port_free("127.0.0.1", port)  # a live listener
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server side closes first: its end of the connection stays in TIME_WAIT
    client.close()
    listener.close()
    with socket.socket() as plain:  # what the old check did: a bind without SO_REUSEADDR trips over TIME_WAIT
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    assert server._port_free("127.0.0.1", port)


def test_status_and_stop_without_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    from np2torch.cli import main

    assert main(["server", "status"]) == 1
    assert "no Prefect server running" in capsys.readouterr().out
    assert main(["server", "stop"]) == 0
    assert "no Prefect server was running" in capsys.readouterr().out


@pytest.mark.server
def test_server_start_status_stop_round_trip(tiny, no_prefect_config, capsys: pytest.CaptureFixture[str]) -> None:
    from np2torch.cli import main

    port = _free_port()
    try:
        assert main(["server", "start", "--port", str(port)]) == 0
        out = capsys.readouterr().out
        assert f"Prefect server running at http://127.0.0.1:{port}" in out
        st = server.server_status()
        assert st["healthy"] and st["port"] == port
        assert Path(st["home"]).is_relative_to(runtime.server_dir())  # history lives under np2torch's data folder
        assert (Path(st["home"]) / "prefect.db").is_file() or any(Path(st["home"]).glob("*.db"))
        assert main(["server", "start", "--port", str(port)]) == 0  # a second start finds it
        assert "already running" in capsys.readouterr().out
        assert main(["server", "status"]) == 0
        assert f"healthy at http://127.0.0.1:{port} (pid {st['pid']})" in capsys.readouterr().out
        choice = runtime.choose_api()
        assert choice.mode == "local" and choice.ui_url == f"http://127.0.0.1:{port}"
        # a convert typed by a user now reports to it and prints where its run is in the UI
        config = tiny("conv", npy_dir=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env["NP2TORCH_DATA_DIR"] = str(data_dir())
        r = subprocess.run([sys.executable, "-m", "np2torch.cli", "convert", str(config)], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        assert f"np2torch: run in the Prefect UI: http://127.0.0.1:{port}/runs/flow-run/" in r.stderr
        assert "temporary" not in r.stderr  # no temporary server, no hint
        run_id = r.stderr.split("/runs/flow-run/", 1)[1].split()[0]
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/flow_runs/{run_id}", timeout=10) as resp:
            run = json.loads(resp.read())
        assert run["name"] == "tiny" and {"tiny", "dtype:float32", "device:cpu"} <= set(run["tags"])
        _warm_runner_runs_commands(config, port)
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        assert main(["server", "stop"]) == 0
    assert "Prefect server stopped" in capsys.readouterr().out
    assert not pid_alive(st["pid"])
    assert runtime.server_state() is None and main(["server", "status"]) == 1
    assert not Path(st["home"]).parent.joinpath("runner.json").exists()  # `server stop` stopped the runner too
    # a restart right after the stop works (the stopped server's TIME_WAIT sockets are no "other program")
    try:
        assert main(["server", "start", "--port", str(port)]) == 0, capsys.readouterr()
        assert f"Prefect server running at http://127.0.0.1:{port}" in capsys.readouterr().out
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        main(["server", "stop"])


def _warm_runner_runs_commands(config: Path, port: int) -> None:
    """The runner `server start` started runs a command typed in the same environment: its output,
    its exit status and its failure message reach the command, as if it had run in its own process."""
    from np2torch import warm

    st = server.server_status()
    assert st["runner"], (runtime.server_dir() / "runner.log").read_text()
    env = {**os.environ, "NP2TORCH_DATA_DIR": str(data_dir())}  # the environment `server start` ran in

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "np2torch.cli", *args], env={**env, **extra}, capture_output=True,
                              text=True, timeout=300)

    r = run("convert", str(config))
    assert r.returncode == 0, r.stderr
    assert "converted (success, " in r.stdout and "warm runner)" in r.stdout
    # every stage computed in a forked child: torch's CPU kernels and thread pools work there
    computed = run("convert", str(config), "--refresh")
    assert computed.returncode == 0 and "warm runner)" in computed.stdout, computed.stderr
    assert "cached" not in computed.stdout.split("converted", 1)[1].split("verification")[0]
    # the files get the command's umask, not the runner's: the same modes as a run in its own process
    modes = {}
    for where, extra in (("runner", {}), ("own", {"NP2TORCH_WARM": "0"})):
        out = config.parent / f"umask-077-{where}"
        r = subprocess.run([sys.executable, "-m", "np2torch.cli", "convert", str(config), "--refresh", "--set", f"export.dir={out}"],
                           env={**env, **extra}, capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o077))
        assert r.returncode == 0 and ("warm runner)" in r.stdout) == (where == "runner"), r.stderr
        modes[where] = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()}
    assert modes["runner"] == modes["own"] and "0o600" in modes["runner"].values()
    assert f"http://127.0.0.1:{port}/runs/flow-run/" in r.stderr
    # a failure inside a stage: exit 1 and the stage's message, on the command's own stderr
    bad = run("convert", str(config), "--set", "convert.dtype=float16", "--set", "verify.atol=0", "--set", "verify.rtol=0")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "np2torch: error: [verify-forward-pass] `verify.reference_output`: the converted model does not reproduce" in bad.stderr
    # another environment (here: the runner turned off; likewise a PREFECT_* or thread-count variable) runs in its own process
    own = run("convert", str(config), NP2TORCH_WARM="0")
    assert own.returncode == 0 and "converted (success, " in own.stdout and "warm runner)" not in own.stdout
    threads = "3" if os.environ.get("OMP_NUM_THREADS") != "3" else "2"  # a value other than the runner's (CI may set one)
    other = run("convert", str(config), OMP_NUM_THREADS=threads)
    assert other.returncode == 0 and "warm runner)" not in other.stdout
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limited = subprocess.run([sys.executable, "-m", "np2torch.cli", "convert", str(config)], env=env, capture_output=True, text=True,
                             timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096) - 1, hard)))
    assert limited.returncode == 0 and "warm runner)" not in limited.stdout, limited.stderr
    assert warm.runner_state() is not None
