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

import numpy as np
import pytest

from conftest import cached_stage_in_process, flip_byte
from np2torch.tasks import cache, stages
from np2torch.tasks.config import load_config
from tiny_conversion import MODEL, make_tiny

ALL = stages.NAMES


def computed(recs: dict) -> list[str]:
    """Stages that ran (not a cache hit), in pipeline order."""
    return [s for s in ALL if not recs[s].cached]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    """The MLP(4, 6, 3) conversion (one .npy per array): its square fc2 makes the manifest use the reference."""
    return make_tiny(tmp_path / "mlp")


@pytest.fixture
def conv(tiny) -> Path:
    """The tiny conversion, one .npy per array (a byte can be flipped in one of them)."""
    return tiny("conv", npy_dir=True)


def test_same_inputs_and_config_hit_every_stage_with_unchanged_outputs(conv: Path) -> None:
    first = stages.run_all(load_config(conv))
    assert computed(first) == ALL
    out = {o["path"]: o["sha256"] for o in first["export"].outputs}
    second = stages.run_all(load_config(conv))
    assert computed(second) == []
    assert {o["path"]: o["sha256"] for o in second["export"].outputs} == out
    assert {p: sha(p) for p in out} == out
    # a hit returns exactly the record the computing run returned
    for s in ALL:
        assert second[s].own() == first[s].own() and second[s].key == first[s].key and second[s].entry == first[s].entry


def test_changed_atol_reruns_only_verify_and_export(conv: Path) -> None:
    stages.run_all(load_config(conv))
    again = stages.run_all(load_config(conv, ["verify.atol=1e-5"]))
    assert computed(again) == ["verify-forward-pass", "export"]
    assert again["verify-forward-pass"].metrics["atol"] == 1e-5


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
    entry = next(i for i in again["load-arrays"].inputs if i["path"].endswith("fc2.bias.npy"))
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
    assert [o["sha256"] for o in again["export"].outputs] == [o["sha256"] for o in first["export"].outputs]


def test_refresh_recomputes_everything(conv: Path) -> None:
    first = stages.run_all(load_config(conv))
    again = stages.run_all(load_config(conv), refresh=True)
    assert computed(again) == ALL
    assert [o["sha256"] for o in again["export"].outputs] == [o["sha256"] for o in first["export"].outputs]


def cfg_out(records: dict) -> Path:
    return Path(next(o["path"] for o in records["export"].outputs if o["path"].endswith("model.safetensors")))


@pytest.mark.parametrize("damage", ["corrupt", "delete", "record"])
def test_corrupt_or_deleted_cache_entry_is_recomputed_never_trusted(mlp: Path, damage: str) -> None:
    first = stages.run_all(load_config(mlp))
    entry = Path(first["convert-to-device"].entry)
    artifact = entry / "model.safetensors"
    good = sha(artifact)
    if damage == "corrupt":
        flip_byte(artifact)  # same size, same inode, same timestamp tick: only the hash can tell
    elif damage == "delete":
        artifact.unlink()
    else:
        (entry / "record.json").write_text("{not json")
    assert cache.lookup("convert-to-device", first["convert-to-device"].key) is None
    again = stages.run_all(load_config(mlp))
    # the exported model.safetensors is a hard link of the converted file (no 2nd copy of a big
    # model), so damage to that inode shows in the export too and export reruns as well
    linked = os.path.samefile(artifact, cfg_out(first)) if damage == "corrupt" else False
    assert computed(again) == (["convert-to-device", "export"] if linked else ["convert-to-device"])
    assert sha(artifact) == good
    assert [o["sha256"] for o in again["export"].outputs] == [o["sha256"] for o in first["export"].outputs]


def test_edited_export_file_reruns_export(mlp: Path) -> None:
    first = stages.run_all(load_config(mlp))
    manifest_csv = Path(next(o["path"] for o in first["export"].outputs if o["path"].endswith("manifest.csv")))
    good = sha(manifest_csv)
    manifest_csv.write_text("tampered\n")
    again = stages.run_all(load_config(mlp))
    assert computed(again) == ["export"]
    assert sha(manifest_csv) == good


def test_key_covers_what_the_stage_reads_and_nothing_else(mlp: Path) -> None:
    cfg = load_config(mlp)
    loaded = stages.run_all(cfg, until="load-arrays")["load-arrays"]
    key = lambda c, prev=loaded.key: stages.key_of(stages.BY_NAME["infer-mapping"], c, prev)  # noqa: E731
    base = key(cfg)
    assert key(load_config(mlp, ["verify.atol=1"])) == base
    assert key(load_config(mlp, ["export.dir=/tmp/x"])) == base
    assert key(load_config(mlp, ["mapping.strategy=order"])) != base
    assert key(load_config(mlp, ["convert.dtype=float16"])) != base
    assert key(cfg, "0" * 64) != base


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
    assert sorted(r.cached for r in results) == [False, True]
    assert all(r.record["n"] == 1 for r in results)


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
        assert sorted(r[s].cached for r in results) == [False, True], s


# ---------------------------------------------------------------------------------------------
# deterministic exports


def test_exports_are_byte_identical_across_export_dirs_and_copied_trees(mlp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = stages.run_all(load_config(mlp))
    a = {Path(o["path"]).name: o["sha256"] for o in first["export"].outputs}
    # another export folder
    other = stages.run_all(load_config(mlp, [f"export.dir={tmp_path / 'other-out'}"]))
    b = {Path(o["path"]).name: sha(o["path"]) for o in other["export"].outputs}
    # the whole tree copied elsewhere, fresh cache: everything recomputed, same bytes
    copy = tmp_path / "copied"
    shutil.copytree(mlp.parent, copy, ignore=shutil.ignore_patterns("out"))
    monkeypatch.setenv("NP2TORCH_CACHE_DIR", str(tmp_path / "fresh-cache"))
    third = stages.run_all(load_config(copy / mlp.name))
    assert computed(third) == ALL
    c = {Path(o["path"]).name: sha(o["path"]) for o in third["export"].outputs}
    for name in ("model.safetensors", "manifest.csv"):
        assert a[name] == b[name] == c[name], name
    meta = _st_metadata(Path(third["export"].outputs[0]["path"]))
    assert str(tmp_path) not in json.dumps(meta)  # no paths inside
    assert set(meta) == {"format", "np2torch_version", "config_content_sha256", "name", "source_fingerprint"}


def _st_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ---------------------------------------------------------------------------------------------
# the keys follow the stage table's declarations, field by field

# config field → (how to change it in the tiny conversion, the first stage that must rerun). Written
# out here, not derived from the table: a stage that reads a field it does not declare (a stale
# hit), or declares one it does not read (a needless rerun), makes its row disagree.
def _changes(root: Path) -> dict[str, tuple[list[str], str]]:
    def copy(name: str, new: str) -> Path:
        shutil.copyfile(root / name, root / new)
        return root / new

    edited = root / "weights-edited"
    shutil.copytree(root / "weights", edited)
    flip_byte(edited / "fc3.bias.npy")
    model = root / "model-copy.py"
    model.write_text(Path(MODEL).read_text() + "\n# the same model, other bytes\n")
    np.savez(root / "acts.npz", fc1=np.zeros((2, 6), np.float32))
    return {
        "name": (["name=tiny-renamed"], "export"),
        "source.path": ([f"source.path={edited}", "verify.reference_output=null"], "load-arrays"),
        "source.format": (["source.format=auto"], "load-arrays"),
        "source.allow_pickle": (["source.allow_pickle=true"], "load-arrays"),
        "source.key_prefix": (["source.key_prefix=zz"], "load-arrays"),
        "source.allow_nonfinite": (["source.allow_nonfinite=true"], "validate"),
        "model.target": ([f"model.target={model}:MLP"], "infer-mapping"),
        "model.kwargs": (["model.kwargs.hidden=7"], "infer-mapping"),  # then fails validation: shapes
        "model.allow_unsafe_load": (["model.allow_unsafe_load=true"], "infer-mapping"),
        "mapping.strategy": (["mapping.strategy=auto"], "infer-mapping"),
        "mapping.preset": (["mapping.preset=flax"], "infer-mapping"),
        "mapping.rules": (["mapping.rules=[{source: 'fc1\\.weight', target: fc1.weight}]"], "infer-mapping"),
        "mapping.ignore": (["mapping.ignore=[nothing-matches]"], "infer-mapping"),
        "mapping.allow_missing": (["mapping.allow_missing=[nothing-matches]"], "infer-mapping"),
        "convert.dtype": (["convert.dtype=float64"], "infer-mapping"),
        "convert.device": (["convert.device=cuda:7"], "convert-to-device"),  # no such device: fails there
        # the manifest used the reference to decide (evidence), so it is re-checked against them
        "verify.input": ([f"verify.input={copy('input.npy', 'input-copy.npy')}"], "infer-mapping"),
        "verify.reference_output": ([f"verify.reference_output={copy('ref_out.npy', 'ref-copy.npy')}"], "infer-mapping"),
        "verify.reference_activations": ([f"verify.reference_activations={root / 'acts.npz'}"], "infer-mapping"),
        "verify.rtol": (["verify.rtol=1e-4"], "verify-forward-pass"),
        "verify.atol": (["verify.atol=1e-5"], "verify-forward-pass"),
        "export.dir": ([f"export.dir={root / 'out-elsewhere'}"], "export"),
        "export.formats": (["export.formats=[safetensors]"], "export"),
        "export.max_shard_size": (["export.max_shard_size=100"], "convert-to-device"),  # shards: the convert stage writes them
    }


def _attempted(cfg) -> list[str]:  # noqa: ANN001
    """Stages that ran (not a hit) in a plain run of the table, the failing one included."""
    trail = stages.Trail()
    try:
        stages.run_all(cfg, trail=trail)
    except Exception:  # noqa: BLE001 - a change that breaks the conversion still shows what reran
        return [n for n, r in trail.records.items() if not r.cached] + [trail.current]
    return [n for n, r in trail.records.items() if not r.cached]


def test_each_config_field_reruns_exactly_the_stages_that_declare_it_and_those_after(mlp: Path) -> None:
    base = load_config(mlp)
    first = stages.run_all(base)
    changes = _changes(mlp.parent)
    assert sorted(changes) == sorted(stages.config_fields()), "a config field without a row here: say which stage it reruns"
    evidence = first["infer-mapping"].evidence_digest is not None
    wrong = []
    for name, (overrides, expected_first) in changes.items():
        # the table's own answer: the first stage that declares the field (or re-checks it, when the manifest used evidence)
        declared = next(s.name for s in stages.STAGES
                        if name in stages.expand(s.reads) or (evidence and name in stages.expand(s.rechecks)))
        assert declared == expected_first, f"{name}: the stage table says {declared} reruns first, this test says {expected_first}"
        cfg = load_config(mlp, overrides)
        if name == "source.path":  # the reference does not match edited weights: compare with a baseline without it
            stages.run_all(load_config(mlp, ["verify.reference_output=null"]))
        ran = _attempted(cfg)
        expected = ALL[ALL.index(expected_first):]
        if ran != expected[: len(ran)] or not ran or (len(ran) < len(expected) and name not in ("model.kwargs", "convert.device")):
            wrong.append(f"{name}: reran {ran}, expected {expected}")
        stages.run_all(base)  # back to the baseline's entries (a re-checked manifest shares its key with the baseline's)
    assert not wrong, "; ".join(wrong)


def test_a_run_whose_every_stage_hits_imports_neither_torch_nor_pandera(mlp: Path) -> None:
    """Keys hash code by file (the import closure, read with ast), never by importing it: a cached run stays light."""
    import subprocess
    import sys

    code = ("import sys; from np2torch.tasks import stages; from np2torch.tasks.config import load_config; "
            f"recs = stages.run_all(load_config({str(mlp)!r})); "
            "print([n for n, r in recs.items() if not r.cached], sorted(m for m in ('torch', 'pandera') if m in sys.modules))")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "[] []", again.stdout
