"""Stage 1, load-arrays: every input style of the seed article, headers only."""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest

from np2torch.tasks.errors import LoadError
from np2torch.tasks.load_arrays import detect_format, open_array, scan_source


def test_single_npy_records_header_offset_and_memory_maps(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "w.npy", a)
    [rec] = scan_source(tmp_path / "w.npy")
    assert (rec.key, rec.shape, rec.dtype, rec.byte_order) == ("w", (3, 4), "<f4", "little")
    assert rec.offset > 0 and rec.nbytes == 48
    arr = open_array(rec)
    assert isinstance(arr, np.memmap)  # not read into memory
    np.testing.assert_array_equal(arr, a)


def test_flat_format_needs_one_vector(tmp_path):
    np.save(tmp_path / "p.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(LoadError, match=r"format flat needs one 1-D vector"):
        scan_source(tmp_path / "p.npy", fmt="flat")


def test_npy_dir_natural_order_and_nested_keys(tmp_path):
    for i in (10, 2, 1):
        np.save(tmp_path / f"layer_{i}.npy", np.full(3, i, np.float32))
    (tmp_path / "dense").mkdir()
    np.save(tmp_path / "dense" / "kernel.npy", np.ones((2, 2), np.float32))
    keys = [r.key for r in scan_source(tmp_path)]
    assert keys == ["dense/kernel", "layer_1", "layer_2", "layer_10"]
    assert detect_format(tmp_path, "auto") == "npy-dir"


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_members_keep_archive_order(tmp_path, compressed):
    save = np.savez_compressed if compressed else np.savez
    arrays = {"conv/kernel": np.random.default_rng(0).standard_normal((3, 3, 1, 4)).astype(np.float32), "conv/bias": np.ones(4, np.float32)}
    save(tmp_path / "w.npz", **arrays)
    recs = scan_source(tmp_path / "w.npz")
    assert [r.key for r in recs] == ["conv/kernel", "conv/bias"]
    assert (recs[0].offset >= 0) is (not compressed)  # stored members are memory-mapped in place
    for r in recs:
        np.testing.assert_array_equal(open_array(r), arrays[r.key])


def test_key_prefix_is_stripped(tmp_path):
    np.savez(tmp_path / "w.npz", **{"model/fc/w": np.ones(2, np.float32)})
    assert [r.key for r in scan_source(tmp_path / "w.npz", key_prefix="model/")] == ["fc/w"]


def _keras_get_weights(tmp_path):
    ws = [np.ones((4, 3), np.float32), np.zeros(3, np.float32), np.full((3, 2), 2, np.float32)]
    obj = np.empty(len(ws), dtype=object)
    obj[:] = ws
    np.save(tmp_path / "weights.npy", obj, allow_pickle=True)
    return ws


def test_pickled_list_refused_without_opt_in(tmp_path):
    _keras_get_weights(tmp_path)
    with pytest.raises(LoadError, match=r"pickles can run code.*\n.*Fix: set `source.allow_pickle: true`"):
        scan_source(tmp_path / "weights.npy")


def test_pickled_list_loads_with_opt_in_in_order(tmp_path):
    ws = _keras_get_weights(tmp_path)
    recs = scan_source(tmp_path / "weights.npy", allow_pickle=True)
    assert [r.key for r in recs] == ["0", "1", "2"] and [r.shape for r in recs] == [w.shape for w in ws]
    for r, w in zip(recs, ws):
        np.testing.assert_array_equal(open_array(r), w)


def test_pickle_file_of_dict(tmp_path):
    with open(tmp_path / "w.pkl", "wb") as fh:
        pickle.dump({"fc.weight": np.ones((2, 2), np.float32)}, fh)
    assert detect_format(tmp_path / "w.pkl", "auto") == "pickle-list"
    [r] = scan_source(tmp_path / "w.pkl", allow_pickle=True)
    assert r.key == "fc.weight"


def test_big_endian_and_fortran_are_recorded_and_read_right(tmp_path):
    a = np.arange(6, dtype=">f8").reshape(2, 3)
    np.save(tmp_path / "be.npy", a)
    f = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.save(tmp_path / "f.npy", f)
    be, fo = scan_source(tmp_path / "be.npy")[0], scan_source(tmp_path / "f.npy")[0]
    assert be.byte_order == "big" and be.dtype == ">f8"
    assert fo.fortran_order
    np.testing.assert_array_equal(open_array(be), a)
    np.testing.assert_array_equal(open_array(fo), f)


def test_fingerprint_follows_content_not_path(tmp_path):
    a = np.arange(5, dtype=np.float32)
    (tmp_path / "x").mkdir()
    np.save(tmp_path / "w.npy", a)
    np.save(tmp_path / "x" / "w.npy", a)
    fp1 = scan_source(tmp_path / "w.npy")[0].fingerprint
    assert scan_source(tmp_path / "x" / "w.npy")[0].fingerprint == fp1
    a[0] = 1.5
    np.save(tmp_path / "w.npy", a)
    assert scan_source(tmp_path / "w.npy")[0].fingerprint != fp1


def test_value_statistics(tmp_path):
    np.save(tmp_path / "w.npy", np.array([0.0, -3.0, 1e-3, np.nan, np.inf], np.float32))
    r = scan_source(tmp_path / "w.npy")[0]
    assert r.n_nonfinite == 2 and r.absmax == 3.0 and r.absmin_nonzero == pytest.approx(1e-3)


def test_missing_path_and_unknown_file(tmp_path):
    with pytest.raises(LoadError, match=r"source path does not exist"):
        scan_source(tmp_path / "nope.npz")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(LoadError, match=r"cannot tell the format"):
        scan_source(tmp_path / "weights.bin")


def test_not_a_zip(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(LoadError, match=r"not a readable .npz"):
        scan_source(tmp_path / "w.npz")
    with zipfile.ZipFile(tmp_path / "ok.npz", "w") as zf:
        zf.writestr("a.npy", b"garbage")
    with pytest.raises(LoadError, match=r"not a valid .npy header"):
        scan_source(tmp_path / "ok.npz")
