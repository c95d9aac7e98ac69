"""Thin Prefect ``@task`` wrappers over :mod:`tasks.stages`: names, retries, logging.

Retries are for transient I/O only (an ``OSError`` such as EIO/EAGAIN/EBUSY, or a
:class:`TransientIOError`), with exponential backoff and jitter; a shape mismatch, a schema
failure or a bad config fails once. Caching is by content, inside the stages.
"""

from __future__ import annotations

import errno
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from tasks import stages
from tasks.config import Config
from tasks.errors import ConversionError, TransientIOError

__all__ = ["is_transient", "load_arrays_task", "infer_mapping_task", "validate_task", "convert_task", "verify_task", "export_task"]

_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.EINTR, errno.ECONNRESET, errno.ESTALE}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ConversionError):
        return False
    if isinstance(exc, TransientIOError):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _retry_transient(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's callback signature
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # noqa: BLE001 - we only classify it
            exc = e
    ok = exc is not None and is_transient(exc)
    if ok:
        get_run_logger().warning("transient error, retrying: %s: %s", type(exc).__name__, exc)
    return ok


_RETRY = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=0.5), retry_jitter_factor=0.5,
              retry_condition_fn=_retry_transient, cache_policy=NO_CACHE, persist_result=False)


def _log(rec: dict[str, Any], stage: str) -> dict[str, Any]:
    from prefect.runtime import task_run

    rec["_attempts"] = int(task_run.run_count or 1)
    get_run_logger().info("%s: %s in %.3fs", stage, "cache hit" if rec.get("_cached") else "computed", rec.get("_seconds", 0.0))
    return rec


@task(name="load-arrays", **_RETRY)
def load_arrays_task(cfg: Config, refresh: bool = False) -> dict[str, Any]:
    """Describe every source array (headers, fingerprints); no bytes held in memory."""
    return _log(stages.load_arrays_stage(cfg, refresh=refresh), "load-arrays")


@task(name="infer-mapping", **_RETRY)
def infer_mapping_task(cfg: Config, loaded: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
    """Build the parameter manifest: one row per target tensor."""
    return _log(stages.infer_mapping_stage(cfg, loaded, refresh=refresh), "infer-mapping")


@task(name="validate", **_RETRY)
def validate_task(cfg: Config, mapped: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
    """Check the manifest with pandera; report every failure at once."""
    return _log(stages.validate_stage(cfg, mapped, refresh=refresh), "validate")


@task(name="convert-to-device", **_RETRY)
def convert_task(cfg: Config, loaded: dict[str, Any], validated: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
    """Cast, transform and write every tensor; prove it loads strictly on the device."""
    return _log(stages.convert_stage(cfg, loaded, validated, refresh=refresh), "convert-to-device")


@task(name="verify-forward-pass", **_RETRY)
def verify_task(cfg: Config, converted: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
    """Run the model on the verify input and compare with the reference output."""
    return _log(stages.verify_stage(cfg, converted, refresh=refresh), "verify-forward-pass")


@task(name="export", **_RETRY)
def export_task(cfg: Config, loaded: dict[str, Any], validated: dict[str, Any], converted: dict[str, Any], verified: dict[str, Any],
                refresh: bool = False) -> dict[str, Any]:
    """Write model.safetensors (+ model.pt) and manifest.csv atomically, then re-check them."""
    return _log(stages.export_stage(cfg, loaded, validated, converted, verified, refresh=refresh), "export")
