"""``np2torch batch``: parent and child flow runs, max_parallel, failures, artifacts, Dask."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest

from conftest import REPO, write_batch, write_conversion
from np2torch.cli import main
from np2torch.flows.batch import BatchError, make_task_runner, plan_batch, run_batch, summary_row
from np2torch.flows.serve import build_deployment, check_cron
from np2torch.tasks.config import load_batch_config, load_config
from np2torch.tasks.errors import ConfigError


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# plain logic (no Prefect)


def test_plan_names_jobs_after_their_conversions_and_keeps_broken_ones(tmp_path: Path, example_data: Path) -> None:
    a = write_conversion("mlp", tmp_path / "cfg", tmp_path / "out")
    b = write_conversion("keras-cnn", tmp_path / "cfg", tmp_path / "out")
    broken = tmp_path / "cfg" / "typo.yaml"
    broken.write_text("name: typo\nsourse: {}\n")
    jobs = plan_batch(load_batch_config(write_batch(tmp_path / "b.yaml", [a, broken, b])))
    assert [j["name"] for j in jobs] == ["mlp", "typo", "keras-cnn"]  # the file's order; a broken config is its own failure
    assert jobs[0]["config_path"] == str(a.resolve())


def test_plan_rejects_two_conversions_with_one_name(tmp_path: Path, example_data: Path) -> None:
    a = write_conversion("mlp", tmp_path / "one", tmp_path / "out1")
    b = write_conversion("mlp", tmp_path / "two", tmp_path / "out2")
    with pytest.raises(ConfigError, match=r"both named 'mlp'.*\n.*Fix: give every conversion of a batch its own `name:`"):
        plan_batch(load_batch_config(write_batch(tmp_path / "b.yaml", [a, b])))


def test_plan_rejects_two_conversions_writing_one_folder(tmp_path: Path, example_data: Path) -> None:
    a = write_conversion("mlp", tmp_path / "cfg", tmp_path / "out")
    b = write_conversion("keras-cnn", tmp_path / "cfg", tmp_path / "out")
    b.write_text(b.read_text().replace(str(tmp_path / "out" / "keras-cnn"), str(tmp_path / "out" / "mlp")))
    with pytest.raises(ConfigError, match=r"both export to .*out/mlp"):
        plan_batch(load_batch_config(write_batch(tmp_path / "b.yaml", [a, b])))


def test_bundled_batch_config_lists_every_example(example_data: Path) -> None:
    jobs = plan_batch(load_batch_config(REPO / "configs" / "batch.yaml"))
    assert [j["name"] for j in jobs] == ["mlp", "seed-flat", "seed-layers", "seed-pickled", "keras-cnn", "mlp-fp16"]
    # the float16 entry: the MLP's config once more, under its own name and next to the others' outputs
    fp16 = load_config(jobs[-1]["config_path"], jobs[-1]["overrides"])
    assert Path(jobs[-1]["config_path"]) == REPO / "configs" / "examples" / "mlp.yaml"
    assert fp16.convert.dtype == "float16" and (fp16.verify.atol, fp16.verify.rtol) == (1e-2, 1e-2)
    assert fp16.export.dir == REPO / "data" / "out" / "mlp-fp16"
    assert load_config(jobs[0]["config_path"]).export.dir == REPO / "data" / "out" / "mlp"


def test_entry_overrides_apply_after_the_batch_wide_ones_as_convert_set_does(tmp_path: Path, example_data: Path) -> None:
    a = write_conversion("mlp", tmp_path / "cfg", tmp_path / "out")
    entry = {"config": str(a), "set": ["name=mlp-fp16", "convert.dtype=float16", "export.dir=fp16"]}
    batch = write_batch(tmp_path / "b.yaml", [a, entry], set=["convert.dtype=bfloat16", "verify.atol=1e-3"])
    bc = load_batch_config(batch)
    assert [c.config for c in bc.conversions] == [a.resolve(), a.resolve()]
    jobs = plan_batch(bc)
    assert jobs == [
        {"name": "mlp", "config_path": str(a.resolve()), "overrides": ["convert.dtype=bfloat16", "verify.atol=1e-3"]},
        {"name": "mlp-fp16", "config_path": str(a.resolve()),
         "overrides": ["convert.dtype=bfloat16", "verify.atol=1e-3", "name=mlp-fp16", "convert.dtype=float16", "export.dir=fp16"]},
    ]
    plain, fp16 = (load_config(j["config_path"], j["overrides"]) for j in jobs)
    assert (plain.convert.dtype, plain.verify.atol, plain.export.dir) == ("bfloat16", 1e-3, tmp_path / "out" / "mlp")
    # the entry's own value wins; a relative path resolves against the conversion config's folder
    assert (fp16.convert.dtype, fp16.verify.atol, fp16.export.dir) == ("float16", 1e-3, tmp_path / "cfg" / "fp16")
    # what the child flow gets is exactly `np2torch convert CONFIG --set ...`: same config, same digest
    assert fp16.digest() == load_config(a, jobs[1]["overrides"]).digest() != plain.digest()


def test_overrides_that_repeat_a_name_or_folder_are_rejected(tmp_path: Path, example_data: Path) -> None:
    a = write_conversion("mlp", tmp_path / "cfg", tmp_path / "out")
    same_name = write_batch(tmp_path / "n.yaml", [a, {"config": str(a), "set": ["convert.dtype=float16"]}])
    with pytest.raises(ConfigError, match=r"conversions\[0\] \(.*mlp.yaml\) and conversions\[1\] \(.*mlp.yaml\) are both named 'mlp'"):
        plan_batch(load_batch_config(same_name))
    same_dir = write_batch(tmp_path / "d.yaml", [a, {"config": str(a), "set": ["name=mlp-fp16"]}])
    with pytest.raises(ConfigError, match=r"conversions\[1\] .* both export to .*out/mlp\n.*Fix: .*export.dir"):
        plan_batch(load_batch_config(same_dir))
    # a whole-batch override that names every conversion alike is caught the same way
    b = write_conversion("keras-cnn", tmp_path / "cfg", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"both named 'x'"):
        plan_batch(load_batch_config(write_batch(tmp_path / "w.yaml", [a, b], set=["name=x"])))


@pytest.mark.parametrize(("entry", "message"), [
    ({"set": ["name=x"], "sett": ["convert.dtype=float16"]},
     r"conversions\[1\] \(.*mlp.yaml\) is not a valid config:\n  - unknown key `sett`"),
    ({"set": ["convert.dtype"]}, r"conversions\[1\] \(.*mlp.yaml\).*\n.*'convert.dtype' must look like KEY=VALUE"),
    ({"set": ["name=x", "convert.dtyp=float16"]}, r"conversions\[1\] \(.*mlp.yaml\) with set \['name=x', 'convert.dtyp=float16'\]: "
                                                   r"(?s:.*)unknown key `convert.dtyp`"),
    ({"set": ["name=x", "convert.dtype=float8"]}, r"conversions\[1\] \(.*mlp.yaml\) with set .*(?s:.*)`convert.dtype`: Input should be"),
])
def test_a_bad_entry_or_override_names_the_entry_and_exits_2(tmp_path: Path, example_data: Path, capsys: pytest.CaptureFixture[str],
                                                            entry: dict, message: str) -> None:
    a = write_conversion("mlp", tmp_path / "cfg", tmp_path / "out")
    batch = write_batch(tmp_path / "b.yaml", [a, {"config": str(a), **entry}])
    with pytest.raises(ConfigError, match=message):
        plan_batch(load_batch_config(batch))
    assert main(["batch", str(batch)]) == 2  # before Prefect starts: no flow run, no outputs
    err = capsys.readouterr().err
    assert "conversions[1]" in err and not (tmp_path / "out").exists()


def test_a_bad_batch_wide_override_is_a_batch_error(tmp_path: Path, example_data: Path) -> None:
    a = write_conversion("mlp", tmp_path / "cfg", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"`set`: Value error, 'fp16' must look like KEY=VALUE"):
        load_batch_config(write_batch(tmp_path / "b.yaml", [a], set=["fp16"]))
    with pytest.raises(ConfigError, match=r"conversions\[0\] \(.*mlp.yaml\) with set \['verify.atoll=1'\]"):
        plan_batch(load_batch_config(write_batch(tmp_path / "c.yaml", [a], set=["verify.atoll=1"])))


def test_a_broken_config_with_overrides_is_still_its_own_failure(tmp_path: Path, example_data: Path) -> None:
    """Overrides are blamed only when the config loads without them."""
    broken = tmp_path / "cfg" / "typo.yaml"
    broken.parent.mkdir(parents=True)
    broken.write_text("name: typo\nsourse: {}\n")
    jobs = plan_batch(load_batch_config(write_batch(tmp_path / "b.yaml", [broken, {"config": str(broken), "set": ["name=typo-2"]}])))
    assert [j["name"] for j in jobs] == ["typo", "typo-2"]
    assert jobs[1]["overrides"] == ["name=typo-2"]


def test_task_runner_follows_config_and_cli(tmp_path: Path, example_data: Path) -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    a = write_conversion("mlp", tmp_path / "cfg", tmp_path / "out")
    bc = load_batch_config(write_batch(tmp_path / "b.yaml", [a], max_parallel=3, dask_workers=4))
    thread = make_task_runner(bc)
    assert isinstance(thread, ThreadPoolTaskRunner) and thread._max_workers == 3
    local = make_task_runner(bc, "local")
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs["n_workers"] == 4 and local.cluster_kwargs["processes"] is True
    remote = make_task_runner(bc, "tcp://10.0.0.5:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    from_config = make_task_runner(load_batch_config(write_batch(tmp_path / "c.yaml", [a], task_runner="dask", dask_address="tcp://h:1")))
    assert isinstance(from_config, DaskTaskRunner) and from_config.address == "tcp://h:1"


def test_what_travels_to_dask_workers_pickles(tmp_path: Path, example_data: Path) -> None:
    """Configs (pydantic, with the private raw copy the digest covers) and batch errors survive pickling."""
    import cloudpickle

    cfg = load_config(write_conversion("keras-cnn", tmp_path / "cfg", tmp_path / "out"))
    for dumps in (pickle.dumps, cloudpickle.dumps):
        back = pickle.loads(dumps(cfg))
        assert back == cfg and back.digest() == cfg.digest() and back._raw == cfg._raw
    err = pickle.loads(pickle.dumps(BatchError("1 of 2 conversion(s) failed: x", rows=[{"name": "x"}], fix="see x")))
    assert err.rows == [{"name": "x"}] and "Fix: see x" in str(err)


def test_summary_row_reads_an_audit_record() -> None:
    record = {"seconds": 1.23456, "stages": {"load-arrays": {"cached": True}, "export": {"cached": False}},
              "verification": {"passed": True, "reference": True, "max_abs_error": 1.5e-7, "max_rel_error": 2e-6},
              "outputs": [{"path": "/o/m/model.safetensors"}, {"path": "/o/m/manifest.csv"}]}
    row = summary_row("m", record, status="success", flow_run_id="abc")
    assert row == {"name": "m", "status": "success", "seconds": 1.23, "cache_hits": "1/2",
                   "verification": "passed (max abs 1.5e-07, max rel 2e-06)", "outputs": "/o/m/{model.safetensors, manifest.csv}",
                   "error": "", "flow_run_id": "abc"}


def test_serve_checks_cron_and_batch_before_prefect(tmp_path: Path, example_data: Path) -> None:
    with pytest.raises(ConfigError, match=r"(?s)`--cron`: 'every night' is not a valid cron schedule "
                                          r"\(expected five fields.*Fix: quote it"):
        check_cron("every night")
    a = write_conversion("mlp", tmp_path / "cfg", tmp_path / "out")
    batch = write_batch(tmp_path / "nightly.yaml", [a])
    dep = build_deployment(batch, cron="0 2 * * *")
    assert dep.name == "nightly" and dep.entrypoint == "np2torch.flows.batch.batch_flow"
    assert dep.parameters == {"batch_config": str(batch.resolve())}
    assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("conversions: []\nmax_paralel: 2\n")
    assert main(["serve", str(bad), "--cron", "0 2 * * *"]) == 2


def test_prefect_yaml_declares_the_nightly_batch_on_a_process_pool() -> None:
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    assert dep["work_pool"]["name"] == "np2torch-process"
    check_cron(dep["schedules"][0]["cron"])
    assert (REPO / dep["parameters"]["batch_config"]).is_file()
    flow_obj = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
    assert flow_obj.name == "np2torch-batch"
    assert set(dep["parameters"]) <= set(flow_obj.parameters.properties)


def test_cli_rejects_a_bad_batch_config_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("conversions: []\nmax_parallel: 0\n")
    assert main(["batch", str(bad)]) == 2
    assert "max_parallel" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# flows under the Prefect test harness


def test_batch_runs_children_in_parallel_and_survives_a_failure(tmp_path: Path, example_data: Path, prefect_harness,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client

    cfg, out = tmp_path / "cfg", tmp_path / "out"
    convs = [write_conversion("mlp", cfg, out), write_conversion("mlp", cfg, out, name="mlp-broken", kwargs={"hidden": 17}),
             write_conversion("keras-cnn", cfg, out)]
    batch = write_batch(tmp_path / "three.yaml", convs, max_parallel=2)

    code = main(["batch", str(batch)])
    captured = capsys.readouterr()
    assert code == 1
    assert "np2torch: error: [batch] 1 of 3 conversion(s) failed: mlp-broken" in captured.err
    assert "np2torch batch [####################] 3/3" in captured.err  # the terminal progress line
    assert re.search(r"^keras-cnn +success +[0-9.]+ +0/6 +passed", captured.out, re.M)
    assert re.search(r"^mlp-broken +failed ", captured.out, re.M)
    assert "mlp-broken: [validate] `fc1.weight`: the manifest fails" in captured.err  # its own message, stage and key
    # the others converted and verified despite the failure
    for name in ("mlp", "keras-cnn"):
        assert (out / name / "model.safetensors").is_file() and (out / name / "report.json").is_file()
    assert not (out / "mlp-broken").exists()

    rows = Artifact.get("np2torch-batch-summary").data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["mlp", "mlp-broken", "keras-cnn"]
    assert by_name["mlp"]["status"] == "success" and by_name["keras-cnn"]["cache_hits"] == "0/6"
    assert by_name["mlp"]["verification"].startswith("passed (max abs")
    assert "model.safetensors" in by_name["keras-cnn"]["outputs"]
    assert by_name["mlp-broken"]["status"] == "failed" and "fc1.weight" in by_name["mlp-broken"]["error"]

    with get_client(sync_client=True) as client:
        children = {r["name"]: client.read_flow_run(UUID(r["flow_run_id"])) for r in rows}
        parents = set()
        for name, child in children.items():
            assert child.name == name  # each child flow run is named after its conversion
            assert child.parent_task_run_id is not None
            parents.add(client.read_task_run(child.parent_task_run_id).flow_run_id)
        (parent_id,) = parents  # all children of one parent run
        parent = client.read_flow_run(parent_id)
        # each batch run its own name (date and time) and tags, like the conversions (which carry them too)
        assert re.fullmatch(r"three\.yaml: 3 conversions, \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", parent.name), parent.name
        assert parent.state.is_failed() and {"np2torch", "batch", "batch:three"} <= set(parent.tags)
        assert {"mlp", "batch:three"} <= set(children["mlp"].tags)
        # the failed run's first ERROR line says the stage and the cause on one line
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel

        errors, deadline = [], time.monotonic() + 30
        while not errors and time.monotonic() < deadline:  # Prefect ships logs to the API in batches: wait for them
            errors = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[children["mlp-broken"].id]),
                                                level=LogFilterLevel(ge_=40)))
            if not errors:
                time.sleep(0.5)
        assert errors, "no ERROR line reached the API for the failed conversion"
        first = min(errors, key=lambda log: log.timestamp).message
        assert first.startswith("validate failed: [validate] `fc1.weight`: the manifest fails") and "\n" not in first, first
        assert "\n" not in children["mlp-broken"].state.message and "failed in validate" in children["mlp-broken"].state.message
        assert children["mlp"].state.is_completed() and children["keras-cnn"].state.is_completed()
        assert children["mlp-broken"].state.is_failed()
        # never more than max_parallel children at once
        spans = sorted((c.start_time, c.end_time) for c in children.values())
        overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
        assert overlap <= 2
        progress = [a for a in client.read_artifacts() if a.type == "progress" and a.flow_run_id == parent_id]
        assert [float(a.data) for a in progress] == [100.0]
        # each conversion's own progress artifact, at 100 % when it succeeded
        for name in ("mlp", "keras-cnn"):
            mine = [a for a in client.read_artifacts() if a.key == f"{name}-progress" and a.flow_run_id == children[name].id]
            assert [float(a.data) for a in mine] == [100.0]
        # the progress lines reach the run's logs once each (and the terminal once, above)
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        def progress_lines() -> int:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[parent_id])))
            return sum(1 for lg in logs if lg.message.startswith("np2torch batch ["))

        deadline = time.monotonic() + 15  # logs reach the API in batches, shortly after the run ends
        while progress_lines() < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert progress_lines() == 3
    assert captured.err.count("np2torch batch [") == 3


def test_an_entry_runs_the_same_config_again_with_its_overrides(tmp_path: Path, example_data: Path, prefect_harness) -> None:
    from prefect.client.orchestration import get_client
    from safetensors import safe_open

    a = write_conversion("mlp", tmp_path / "cfg", tmp_path / "out")
    fp16 = {"config": str(a), "set": ["name=mlp-fp16", "convert.dtype=float16", "verify.atol=1e-2", "verify.rtol=1e-2",
                                      "export.dir=../out/mlp-fp16"]}
    rows, failure = run_batch(write_batch(tmp_path / "b.yaml", [a, fp16]))
    assert failure is None and [(r["name"], r["status"]) for r in rows] == [("mlp", "success"), ("mlp-fp16", "success")]
    dtypes = {}
    for name in ("mlp", "mlp-fp16"):
        with safe_open(str(tmp_path / "out" / name / "model.safetensors"), "pt") as f:
            dtypes[name] = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"mlp": {"F32"}, "mlp-fp16": {"F16"}}
    report = json.loads((tmp_path / "out" / "mlp-fp16" / "report.json").read_text())
    assert report["config"]["name"] == "mlp-fp16"
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(UUID(rows[1]["flow_run_id"])).name == "mlp-fp16"


def test_batch_reuses_the_cache_on_a_second_run(tmp_path: Path, example_data: Path, prefect_harness) -> None:
    batch = write_batch(tmp_path / "b.yaml", [write_conversion("mlp", tmp_path / "cfg", tmp_path / "out")])
    first, failure = run_batch(batch)
    assert failure is None and first[0]["cache_hits"] == "0/6"
    second, _ = run_batch(batch)
    assert second[0]["cache_hits"] == "6/6" and second[0]["outputs"] == first[0]["outputs"]
    third, _ = run_batch(batch, refresh=True)
    assert third[0]["cache_hits"] == "0/6"


def test_a_crashed_conversion_task_is_reported_and_the_batch_goes_on(tmp_path: Path, example_data: Path, prefect_harness,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a conversion failure but the task around it dying (as when a Dask worker is lost)."""
    import np2torch.flows.batch as batch_mod

    def unreadable(**lookup: str) -> dict:
        raise OSError("audit log unreadable")

    monkeypatch.setattr(batch_mod.audit, "last_record", unreadable)  # only consulted for a failed conversion
    cfg, out = tmp_path / "cfg", tmp_path / "out"
    batch = write_batch(tmp_path / "b.yaml", [write_conversion("mlp", cfg, out, name="mlp-broken", kwargs={"hidden": 17}),
                                              write_conversion("mlp", cfg, out)], max_parallel=1)
    rows, failure = run_batch(batch)
    assert isinstance(failure, BatchError) and str(failure).startswith("[batch] 1 of 2 conversion(s) failed: mlp-broken")
    assert rows[0]["status"] == "failed" and "audit log unreadable" in rows[0]["error"]
    assert rows[1]["status"] == "success" and (out / "mlp" / "model.safetensors").is_file()


@pytest.mark.slow
def test_dask_local_cluster_gives_identical_outputs(tmp_path: Path, example_data: Path, prefect_harness,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Dask worker processes convert four examples; every output file equals the thread-pool run's."""
    import time

    from distributed import Client, LocalCluster

    names = ["mlp", "seed-flat", "seed-pickled", "keras-cnn"]
    out = tmp_path / "out"
    # one set of configs for both runs: the config digest is part of the safetensors metadata
    batch = write_batch(tmp_path / "four.yaml", [write_conversion(n, tmp_path / "cfg", out) for n in names], max_parallel=2)

    t0 = time.perf_counter()
    rows_thread, failure = run_batch(batch)
    t_thread = time.perf_counter() - t0
    assert failure is None
    out.rename(tmp_path / "out-thread")

    # a fresh cache for the Dask run, so that its workers compute every stage themselves; the
    # worker processes inherit this environment
    monkeypatch.setenv("NP2TORCH_CACHE_DIR", str(tmp_path / "cache-dask"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        rows_dask, failure = run_batch(batch, dask=cluster.scheduler_address)
        t_dask = time.perf_counter() - t0
        assert failure is None
        # the conversions ran in the worker processes, on this checkout's code
        ran = client.run(lambda: (sys.modules["np2torch.flows.convert"].__file__ if "np2torch.flows.convert" in sys.modules else None))
    assert len(ran) == 2 and any(ran.values())
    assert {f for f in ran.values() if f} == {str(REPO / "flows" / "convert.py")}
    print(f"\nthread pool: {t_thread:.1f}s, Dask LocalCluster(2 processes): {t_dask:.1f}s (cluster start excluded)")

    assert [r["status"] for r in rows_dask] == ["success"] * len(names)
    assert all(r["cache_hits"] == "0/6" for r in rows_dask)
    for name in names:
        for f in ("model.safetensors", "manifest.csv"):
            assert _sha256(out / name / f) == _sha256(tmp_path / "out-thread" / name / f), (name, f)
