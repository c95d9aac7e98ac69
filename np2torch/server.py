"""A lasting local Prefect server (``np2torch server start|stop|status``) and the temporary one.

Starting Prefect's temporary API server costs a conversion about ten seconds, and its history
is gone when the command ends. ``np2torch server start`` runs Prefect's own server app (what
``prefect server start`` serves, see :mod:`np2torch.server_app`) in the background, detached
from the terminal, with its ``PREFECT_HOME`` (SQLite database, logs) under np2torch's data
folder, so flow runs, logs and artifacts survive and the UI stays at one URL
(http://127.0.0.1:4200 by default), and beside it the warm runner (:mod:`np2torch.warm`).

Which API a run then reports to is :func:`np2torch.flows.runtime.choose_api`. Server
management is no Prefect flow: it sits beside the CLI, and imports Prefect nowhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from np2torch import warm
from np2torch.flows.runtime import ApiChoice, healthy_local_server, probe, server_dir, server_state, server_state_file
from np2torch.tasks.errors import ConversionError
from np2torch.tasks.procs import pid_alive, stop_pid

__all__ = ["TemporaryServer", "start_temporary_early", "start_server", "autostart_server", "stop_server", "server_status",
           "add_server_parser", "server_cli",
           "DEFAULT_HOST", "DEFAULT_PORT"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
START_TIMEOUT_S = 180.0  # a first start migrates a fresh SQLite database; a busy 2-core box is slow
AUTO_IDLE_S = 3 * 3600.0  # a server a convert/batch started stops after this long without a command (NP2TORCH_SERVER_IDLE)


# ---------------------------------------------------------------------------------------------
# the temporary server, started early


class TemporaryServer:
    """Prefect's temporary API server, started by np2torch as soon as a command knows it needs one.

    Prefect starts its temporary server when the first flow starts, after this process has spent
    seconds importing torch and Prefect; np2torch starts the same server app
    (:mod:`np2torch.server_app` ``--ephemeral``: what Prefect's own ``SubprocessASGIServer``
    runs, with busy writes retried) right after the preflight checks, so that both start-ups run
    at once. It reports through ``PREFECT_API_URL``, dies with this process even on ``kill -9``
    (:mod:`np2torch.tasks._orphan_guard`) and is stopped when the command ends.
    """

    def __init__(self) -> None:
        import tempfile

        with socket.socket() as s:
            s.bind((DEFAULT_HOST, 0))
            self.port = s.getsockname()[1]
        self.api_url = f"http://{DEFAULT_HOST}:{self.port}/api"
        self.log = tempfile.TemporaryFile(prefix="np2torch-temporary-server-")
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "np2torch.tasks._orphan_guard", str(os.getpid()), "-m", "np2torch.server_app",
                                      "--ephemeral", "--host", DEFAULT_HOST, "--port", str(self.port), "--log-level", "error"],
                                     env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        os.environ["PREFECT_API_URL"] = self.api_url
        os.environ["NP2TORCH_TEMPORARY_API_URL"] = self.api_url  # choose_api: a temporary server, no UI link
        import atexit

        atexit.register(self.stop)

    def wait(self, timeout: float = 120.0) -> None:
        """Block until it answers; a clear error (with its log) when it exits or does not answer."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                break
            if probe(self.api_url, timeout=1.0) is None:
                return
            time.sleep(0.1)
        self.log.seek(0)
        tail = "\n".join(self.log.read().decode(errors="replace").splitlines()[-15:])
        self.stop()
        why = f" (exit status {self.proc.returncode})" if self.proc.returncode is not None else f" within {timeout:g} s"
        raise ConversionError("the temporary Prefect server did not start" + why, key="prefect-api", stage="prefect-api",
                              fix=f"start a lasting one with `np2torch server start`; its log:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.environ.get("NP2TORCH_TEMPORARY_API_URL") == self.api_url:
            os.environ.pop("NP2TORCH_TEMPORARY_API_URL", None)
            if os.environ.get("PREFECT_API_URL") == self.api_url:
                os.environ.pop("PREFECT_API_URL", None)


def start_temporary_early(choice: ApiChoice) -> TemporaryServer | None:
    """Start the temporary server now when ``choice`` says one is needed (``NP2TORCH_EARLY_SERVER=0``: leave it to Prefect)."""
    if choice.mode != "temporary" or os.environ.get("NP2TORCH_EARLY_SERVER", "1") in ("0", "false", "no"):
        return None
    return TemporaryServer()


# ---------------------------------------------------------------------------------------------
# start / stop / status


def _port_free(host: str, port: int) -> bool:
    """True unless a program listens on ``port``: bound with ``SO_REUSEADDR`` as the server itself
    (uvicorn) binds, so the ``TIME_WAIT`` sockets a just-stopped server leaves do not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@contextlib.contextmanager
def _start_lock(timeout: float = START_TIMEOUT_S) -> Iterator[None]:
    """One starter at a time per home (a file lock): two commands started at once start one server."""
    import fcntl

    d = server_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "start.lock", "a+") as fh:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > timeout:
                    raise ConversionError(f"another np2torch command has been starting the server for {timeout:g} s", key=str(d),
                                          stage="server", fix="see server.log there, or `np2torch server stop` and try again") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def idle_seconds(default: float) -> float:
    """``NP2TORCH_SERVER_IDLE`` (seconds; 0: never) or ``default``."""
    try:
        return max(0.0, float(os.environ["NP2TORCH_SERVER_IDLE"]))
    except (KeyError, ValueError):
        return default


def autostart_server() -> dict[str, Any] | None:
    """Start the lasting local server for a ``convert`` or ``batch`` that found none; say so in one line.

    Port 4200 when free, else any free port; it stops after :data:`AUTO_IDLE_S` without a command
    (``NP2TORCH_SERVER_IDLE``). None (the command uses a temporary server) when it cannot start.
    """
    try:
        with _start_lock():
            running = healthy_local_server()  # another command may have started it meanwhile
            if running is not None:
                return running
            port = DEFAULT_PORT if _port_free(DEFAULT_HOST, DEFAULT_PORT) else _any_free_port()
            st = start_server(port=port, idle_s=idle_seconds(AUTO_IDLE_S), wait_runner=False, locked=True)
    except ConversionError as exc:
        print(f"np2torch: could not start the local Prefect server, using a temporary one: {str(exc).splitlines()[0]}", file=sys.stderr)
        return None
    idle = f"after {_human_s(st['idle_s'])} idle or " if st.get("idle_s") else ""
    print(f"np2torch: started the local Prefect server at {st['url']} in the background (run history, UI; later commands use it; "
          f"it stops {idle}with `np2torch server stop`; --no-server: a temporary one)", file=sys.stderr)
    return st


def _any_free_port() -> int:
    with socket.socket() as s:
        s.bind((DEFAULT_HOST, 0))
        return s.getsockname()[1]


def _human_s(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def start_server(*, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout: float = START_TIMEOUT_S, idle_s: float = 0.0,
                 wait_runner: bool = True, locked: bool = False) -> dict[str, Any]:
    """Start the server (:mod:`np2torch.server_app`) detached (own session: it outlives this command); wait until healthy.

    ``idle_s`` > 0: it stops itself after that long without a command using it. Under the home's
    start lock (``locked``: the caller holds it), so that two starters start one server.
    """
    if not locked:
        with _start_lock(timeout):
            return start_server(host=host, port=port, timeout=timeout, idle_s=idle_s, wait_runner=wait_runner, locked=True)
    running = healthy_local_server()
    if running is not None:
        st = warm.runner_state()
        if st is None or not pid_alive(int(st["pid"])) or st.get("api_url") != running["api_url"]:
            warm.start_runner(running["api_url"], server_dir() / "runner.log")
        return {**running, "already_running": True, "runner": warm.wait_ready(timeout) if wait_runner else None}
    old = server_state()
    if old and pid_alive(int(old["pid"])):
        stop_server()  # recorded but not answering: replace it rather than start a second one
    if not _port_free(host, port):
        raise ConversionError(f"port {port} on {host} is already in use by another program", key="server.port", stage="server",
                              fix=f"stop that program, or choose another port: np2torch server start --port {port + 1}")
    d = server_dir()
    home = d / "home"
    home.mkdir(parents=True, exist_ok=True)
    log = d / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port))
    url = f"http://{host}:{port}"
    # Prefect's own server app (UI, API, services), with busy SQLite writes retried inside the
    # server instead of by the client after 2-8 s of backoff (np2torch.server_app)
    cmd = [sys.executable, "-m", "np2torch.server_app", "--host", host, "--port", str(port), "--idle-stop", str(idle_s)]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, cwd=str(d),
                                start_new_session=True, close_fds=True)
    state = {"pid": proc.pid, "host": host, "port": port, "url": url, "api_url": f"{url}/api", "home": str(home), "log": str(log),
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "idle_s": idle_s}
    tmp = server_state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, server_state_file())
    warm.start_runner(state["api_url"], d / "runner.log")  # warms up (imports) while the server starts
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            server_state_file().unlink(missing_ok=True)
            raise ConversionError(f"the Prefect server exited during start-up (status {proc.returncode})", key=str(log), stage="server",
                                  fix=f"see its log:\n{_tail(log)}")
        if probe(state["api_url"], timeout=1.0) is None:
            waited = time.monotonic() - t0
            return {**state, "seconds": round(waited, 1), "runner": warm.wait_ready(max(5.0, timeout - waited)) if wait_runner else None}
        time.sleep(0.25)
    stop_server()
    raise ConversionError(f"the Prefect server did not answer within {timeout:g} s", key=str(log), stage="server",
                          fix="see its log; a first start migrates the database, try again on a less busy machine")


def stop_server(*, timeout: float = 30.0) -> bool:
    """Stop the local server (its whole process group); False when none was running."""
    warm.stop_runner()
    state = server_state()
    if state is None:
        return False
    alive = stop_pid(int(state["pid"]), group=True, timeout=timeout)  # start_new_session made the server its group's leader
    server_state_file().unlink(missing_ok=True)
    return alive


def server_status() -> dict[str, Any]:
    """What ``np2torch server status`` shows: running, healthy, URL, pid, home."""
    state = server_state()
    if state is None:
        return {"running": False, "healthy": False, "url": None, "pid": None}
    alive = pid_alive(int(state["pid"]))
    healthy = alive and probe(state["api_url"], timeout=2.0) is None
    runner = warm.runner_state()
    return {**state, "running": alive, "healthy": healthy, "runner": bool(runner and pid_alive(int(runner["pid"]))),
            "runner_pid": runner["pid"] if runner else None}


# ---------------------------------------------------------------------------------------------
# the CLI


def add_server_parser(sub: Any) -> None:
    """``np2torch server start|stop|status`` on the CLI's sub-parsers."""
    s = sub.add_parser("server", help="a lasting local Prefect server (history, UI)",
                       description="Start, stop or check a lasting local Prefect server; convert and batch use it when it answers.",
                       epilog="example:\n  np2torch server start && np2torch convert configs/examples/keras-cnn.yaml\n\n"
                              "exit status: 0 done (status: the server answers); 1 it could not start or stop (status: not running); "
                              "2 the command line is wrong",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("action", choices=["start", "stop", "status"])
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port of the UI and API (default {DEFAULT_PORT})")
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    s.set_defaults(func=server_cli)


def server_cli(args: argparse.Namespace) -> int:
    if args.action == "start":
        print("np2torch: starting the Prefect server (a first start takes a while: it creates the database)...", file=sys.stderr)
        st = start_server(host=args.host, port=args.port, idle_s=idle_seconds(0.0))
        if st.get("already_running"):
            print(f"np2torch: the Prefect server is already running at {st['url']} (pid {st['pid']})")
        else:
            print(f"np2torch: Prefect server running at {st['url']} (pid {st['pid']}, ready in {st['seconds']} s)")
        print("  warm runner: " + ("ready (convert and batch start without import time)" if st.get("runner") else
                                   "NOT ready (convert and batch still work, in their own process; see runner.log)"))
        print(f"  UI: {st['url']}   API: {st['api_url']}\n  history: {st['home']}\n  log: {st['log']}\n"
              "  convert and batch use it from now on (no temporary server); stop it with `np2torch server stop`")
        return 0
    if args.action == "stop":
        print("np2torch: Prefect server stopped" if stop_server() else "np2torch: no Prefect server was running")
        return 0
    from np2torch.tasks.paths import home_line

    st = server_status()
    if not st["running"]:
        print(f"np2torch: no Prefect server running (start one with `np2torch server start`)\n  {home_line()}")
        return 1
    print(f"np2torch: Prefect server {'healthy' if st['healthy'] else 'NOT answering'} at {st['url']} (pid {st['pid']})\n"
          f"  API: {st['api_url']}\n  history: {st['home']}\n  log: {st['log']}\n  started: {st['started_at']}\n"
          f"  warm runner: {'running (pid ' + str(st['runner_pid']) + ')' if st['runner'] else 'not running'}\n  {home_line()}")
    return 0 if st["healthy"] else 1
