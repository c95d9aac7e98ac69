"""Issue 20 item 2: with no server running, the first ``convert`` starts the lasting local server in
the background and uses it; later commands from any folder use it; two at once start one; it stops
after an idle period and with ``server stop``; ``--no-server`` / ``NP2TORCH_NO_SERVER`` and
``PREFECT_API_URL`` keep today's behaviour. Typed as a user types them, with a temporary home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from np2torch.flows import runtime
from np2torch.tasks.procs import pid_alive

STARTED = "np2torch: started the local Prefect server at http://127.0.0.1:"


def test_no_server_setting_and_prefect_api_url_never_start_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import np2torch.server

    def boom() -> None:
        raise AssertionError("a server was started")

    monkeypatch.setattr(np2torch.server, "autostart_server", boom)
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "none.toml"))
    monkeypatch.setattr(runtime, "_configured_in_process", lambda: None)
    monkeypatch.setenv("PREFECT_API_URL", "x")
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("NP2TORCH_NO_SERVER", "1")  # what conftest sets for every test, and CI may
    assert runtime.choose_api(start=True, hint=False).mode == "temporary"
    monkeypatch.setenv("NP2TORCH_NO_SERVER", "0")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # set: it wins, even when it does not answer
    with pytest.raises(runtime.ApiUnreachable):
        runtime.choose_api(start=True)


@pytest.mark.server
def test_first_commands_start_one_server_that_later_folders_use_and_that_stops_when_idle(tmp_path: Path, tiny) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ("NP2TORCH_DATA_DIR", "NP2TORCH_NO_SERVER")}
    env.update(NP2TORCH_HOME=str(home), NP2TORCH_SERVER_IDLE="40")
    config = tiny("model")
    folders = [tmp_path / f"folder-{i}" for i in range(3)]
    for f in folders:
        f.mkdir()

    def convert(folder: Path, *extra: str, **more: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "np2torch.cli", "convert", str(config), *extra], cwd=folder, env={**env, **more},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    state_file = home / "prefect-server" / "server.json"
    try:
        # two first commands at once, from two folders: one server
        procs = [convert(folders[0]), convert(folders[1])]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert sum(o.count(STARTED) for o in outs) == 1, outs
        started = next(o for o in outs if STARTED in o)
        assert len([ln for ln in started.splitlines() if ln.startswith("np2torch: started")]) == 1  # said in one line
        state = json.loads(state_file.read_text())
        assert pid_alive(state["pid"]) and state["idle_s"] == 40
        for o in outs:
            assert f"{state['url']}/runs/flow-run/" in o and "using a temporary one" not in o
        assert not any((f / "data").exists() for f in folders)  # state lands in the home, not the folders
        # a third folder finds it: no start, no temporary server
        later = convert(folders[2])
        out = later.communicate(timeout=300)[0]
        assert later.returncode == 0 and STARTED not in out and f"{state['url']}/runs/flow-run/" in out, out
        # idle: it stops itself (and its runner), and says so in its log
        deadline = time.monotonic() + 40 + 60
        while pid_alive(state["pid"]) and time.monotonic() < deadline:
            time.sleep(1)
        assert not pid_alive(state["pid"]), "the server did not stop when idle"
        assert not state_file.exists() and not (home / "prefect-server" / "runner.json").exists()
        assert "no command for 40 s: stopping" in (home / "prefect-server" / "server.log").read_text()
        # with none running, --no-server (as NP2TORCH_NO_SERVER=1) keeps today's temporary server: none is started
        own = convert(folders[2], "--no-server")
        out = own.communicate(timeout=300)[0]
        assert own.returncode == 0 and STARTED not in out and "using a temporary one" in out, out
        assert not state_file.exists()
    finally:
        subprocess.run([sys.executable, "-m", "np2torch.cli", "server", "stop"], env=env, cwd=tmp_path, capture_output=True, timeout=120)
