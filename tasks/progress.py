"""Progress you can watch: a terminal bar for long stages, a moving progress artifact in the UI.

Long work (hashing bytes, converting tensors) takes an optional ``progress: Callable[[int], None]``
called with the increment done. :func:`track` makes such a callback for one piece of work:

- in a terminal (stderr is a TTY) a ``rich`` bar appears once the work has run for about a
  second (bytes or items done, rate, ETA) and is cleared when it ends; quiet otherwise, and
  quiet when ``NP2TORCH_PROGRESS=0``;
- when a :class:`RunProgress` is active in this context (the convert flow opens one per
  conversion, the batch one per batch) the same increments move its Prefect progress artifact.

Callbacks may be called from any thread; they only add to counters under a lock. The terminal
is redrawn by rich's own refresh thread, the UI by one background thread per run that sends
at most two updates a second, so a callback never waits for the screen or the network.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Progress", "track", "RunProgress", "current_run", "chain"]

Progress = Callable[[int], None]

_SHOW_AFTER_S = 1.0
_current: contextvars.ContextVar[RunProgress | None] = contextvars.ContextVar("np2torch_run_progress", default=None)


def _terminal_wanted() -> bool:
    if os.environ.get("NP2TORCH_PROGRESS", "").lower() in ("0", "false", "no", "off"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def chain(*callbacks: Progress | None) -> Progress | None:
    """One callback that feeds every given one (None entries skipped)."""
    cbs = [c for c in callbacks if c is not None]
    if not cbs:
        return None
    if len(cbs) == 1:
        return cbs[0]

    def feed(n: int) -> None:
        for c in cbs:
            c(n)

    return feed


class _TerminalBar:
    """A rich bar that appears only after the work has run for ``_SHOW_AFTER_S``."""

    def __init__(self, description: str, total: int | None, unit: str):
        self.description, self.total, self.unit = description, total, unit
        self.t0 = time.monotonic()
        self.done = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        amount = [DownloadColumn(), TransferSpeedColumn()] if self.unit == "B" else [MofNCompleteColumn(), TextColumn(f"{self.unit}")]
        self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), *amount,
                                 TextColumn("ETA"), TimeRemainingColumn(), console=Console(file=sys.stderr), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=self.total, completed=self.done)

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._bar is None:
                if time.monotonic() - self.t0 < _SHOW_AFTER_S:
                    return
                self._start()
            else:
                self._bar.update(self._task, completed=self.done)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None


@contextlib.contextmanager
def track(stage: str, description: str, total: int | None, *, unit: str = "B", progress: Progress | None = None,
          terminal: bool | None = None) -> Iterator[Progress]:
    """A callback for one piece of work of ``stage`` (``total`` bytes or items), feeding the
    terminal bar, the active run's UI artifact and ``progress`` (the caller's own callback)."""
    bar = _TerminalBar(description, total, unit) if (_terminal_wanted() if terminal is None else terminal) else None
    run = _current.get()
    ui = run.work(stage, total) if run is not None else None
    cb = chain(bar, ui, progress) or (lambda n: None)
    try:
        yield cb
    finally:
        if bar is not None:
            bar.close()


class RunProgress:
    """A Prefect progress artifact for one run that moves as its stages (or conversions) advance.

    ``stage_begin``/``stage_end`` mark whole stages; :func:`track` callbacks inside a stage move
    the bar within that stage's weight. Updates go out from one background thread, at most every
    ``interval`` seconds, so callers never wait for the API; the last one is always sent.
    """

    def __init__(self, *, key: str, description: str, weights: dict[str, float], interval: float = 0.5):
        self.key, self.description, self.interval = key, description, interval
        self.weights = dict(weights)  # each stage's (or conversion's) share of the bar
        self._lock = threading.Lock()
        self._done_weight = 0.0
        self._stage: str | None = None
        self._stage_total: int | None = None
        self._stage_done = 0
        self._note = ""
        self._sent: tuple[float, str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: contextvars.Token | None = None
        self.artifact_id: Any = None

    # -- what callers report
    def stage_begin(self, stage: str) -> None:
        with self._lock:
            self._stage, self._stage_total, self._stage_done, self._note = stage, None, 0, stage

    def stage_end(self, stage: str, note: str = "") -> None:
        with self._lock:
            self._done_weight += self.weights.get(stage, 0.0)
            self._stage, self._note = None, f"{stage} {note}".strip()

    def work(self, stage: str, total: int | None) -> Progress:
        with self._lock:
            if self._stage != stage:
                self._stage, self._stage_done = stage, 0
            self._stage_total = total

        def advance(n: int) -> None:
            with self._lock:
                self._stage_done += n

        return advance

    def percent(self) -> float:
        with self._lock:
            part = 0.0
            if self._stage is not None and self._stage_total:
                part = self.weights.get(self._stage, 0.0) * min(1.0, self._stage_done / self._stage_total)
            total_w = sum(self.weights.values()) or 1.0
            return round(min(100.0, 100.0 * (self._done_weight + part) / total_w), 1)

    # -- the artifact
    def _send(self, final: bool = False) -> None:
        from prefect.artifacts import update_progress_artifact

        pct, note = (100.0 if final else self.percent()), self._note
        if self._sent == (pct, note) or self.artifact_id is None:
            return
        self._sent = (pct, note)
        update_progress_artifact(artifact_id=self.artifact_id, progress=pct, description=f"{self.description}: {note}" if note else None)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._send()
            except Exception:  # noqa: BLE001 - the UI bar must never break a conversion
                pass

    def __enter__(self) -> RunProgress:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import FlowRunContext, TaskRunContext

        self.artifact_id = None
        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:  # outside a run: count, publish nothing
            try:
                self.artifact_id = create_progress_artifact(progress=0.0, key=self.key, description=self.description)
            except Exception:  # noqa: BLE001 - an unreachable API must not stop the conversion
                self.artifact_id = None
        self._token = _current.set(self)
        if self.artifact_id is not None:
            ctx = contextvars.copy_context()  # the run's Prefect settings and client, in the sender thread
            self._thread = threading.Thread(target=ctx.run, args=(self._loop,), name=f"np2torch-progress-{self.key}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._token is not None:
            _current.reset(self._token)
        with contextlib.suppress(Exception):
            if exc_type is None:
                self._note = "done"
            self._send(final=exc_type is None)


def current_run() -> RunProgress | None:
    """The run progress active in this context, if any."""
    return _current.get()
