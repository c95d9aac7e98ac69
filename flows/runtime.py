"""Prefect's settings for np2torch runs, in one place for the CLI and the Python API.

:func:`configure_prefect` runs before Prefect starts (``np2torch convert`` / ``batch`` /
``serve``, and :func:`np2torch.convert`): it only sets environment variables that the user has
not set, so an explicit ``PREFECT_…`` setting always wins. Importing this module imports no
Prefect.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["PREFECT_DEFAULTS", "configure_prefect", "quiet_expected_tracebacks", "log_file"]

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
