"""The large-model paths: memory-mapped sources, streamed writes, the stat cache.

Each source layout (a ``.npy``, a stored ``.npz`` member, big-endian, Fortran order) must come
out of the whole pipeline bit-exact, read through a memory map rather than into RAM; an
unchanged file is never re-read to be re-hashed, yet a changed one is always noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from np2torch.tasks import fingerprint, stages
from np2torch.tasks.config import load_config
from np2torch.tasks.load_arrays import open_array, scan_source
from np2torch.tasks.readers import stats
from np2torch.tasks.st_io import MappedSafetensors

MODEL = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))
'''


def _keras_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"fc1/kernel": rng.standard_normal((6, 5)).astype(np.float32), "fc1/bias": rng.standard_normal(5).astype(np.float32),
            "norm/gamma": rng.standard_normal(5).astype(np.float32), "norm/beta": rng.standard_normal(5).astype(np.float32),
            "fc2/kernel": rng.standard_normal((5, 3)).astype(np.float32), "fc2/bias": rng.standard_normal(3).astype(np.float32)}


def _layout(a: np.ndarray, *, big_endian: bool, fortran: bool) -> np.ndarray:
    """The same values stored in another byte order / memory order."""
    if big_endian:
        a = a.astype(a.dtype.newbyteorder(">"))
    return np.asfortranarray(a) if fortran else a


def _write_config(tmp_path: Path, source: Path, fmt: str, dtype: str = "float32") -> Path:
    (tmp_path / "net.py").write_text(MODEL)
    cfg = {"name": "large-paths", "source": {"path": str(source), "format": fmt},
           "model": {"target": f"{tmp_path / 'net.py'}:Net"}, "mapping": {"strategy": "name", "preset": "keras"},
           "convert": {"dtype": dtype, "device": "cpu"}, "verify": {"input": {"shape": [2, 6], "dtype": "float32", "seed": 0}},
           "export": {"dir": str(tmp_path / "out"), "formats": ["safetensors", "pt"]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _run_stages(cfg_path: Path) -> dict:
    return stages.run_all(load_config(cfg_path))["export"]


def _expected(arrs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, a in arrs.items():
        layer, leaf = k.split("/")
        name = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}[leaf]
        out[f"{layer}.{name}"] = np.ascontiguousarray(a.T if leaf == "kernel" else a).astype(np.float32)
    return out


def _assert_bit_exact(out_dir: Path, expected: dict[str, np.ndarray]) -> None:
    st = load_file(str(out_dir / "model.safetensors"))
    pt = torch.load(out_dir / "model.pt", weights_only=True)
    assert sorted(st) == sorted(expected) == sorted(pt)
    for k, want in expected.items():
        assert st[k].dtype == torch.float32 and pt[k].dtype == torch.float32
        assert np.array_equal(st[k].numpy().view(np.uint32), want.view(np.uint32)), k  # bit-exact, not allclose
        assert np.array_equal(pt[k].numpy().view(np.uint32), want.view(np.uint32)), k


@pytest.mark.parametrize("big_endian", [False, True], ids=["little", "big-endian"])
@pytest.mark.parametrize("fortran", [False, True], ids=["C", "Fortran"])
def test_npy_dir_memory_mapped_bit_exact(tmp_path: Path, big_endian: bool, fortran: bool) -> None:
    arrs = _keras_arrays(np.random.default_rng(1))
    src = tmp_path / "weights"
    for k, a in arrs.items():
        (src / k).parent.mkdir(parents=True, exist_ok=True)
        np.save(src / f"{k}.npy", _layout(a, big_endian=big_endian, fortran=fortran))
    records = {r.key: r for r in scan_source(src)}
    kernel = records["fc1/kernel"]
    assert kernel.offset > 0 and kernel.fortran_order == fortran
    assert (kernel.byte_order == "big") == big_endian and kernel.dtype[0] == (">" if big_endian else "<")
    view = open_array(kernel)
    assert isinstance(view, np.memmap), "a .npy must be memory-mapped, not read into RAM"
    assert np.array_equal(view, arrs["fc1/kernel"])
    _run_stages(_write_config(tmp_path, src, "npy-dir"))
    _assert_bit_exact(tmp_path / "out", _expected(arrs))


@pytest.mark.parametrize("big_endian", [False, True], ids=["little", "big-endian"])
@pytest.mark.parametrize("fortran", [False, True], ids=["C", "Fortran"])
def test_stored_npz_member_memory_mapped_bit_exact(tmp_path: Path, big_endian: bool, fortran: bool) -> None:
    arrs = _keras_arrays(np.random.default_rng(2))
    src = tmp_path / "weights.npz"
    np.savez(src, **{k: _layout(a, big_endian=big_endian, fortran=fortran) for k, a in arrs.items()})
    records = {r.key: r for r in scan_source(src)}
    rec = records["fc2/kernel"]
    assert rec.member == "fc2/kernel.npy" and rec.offset > 0, "a stored member is memory-mapped at its data offset"
    with open(src, "rb") as fh:  # the offset points at the member's data inside the zip
        raw = fh.read()[rec.offset : rec.offset + rec.nbytes]
    order = "F" if fortran else "C"
    assert np.array_equal(np.frombuffer(raw, dtype=rec.dtype).reshape(rec.shape, order=order), arrs["fc2/kernel"])
    assert isinstance(open_array(rec), np.memmap)
    _run_stages(_write_config(tmp_path, src, "npz"))
    _assert_bit_exact(tmp_path / "out", _expected(arrs))


def test_compressed_npz_member_still_bit_exact(tmp_path: Path) -> None:
    arrs = _keras_arrays(np.random.default_rng(3))
    src = tmp_path / "weights.npz"
    np.savez_compressed(src, **{k: _layout(a, big_endian=True, fortran=True) for k, a in arrs.items()})
    assert all(r.offset == -1 for r in scan_source(src))  # compressed: inflated on demand, not mapped
    _run_stages(_write_config(tmp_path, src, "npz"))
    _assert_bit_exact(tmp_path / "out", _expected(arrs))


def test_float64_big_endian_cast_to_float16_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    arrs = {k: v.astype(np.float64) for k, v in _keras_arrays(rng).items()}
    src = tmp_path / "weights"
    for k, a in arrs.items():
        (src / k).parent.mkdir(parents=True, exist_ok=True)
        np.save(src / f"{k}.npy", _layout(a, big_endian=True, fortran=True))
    _run_stages(_write_config(tmp_path, src, "npy-dir", dtype="float16"))
    st = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, a in arrs.items():
        layer, leaf = k.split("/")
        name = f"{layer}." + {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}[leaf]
        want = np.ascontiguousarray(a.T if leaf == "kernel" else a).astype(np.float16)  # one rounding, as NumPy does it
        assert np.array_equal(st[name].numpy().view(np.uint16), want.view(np.uint16)), name


def test_scan_records_value_stats_and_fingerprint_per_layout(tmp_path: Path) -> None:
    a = np.array([[0.0, -3.5, 1e-30], [np.inf, 2.0, np.nan]], dtype=np.float32)
    fps = set()
    for i, (be, fo) in enumerate([(False, False), (True, False), (False, True), (True, True)]):
        p = tmp_path / f"a{i}.npy"
        np.save(p, _layout(a, big_endian=be, fortran=fo))
        (rec,) = scan_source(p)
        assert rec.n_nonfinite == 2
        assert rec.absmax == pytest.approx(3.5)
        assert rec.absmin_nonzero == pytest.approx(1e-30, rel=1e-6)
        fps.add(rec.fingerprint)
    assert len(fps) == 4, "the fingerprint covers dtype/byte order and memory order, not only values"


def test_scan_stats_exact_on_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "_STATS_CHUNK", 64)  # bytes: forces many chunks
    rng = np.random.default_rng(5)
    a = rng.standard_normal(1000).astype(np.float32)
    a[[3, 500, 999]] = [np.nan, np.inf, -np.inf]
    a[700] = -77.0
    a[10] = 1e-7
    np.save(tmp_path / "a.npy", a)
    (rec,) = scan_source(tmp_path / "a.npy")
    finite = a[np.isfinite(a)]
    assert rec.n_nonfinite == 3
    assert rec.absmax == float(np.abs(finite).max()) == 77.0
    assert rec.absmin_nonzero == float(np.abs(finite[finite != 0]).min())


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every whole-file hashing pass (the only way the scan reads a file's bytes)."""
    reads: list[str] = []
    real = fingerprint.file_digests

    def counting(path, *a, **kw):
        reads.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(fingerprint, "file_digests", counting)  # every reader calls it through the module
    return reads


def _settle(p: Path) -> None:
    """Date a just-written file 10 s back, as a checkpoint on disk is: the stat cache does not
    trust files modified within the last 2 s (their timestamp could still tick unchanged)."""
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))


def test_unchanged_file_is_not_reread_and_changed_file_is_noticed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "w.npy"
    np.save(p, np.arange(64, dtype=np.float32))
    _settle(p)
    reads = _count_reads(monkeypatch)
    first = scan_source(p)
    sha_first = fingerprint.file_fingerprint(p)["sha256"]
    n_first = len(reads)
    assert n_first == 1, "one pass computes the sha256 and the value stats together"
    assert scan_source(p) == first and fingerprint.file_fingerprint(p)["sha256"] == sha_first
    assert len(reads) == n_first, "an unchanged file must come from the stat cache"

    # same size, same mtime (restored), new bytes: the inode's ctime still changes
    st = os.stat(p)
    with open(p, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(np.float32(1234.5).tobytes())
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_size == st.st_size and os.stat(p).st_mtime_ns == st.st_mtime_ns
    (changed,) = scan_source(p)
    assert len(reads) == n_first + 1
    assert changed.fingerprint != first[0].fingerprint and changed.absmax == 1234.5
    assert fingerprint.file_fingerprint(p)["sha256"] != sha_first


def test_rerun_with_unchanged_inputs_reads_no_source_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrs = _keras_arrays(np.random.default_rng(6))
    src = tmp_path / "weights.npz"
    np.savez(src, **arrs)
    _settle(src)
    cfg = _write_config(tmp_path, src, "npz")
    for f in tmp_path.iterdir():
        if f.is_file():
            _settle(f)
    first = _run_stages(cfg)
    reads = _count_reads(monkeypatch)
    second = _run_stages(cfg)
    assert second.cached and second.outputs == first.outputs
    assert reads == []


def test_folder_of_many_files_is_not_reread_by_a_new_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder of many .npy keeps its stat-cache entries in one pack file per folder; the hash
    pass (cache key) and the scan each add their own entries to it, and neither may drop the
    other's (a regression once made every rerun of a 1.6 GB folder re-hash it all)."""
    src = tmp_path / "layers"
    src.mkdir()
    for i in range(fingerprint._PACK_MIN + 4):
        np.save(src / f"w{i:02d}.npy", np.full(32, i, dtype=np.float32))
        _settle(src / f"w{i:02d}.npy")
    files = sorted(src.glob("*.npy"))
    from np2torch.tasks.load_arrays import fingerprint_files

    first = fingerprint_files(files), scan_source(src)
    fingerprint._MEMO.clear()  # what a new process starts with
    reads = _count_reads(monkeypatch)
    assert (fingerprint_files(files), scan_source(src)) == first
    assert reads == [], "an unchanged folder must come from the stat cache in the next process"


def test_mapped_safetensors_release_keeps_values(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    big = torch.arange(3 * 4096, dtype=torch.float32).reshape(3, 4096)
    save_file({"a": big, "b": torch.ones(7)}, str(tmp_path / "m.safetensors"))
    with MappedSafetensors(tmp_path / "m.safetensors") as m:
        before = m.state["a"].clone()
        m.release(["a", "b"])  # drop the pages from this process; the next read faults them back in
        assert torch.equal(m.state["a"], before) and torch.equal(m.state["b"], torch.ones(7))


def test_materialize_missing_builds_only_owning_modules(tmp_path: Path) -> None:
    from np2torch.tasks.model import materialize_missing

    (tmp_path / "huge.py").write_text('''
from torch import nn

ON = []  # the device of every Big weight that was initialised

class Big(nn.Linear):
    def reset_parameters(self):
        ON.append(self.weight.device.type)
        super().reset_parameters()

class Huge(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = Big(4096, 4096)   # 64 MiB if built on the CPU
        self.bn = nn.BatchNorm1d(8)
''')
    target = f"{tmp_path / 'huge.py'}:Huge"
    vals = materialize_missing(target, {}, ["bn.num_batches_tracked", "bn.running_var", "bn.weight"])
    assert vals["bn.num_batches_tracked"].item() == 0
    assert torch.equal(vals["bn.running_var"], torch.ones(8)) and torch.equal(vals["bn.weight"], torch.ones(8))
    import sys

    built = next(m for n, m in sys.modules.items() if n.startswith("np2torch_user_model_") and hasattr(m, "Big"))
    assert "cpu" not in built.ON, "the 64 MiB Linear must not be built to initialise a BatchNorm counter"
    b1 = materialize_missing(target, {}, ["big.bias"])["big.bias"]
    b2 = materialize_missing(target, {}, ["big.bias"])["big.bias"]
    assert b1.shape == (4096,) and torch.equal(b1, b2)  # seeded: reproducible
    assert float(b1.abs().max()) <= 1 / 64  # Linear's init bound 1/sqrt(in_features)


def test_materialize_missing_falls_back_to_a_full_build(tmp_path: Path) -> None:
    from np2torch.tasks.model import materialize_missing

    (tmp_path / "custom.py").write_text('''
import torch
from torch import nn

class Scale(nn.Module):  # no reset_parameters: only __init__ knows the initial value
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.full((3,), 7.0))
        self.register_buffer("steps", torch.tensor(5))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = Scale()
''')
    vals = materialize_missing(f"{tmp_path / 'custom.py'}:Net", {}, ["scale.s", "scale.steps"])
    assert torch.equal(vals["scale.s"], torch.full((3,), 7.0)) and vals["scale.steps"].item() == 5


def test_export_links_or_copies_and_records_true_sha256(tmp_path: Path) -> None:
    import hashlib

    arrs = _keras_arrays(np.random.default_rng(7))
    src = tmp_path / "weights.npz"
    np.savez(src, **arrs)
    cfg_path = _write_config(tmp_path, src, "npz")
    first = _run_stages(cfg_path)
    st = tmp_path / "out" / "model.safetensors"
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert {o["sha256"] for o in first.outputs} >= {sha(st)}
    assert os.stat(st).st_nlink == 2, "headers equal: the converted file is linked into place, not copied"

    # another verify tolerance: same converted tensors (cache hit), other config digest in the header
    cfg = json.loads(cfg_path.read_text())
    cfg["verify"]["rtol"] = 1e-3
    cfg_path.write_text(json.dumps(cfg))
    second = _run_stages(cfg_path)
    assert os.stat(st).st_nlink == 1, "a different header is written as a new file"
    assert {o["sha256"] for o in second.outputs} >= {sha(st)}
    assert load_file(str(st)).keys() == _expected(arrs).keys()
    _assert_bit_exact(tmp_path / "out", _expected(arrs))


@pytest.mark.parametrize("kind", ["npy", "npz", "npz-deflated", "safetensors"])
def test_load_arrays_reads_every_source_byte_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The key's hashing pass (sha256) and the scan (value statistics, CRCs, inflation, fingerprints)
    are ONE read: the bytes read are the file's size, and the fingerprints need no second hash."""
    from safetensors.numpy import save_file

    from np2torch.tasks.readers import fingerprint_files

    rng = np.random.default_rng(7)
    arrs = {"a": rng.standard_normal((700, 1000)).astype(np.float32), "b": rng.standard_normal(3000).astype(np.float64)}
    p = tmp_path / {"npy": "a.npy", "npz": "w.npz", "npz-deflated": "w.npz", "safetensors": "w.safetensors"}[kind]
    {"npy": lambda: np.save(p, arrs["a"]), "npz": lambda: np.savez(p, **arrs), "npz-deflated": lambda: np.savez_compressed(p, **arrs),
     "safetensors": lambda: save_file(arrs, str(p))}[kind]()
    _settle(p)
    read: list[int] = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, pos: read.append(real(fd, bufs, pos)) or read[-1])
    (info,) = fingerprint_files([p])
    records = scan_source(p)
    assert sum(read) == p.stat().st_size > fingerprint.SMALL_FILE
    assert info["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    for r in records:
        want = arrs[r.key] if kind != "npy" else arrs["a"]
        assert r.absmax == float(np.abs(want).max()) and r.n_nonfinite == 0
        assert np.array_equal(open_array(r), want)
    assert len({r.fingerprint for r in records}) == len(records)
