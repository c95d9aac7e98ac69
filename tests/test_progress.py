"""Progress hooks: convert and export report their bytes; a run's overall percentage moves by stage."""

from __future__ import annotations

from pathlib import Path

from conftest import run_pipeline
from np2torch.tasks import convert, export, manifest, stages
from np2torch.tasks.config import load_config
from np2torch.tasks.progress import RunProgress, track
from np2torch.tasks.st_io import read_header


def test_convert_and_export_report_every_tensor_byte(tiny, tmp_path: Path) -> None:
    cfg = load_config(tiny("conv", npy_dir=True))
    recs = run_pipeline(cfg)
    rows = manifest.read_manifest(Path(recs["validate"].entry) / "manifest.json")
    seen: list[int] = []
    out = tmp_path / "again.safetensors"
    res = convert.convert_to_device(rows, stages.read_records(recs["load-arrays"]), model_target=cfg.model.target,
                                    model_kwargs=cfg.model.kwargs, device="cpu", out_path=out, progress=seen.append)
    _, base = read_header(out)
    assert sum(seen) == out.stat().st_size - base and len(seen) == res["n_tensors"]

    rechecked: list[int] = []
    export.check_export(out, res["tensors"], reread=True, reference=out, progress=rechecked.append)
    assert sum(rechecked) == out.stat().st_size - base


def test_run_progress_moves_by_stage_weight_and_work_done() -> None:
    rp = RunProgress(key="x-progress", description="x", weights={"a": 1.0, "b": 3.0})
    with rp:  # outside a flow run: no artifact, the counting still works
        assert rp.percent() == 0.0
        rp.stage_begin("a")
        rp.stage_end("a", "computed in 1 s")
        assert rp.percent() == 25.0
        rp.stage_begin("b")
        with track("b", "b", 200, unit="items", terminal=False) as cb:
            cb(100)
            assert rp.percent() == 62.5
            cb(100)
        rp.stage_end("b")
        assert rp.percent() == 100.0


def test_track_feeds_the_callers_callback_without_a_terminal() -> None:
    got: list[int] = []
    with track("convert-to-device", "convert", 10, progress=got.append, terminal=False) as cb:
        cb(4)
        cb(6)
    assert got == [4, 6]
