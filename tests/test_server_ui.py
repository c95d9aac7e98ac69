"""Against a real ``prefect server start``: a batch, a served schedule, a prefect.yaml deployment
run by a process worker, and the flow run page in headless Chromium.

One server per module (its own PREFECT_HOME and a free port on 127.0.0.1), always stopped at
teardown. Every np2torch command runs as a user would run it: a subprocess with the server's
PREFECT_API_URL in its environment.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, write_batch, write_conversion  # noqa: E402
from ui.flow_run_page import capture_flow_run_page, chromium_path  # noqa: E402

pytestmark = pytest.mark.server

SERVER_START_TIMEOUT = 180  # seconds; a cold start migrates a fresh SQLite database


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT (the UI); the API is url + "/api"
    env: dict[str, str]
    log: Path

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group we started (the server's own children too), then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(root / "home"), PREFECT_API_URL=f"{url}/api", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               NP2TORCH_DATA_DIR=str(root / "np2torch-data"))
    env.pop("NP2TORCH_CACHE_DIR", None)
    env.pop("NP2TORCH_AUDIT_LOG", None)
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _healthy(f"{url}/api"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start on {url} (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Server(url=url, env=env, log=log)
    finally:
        _stop(proc)


def _cli(server: Server, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=server.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def client(prefect_server: Server) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}), get_client(sync_client=True) as c:
        yield c


@pytest.fixture(scope="module")
def ui_batch(prefect_server: Server, tmp_path_factory: pytest.TempPathFactory, example_data: Path) -> dict[str, Any]:
    """`np2torch batch` of two good conversions and a broken one, against the server."""
    root = tmp_path_factory.mktemp("ui-batch")
    cfg, out = root / "cfg", root / "out"
    convs = [write_conversion("mlp", cfg, out), write_conversion("mlp", cfg, out, name="mlp-broken", kwargs={"hidden": 17}),
             write_conversion("keras-cnn", cfg, out)]
    batch = write_batch(root / "ui-batch.yaml", convs, max_parallel=2)
    proc = _cli(prefect_server, "-m", "np2torch.cli", "batch", str(batch))
    return {"proc": proc, "out": out, "cfg": cfg, "batch": batch}


def _flow_runs(client: Any, **filters: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(**filters))


def _parent_run(client: Any, name: str) -> Any:
    """The batch run whose name starts with ``name`` (batch runs are named "<file>: N conversions, <date time>")."""
    from prefect.client.schemas.filters import FlowRunFilterName

    (run,) = [r for r in _flow_runs(client, name=FlowRunFilterName(like_=name)) if r.name.startswith(name)]
    return run


def _children(client: Any, parent_id: UUID) -> dict[str, Any]:
    from prefect.client.schemas.filters import FlowRunFilterParentFlowRunId

    return {r.name: r for r in _flow_runs(client, parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))}


def _logs(client: Any, flow_run_id: UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return [entry.message for entry in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def _artifacts(client: Any, flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    return {a.key: a
            for a in client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))}


def _table(artifact: Any) -> list[dict[str, Any]]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def _run_id(deployment_run_output: str) -> UUID:
    """The flow run that `prefect deployment run` created (the schedule adds future ones too)."""
    match = re.search(r"UUID: ([0-9a-f-]{36})", deployment_run_output)
    assert match, deployment_run_output
    return UUID(match.group(1))


def _wait_final(client: Any, flow_run_id: UUID, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run {flow_run_id} still {run.state.name if run.state else None} after {timeout}s")
        time.sleep(1)


# ---------------------------------------------------------------------------------------------


def test_batch_is_recorded_on_the_server(ui_batch: dict[str, Any], client: Any) -> None:
    proc = ui_batch["proc"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "np2torch: error: [batch] 1 of 3 conversion(s) failed: mlp-broken" in proc.stderr

    parent = _parent_run(client, "ui-batch.yaml: 3 conversions")
    assert parent.state.is_failed() and "mlp-broken" in parent.state.message
    children = _children(client, parent.id)
    assert set(children) == {"mlp", "mlp-broken", "keras-cnn"}
    assert children["mlp"].state.is_completed() and children["keras-cnn"].state.is_completed()
    assert children["mlp-broken"].state.is_failed()
    assert all(c.flow_id == children["mlp"].flow_id for c in children.values())

    # logs: the parent's progress lines, each child's stages, the failure's stage and key
    parent_logs = _logs(client, parent.id)
    assert sum(1 for m in parent_logs if m.startswith("np2torch batch [")) == 3
    assert any(m.startswith("np2torch batch [####################] 3/3") for m in parent_logs)
    assert any(m.startswith("load-arrays: computed") for m in _logs(client, children["keras-cnn"].id))
    assert any("`fc1.weight`" in m and "wrong shape" in m for m in _logs(client, children["mlp-broken"].id))

    # artifacts: the batch summary table, report and progress on the parent; manifest and summary on each child
    arts = _artifacts(client, parent.id)
    assert {"np2torch-batch-summary", "np2torch-batch-report", "np2torch-batch-progress"} <= set(arts)
    rows = {r["name"]: r for r in _table(arts["np2torch-batch-summary"])}
    assert rows["mlp"]["status"] == "success" and rows["mlp-broken"]["status"] == "failed" and rows["keras-cnn"]["status"] == "success"
    assert rows["keras-cnn"]["flow_run_id"] == str(children["keras-cnn"].id)
    assert float(arts["np2torch-batch-progress"].data) == 100.0
    assert "**Failed:** mlp-broken" in arts["np2torch-batch-report"].data

    child_arts = _artifacts(client, children["keras-cnn"].id)
    manifest = _table(child_arts["keras-cnn-manifest"])
    assert {r["target_key"] for r in manifest} >= {"conv1.weight", "fc1.weight", "bn1.running_var"}
    assert "keras-cnn — success" in child_arts["keras-cnn-summary"].data
    assert "Verification: passed" in child_arts["keras-cnn-summary"].data
    assert "mlp-broken-validation-failures" in _artifacts(client, children["mlp-broken"].id)


def test_served_schedule_runs_when_triggered(prefect_server: Server, ui_batch: dict[str, Any], client: Any, tmp_path: Path) -> None:
    """`np2torch serve --cron` registers a scheduled deployment; `prefect deployment run` runs it."""
    batch = write_batch(tmp_path / "ui-nightly.yaml", [ui_batch["cfg"] / "mlp.yaml"])
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "np2torch.cli", "serve", str(batch), "--cron", "30 1 * * *",
                                  "--name", "ui-nightly"],
                                 cwd=REPO, env=prefect_server.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                dep = client.read_deployment_by_name("np2torch-batch/ui-nightly")
                break
            except Exception:  # noqa: BLE001 - ObjectNotFound until serve has registered it
                if serve.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve did not register its deployment:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        assert [s.schedule.cron for s in dep.schedules] == ["30 1 * * *"] and dep.schedules[0].active
        assert dep.parameters == {"batch_config": str(batch)}

        run = _cli(prefect_server, "-m", "prefect", "deployment", "run", "np2torch-batch/ui-nightly", timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        final = _wait_final(client, _run_id(run.stdout))
        assert final.state.is_completed(), log.read_text()[-3000:]
        assert final.name.startswith("ui-nightly.yaml: 1 conversion, ")
        assert set(_children(client, final.id)) == {"mlp"}
    finally:
        _stop(serve)


def test_prefect_yaml_deploys_to_a_process_pool_and_a_worker_runs_it(prefect_server: Server, ui_batch: dict[str, Any], client: Any,
                                                                    tmp_path: Path) -> None:
    pool = _cli(prefect_server, "-m", "prefect", "work-pool", "create", "np2torch-process", "--type", "process", timeout=120)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = _cli(prefect_server, "-m", "prefect", "--no-prompt", "deploy", "--all", timeout=180)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    dep = client.read_deployment_by_name("np2torch-batch/nightly")
    assert dep.work_pool_name == "np2torch-process"
    assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]

    # run it now on a private batch (the declared one would write into the repository's data/)
    batch = write_batch(tmp_path / "pool-batch.yaml", [ui_batch["cfg"] / "mlp.yaml"])
    run = _cli(prefect_server, "-m", "prefect", "deployment", "run", "np2torch-batch/nightly", "--param", f"batch_config={batch}",
               timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    worker = _cli(prefect_server, "-m", "prefect", "worker", "start", "--pool", "np2torch-process", "--run-once", timeout=400)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    final = _wait_final(client, _run_id(run.stdout), timeout=60)
    assert final.state.is_completed(), worker.stdout[-3000:] + worker.stderr[-3000:]
    assert final.name.startswith("pool-batch.yaml: 1 conversion, ") and set(_children(client, final.id)) == {"mlp"}


@pytest.mark.browser
def test_flow_run_page_shows_the_run_and_its_artifact(prefect_server: Server, ui_batch: dict[str, Any], client: Any) -> None:
    if chromium_path() is None:
        pytest.skip("Chromium is not installed (/usr/bin/chromium); install it with `apt-get install -y chromium`")
    pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium through Playwright (pip install playwright)")
    parent = _parent_run(client, "ui-batch.yaml: 3 conversions")
    shots = Path(os.environ.get("NP2TORCH_UI_SCREENSHOTS", REPO / "data" / "ui-screenshots"))
    seen = capture_flow_run_page(prefect_server.url, str(parent.id), parent.name, "np2torch-batch-summary",
                                 shots / "batch-flow-run.png", row_text="mlp-broken")
    assert seen["run_name"] and seen["artifact"] and seen["row"] == "mlp-broken"
    for shot in seen["screenshots"]:
        assert Path(shot).stat().st_size > 10_000  # a rendered page, not an empty image
        print(f"\nUI screenshot: {shot}")
