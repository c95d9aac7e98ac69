"""The content-addressed stage cache: what reruns, what hits, what is never trusted.

These call the plain stages (:func:`np2torch.tasks.stages.run_all`); the Prefect layer on top of the
same keys is covered in test_flow.py.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import threading
from pathlib import Path

import pytest

from conftest import cached_stage_in_process, flip_byte
from np2torch.tasks import cache, stages
from np2torch.tasks.config import load_config

ALL = stages.STAGES


def computed(recs: dict) -> list[str]:
    """Stages that ran (not a cache hit), in pipeline order."""
    return [s for s in ALL if not recs[s]["_cached"]]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def conv(tiny) -> Path:
    """The tiny conversion, one .npy per array (a byte can be flipped in one of them)."""
    return tiny("conv", npy_dir=True)


def test_same_inputs_and_config_hit_every_stage_with_unchanged_outputs(conv: Path) -> None:
    first = stages.run_all(load_config(conv))
    assert computed(first) == ALL
    out = {o["path"]: o["sha256"] for o in first["export"]["outputs"]}
    second = stages.run_all(load_config(conv))
    assert computed(second) == []
    assert {o["path"]: o["sha256"] for o in second["export"]["outputs"]} == out
    assert {p: sha(p) for p in out} == out
    # a hit returns exactly the record the computing run returned
    for s in ALL:
        strip = lambda r: {k: v for k, v in r.items() if k not in ("_cached", "_seconds")}  # noqa: E731
        assert strip(second[s]) == strip(first[s])


def test_changed_atol_reruns_only_verify_and_export(conv: Path) -> None:
    stages.run_all(load_config(conv))
    again = stages.run_all(load_config(conv, ["verify.atol=1e-5"]))
    assert computed(again) == ["verify-forward-pass", "export"]
    assert again["verify-forward-pass"]["metrics"]["atol"] == 1e-5


def test_changed_mapping_rule_reruns_mapping_onwards_not_load_arrays(conv: Path) -> None:
    stages.run_all(load_config(conv))
    # the same mapping written as an explicit rule: a different mapping spec, same result
    again = stages.run_all(load_config(conv, ["mapping.rules=[{source: 'fc1\\.weight', target: fc1.weight}]"]))
    assert computed(again) == ALL[1:]


def test_changed_byte_in_a_source_file_reruns_everything(conv: Path) -> None:
    stages.run_all(load_config(conv))
    flip_byte(conv.parent / "weights" / "fc2.bias.npy")  # a mantissa bit of the last value
    again = stages.run_all(load_config(conv, ["verify.reference_output=null"]))
    assert computed(again) == ALL
    # and the changed file is what the fingerprint saw
    entry = next(i for i in again["load-arrays"]["inputs"] if i["path"].endswith("fc2.bias.npy"))
    assert entry["sha256"] == sha(conv.parent / "weights" / "fc2.bias.npy")


def test_changed_byte_in_the_verify_input_reruns_verify_and_export_only(conv: Path) -> None:
    stages.run_all(load_config(conv, ["verify.reference_output=null"]))
    flip_byte(conv.parent / "input.npy")
    again = stages.run_all(load_config(conv, ["verify.reference_output=null"]))
    assert computed(again) == ["verify-forward-pass", "export"]


def test_same_bytes_at_another_path_still_hit(conv: Path, tmp_path: Path) -> None:
    first = stages.run_all(load_config(conv))
    moved = tmp_path / "elsewhere" / "weights-copy"
    shutil.copytree(conv.parent / "weights", moved)
    again = stages.run_all(load_config(conv, [f"source.path={moved}"]))
    assert computed(again) == []
    # the array table is rebased onto where the source lives now
    assert {Path(r.file).parent for r in stages.read_records(again["load-arrays"])} == {moved}
    assert [o["sha256"] for o in again["export"]["outputs"]] == [o["sha256"] for o in first["export"]["outputs"]]


def test_refresh_recomputes_everything(conv: Path) -> None:
    first = stages.run_all(load_config(conv))
    again = stages.run_all(load_config(conv), refresh=True)
    assert computed(again) == ALL
    assert [o["sha256"] for o in again["export"]["outputs"]] == [o["sha256"] for o in first["export"]["outputs"]]


def cfg_out(records: dict) -> Path:
    return Path(next(o["path"] for o in records["export"]["outputs"] if o["path"].endswith("model.safetensors")))


@pytest.mark.parametrize("damage", ["corrupt", "delete", "record"])
def test_corrupt_or_deleted_cache_entry_is_recomputed_never_trusted(conv: Path, damage: str) -> None:
    first = stages.run_all(load_config(conv))
    entry = Path(first["convert-to-device"]["_entry"])
    artifact = entry / "model.safetensors"
    good = sha(artifact)
    if damage == "corrupt":
        flip_byte(artifact)  # same size, same inode, same timestamp tick: only the hash can tell
    elif damage == "delete":
        artifact.unlink()
    else:
        (entry / "record.json").write_text("{not json")
    assert cache.lookup("convert-to-device", first["convert-to-device"]["key"]) is None
    again = stages.run_all(load_config(conv))
    # the exported model.safetensors is a hard link of the converted file (no 2nd copy of a big
    # model), so damage to that inode shows in the export too and export reruns as well
    linked = os.path.samefile(artifact, cfg_out(first)) if damage == "corrupt" else False
    assert computed(again) == (["convert-to-device", "export"] if linked else ["convert-to-device"])
    assert sha(artifact) == good
    assert [o["sha256"] for o in again["export"]["outputs"]] == [o["sha256"] for o in first["export"]["outputs"]]


def test_edited_export_file_reruns_export(conv: Path) -> None:
    first = stages.run_all(load_config(conv))
    manifest_csv = Path(next(o["path"] for o in first["export"]["outputs"] if o["path"].endswith("manifest.csv")))
    good = sha(manifest_csv)
    manifest_csv.write_text("tampered\n")
    again = stages.run_all(load_config(conv))
    assert computed(again) == ["export"]
    assert sha(manifest_csv) == good


def test_key_covers_what_the_stage_reads_and_nothing_else(conv: Path) -> None:
    cfg = load_config(conv)
    loaded = stages.load_arrays_stage(cfg)
    base = stages.KEYS["infer-mapping"](cfg, loaded)
    assert stages.KEYS["infer-mapping"](load_config(conv, ["verify.atol=1"]), loaded) == base
    assert stages.KEYS["infer-mapping"](load_config(conv, ["export.dir=/tmp/x"]), loaded) == base
    assert stages.KEYS["infer-mapping"](load_config(conv, ["mapping.strategy=order"]), loaded) != base
    assert stages.KEYS["infer-mapping"](load_config(conv, ["convert.dtype=float16"]), loaded) != base
    assert stages.KEYS["infer-mapping"](cfg, {**loaded, "key": "0" * 64}) != base


# ---------------------------------------------------------------------------------------------
# concurrency: identical conversions started at once compute once


def test_two_threads_compute_a_stage_once(tmp_path: Path) -> None:
    calls: list[int] = []
    gate = threading.Event()

    def compute(work: Path) -> dict:
        calls.append(1)
        gate.wait(5)  # hold the lock while the other thread arrives
        (work / "blob.bin").write_bytes(b"x" * 100)
        return {"n": 1}

    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(cache.run_cached("demo", "k" * 64, compute))) for _ in range(2)]
    for t in threads:
        t.start()
    threading.Timer(0.3, gate.set).start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert sorted(r["_cached"] for r in results) == [False, True]
    assert all(r["n"] == 1 for r in results)


def test_two_processes_compute_once_the_second_waits_and_reuses(isolated_data: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    calls = tmp_path / "calls.txt"
    procs = [ctx.Process(target=cached_stage_in_process, args=(str(isolated_data), str(calls), barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(calls.read_text().split()) == 1
    assert sorted(r["cached"] for r in results) == [False, True]
    assert results[0]["pid"] == results[1]["pid"]  # both hold the one computed record


def test_two_identical_conversions_at_once_compute_each_stage_once(conv: Path) -> None:
    results: list[dict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(stages.run_all(load_config(conv)))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for s in ALL:
        assert sorted(r[s]["_cached"] for r in results) == [False, True], s


# ---------------------------------------------------------------------------------------------
# deterministic exports


def test_exports_are_byte_identical_across_export_dirs_and_copied_trees(conv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = stages.run_all(load_config(conv))
    a = {Path(o["path"]).name: o["sha256"] for o in first["export"]["outputs"]}
    # another export folder
    other = stages.run_all(load_config(conv, [f"export.dir={tmp_path / 'other-out'}"]))
    b = {Path(o["path"]).name: sha(o["path"]) for o in other["export"]["outputs"]}
    # the whole tree copied elsewhere, fresh cache: everything recomputed, same bytes
    copy = tmp_path / "copied"
    shutil.copytree(conv.parent, copy, ignore=shutil.ignore_patterns("out"))
    monkeypatch.setenv("NP2TORCH_CACHE_DIR", str(tmp_path / "fresh-cache"))
    third = stages.run_all(load_config(copy / conv.name))
    assert computed(third) == ALL
    c = {Path(o["path"]).name: sha(o["path"]) for o in third["export"]["outputs"]}
    for name in ("model.safetensors", "manifest.csv"):
        assert a[name] == b[name] == c[name], name
    meta = _st_metadata(Path(third["export"]["outputs"][0]["path"]))
    assert str(tmp_path) not in json.dumps(meta)  # no paths inside
    assert set(meta) == {"format", "np2torch_version", "config_content_sha256", "name", "source_fingerprint"}


def _st_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()
