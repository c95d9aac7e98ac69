"""End to end under the Prefect test harness: the flow's cache states, audit record and UI artifacts."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from conftest import flip_byte, tiny_arrays
from np2torch.cli import main
from np2torch.tasks import audit, stages


def _sha(p: str | Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _task_states(run_id: str) -> dict[str, str]:
    """Prefect's own view: stage name → final state name of its task run in this flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # task-run states reach the API as events, recorded asynchronously by the server: wait for the final ones
    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            if all(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    return {r.name.rsplit("-", 1)[0]: r.state.name if r.state else "no state recorded" for r in runs}


def _artifact(key: str, run_id: str):  # noqa: ANN202 - prefect's Artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                                     flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert len(found) == 1, (key, found)
    return found[0]


def test_convert_flow_caches_audits_and_publishes(tiny, prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from np2torch.flows.convert import convert_config

    config = tiny("conv", npy_dir=True)

    # 1. first run: every stage computed; report.json is the audit record
    first = convert_config(config)
    assert first["status"] == "success"
    assert not any(s["cached"] for s in first["stages"].values())
    assert set(_task_states(first["run_id"]).values()) == {"Completed"}
    report = json.loads((config.parent / "out" / "report.json").read_text())
    assert report == json.loads(json.dumps(first, default=str))
    assert audit.read_records()[0][-1]["run_id"] == first["run_id"]
    for key in ("run_id", "name", "started_at", "finished_at", "status", "config_sha256", "inputs", "mapping_sha256", "outputs",
                "verification", "stages", "versions", "error"):
        assert key in first, key
    assert first["verification"]["passed"] and first["verification"]["max_abs_error"] <= 1e-6
    outputs = {o["path"]: o["sha256"] for o in first["outputs"]}
    assert {p: _sha(p) for p in outputs} == outputs

    # 2. rerun: Prefect answers every stage from its cache (state "Cached"), outputs unchanged
    second = convert_config(config)
    assert _task_states(second["run_id"]) == {s: "Cached" for s in stages.NAMES}
    assert all(s["cached"] and s["attempts"] == 0 for s in second["stages"].values())
    assert {o["path"]: o["sha256"] for o in second["outputs"]} == outputs

    # 3. a corrupt cache entry is never trusted, even though Prefect holds a record for its key
    entry = Path(second["stages"]["convert-to-device"]["key"])
    artifact = next(Path(p) for p in (tmp_path / "np2torch-data" / "cache" / "convert-to-device").glob(f"{entry.name}/model.safetensors"))
    flip_byte(artifact)
    third = convert_config(config)
    states = _task_states(third["run_id"])
    assert states.pop("convert-to-device") == "Completed"
    # the exported model.safetensors is a hard link of that artifact: it was damaged too
    assert states.pop("export") == "Completed"
    assert set(states.values()) == {"Cached"}
    assert not third["stages"]["convert-to-device"]["cached"]
    assert {o["path"]: o["sha256"] for o in third["outputs"]} == outputs

    # 4. --refresh recomputes everything
    fourth = convert_config(config, refresh=True)
    assert set(_task_states(fourth["run_id"]).values()) == {"Completed"}
    assert not any(s["cached"] for s in fourth["stages"].values())
    assert {p: _sha(p) for p in outputs} == outputs

    # 4b. result records a killed run left half-written are not read (nor deleted): the tasks run with
    #     refresh_cache, answer from the intact stage cache and write whole records again
    results = tmp_path / "np2torch-data" / "cache" / "prefect" / "results"
    for f in results.iterdir():
        f.write_bytes(f.read_bytes()[:20])
    fifth = convert_config(config)
    assert set(_task_states(fifth["run_id"]).values()) == {"Completed"}
    assert all(s["cached"] for s in fifth["stages"].values()) and {p: _sha(p) for p in outputs} == outputs
    assert set(_task_states(convert_config(config)["run_id"]).values()) == {"Cached"}

    # 5. the UI: markdown summary (inputs, outputs with hashes, verification, cache hits) and the manifest table
    md = _artifact("tiny-summary", second["run_id"])
    assert md.type == "markdown"
    assert "cache hits 6/6" in md.data and "| export | hit |" in md.data and "Verification: passed" in md.data
    for sha in outputs.values():
        assert sha in md.data
    assert all(i["sha256"] in md.data for i in second["inputs"])
    table = _artifact("tiny-manifest", second["run_id"])
    rows = json.loads(table.data)
    assert table.type == "table"
    assert sorted(r["target_key"] for r in rows if r["target_key"]) == sorted([*tiny_arrays(), "bn.num_batches_tracked"])

    # 6. a failed validation: failure table in the UI, failed record with the error in the log
    from np2torch.tasks.errors import ValidationError

    with pytest.raises(ValidationError):
        convert_config(config, ["model.kwargs.hidden=7", "name=tiny-bad"])
    failed = audit.read_records()[0][-1]
    assert failed["status"] == "failed" and failed["error"]["stage"] == "validate"
    assert failed["stages"]["validate"]["failed"] and failed["stages"]["load-arrays"]["cached"]
    bad_table = json.loads(_artifact("tiny-bad-validation-failures", failed["run_id"]).data)
    assert {r["key"] for r in bad_table} >= {"fc1.weight", "fc1.bias", "fc2.weight"}
    assert "Failed in `validate`" in _artifact("tiny-bad-summary", failed["run_id"]).data
    # the failed run's state message names the stage, the key and the cause (no click needed);
    # runs carry the conversion's name, dtype and device as tags
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        bad_run = client.read_flow_run(failed["run_id"])
        good_run = client.read_flow_run(second["run_id"])
    assert bad_run.state.is_failed()
    assert bad_run.state.message.startswith("tiny-bad failed in validate, `fc1.weight`: the manifest fails"), bad_run.state.message
    assert {"tiny-bad", "dtype:float32", "device:cpu"} <= set(bad_run.tags)
    assert {"tiny", "dtype:float32", "device:cpu"} <= set(good_run.tags)
    # a progress artifact per conversion, at 100 % when it succeeded
    progress = _artifact("tiny-progress", first["run_id"])
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert float(_artifact("tiny-bad-progress", failed["run_id"]).data) < 100.0
    # the manifest table keeps to the columns that fit a 1440 px screen
    assert list(rows[0]) == ["target_key", "source_key", "transform", "target_shape", "status", "confidence"]

    # 7. the audit log proves the outputs until one is modified
    assert main(["audit", "--verify"]) == 0
    capsys.readouterr()
    manifest_csv = next(p for p in outputs if p.endswith("manifest.csv"))
    with open(manifest_csv, "a") as fh:
        fh.write("extra,row\n")
    assert main(["audit", "--verify"]) == 1
    assert f"output {manifest_csv} changed" in capsys.readouterr().err


SLOW_MODEL = '''
import time
import torch
from torch import nn


class SlowMLP(nn.Module):
    """Builds slowly (like a big model's constructor), so two runs overlap in the mapping stage."""

    def __init__(self):
        super().__init__()
        time.sleep(3.0)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
'''


def test_two_identical_flows_at_once_compute_each_stage_once(prefect_harness, tmp_path: Path) -> None:
    """Two conversions of the same config started together: the stage lock makes the second
    wait for the first and reuse its entries, so every stage is computed exactly once."""
    import threading

    import numpy as np
    import yaml

    from np2torch.flows.convert import convert_config

    rng = np.random.default_rng(3)
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    np.savez(tmp_path / "w.npz", **{"fc1.weight": rng.standard_normal((6, 4)).astype("float32"), "fc1.bias": np.zeros(6, "float32"),
                                    "fc2.weight": rng.standard_normal((3, 6)).astype("float32"), "fc2.bias": np.zeros(3, "float32")})
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(yaml.safe_dump({"name": "slow", "source": {"path": "w.npz"}, "model": {"target": "slow_model.py:SlowMLP"},
                                   "mapping": {"strategy": "name"}, "verify": {"input": {"shape": [2, 4]}},
                                   "export": {"dir": "out"}}))
    records: list[dict] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        try:
            start.wait(30)
            records.append(convert_config(cfg))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert [r["status"] for r in records] == ["success", "success"]
    for stage in stages.NAMES:
        computed = [not r["stages"][stage]["cached"] for r in records]
        assert sum(computed) == 1, (stage, [r["stages"][stage] for r in records])
    assert records[0]["outputs"] == records[1]["outputs"]
