"""A run ends cleanly however it is ended: killed, terminated or interrupted.

* **Child processes die with their parent.** The temporary Prefect API server that Prefect starts
  for a run without ``PREFECT_API_URL`` (``SubprocessASGIServer``, a ``uvicorn`` subprocess) is
  started through :mod:`np2torch.tasks._orphan_guard`: a thread in the server process watches its
  parent and stops the server the moment the parent is gone (``kill -9`` included). A watching
  thread is used rather than ``PR_SET_PDEATHSIG`` because that signal fires when the *thread*
  that started the child ends, and Prefect may start the server from a short-lived thread.
* **SIGTERM and SIGINT stop a run within seconds** (:func:`handle_termination`, installed by the
  CLI): the first signal raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread
  (while a flow runs, Prefect's own SIGTERM handler raises its ``TerminationSignal`` instead), so
  the run records its failure in the audit log and removes its work; a watchdog ends the
  process after :data:`GRACE_SECONDS` whatever a worker thread is stuck in (a batch's task
  runner waits for its threads on the way out), stopping the server first. A second signal
  ends it at once. Either way the guarantees of a kill hold: locks are
  released by the OS, no file is ever partial under its final name, the audit log is whole.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Terminated", "handle_termination", "guard_prefect_server", "stop_children", "GRACE_SECONDS"]

GRACE_SECONDS = 5.0


class Terminated(KeyboardInterrupt):
    """The run was asked to stop by a signal (exit status 128 + the signal number)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


_SERVER_MODULE = "prefect.server.api.server"


def _patch_server_module(module: Any) -> None:
    if not isinstance(getattr(module, "subprocess", None), _GuardedSubprocess):
        module.subprocess = _GuardedSubprocess()  # only the server module's view of subprocess


class _PatchOnImport:
    """Meta path finder: patch Prefect's server module right after it is first imported.

    Importing it costs seconds, and a run with ``PREFECT_API_URL`` set never needs it, so it is
    not imported just to patch it.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != _SERVER_MODULE:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            _patch_server_module(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def guard_prefect_server() -> None:
    """Make Prefect's temporary API server stop when this process dies, and Prefect's SIGTERM
    handler arm the watchdog (idempotent)."""
    _wrap_prefect_sigterm()
    if _SERVER_MODULE in sys.modules:
        _patch_server_module(sys.modules[_SERVER_MODULE])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _GuardedSubprocess:
    """``subprocess`` as Prefect's server module sees it: ``python -m uvicorn ...`` is started as
    ``python -m np2torch.tasks._orphan_guard <this pid> -m uvicorn ...``; all else is unchanged."""

    def __getattr__(self, name: str) -> Any:
        import subprocess

        return getattr(subprocess, name)

    @staticmethod
    def Popen(args: Any, *a: Any, **kw: Any) -> Any:  # noqa: N802 - the name Prefect calls
        import subprocess

        if isinstance(args, (list, tuple)) and list(args[1:3]) == ["-m", "uvicorn"]:
            args = [args[0], "-m", "np2torch.tasks._orphan_guard", str(os.getpid()), *args[1:]]
        return subprocess.Popen(args, *a, **kw)


def stop_children() -> None:
    """Kill the temporary Prefect server(s) this process started (used just before a hard exit)."""
    module = sys.modules.get(_SERVER_MODULE)  # never import it here: that alone takes seconds
    if module is None:
        return
    for server in list(module.SubprocessASGIServer._instances.values()):
        proc = getattr(server, "server_process", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
                proc.wait(2)
            except Exception:  # noqa: BLE001 - best effort on the way out; its guard stops it anyway
                pass


_state = {"signalled": False, "installed": False}


def _hard_exit(code: int) -> None:
    stop_children()
    try:
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(code)


def _watchdog(code: int, grace: float) -> None:
    timer = threading.Timer(grace, _hard_exit, args=(code,))
    timer.daemon = True
    timer.start()


def _begin_stop(signum: int) -> None:
    """First signal: say so and arm the watchdog; second: stop now."""
    if _state["signalled"]:  # asked twice: stop now
        _hard_exit(128 + signum)
    _state["signalled"] = True
    print(f"np2torch: {signal.Signals(signum).name} received; stopping (at most {GRACE_SECONDS:.0f}s)", file=sys.stderr, flush=True)
    _watchdog(128 + signum, GRACE_SECONDS)


def _on_signal(signum: int, frame: Any) -> None:
    _begin_stop(signum)
    raise Terminated(signum)


def _wrap_prefect_sigterm() -> None:
    """While a flow runs, Prefect's own SIGTERM handler is installed (it raises
    ``TerminationSignal``); arm the same watchdog from it, so that a flow whose shutdown waits
    on a stuck worker thread (a batch's task runner) still ends within the grace period."""
    try:
        from prefect.utilities import engine
    except ImportError:  # pragma: no cover
        return
    original = engine._prefect_sigterm_handler
    if getattr(original, "_np2torch", False):
        return

    def handler(sig_num: int, *args: object) -> Any:
        if _state["installed"]:
            _begin_stop(sig_num)
        return original(sig_num, *args)

    handler._np2torch = True  # type: ignore[attr-defined]
    engine._prefect_sigterm_handler = handler


def handle_termination(grace: float | None = None) -> Callable[[], None]:
    """Install the SIGTERM/SIGINT handlers; return a function that puts the previous ones back.

    Main thread only (elsewhere a no-op). The CLI installs them around a command, so that a
    caller of ``main()`` in its own process gets its own handlers back afterwards.
    """
    global GRACE_SECONDS
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    if grace is not None:
        GRACE_SECONDS = grace
    _state["signalled"] = False
    _state["installed"] = True
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        _state["installed"] = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
