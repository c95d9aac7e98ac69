"""The large path's byte work: one streaming pass for sha256 + region digests + statistics,
the convert stage's writes, and the export's check of a copied file."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import run_pipeline
from np2torch.tasks import bytework, export, fingerprint, manifest, st_write, stages
from np2torch.tasks.config import load_config
from np2torch.tasks.errors import ConvertError, ExportError
from np2torch.tasks.fingerprint import Region, file_digests
from np2torch.tasks.load_arrays import scan_source


def test_streaming_pass_matches_direct_hashes_for_overlapping_regions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fingerprint, "_PIECE", 4099)  # odd pieces: regions start and end inside them
    data = np.random.default_rng(0).integers(0, 256, (3 << 20) + 5, dtype=np.uint8).tobytes()
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    spans = [(100, 2 << 20), (1 << 20, (2 << 20) + 5), (0, 0), (len(data) - 7, 7)]
    seen: list[bytearray] = [bytearray() for _ in spans]
    regions = [Region(a, n, on_chunk=lambda piece, i=i: seen[i].extend(piece)) for i, (a, n) in enumerate(spans)]
    done: list[int] = []
    sha, digests = file_digests(p, regions, progress=done.append)
    assert sha == hashlib.sha256(data).hexdigest()
    assert digests == [hashlib.sha256(data[a : a + n]).hexdigest() for a, n in spans]
    assert [bytes(s) for s in seen] == [data[a : a + n] for a, n in spans]
    assert sum(done) == len(data)
    assert file_digests(p, regions[:1], sha256=False)[0] is None
    with pytest.raises(OSError, match="shorter"):
        file_digests(p, [Region(len(data) - 3, 10)])


@pytest.mark.parametrize("dtype", ["<f2", "<f4", ">f4", "<f8"])
def test_value_statistics_of_a_streamed_array_are_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """NaN/Inf, |x| range and values a cast would lose, over a file read in pieces that split values."""
    monkeypatch.setattr(fingerprint, "_PIECE", 4099)
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(600_000) * 0.02).astype(dtype)
    a[[5, 300_000]] = np.nan
    a[123_457] = -np.inf
    a[10:20] = 0
    a[999] = -3000.0
    if np.dtype(dtype).itemsize > 2:
        a[77] = 7e-9  # below float16's half-smallest subnormal: an underflow for a float16 cast
    np.save(tmp_path / "a.npy", a)
    assert (tmp_path / "a.npy").stat().st_size > fingerprint.SMALL_FILE  # the streaming path
    (rec,) = scan_source(tmp_path / "a.npy")
    finite = a[np.isfinite(a)].astype(np.float64)
    assert rec.n_nonfinite == 3
    assert rec.absmax == float(np.abs(finite).max()) == 3000.0
    assert rec.absmin_nonzero == float(np.abs(finite[finite != 0]).min())


def _tiny_rows(config: Path):
    cfg = load_config(config)
    recs = run_pipeline(cfg)
    rows = manifest.read_manifest(Path(recs["validate"].entry) / "manifest.json")
    return cfg, recs, rows, {r.key: r for r in stages.read_records(recs["load-arrays"])}


def test_a_failed_write_is_a_storage_error_and_leaves_nothing(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, rows, records = _tiny_rows(tiny())
    import torch

    def full(fd, buf, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bytework, "pwrite_all", full)  # the tensors' block writes only (not the header's)
    out = tmp_path / "conv" / "model.safetensors"
    with pytest.raises(OSError) as info:
        st_write.write_converted(rows, records, out, missing_values={"bn.num_batches_tracked": torch.tensor(0)})
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, ConvertError)
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))


def test_a_copied_export_is_checked_against_the_converted_file(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other metadata than the converted file's header forces a copy (no link); the copy is
    re-read and compared tensor by tensor with the converted file, so a corrupted copy fails."""
    cfg, recs, rows, _ = _tiny_rows(tiny())
    conv = Path(recs["convert-to-device"].file)
    tensors = recs["convert-to-device"].tensors
    assert all("blake3" not in t and "sha256" not in t for t in tensors.values())  # the convert stage no longer hashes each tensor
    outs = export.export_outputs(converted=conv, tensors=tensors, manifest_rows=rows, out_dir=tmp_path / "copy",
                                 formats=["safetensors"], metadata={"other": "metadata"})
    st = tmp_path / "copy" / "model.safetensors"
    assert os.stat(st).st_ino != os.stat(conv).st_ino  # copied, not linked
    assert {k: v.tolist() for k, v in load_file(st).items()} == {k: v.tolist() for k, v in load_file(conv).items()}
    assert outs[0]["sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()

    real = export._copy_range

    def flip_a_byte(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
        real(src_fd, dst_fd, offset, count)
        pos = os.lseek(dst_fd, 0, os.SEEK_CUR) - 1
        b = os.pread(dst_fd, 1, pos)
        os.pwrite(dst_fd, bytes([b[0] ^ 1]), pos)

    monkeypatch.setattr(export, "_copy_range", flip_a_byte)
    with pytest.raises(ExportError, match="differ from the converted ones"):
        export.export_outputs(converted=conv, tensors=tensors, manifest_rows=rows, out_dir=tmp_path / "bad",
                              formats=["safetensors"], metadata={"other": "metadata"})
    assert not (tmp_path / "bad" / "model.safetensors").exists()
