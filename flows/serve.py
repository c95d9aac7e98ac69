"""``np2torch serve``: a scheduled batch deployment, visible and runnable from the Prefect UI.

``serve`` registers a deployment of :func:`np2torch.flows.batch.batch_flow` with a cron schedule and
then runs its scheduled (or UI-/CLI-triggered) runs in this process until stopped. The same
nightly batch can instead be deployed to a process work pool from ``prefect.yaml``
(``prefect deploy``), where any worker of the pool picks its runs up.
"""

from __future__ import annotations

from pathlib import Path

from prefect.deployments.runner import EntrypointType, RunnerDeployment

from np2torch.flows.batch import batch_flow, plan_batch
from np2torch.tasks.config import load_batch_config
from np2torch.tasks.errors import ConfigError

__all__ = ["build_deployment", "check_cron"]


def check_cron(cron: str, timezone: str = "UTC") -> str:
    """The cron string if Prefect accepts it; a ConfigError (exit 2) naming it otherwise."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValueError:
        raise ConfigError(f"{cron!r} is not a valid cron schedule", key="--cron", expected="five fields: minute hour day month weekday",
                          actual=repr(cron), fix='quote it, e.g. --cron "0 2 * * *" for 02:00 UTC every night') from None
    return cron


def build_deployment(batch_config: str | Path, *, cron: str, name: str | None = None) -> RunnerDeployment:
    """A deployment of the batch flow over ``batch_config`` on ``cron`` (checked before Prefect starts)."""
    path = Path(batch_config).resolve()
    plan_batch(load_batch_config(path))  # a broken batch file fails here, not at 02:00
    check_cron(cron)
    # a module entrypoint: the runs load `np2torch.flows.batch` from the installed package, whatever the cwd
    return batch_flow.to_deployment(name=name or path.stem, cron=cron, parameters={"batch_config": str(path)},
                                    description=f"np2torch batch over {path} ({cron}, UTC)", tags=["np2torch", "batch"],
                                    entrypoint_type=EntrypointType.MODULE_PATH)
