"""Stage 4, convert-to-device: cast, transform, write, strict load on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_pipeline, tiny_arrays
from np2torch.tasks import stages
from np2torch.tasks.config import load_config
from np2torch.tasks.errors import ConvertError
from np2torch.tasks.model import build_model, describe_targets
from np2torch.tasks.state_dict import check_device, load_into_model


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_cast_to_configured_dtype_keeps_integer_buffers(tiny, dtype):
    cfg = load_config(tiny(), [f"convert.dtype={dtype}", "verify.rtol=0.02", "verify.atol=0.02"])
    recs = run_pipeline(cfg)
    state = load_file(cfg.export.dir / "model.safetensors")
    assert state["fc1.weight"].dtype == getattr(torch, dtype)
    assert state["bn.num_batches_tracked"].dtype == torch.int64  # never cast to float
    ref = tiny_arrays()["fc1.weight"]
    np.testing.assert_allclose(state["fc1.weight"].double().numpy(), ref, rtol=1e-2 if dtype != "float64" else 0)
    assert recs["verify-forward-pass"].metrics["passed"]


def test_big_endian_float64_source_converts_exactly(tiny):
    arrays = {k: v.astype(">f8") for k, v in tiny_arrays().items()}
    cfg = load_config(tiny(arrays=arrays))
    run_pipeline(cfg)
    state = load_file(cfg.export.dir / "model.safetensors")
    np.testing.assert_array_equal(state["fc2.weight"].numpy(), arrays["fc2.weight"].astype("<f4"))


def test_allowed_missing_keeps_the_model_initial_value(tiny):
    cfg = load_config(tiny())
    run_pipeline(cfg)
    state = load_file(cfg.export.dir / "model.safetensors")
    assert state["bn.num_batches_tracked"].item() == 0


def test_strict_load_reports_missing_unexpected_and_shape_together():
    model = build_model("torch.nn:Linear", {"in_features": 3, "out_features": 2})
    targets = describe_targets(model)
    state = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    with pytest.raises(ConvertError) as exc:
        load_into_model(model, state, targets)
    msg = str(exc.value)
    assert "`bias`: missing from the converted state dict" in msg
    assert "`extra`: unexpected key: the model has no such tensor" in msg
    assert "`weight`: shape differs from the model's (expected [2, 3], got [2, 4])" in msg


def test_tied_weights_stay_tied_after_assign_load():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    with torch.device("meta"):
        model = Tied()
    targets = describe_targets(model)
    assert [t.tied_to for t in targets] == [None, "emb.weight"]
    w = torch.randn(5, 3)
    load_into_model(model, {"emb.weight": w, "head.weight": w.clone()}, targets)
    assert model.head.weight is model.emb.weight


def test_cuda_device_is_a_clear_error_without_a_gpu():
    if torch.cuda.is_available():
        assert check_device("cuda").type == "cuda"
    else:
        with pytest.raises(ConvertError, match=r"CUDA is not available on this machine.*\n.*Fix: use --set convert.device=cpu"):
            check_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_conversion_matches_cpu(tiny, tmp_path):
    cpu = load_config(tiny(tmp_path / "a"))
    gpu = load_config(tiny(tmp_path / "b"), ["convert.device=cuda", "verify.rtol=1e-4", "verify.atol=1e-5"])
    run_pipeline(cpu)
    recs = run_pipeline(gpu)
    assert recs["convert-to-device"].placed_on == ["cuda:0"]
    a, b = load_file(cpu.export.dir / "model.safetensors"), load_file(gpu.export.dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_records_are_small_and_json(tiny):
    import json

    cfg = load_config(tiny())
    recs = run_pipeline(cfg)
    for name, rec in recs.items():
        # only small JSON records travel between tasks, and come back the same
        assert type(rec).from_dict(json.loads(json.dumps(rec.to_dict()))) == rec, name
    assert stages.NAMES == list(recs)


def test_cast_into_a_misaligned_place_gives_the_same_bytes():
    """A tensor placed after an odd-sized one is not aligned for its dtype: the bytes must still be exact."""
    from np2torch.tasks.st_write import cast_into as _cast_to

    src = np.arange(12, dtype=">f8").reshape(3, 4).T  # big-endian, transposed view
    for dtype, np_dt in (("float32", "<f4"), ("float16", "<f2"), ("int64", "<i8")):
        want = np.ascontiguousarray(src.astype(np_dt)).tobytes()
        backing = torch.zeros(len(want) + 1, dtype=torch.uint8)
        out = backing[1:]  # data pointer off by one byte
        assert out.data_ptr() % 2 == 1
        assert _cast_to(dtype, src, out) == len(want)
        assert out.numpy().tobytes() == want
        assert _cast_to(dtype, src, torch.zeros(len(want) - 1, dtype=torch.uint8)) == len(want)  # wrong size: nothing written


@pytest.mark.parametrize("how", ["one-worker", "small-blocks"])
def test_every_write_path_gives_the_same_file(tiny, tmp_path, monkeypatch, how):
    """Streamed blocks with any number of workers, and blocks smaller than a row, all write the
    same bytes, with the sha256 the cache remembers."""
    import hashlib

    from np2torch.tasks import fingerprint, manifest, st_write

    cfg = load_config(tiny(), ["convert.dtype=float16", "verify.rtol=0.02", "verify.atol=0.02"])
    recs = run_pipeline(cfg)
    rows = manifest.read_manifest(stages.Path(recs["validate"].entry) / "manifest.json")
    records = {r.key: r for r in stages.read_records(recs["load-arrays"])}
    missing = {"bn.num_batches_tracked": torch.tensor(7)}
    _, ref = st_write.write_converted(rows, records, tmp_path / "ref.safetensors", missing_values=missing)
    if how == "small-blocks":
        monkeypatch.setattr(st_write, "_BLOCK", 6)
    _, got = st_write.write_converted(rows, records, tmp_path / "got.safetensors", missing_values=missing,
                                      workers=1 if how == "one-worker" else None)
    data = (tmp_path / "got.safetensors").read_bytes()
    assert got == ref and data == (tmp_path / "ref.safetensors").read_bytes()
    assert fingerprint.peek(tmp_path / "got.safetensors", "sha256") == hashlib.sha256(data).hexdigest()
    state = load_file(tmp_path / "got.safetensors")
    assert state["bn.num_batches_tracked"].item() == 7
    np.testing.assert_array_equal(state["fc1.weight"].numpy(), tiny_arrays()["fc1.weight"].astype("float16"))
