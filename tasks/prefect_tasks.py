"""Thin Prefect ``@task`` wrappers over :mod:`np2torch.tasks.stages`: names, caching, retries, logging.

Caching. Each task's cache key is the stage's content key (:mod:`np2torch.tasks.stages` ``KEYS``) plus
the task's own source (``TASK_SOURCE``), never its inputs: the inputs are a config and small
records, and hashing them would tie the key to paths. Results persist as small JSON records in
local storage under the cache dir; the big artifacts stay in the stage's own cache entry. The
policy checks that entry before Prefect may answer from its record: if any artifact no longer
hashes as recorded (or an exported file was edited), the Prefect record for that key is
dropped, so the task runs and the stage recomputes; a corrupt entry is never trusted.
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

import errno
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects

from np2torch.tasks import cache, lifecycle, stages
from np2torch.tasks.config import Config
from np2torch.tasks.errors import ConversionError, TransientIOError
from np2torch.tasks.locks import FlockLockManager
from np2torch.tasks.paths import cache_dir

__all__ = ["is_transient", "StageCachePolicy", "configured_tasks", "attempts_of", "RETRIES", "BACKOFF_FACTOR", "JITTER_FACTOR",
           "load_arrays_task", "infer_mapping_task", "validate_task", "convert_task", "verify_task", "export_task"]

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
        logger.error("%s: attempt %d failed, not retrying (%s is not transient)", task.name, task_run.run_count, type(exc).__name__)
    return ok


# ---------------------------------------------------------------------------------------------
# cache policy


@dataclass
class StageCachePolicy(CachePolicy):
    """Cache key = the stage's content key + the task's source; checks the artifacts first.

    It folds ``TASK_SOURCE`` in itself rather than being ``+``-ed with it because a
    ``CompoundCachePolicy`` ignores a ``None`` from one member, which would let a stage with
    no valid key hit on its source alone.
    """

    stage: str = ""
    records_dir: str = ""  # where Prefect stores its result records (one file per cache key)

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        args = [v for k, v in inputs.items() if k != "refresh"]
        try:
            content_key = stages.KEYS[self.stage](*args)
        except Exception as exc:  # noqa: BLE001 - the stage itself will fail and say why
            log.debug("%s: no cache key (%s); the task will run", self.stage, exc)
            return None
        source = TASK_SOURCE.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs)
        # load-arrays' record says where the source lives (paths are rebased onto it), so its
        # Prefect record is per location; the content-addressed entry behind it is shared
        where = str(stages.source_files_of(args[0])[0]) if self.stage == "load-arrays" else None
        key = f"{self.stage}-{hash_objects(content_key, source, where, raise_on_failure=True)}"
        check = stages.STILL_VALID.get(self.stage)
        if cache.lookup(self.stage, content_key, still_valid=(lambda r: check(args[0], r)) if check else None) is None:
            # missing, corrupt or edited: forget Prefect's record so the stage really reruns
            if not self.records_dir:
                return None  # records stored elsewhere: no key rather than a stale hit
            Path(self.records_dir, key).unlink(missing_ok=True)
        elif self.records_dir:
            _drop_torn_record(Path(self.records_dir, key), self.lock_manager, key)
        return key


def _drop_torn_record(path: Path, locks: Any, key: str) -> None:
    """Remove a result record a killed run left half-written (Prefect writes them in place).

    Only when no live run holds the key's lock (a writer still writing is not torn)."""
    try:
        json.loads(path.read_bytes())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        if locks is None or not locks.is_locked(key):
            log.info("removing Prefect result record %s, left half-written by a killed run", path)
            path.unlink(missing_ok=True)


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


def attempts_of(task_run_id: Any) -> int:
    """How many times the task run's function started in this process (0: answered from cache)."""
    with _ATTEMPTS_LOCK:
        return _ATTEMPTS.pop(str(task_run_id), 0)


def _done(rec: dict[str, Any], stage: str) -> dict[str, Any]:
    get_run_logger().info("%s: %s in %.3fs", stage, "cache hit" if rec.get("_cached") else "computed", rec.get("_seconds", 0.0))
    return rec


_OPTIONS = dict(retries=RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=BACKOFF_FACTOR), retry_jitter_factor=JITTER_FACTOR,
                retry_condition_fn=_retry_transient, persist_result=True, result_serializer="json")


@task(name="load-arrays", cache_policy=StageCachePolicy(stage="load-arrays"), **_OPTIONS)
def load_arrays_task(cfg: Config, refresh: bool = False) -> dict[str, Any]:
    """Describe every source array (headers, fingerprints); no bytes held in memory."""
    _begin_attempt("load-arrays")
    return _done(stages.load_arrays_stage(cfg, refresh=refresh), "load-arrays")


@task(name="infer-mapping", cache_policy=StageCachePolicy(stage="infer-mapping"), **_OPTIONS)
def infer_mapping_task(cfg: Config, loaded: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
    """Build the parameter manifest: one row per target tensor."""
    _begin_attempt("infer-mapping")
    return _done(stages.infer_mapping_stage(cfg, loaded, refresh=refresh), "infer-mapping")


@task(name="validate", cache_policy=StageCachePolicy(stage="validate"), **_OPTIONS)
def validate_task(cfg: Config, mapped: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
    """Check the manifest with pandera; report every failure at once."""
    _begin_attempt("validate")
    return _done(stages.validate_stage(cfg, mapped, refresh=refresh), "validate")


@task(name="convert-to-device", cache_policy=StageCachePolicy(stage="convert-to-device"), **_OPTIONS)
def convert_task(cfg: Config, loaded: dict[str, Any], validated: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
    """Cast, transform and write every tensor; prove it loads strictly on the device."""
    _begin_attempt("convert-to-device")
    return _done(stages.convert_stage(cfg, loaded, validated, refresh=refresh), "convert-to-device")


@task(name="verify-forward-pass", cache_policy=StageCachePolicy(stage="verify-forward-pass"), **_OPTIONS)
def verify_task(cfg: Config, converted: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
    """Run the model on the verify input and compare with the reference output."""
    _begin_attempt("verify-forward-pass")
    return _done(stages.verify_stage(cfg, converted, refresh=refresh), "verify-forward-pass")


@task(name="export", cache_policy=StageCachePolicy(stage="export"), **_OPTIONS)
def export_task(cfg: Config, loaded: dict[str, Any], validated: dict[str, Any], converted: dict[str, Any], verified: dict[str, Any],
                refresh: bool = False) -> dict[str, Any]:
    """Write model.safetensors (+ model.pt) and manifest.csv atomically, then re-check them."""
    _begin_attempt("export")
    return _done(stages.export_stage(cfg, loaded, validated, converted, verified, refresh=refresh), "export")


_TASKS = {"load-arrays": load_arrays_task, "infer-mapping": infer_mapping_task, "validate": validate_task,
          "convert-to-device": convert_task, "verify-forward-pass": verify_task, "export": export_task}


def configured_tasks(*, refresh: bool = False, root: Path | None = None) -> dict[str, Task]:
    """The six tasks bound to the current cache dir (resolved per run, so it follows the env).

    ``refresh`` makes Prefect overwrite its records instead of reading them (and the stages
    recompute, see ``refresh=`` on each task). Retry settings are read here, so a test may
    shorten the backoff without changing what it checks.
    """
    cache.sweep_once(root or cache_dir())  # work folders and lock files of killed runs (stage cache and Prefect's)
    base = (root or cache_dir()) / "prefect"
    records = base / "results"
    locks = FlockLockManager(base / "locks")
    out = {}
    for name, t in _TASKS.items():
        policy = StageCachePolicy(stage=name, records_dir=str(records)).configure(lock_manager=locks, isolation_level="SERIALIZABLE")
        out[name] = t.with_options(cache_policy=policy, result_storage=records, refresh_cache=refresh, retries=RETRIES,
                                   retry_delay_seconds=exponential_backoff(backoff_factor=BACKOFF_FACTOR)(RETRIES),
                                   retry_jitter_factor=JITTER_FACTOR)
    return out
