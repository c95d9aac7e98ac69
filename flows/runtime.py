"""Prefect's settings for np2torch runs, in one place for the CLI and the Python API.

:func:`configure_prefect` runs before Prefect starts (``np2torch convert`` / ``batch`` /
``serve``, and :func:`np2torch.convert`): it only sets environment variables that the user has
not set, so an explicit ``PREFECT_…`` setting always wins.

Which API a ``convert`` or ``batch`` reports to (:func:`choose_api`):

1. ``PREFECT_API_URL`` (environment, or the active Prefect profile) when set: it is probed
   first, and an unreachable URL is one clear error (exit 1) instead of three tracebacks;
2. else np2torch's local server (``np2torch server start``, :mod:`np2torch.server`), when its
   state file names a live process that answers;
3. else, for ``convert`` and ``batch`` on the command line, that server started now in the
   background (it stops after an idle period), unless ``--no-server`` / ``NP2TORCH_NO_SERVER=1``;
4. else Prefect's temporary server, with one line saying how to start the lasting one.

Importing this module imports no Prefect: these checks run before Prefect starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from np2torch.tasks.errors import ConversionError
from np2torch.tasks.paths import data_dir
from np2torch.tasks.procs import pid_alive

__all__ = ["PREFECT_DEFAULTS", "configure_prefect", "quiet_expected_tracebacks", "ApiChoice", "ApiUnreachable", "choose_api", "using_api",
           "run_url", "probe", "server_dir", "server_state", "server_state_file", "healthy_local_server", "log_file",
           "last_used_file", "autostart_allowed"]

_PROBE_TIMEOUT_S = 2.0

PREFECT_DEFAULTS: dict[str, str] = {
    # the anonymous usage heartbeat of the temporary API server only adds noise to a run: with
    # several processes on one SQLite file it prints a "database is locked" traceback
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # the temporary API server can take longer than Prefect's 20 s default on a busy 2-core box
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def configure_prefect() -> None:
    """Apply :data:`PREFECT_DEFAULTS` where the environment does not already set them."""
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def log_file() -> Path:
    """Where Prefect's own log lines go when the terminal does not show them: one file in the home."""
    from np2torch.tasks.paths import home

    return home() / "logs" / "np2torch.log"


def quiet_expected_tracebacks(verbose: bool = False) -> None:
    """Keep the terminal to np2torch's own lines; Prefect's go to the run (UI) and a log file.

    Prefect's INFO lines ("attempt 1 of 4", "Finished in state Cached(...)") reach the terminal
    only when ``verbose``; they always reach the Prefect API (the run's logs in the UI) and
    :func:`log_file`. Warnings and errors still print. A failed run's :class:`ConversionError`
    prints as its message, without the traceback: the message already names the stage, the key
    and the fix (the traceback still reaches the Prefect API and the log file). Idempotent.
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    from np2torch.tasks.errors import ConversionError

    root = logging.getLogger()
    if not any(getattr(h, "_np2torch_file", False) for h in root.handlers):
        try:
            path = log_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(path, encoding="utf-8", delay=True)
        except OSError:  # a read-only home: the terminal and the UI still have everything
            fh = None
        if fh is not None:
            fh.setLevel(logging.INFO)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            fh._np2torch_file = True  # type: ignore[attr-defined]
            root.addHandler(fh)
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, PrefectConsoleHandler):
                h.setLevel(logging.NOTSET if verbose else logging.WARNING)
                with h.lock:  # this command's stderr (the handler was made with whatever stderr was then)
                    h.stream = sys.stderr
            if isinstance(h, PrefectConsoleHandler) and not getattr(h, "_np2torch_quiet", False):
                orig = h.format

                def fmt(record: logging.LogRecord, _orig=orig) -> str:
                    if record.exc_info and isinstance(record.exc_info[1], ConversionError):
                        saved = record.exc_info, record.exc_text
                        record.exc_info, record.exc_text = None, None
                        try:
                            return _orig(record)
                        finally:
                            record.exc_info, record.exc_text = saved
                    return _orig(record)

                h.format = fmt  # type: ignore[method-assign]
                h._np2torch_quiet = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# which Prefect API a run reports to


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


def server_state_file() -> Path:
    return server_dir() / "server.json"


def last_used_file() -> Path:
    """Touched by each command that reports to the local server: its idle stop counts from it."""
    return server_dir() / "last-used"


def autostart_allowed() -> bool:
    """Whether a command may start the lasting local server: not with ``NP2TORCH_NO_SERVER=1`` (``--no-server``)."""
    return os.environ.get("NP2TORCH_NO_SERVER", "").strip().lower() in ("", "0", "false", "no")


def server_state() -> dict[str, Any] | None:
    """The local server's recorded pid/URL, or None when none was started (or it was stopped)."""
    try:
        state = json.loads(server_state_file().read_text())
        return state if isinstance(state, dict) and "pid" in state and "url" in state else None
    except (OSError, ValueError):
        return None


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
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except (OSError, ValueError) as exc:
        return str(exc)


def healthy_local_server() -> dict[str, Any] | None:
    state = server_state()
    if state and pid_alive(int(state["pid"])) and probe(state["api_url"], timeout=1.0) is None:
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


def choose_api(*, hint: bool = True, start: Callable[[], dict[str, Any] | None] | None = None) -> ApiChoice:
    """The API this process's runs report to; makes np2torch's local server the default when it answers.

    ``start`` (``convert`` and ``batch`` on the command line pass :func:`np2torch.server.autostart_server`;
    the flows never import the entry points): with no server running, start the lasting local
    server in the background and use it, unless ``NP2TORCH_NO_SERVER=1`` (``--no-server``); a
    temporary server when it cannot start.

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
    state = healthy_local_server()
    if state is None and start is not None and autostart_allowed():
        state = start()
    if state is not None:
        with contextlib.suppress(OSError):
            last_used_file().touch()  # the server's idle stop counts from the last command
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
