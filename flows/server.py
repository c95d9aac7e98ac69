"""A lasting local Prefect server (``np2torch server start|stop|status``) and the API a run uses.

Starting Prefect's temporary API server costs a conversion about ten seconds, and its history
is gone when the command ends. ``np2torch server start`` runs Prefect's own server
app (what ``prefect server start`` serves, see :mod:`np2torch.flows.server_app`) in the background, detached from the terminal, with its
``PREFECT_HOME`` (SQLite database, logs) under np2torch's data folder, so flow runs, logs and
artifacts survive and the UI stays at one URL (http://127.0.0.1:4200 by default).

Which API a ``convert`` or ``batch`` reports to (:func:`choose_api`):

1. ``PREFECT_API_URL`` (environment, or the active Prefect profile) when set: it is probed
   first, and an unreachable URL is one clear error (exit 1) instead of three tracebacks;
2. else np2torch's local server, when its state file names a live process that answers;
3. else Prefect's temporary server, with one line saying how to start the lasting one.

This module never imports Prefect at module level: the checks run before Prefect starts.
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
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from np2torch.tasks.errors import ConversionError
from np2torch.tasks.paths import data_dir
from np2torch.tasks.procs import pid_alive, stop_pid

__all__ = ["ApiChoice", "ApiUnreachable", "TemporaryServer", "start_temporary_early", "choose_api", "using_api", "run_url", "server_state", "start_server", "stop_server",
           "server_status", "add_server_parser", "server_cli", "DEFAULT_HOST", "DEFAULT_PORT"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
START_TIMEOUT_S = 180.0  # a first start migrates a fresh SQLite database; a busy 2-core box is slow
_PROBE_TIMEOUT_S = 2.0


class ApiUnreachable(ConversionError):
    """``PREFECT_API_URL`` names a server that does not answer (exit status 1); one line, no traceback."""

    stage = "prefect-api"

    def render(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


@dataclass(frozen=True)
class ApiChoice:
    """Where this run's flow runs go: ``env`` (PREFECT_API_URL), ``local`` (np2torch's server),
    ``configured`` (set by the caller, e.g. a test harness) or ``temporary``."""

    mode: str
    api_url: str | None = None
    ui_url: str | None = None

    @property
    def lasting(self) -> bool:
        return self.mode in ("env", "local", "configured") and self.ui_url is not None


# ---------------------------------------------------------------------------------------------
# where the local server lives


def server_dir() -> Path:
    """``<data>/prefect-server``: PREFECT_HOME (database, logs), the state file and the log."""
    return data_dir() / "prefect-server"


def _state_file() -> Path:
    return server_dir() / "server.json"


def server_state() -> dict[str, Any] | None:
    """The local server's recorded pid/URL, or None when none was started (or it was stopped)."""
    try:
        state = json.loads(_state_file().read_text())
        return state if isinstance(state, dict) and "pid" in state and "url" in state else None
    except (OSError, ValueError):
        return None


_pid_alive = pid_alive  # the name tests and older callers use


def probe(api_url: str, *, timeout: float = _PROBE_TIMEOUT_S) -> str | None:
    """None when something answers HTTP at ``api_url`` (any status), else why not, in words."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (Prefect Cloud asks for a key here): reachable
    except urllib.error.URLError as exc:
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    except (TimeoutError, socket.timeout):
        return f"no answer within {timeout:g} s"
    except (OSError, ValueError) as exc:
        return str(exc)


def _healthy_local() -> dict[str, Any] | None:
    state = server_state()
    if state and _pid_alive(int(state["pid"])) and probe(state["api_url"], timeout=1.0) is None:
        return state
    return None


# ---------------------------------------------------------------------------------------------
# which API a run uses


def _profile_api_url() -> str | None:
    """PREFECT_API_URL of the active Prefect profile (``prefect config set``), read without Prefect."""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    value = (data.get("profiles") or {}).get(active, {}).get("PREFECT_API_URL")
    return str(value) if value else None


def _configured_in_process() -> str | None:
    """An API URL already set inside this process's Prefect settings (a test harness, a caller)."""
    if "prefect.settings" not in sys.modules:
        return None
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


_HINT_SHOWN = False


def _ui_of(api_url: str) -> str:
    url = api_url.rstrip("/")
    return url[: -len("/api")] if url.endswith("/api") else url


def choose_api(*, hint: bool = True) -> ApiChoice:
    """The API this process's runs report to; makes np2torch's local server the default when it answers.

    Raises :class:`ApiUnreachable` when ``PREFECT_API_URL`` is set but nothing answers there.
    """
    global _HINT_SHOWN
    env_url = os.environ.get("PREFECT_API_URL") or _profile_api_url()
    if env_url and env_url == os.environ.get("NP2TORCH_TEMPORARY_API_URL"):
        return ApiChoice("temporary", env_url, None)  # started by this command (TemporaryServer): no lasting UI link
    if env_url:
        why = probe(env_url)
        if why is not None:
            raise ApiUnreachable(
                f"the Prefect API at {env_url} is unreachable ({why})", key="PREFECT_API_URL",
                fix="start that server (or `np2torch server start` and point PREFECT_API_URL at it), "
                    "or unset PREFECT_API_URL to run with a temporary server")
        ui = os.environ.get("PREFECT_UI_URL") or (_ui_of(env_url) if "api.prefect.cloud" not in env_url else None)
        return ApiChoice("env", env_url, ui)
    configured = _configured_in_process()
    if configured:
        return ApiChoice("configured", configured, None)
    state = _healthy_local()
    if state is not None:
        os.environ["PREFECT_API_URL"] = state["api_url"]  # read by Prefect when it is imported after this
        return ApiChoice("local", state["api_url"], state["url"])
    if hint and not _HINT_SHOWN:
        _HINT_SHOWN = True
        print("np2torch: no Prefect server running, using a temporary one (~10 s per command, history lost); "
              "`np2torch server start` once keeps one at http://127.0.0.1:4200 with the run history", file=sys.stderr)
    return ApiChoice("temporary")


@contextlib.contextmanager
def using_api(choice: ApiChoice) -> Iterator[None]:
    """Apply the choice to Prefect's settings in this process (Prefect may already be imported)."""
    if choice.mode not in ("env", "local") or not choice.api_url:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value() == choice.api_url:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: choice.api_url}):
        yield


def run_url(choice: ApiChoice, flow_run_id: str | None) -> str | None:
    """The flow run's page in the UI, when the run went to a lasting server."""
    if not choice.lasting or not flow_run_id:
        return None
    return f"{choice.ui_url}/runs/flow-run/{flow_run_id}"


# ---------------------------------------------------------------------------------------------
# the temporary server, started early


class TemporaryServer:
    """Prefect's temporary API server, started by np2torch as soon as a command knows it needs one.

    Prefect starts its temporary server when the first flow starts, after this process has spent
    seconds importing torch and Prefect; np2torch starts the same server app
    (:mod:`np2torch.flows.server_app` ``--ephemeral``: what Prefect's own ``SubprocessASGIServer``
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
        self.proc = subprocess.Popen([sys.executable, "-m", "np2torch.tasks._orphan_guard", str(os.getpid()), "-m", "np2torch.flows.server_app",
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
        raise ConversionError("the temporary Prefect server did not start" + (f" (exit status {self.proc.returncode})" if self.proc.returncode is not None else
                              f" within {timeout:g} s"), key="prefect-api", stage="prefect-api",
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
    with socket.socket() as s:
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


def start_server(*, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
    """Start the server (:mod:`np2torch.flows.server_app`) detached (own session: it outlives this command); wait until healthy."""
    running = _healthy_local()
    if running is not None:
        from np2torch.flows import warm

        st = warm.runner_state()
        if st is None or not _pid_alive(int(st["pid"])) or st.get("api_url") != running["api_url"]:
            warm.start_runner(running["api_url"], server_dir() / "runner.log")
        return {**running, "already_running": True, "runner": warm.wait_ready(timeout)}
    old = server_state()
    if old and _pid_alive(int(old["pid"])):
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
    # server instead of by the client after 2-8 s of backoff (np2torch.flows.server_app)
    cmd = [sys.executable, "-m", "np2torch.flows.server_app", "--host", host, "--port", str(port)]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, cwd=str(d),
                                start_new_session=True, close_fds=True)
    state = {"pid": proc.pid, "host": host, "port": port, "url": url, "api_url": f"{url}/api", "home": str(home), "log": str(log),
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = _state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, _state_file())
    from np2torch.flows import warm

    warm.start_runner(state["api_url"], d / "runner.log")  # warms up (imports) while the server starts
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            _state_file().unlink(missing_ok=True)
            raise ConversionError(f"the Prefect server exited during start-up (status {proc.returncode})", key=str(log), stage="server",
                                  fix=f"see its log:\n{_tail(log)}")
        if probe(state["api_url"], timeout=1.0) is None:
            return {**state, "seconds": round(time.monotonic() - t0, 1), "runner": warm.wait_ready(max(5.0, timeout - (time.monotonic() - t0)))}
        time.sleep(0.25)
    stop_server()
    raise ConversionError(f"the Prefect server did not answer within {timeout:g} s", key=str(log), stage="server",
                          fix="see its log; a first start migrates the database, try again on a less busy machine")


def stop_server(*, timeout: float = 30.0) -> bool:
    """Stop the local server (its whole process group); False when none was running."""
    from np2torch.flows import warm

    warm.stop_runner()
    state = server_state()
    if state is None:
        return False
    alive = stop_pid(int(state["pid"]), group=True, timeout=timeout)  # start_new_session made the server its group's leader
    _state_file().unlink(missing_ok=True)
    return alive


def server_status() -> dict[str, Any]:
    """What ``np2torch server status`` shows: running, healthy, URL, pid, home."""
    state = server_state()
    if state is None:
        return {"running": False, "healthy": False, "url": None, "pid": None}
    alive = _pid_alive(int(state["pid"]))
    healthy = alive and probe(state["api_url"], timeout=2.0) is None
    from np2torch.flows import warm

    runner = warm.runner_state()
    return {**state, "running": alive, "healthy": healthy, "runner": bool(runner and _pid_alive(int(runner["pid"]))),
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
        st = start_server(host=args.host, port=args.port)
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
    st = server_status()
    if not st["running"]:
        print("np2torch: no Prefect server running (start one with `np2torch server start`)")
        return 1
    print(f"np2torch: Prefect server {'healthy' if st['healthy'] else 'NOT answering'} at {st['url']} (pid {st['pid']})\n"
          f"  API: {st['api_url']}\n  history: {st['home']}\n  log: {st['log']}\n  started: {st['started_at']}\n"
          f"  warm runner: {'running (pid ' + str(st['runner_pid']) + ')' if st['runner'] else 'not running'}")
    return 0 if st["healthy"] else 1
