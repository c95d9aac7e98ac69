"""Prefect over the stage table: one task per stage from one factory, adding caching, retries and logging.

:class:`Orchestrated` is the executor the runner (:func:`np2torch.tasks.stages.run_all`) uses in
a flow run. Caching. A task's cache key is a pure function of the stage's content key (computed
by the runner, passed to the task) and the task's own source (``TASK_SOURCE``), never of its
other inputs: they are a config and small records, and hashing them would tie the key to paths.
Results persist as small JSON records (``StageRecord.to_dict``) in local storage under the cache
dir; the big artifacts stay in the stage's own cache entry. Before Prefect may answer from its
record, the executor re-checks that entry: if any artifact no longer hashes as recorded (or an
exported file was edited), or the record was left half-written, the task runs with
``refresh_cache`` (the stage recomputes and the record is overwritten); nothing is deleted and
a corrupt entry is never trusted.
Identical tasks started at once are serialized by a file lock (``SERIALIZABLE`` isolation):
the second waits and then reads the first one's result. The lock is a ``flock``
(:class:`~np2torch.tasks.locks.FlockLockManager`, not Prefect's ``FileSystemLockManager``, whose
lock files outlive a killed holder and make every later run wait forever): the OS releases it
when its holder dies. A result record left half-written by a killed run is removed, not
trusted, and Prefect's temporary API server is made to die with this process
(:mod:`np2torch.tasks.lifecycle`).

Retries are for transient I/O only (an ``OSError`` such as EIO/EAGAIN/EBUSY, a
:class:`TransientIOError`, or a busy Prefect API), with exponential backoff and jitter; a shape
mismatch, a schema failure or a bad config fails once. Every attempt is logged and counted.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects

from np2torch.tasks import cache, lifecycle
from np2torch.tasks.config import Config
from np2torch.tasks.errors import ConversionError, TransientIOError, one_line
from np2torch.tasks.locks import FlockLockManager
from np2torch.tasks.paths import cache_dir
from np2torch.tasks.stages import BY_NAME, STAGES, Stage, StageRecord

__all__ = [
    "BACKOFF_FACTOR",
    "JITTER_FACTOR",
    "RETRIES",
    "Orchestrated",
    "StageCachePolicy",
    "configured_tasks",
    "is_transient",
    "stage_task",
]

log = logging.getLogger(__name__)

lifecycle.guard_prefect_server()  # before any flow can start Prefect's temporary server

_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.EINTR, errno.ECONNRESET, errno.ESTALE}
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}

RETRIES = 3  # after the first attempt: 4 attempts at most
BACKOFF_FACTOR = 0.5  # seconds: delays 0.5, 1, 2 (each ± JITTER_FACTOR)
JITTER_FACTOR = 0.5


def is_transient(exc: BaseException) -> bool:
    """True for failures a second try can fix: flaky I/O, a busy or unreachable Prefect API."""
    if isinstance(exc, ConversionError):
        return False
    if isinstance(exc, TransientIOError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    try:
        import httpx

        if isinstance(exc, httpx.TransportError):
            return True
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code in _TRANSIENT_HTTP
    except ImportError:  # pragma: no cover - httpx ships with prefect
        pass
    return False


def _retry_transient(task: Task, task_run: Any, state: Any) -> bool:
    exc: BaseException | None = None
    try:
        state.result(raise_on_failure=True)
    except BaseException as e:  # noqa: BLE001 - we only classify it
        exc = e
    ok = exc is not None and is_transient(exc)
    logger = get_run_logger()
    if ok:
        logger.warning("%s: attempt %d failed with a transient error, retrying: %s: %s", task.name, task_run.run_count,
                       type(exc).__name__, exc)
    elif exc is not None:
        # the run's first ERROR line: the stage and the cause on one line (what the UI's log shows first)
        logger.error("%s failed: %s (attempt %d, not retried: %s is not transient)", task.name, one_line(exc), task_run.run_count,
                     type(exc).__name__)
    return ok


# ---------------------------------------------------------------------------------------------
# cache policy


@dataclass
class StageCachePolicy(CachePolicy):
    """Cache key = the stage's content key (the task's ``key`` input) + the task's source; nothing else, no side effect.

    It folds ``TASK_SOURCE`` in itself rather than being ``+``-ed with it because a
    ``CompoundCachePolicy`` ignores a ``None`` from one member, which would let a stage with
    no content key hit on its source alone.
    """

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        if not inputs.get("key"):
            return None
        source = TASK_SOURCE.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs)
        return record_name(inputs["stage"], inputs["key"], source)


def record_name(stage: str, key: str, source: str | None) -> str:
    """The name of a task's result record (and of its lock)."""
    return f"{stage}-{hash_objects(key, source, raise_on_failure=True)}"


def _torn(path: Path, locks: Any, key: str) -> bool:
    """A result record a killed run left half-written (Prefect writes them in place); one a live run is writing is not."""
    try:
        json.loads(path.read_bytes())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return locks is None or not locks.is_locked(key)
    return False


# ---------------------------------------------------------------------------------------------
# attempts: counted here so that a failed task's attempts reach the audit record too

_ATTEMPTS: dict[str, int] = {}
_ATTEMPTS_LOCK = threading.Lock()


def _begin_attempt(stage: str) -> None:
    from prefect.runtime import task_run

    n = int(task_run.run_count or 1)
    with _ATTEMPTS_LOCK:
        _ATTEMPTS[str(task_run.id)] = n
    get_run_logger().info("%s: attempt %d of %d", stage, n, RETRIES + 1)


def _attempts_of(task_run_id: Any) -> int:
    """How many times the task run's function started in this process (0: answered from cache)."""
    with _ATTEMPTS_LOCK:
        return _ATTEMPTS.pop(str(task_run_id), 0)


# ---------------------------------------------------------------------------------------------
# the task factory


def _run_stage(stage: str, cfg: Config, deps: dict[str, dict[str, Any]], key: str, refresh: bool = False) -> dict[str, Any]:
    """One stage of the table, run through its content cache; its record as JSON."""
    _begin_attempt(stage)
    rec = BY_NAME[stage].execute(cfg, {n: BY_NAME[n].record.from_dict(d) for n, d in deps.items()}, key, refresh=refresh)
    get_run_logger().info("%s: %s in %.3fs", stage, "cache hit" if rec.cached else "computed", rec.seconds)
    return rec.to_dict()


_OPTIONS = dict(retries=RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=BACKOFF_FACTOR), retry_jitter_factor=JITTER_FACTOR,
                retry_condition_fn=_retry_transient, persist_result=True, result_serializer="json")


def stage_task(stage: Stage) -> Task:
    """The Prefect task of one stage (named after it; its docstring is the stage's)."""
    return task(_run_stage, name=stage.name, cache_policy=StageCachePolicy(), **_OPTIONS)


def configured_tasks(*, root: Path | None = None) -> dict[str, Task]:
    """The tasks bound to the current cache dir (resolved per run, so it follows the env).

    Retry settings are read here, so a test may shorten the backoff without changing what it checks.
    """
    base = (root or cache_dir()) / "prefect"
    records = base / "results"
    locks = FlockLockManager(base / "locks")
    policy = StageCachePolicy().configure(lock_manager=locks, isolation_level="SERIALIZABLE")
    return {s.name: stage_task(s).with_options(cache_policy=policy, result_storage=records, retries=RETRIES,
                                               retry_delay_seconds=exponential_backoff(backoff_factor=BACKOFF_FACTOR)(RETRIES),
                                               retry_jitter_factor=JITTER_FACTOR) for s in STAGES}


class Orchestrated:
    """The runner's executor in a flow run: each stage as its Prefect task.

    Prefect answers from its record only while the stage's cache entry is intact and the
    record whole; otherwise the task runs with ``refresh_cache`` and overwrites it. A
    transient error while computing a key (reading the sources) is retried like a task.
    """

    def __init__(self, *, root: Path | None = None) -> None:
        self.root = root or cache_dir()
        cache.sweep_once(self.root)  # work folders and lock files of killed runs (stage cache and Prefect's)
        self.tasks = configured_tasks(root=self.root)
        self.records = self.root / "prefect" / "results"
        self.locks = FlockLockManager(self.root / "prefect" / "locks")
        self.attempts = 0

    def key(self, compute: Any) -> str:
        for attempt in range(RETRIES + 1):
            self.attempts = attempt + 1  # what the audit record says if the key cannot be computed
            try:
                return compute()
            except Exception as exc:
                if attempt == RETRIES or not is_transient(exc):
                    raise
                delay = BACKOFF_FACTOR * 2 ** attempt * (1 + JITTER_FACTOR * (2 * random.random() - 1))
                log.warning("computing a cache key failed with a transient error, retrying in %.2fs: %s", delay, exc)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def __call__(self, stage: Stage, cfg: Config, deps: dict[str, StageRecord], key: str, refresh: bool) -> StageRecord:
        t = self.tasks[stage.name]
        check = (lambda r: stage.still_valid(cfg, r)) if stage.still_valid else None
        name = record_name(stage.name, key, TASK_SOURCE.compute_key(task_ctx=_TaskOnly(t), inputs={}, flow_parameters={}))
        intact = cache.lookup(stage.name, key, root=self.root, still_valid=check) is not None
        fresh = refresh or not intact or _torn(self.records / name, self.locks, name)
        self.attempts = 0
        t0 = time.perf_counter()
        state = t.with_options(refresh_cache=fresh)(stage.name, cfg, {n: r.to_dict() for n, r in deps.items()}, key, refresh,
                                                    return_state=True)
        wall = time.perf_counter() - t0
        self.attempts = _attempts_of(state.state_details.task_run_id) if state.state_details.task_run_id else 0
        rec = stage.record.from_dict(state.result(raise_on_failure=True))  # raises the stage's own exception
        if state.name == "Cached":
            # Prefect answered from its record (the entry behind it re-checked): nothing ran
            get_run_logger().info("%s: cache hit (artifacts re-checked) in %.3fs", stage.name, wall)
            return dataclasses.replace(rec, cached=True, seconds=wall, attempts=0)
        return dataclasses.replace(rec, attempts=self.attempts)


@dataclass
class _TaskOnly:
    task: Task
