"""Sharded export (``export.max_shard_size``): the layout transformers loads, equal to the single
file, every shard in the audit record, the set published atomically, and checks that read each
file through np2torch's bounded reader instead of mapping it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_pipeline
from np2torch.tasks import export, st_io
from np2torch.tasks.config import load_config
from np2torch.tasks.errors import ExportError
from np2torch.tasks.st_write import plan_shards

SHARDS = "export.max_shard_size=40"  # bytes: the tiny model's tensors then need several files


def _files(d: Path) -> dict[str, bytes]:
    """The visible files of an export folder (staging files start with a dot)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "report.json" and not p.name.startswith(".")}


def _sharded_loader():
    """transformers' own loader of a sharded checkpoint folder (it imports no vision code)."""
    mod = pytest.importorskip("transformers.trainer_utils")
    return mod.load_sharded_checkpoint


def _tiny_model(tmp_path: Path) -> torch.nn.Module:
    sys.path.insert(0, str(tmp_path))
    try:
        from tiny_model import Tiny
    finally:
        sys.path.remove(str(tmp_path))
    return Tiny()


def test_shards_are_planned_as_save_pretrained_does() -> None:
    plan = [("a", "float32", (10,)), ("b", "float32", (20,)), ("c", "float32", (5,)), ("d", "float32", (1,))]
    assert [[k for k, _, _ in s] for s in plan_shards(plan, 100)] == [["a"], ["b", "c"], ["d"]]  # 40, 80+20, 4 bytes
    assert [[k for k, _, _ in s] for s in plan_shards(plan, 60)] == [["a"], ["b"], ["c", "d"]]  # b (80) alone: too big for any
    assert len(plan_shards(plan, 0)) == len(plan_shards(plan, 10**9)) == 1
    assert st_io.shard_name(0, 3) == "model-00001-of-00003.safetensors"


def test_sharded_export_loads_with_transformers_and_equals_the_single_file(tiny, tmp_path: Path) -> None:
    import np2torch

    cfg_path = tiny()
    single = run_pipeline(load_config(cfg_path, ["export.dir=single"]))
    result = np2torch.convert(cfg_path, overrides=[SHARDS, "export.dir=sharded"], orchestrate=False)
    out = tmp_path / "sharded"
    index = json.loads((out / st_io.INDEX_NAME).read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [st_io.shard_name(i, n) for i in range(n)] and not (out / "model.safetensors").exists()
    assert set(index) == {"metadata", "weight_map"} and sorted(set(index["weight_map"].values())) == shards
    ref = load_file(tmp_path / "single" / "model.safetensors")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())

    # the same tensors as the single file, shard by shard with safetensors and through transformers' loader
    got: dict[str, torch.Tensor] = {}
    for s in shards:
        part = load_file(out / s)
        assert {k for k, v in index["weight_map"].items() if v == s} == set(part)
        got.update(part)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    model = _tiny_model(tmp_path)
    _sharded_loader()(model, str(out), strict=True)
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)

    # every shard and the index are outputs of the audit record, each with its sha256
    listed = {Path(o.path).name: o for o in result.outputs}
    assert set(shards) | {st_io.INDEX_NAME} <= set(listed)
    for name in [*shards, st_io.INDEX_NAME]:
        assert listed[name].sha256 == hashlib.sha256((out / name).read_bytes()).hexdigest()
    report = json.loads((out / "report.json").read_text())
    assert set(shards) <= {Path(o["path"]).name for o in report["outputs"]}
    assert single["export"].outputs[0]["path"].endswith("model.safetensors")


def test_a_killed_sharded_export_leaves_the_previous_single_file_whole(tiny, tmp_path: Path) -> None:
    """kill -9 after every shard is written and checked, before any is renamed into place: the
    previous single-file export is byte-identical; the next export cleans up, publishes the
    shards and only then removes the single file; going back to one file removes the shards."""
    cfg_path = tiny()
    out = tmp_path / "out"
    run_pipeline(load_config(cfg_path))
    before = _files(out)
    assert "model.safetensors" in before
    code = ("import sys; from np2torch.tasks.config import load_config; from np2torch.tasks.stages import run_all; "
            f"run_all(load_config(sys.argv[1], [{SHARDS!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cfg_path)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NP2TORCH_TEST_PAUSE_AT": "export-publish"})
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "paused at export-publish" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
        assert "paused at export-publish" in line, f"the run did not reach the pause point (rc {proc.poll()})"
        staged = [p.name for p in out.iterdir() if p.name.startswith(".np2torch.")]
        assert any(n.endswith(".safetensors") and "-of-" in n for n in staged)  # the shards were complete, staged
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert _files(out) == before  # visible files unchanged: no shard, no index

    run_pipeline(load_config(cfg_path, [SHARDS]))
    names = set(_files(out))
    assert st_io.INDEX_NAME in names and "model.safetensors" not in names
    assert not [p for p in out.iterdir() if p.name.startswith(".np2torch.")]  # the dead run's staging files are gone
    got = {}
    for s in sorted(out.glob("model-*-of-*.safetensors")):
        got.update(load_file(s))
    ref = {k: v for k, v in load_file(_write(tmp_path / "ref.safetensors", before["model.safetensors"])).items()}
    assert all(torch.equal(got[k], ref[k]) for k in ref) and got.keys() == ref.keys()

    run_pipeline(load_config(cfg_path))  # back to one file: cached stages, the export is re-linked
    assert _files(out) == before


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def test_a_failed_sharded_export_leaves_the_previous_export_whole(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = tiny()
    out = tmp_path / "out"
    run_pipeline(load_config(cfg_path, [SHARDS]))
    before = _files(out)
    real, calls = export.check_export, []

    def fail_on_second(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(export, "check_export", fail_on_second)
    with pytest.raises(ExportError, match="disk is full"):
        run_pipeline(load_config(cfg_path, [SHARDS, "convert.dtype=float16", "verify.rtol=0.01", "verify.atol=0.01"]))
    assert _files(out) == before and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_the_self_check_rejects_a_layout_a_strict_parser_would(tmp_path: Path) -> None:
    """check_export reads the header only (no map of the file) and still rejects what safetensors rejects."""
    header, _ = st_io.plan_header([("a", "float32", (2,)), ("b", "float32", (3,))], {})
    good = tmp_path / "good.safetensors"
    good.write_bytes(header + bytes(20))
    tensors = {"a": {"dtype": "float32", "shape": [2]}, "b": {"dtype": "float32", "shape": [3]}}
    export.check_export(good, tensors, reference=good)  # re-read; each tensor compared with the reference file
    for bad, why in ((header + bytes(24), "ends at byte"), (header + bytes(16), "ends at byte")):
        p = tmp_path / "bad.safetensors"
        p.write_bytes(bad)
        with pytest.raises(ExportError, match=why):
            export.check_export(p, tensors)
    raw = json.loads(header[8:])
    raw["b"]["data_offsets"] = [12, 24]  # a gap after a
    text = json.dumps(raw).encode()
    p.write_bytes(len(text).to_bytes(8, "little") + text + bytes(24))
    with pytest.raises(ExportError, match="gap or an overlap"):
        export.check_export(p, tensors)


@pytest.mark.parametrize(("given", "size"),
                         [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("1KB", 1000), ("2GiB", 2 * 2**30), (0, 0), (1234, 1234)])
def test_max_shard_size_reads_bytes_and_units(tiny, tmp_path: Path, given, size) -> None:
    cfg = load_config(tiny(), [f"export.max_shard_size={given}"])
    assert cfg.export.max_shard_size == size
    assert load_config(tiny()).export.max_shard_size == 5 * 10**9  # transformers' default


@pytest.mark.parametrize("given", ["5 apples", "-1", "GB"])
def test_a_wrong_max_shard_size_names_the_key(tiny, tmp_path: Path, given) -> None:
    from np2torch.tasks.errors import ConfigError

    with pytest.raises(ConfigError, match=r"export.max_shard_size"):
        load_config(tiny(), [f"export.max_shard_size={given}"])
