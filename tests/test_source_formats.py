"""Source formats beyond NumPy's own (issue 11 item 7): Keras 3 ``.weights.h5``, legacy Keras
``.h5``, Flax ``.msgpack`` and ``.safetensors``, written by the real frameworks where they are
installed, read through the same bounded, no-code path, plus their hostile variants: each one
clear error naming the file or key, expected vs actual, and the fix.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from np2torch.tasks.errors import LoadError
from np2torch.tasks.load_arrays import detect_format, fingerprint_files, open_array, scan_source

os.environ.setdefault("KERAS_BACKEND", "torch")


def _keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras runs on another backend in this process")
    keras.utils.set_random_seed(0)
    return keras


def _values(recs) -> dict[str, np.ndarray]:
    return {r.key: np.asarray(open_array(r)) for r in recs}


def _left_behind(tmp_path: Path, before: set[Path]) -> set[Path]:
    """Files created by a scan outside the stat cache (nothing should be)."""
    return {q for q in tmp_path.rglob("*") if "np2torch-data" not in q.parts} - before


# ---------------------------------------------------------------------------------------------
# Keras 3 .weights.h5 and legacy .h5, written by Keras


def _keras_cnn(keras):
    from keras import layers

    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3)(inp)
    x = layers.BatchNormalization()(x)
    x = layers.DepthwiseConv2D(3)(x)
    x = layers.SeparableConv2D(5, 1)(x)
    x = layers.Flatten()(x)
    out = layers.Dense(6)(x)
    return keras.Model(inp, out)


def test_keras3_weights_h5_keys_are_keras_variable_paths_in_model_order(tmp_path):
    keras = _keras()
    m = _keras_cnn(keras)
    m(np.zeros((1, 8, 8, 3), np.float32))
    p = tmp_path / "cnn.weights.h5"
    m.save_weights(p)
    assert detect_format(p, "auto") == "h5"
    recs = scan_source(p)
    assert [r.key for r in recs] == [v.path for v in m.weights]  # 'conv2d/kernel', …, 'dense/bias'
    got = _values(recs)
    for v in m.weights:
        np.testing.assert_array_equal(got[v.path], keras.ops.convert_to_numpy(v))
    assert all(r.offset > 0 for r in recs), "contiguous datasets are memory-mapped in place"


def test_keras3_weights_h5_nested_rnn_and_renamed_layers(tmp_path):
    keras = _keras()
    from keras import layers

    inner = keras.Sequential([layers.Dense(3), layers.Dense(2)], name="inner")
    # named explicitly: Keras numbers unnamed layers per process (lstm, lstm_1, ...), and other tests build LSTMs too
    m = keras.Sequential([keras.Input((5, 3)), layers.LSTM(4, return_sequences=True, name="lstm"), layers.Bidirectional(layers.GRU(3)),
                          layers.Dense(4, name="head"), inner])
    p = tmp_path / "rnn.weights.h5"
    m.save_weights(p)
    recs = scan_source(p)
    # Keras's own variable paths, less the model's name: 'lstm/lstm_cell/kernel', 'head/kernel', 'inner/dense/kernel'
    want = {v.path.split("/", 1)[1]: keras.ops.convert_to_numpy(v) for v in m.weights}
    got = _values(recs)
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)
    keys = [r.key for r in recs]
    assert keys.index("lstm/lstm_cell/kernel") < keys.index("head/kernel") < keys.index(f"inner/{m.layers[-1].layers[0].name}/kernel")


@pytest.mark.parametrize("how", ["legacy_weights", "model_save"])
def test_legacy_keras_h5(tmp_path, how):
    keras = _keras()
    m = _keras_cnn(keras)
    m(np.zeros((1, 8, 8, 3), np.float32))
    p = tmp_path / "model.h5"
    if how == "model_save":
        m.save(p)  # legacy full-model HDF5: weights under model_weights/
    else:
        import h5py
        from keras.src.legacy.saving import legacy_h5_format

        with h5py.File(p, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, m)
    recs = scan_source(p, fmt="h5")
    assert [r.key for r in recs] == [v.path for v in m.weights]
    got = _values(recs)
    for v in m.weights:
        np.testing.assert_array_equal(got[v.path], keras.ops.convert_to_numpy(v))


def _legacy_layout(p: Path, arrays: dict[str, dict[str, np.ndarray]], **ds_kw) -> None:
    """The Keras 2 legacy layout, written with h5py: model_weights-less, ':0' weight names."""
    import h5py

    with h5py.File(p, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in arrays]
        for layer, ws in arrays.items():
            g = f.create_group(layer)
            g.attrs["weight_names"] = [f"{layer}/{w}:0".encode() for w in ws]
            for w, a in ws.items():
                g.create_dataset(f"{layer}/{w}:0", data=a, **ds_kw)


def test_legacy_keras2_layout_with_tf_suffixes_and_compressed_datasets(tmp_path):
    pytest.importorskip("h5py")
    rng = np.random.default_rng(1)
    arrays = {"dense_1": {"kernel": rng.standard_normal((4, 3), np.float32), "bias": rng.standard_normal(3).astype(np.float32)},
              "dense": {"kernel": rng.standard_normal((3, 2)).astype(">f8"), "bias": np.zeros(2, np.float32)}}
    p = tmp_path / "w.h5"
    _legacy_layout(p, arrays, compression="gzip", chunks=True)
    recs = scan_source(p)
    assert [r.key for r in recs] == ["dense_1/kernel:0", "dense_1/bias:0", "dense/kernel:0", "dense/bias:0"]
    assert all(r.offset == -1 for r in recs), "compressed datasets cannot be mapped"
    assert recs[2].dtype == ">f8"
    got = _values(recs)
    np.testing.assert_array_equal(got["dense/kernel:0"], arrays["dense"]["kernel"])


# ---------------------------------------------------------------------------------------------
# Flax msgpack


def _flax_bytes_real() -> tuple[bytes, dict[str, np.ndarray]]:
    pytest.importorskip("jax")
    flax = pytest.importorskip("flax")
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(5)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(2)(nn.relu(x))

    variables = MLP().init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
    flat = {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep=None).items()}
    return flax.serialization.to_bytes(variables), flat


def _flax_bytes_layout(tree: dict) -> bytes:
    """Flax's msgpack layout, written with msgpack (ext type 1: [shape, dtype name, C bytes])."""
    msgpack = pytest.importorskip("msgpack")

    def ext(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
        return x

    return msgpack.packb(tree, default=ext, strict_types=True, use_bin_type=True)


def test_flax_msgpack_written_by_flax(tmp_path):
    data, flat = _flax_bytes_real()
    p = tmp_path / "params.msgpack"
    p.write_bytes(data)
    assert detect_format(p, "auto") == "msgpack"
    recs = scan_source(p)
    assert {r.key for r in recs} == set(flat)
    got = _values(recs)
    for k, v in flat.items():
        np.testing.assert_array_equal(got[k], v)


def test_flax_msgpack_layout_memory_mapped_in_order(tmp_path):
    rng = np.random.default_rng(2)
    tree = {"params": {"Dense_0": {"kernel": rng.standard_normal((3, 4)).astype(np.float32), "bias": np.zeros(4, np.float32)},
                       "Dense_1": {"kernel": rng.standard_normal((4, 2)).astype(np.float64), "bias": np.arange(2, dtype=np.int32)}},
            "step": 7}
    p = tmp_path / "ckpt"  # no suffix: detected from its first byte
    p.write_bytes(_flax_bytes_layout(tree))
    assert detect_format(p, "auto") == "msgpack"
    recs = scan_source(p)
    assert [r.key for r in recs] == ["params/Dense_0/kernel", "params/Dense_0/bias", "params/Dense_1/kernel", "params/Dense_1/bias"]
    assert all(r.offset > 0 for r in recs)
    got = _values(recs)
    np.testing.assert_array_equal(got["params/Dense_1/kernel"], tree["params"]["Dense_1"]["kernel"])
    assert isinstance(open_array(recs[0]), np.memmap)


# ---------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_memory_mapped(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    arrays = {"fc.weight": rng.standard_normal((3, 4)).astype(np.float32), "fc.bias": rng.standard_normal(3).astype(np.float16),
              "steps": np.arange(5, dtype=np.int64)}
    p = tmp_path / "model.safetensors"
    save_file(arrays, str(p), metadata={"format": "np"})
    assert detect_format(p, "auto") == "safetensors"
    recs = scan_source(p)
    assert {r.key for r in recs} == set(arrays)
    got = _values(recs)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype
    q = tmp_path / "noext"
    q.write_bytes(p.read_bytes())
    assert detect_format(q, "auto") == "safetensors"


def test_new_formats_prime_in_the_key_read(tmp_path, monkeypatch):
    """The cache-key read (sha256) also computes the scan's fingerprints: one read per file."""
    from safetensors.numpy import save_file

    from np2torch.tasks import fingerprint

    p = tmp_path / "m.safetensors"
    save_file({"a": np.ones(3, np.float32)}, str(p))
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))
    reads = []
    real = fingerprint.file_digests
    monkeypatch.setattr(fingerprint, "file_digests", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    fingerprint_files([p])
    scan_source(p)
    assert len(reads) == 1


# ---------------------------------------------------------------------------------------------
# hostile variants: (file bytes, format, exact message) → one LoadError naming the file


def _st(header: dict | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    import json

    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def _mp_array(shape, dtype: str, data: bytes) -> bytes:
    msgpack = pytest.importorskip("msgpack")
    return msgpack.packb({"params": {"w": msgpack.ExtType(1, msgpack.packb((shape, dtype, data), use_bin_type=True))}}, use_bin_type=True)


HOSTILE = {
    "st-header-longer-than-file": (lambda: _st(b"{}", n=1 << 40), "safetensors",
                                   "safetensors header declares 1099511627776 bytes but the file holds 2 after the length "
                                   "(and the limit is 104857600)"),
    "st-too-short": (lambda: b"\x01\x02", "safetensors", "not a safetensors file: 2 bytes, shorter than the 8-byte header length"),
    "st-not-json": (lambda: _st(b"{not json"), "safetensors",
                    "safetensors header is not valid JSON: Expecting property name enclosed in double quotes"),
    "st-duplicate": (lambda: _st(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                 b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
                     "safetensors", "safetensors header is not valid JSON: duplicate name 'a'"),
    "st-huge-shape": (lambda: _st({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}, b"\0" * 16), "safetensors",
                      "::w|tensor declares shape [1048576, 1048576] F32 (4398046511104 bytes) but its data_offsets span 16"),
    "st-offsets-outside": (lambda: _st({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "safetensors",
                           "::w|tensor's data_offsets [0, 16] fall outside the 8 data bytes"),
    "st-bf16": (lambda: _st({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "safetensors",
                "::w|tensor has dtype BF16, which np2torch cannot read"),
    "st-overlap": (lambda: _st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                               b"\0" * 12), "safetensors", "tensors 'a' and 'b' overlap in the file"),
    "mp-truncated": (lambda: _mp_array([4], "float32", b"\0" * 16)[:-6], "msgpack",
                     "not a valid Flax msgpack checkpoint: a length of 16 bytes at byte"),
    "mp-huge-shape": (lambda: _mp_array([1 << 20, 1 << 20], "float32", b"\0" * 16), "msgpack",
                      "not a valid Flax msgpack checkpoint: array 'params/w' declares shape [1048576, 1048576] float32 "
                      "(4398046511104 bytes) but holds 16 data bytes"),
    "mp-object-dtype": (lambda: _mp_array([1], "object", b"\0" * 8), "msgpack",
                        "not a valid Flax msgpack checkpoint: array 'params/w' has dtype 'object'; supported: float16"),
    "mp-garbage": (lambda: b"\x81\xa1w\xc1", "msgpack", "not a valid Flax msgpack checkpoint: byte 0xc1 at 3 is not MessagePack"),
    "mp-unknown-ext": (lambda: b"\x81\xa1w\xd4\x09\x00", "msgpack", "not a valid Flax msgpack checkpoint: unknown extension type 9 at 'w'"),
    "mp-deep": (lambda: b"\x81\xa1k" * 200 + b"\xc0", "msgpack", "not a valid Flax msgpack checkpoint: nesting deeper than 64"),
    "mp-map32-lies": (lambda: b"\xdf\xff\xff\xff\xff", "msgpack",
                      "not a valid Flax msgpack checkpoint: a length of 1 bytes at byte 5 runs past the end of the file (5 bytes)"),
    "mp-trailing": (lambda: _mp_array([1], "float32", b"\0" * 4) + b"\0", "msgpack",
                    "not a valid Flax msgpack checkpoint: 1 bytes follow the end of the tree"),
    "h5-garbled": (lambda: b"\x89HDF\r\n\x1a\n" + b"\xff" * 200, "h5", "HDF5 file is truncated or corrupt: "),
    "h5-not-hdf5": (lambda: b"hello world", "h5", "not an HDF5 file (no HDF5 signature at its start)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_source_files(tmp_path, case):
    make, fmt, message = HOSTILE[case]
    where, _, message = message.rpartition("|")  # "::key|…": the message names the key inside the file
    p = tmp_path / f"bad.{fmt}"
    p.write_bytes(make())
    before = set(tmp_path.rglob("*"))
    t = time.perf_counter()
    with pytest.raises(LoadError) as ei:
        scan_source(p, fmt=fmt)
    elapsed = time.perf_counter() - t
    text = str(ei.value)
    assert text.startswith(f"[load-arrays] `{p}{where}`: {message}"), text
    assert "Fix: " in text
    assert elapsed < 5, f"{case} took {elapsed:.1f} s"
    assert not _left_behind(tmp_path, before)


def _h5_with(tmp_path: Path, build) -> Path:
    h5py = pytest.importorskip("h5py")
    p = tmp_path / "bad.weights.h5"
    with h5py.File(p, "w") as f:
        build(f, h5py)
    return p


def test_h5_truncated(tmp_path):
    p = _h5_with(tmp_path, lambda f, h5py: f.create_dataset("layers/dense/vars/0", data=np.ones((64, 64), np.float32)))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LoadError, match=rf"^\[load-arrays\] `{p}`: HDF5 file is truncated or corrupt: .*truncated file"):
        scan_source(p)


@pytest.mark.parametrize("kind", ["external", "soft"])
def test_h5_links_are_not_followed(tmp_path, kind):
    secret = tmp_path / "other.h5"
    h5py = pytest.importorskip("h5py")
    with h5py.File(secret, "w") as f:
        f["x"] = np.ones(3, np.float32)

    def build(f, h5py):
        f.create_dataset("layers/dense/vars/0", data=np.ones((2, 2), np.float32))
        f["layers/dense/vars/1"] = h5py.ExternalLink(str(secret), "x") if kind == "external" else h5py.SoftLink("/layers/dense/vars/0")

    p = _h5_with(tmp_path, build)
    what = "an external link" if kind == "external" else "a soft link"
    with pytest.raises(LoadError, match=rf"^\[load-arrays\] `{p}`: HDF5 entry 'layers/dense/vars/1' is {what}; "
                                        r"links to other objects or files are not followed"):
        scan_source(p)


def test_h5_compression_bomb_refused_before_reading(tmp_path):
    def build(f, h5py):
        f.create_dataset("layers/dense/vars/0", shape=(1 << 20, 1 << 14), dtype="f4", chunks=(1024, 1024), compression="gzip")

    p = _h5_with(tmp_path, build)
    with pytest.raises(LoadError, match=rf"^\[load-arrays\] `{p}::/layers/dense/vars/0`: "
                                        r"dataset would expand to 68719476736 bytes from 0 stored "
                                        r"\(ratio > 200\); refusing to read a likely compression bomb"):
        scan_source(p)


def test_h5_string_dataset_is_not_a_parameter(tmp_path):
    p = _h5_with(tmp_path, lambda f, h5py: f.create_dataset("layers/dense/vars/0", data=np.array([b"abc", b"de"])))
    with pytest.raises(LoadError, match=rf"^\[load-arrays\] `{p}`: 1 array\(s\) cannot be model parameters\n"
                                        r"  - `dense/0`: has bytes dtype \|S3"):
        scan_source(p)


def test_h5_variables_with_a_gap_in_their_numbering(tmp_path):
    def build(f, h5py):
        f["layers/dense/vars/0"] = np.ones((2, 2), np.float32)
        f["layers/dense/vars/2"] = np.ones(2, np.float32)

    p = _h5_with(tmp_path, build)
    with pytest.raises(LoadError, match=rf"^\[load-arrays\] `{p}`: variables of 'layers/dense' are not numbered 0\.\.1"):
        scan_source(p)


def test_h5_is_read_through_a_checked_handle(tmp_path):
    """A FIFO named .weights.h5 is refused before HDF5 opens anything (it would block forever)."""
    p = tmp_path / "pipe.weights.h5"
    os.mkfifo(p)
    with pytest.raises(LoadError, match=rf"^\[load-arrays\] `{p}`: refusing to read a FIFO \(named pipe\)"):
        scan_source(p, fmt="h5")


# ---------------------------------------------------------------------------------------------
# Keras 3 native .keras (issue 18): detected by suffix and by content, read in place, in the config's order


def test_keras_native_file_detected_by_content_and_read_in_config_order(tmp_path):
    keras = _keras()
    from keras import layers

    from np2torch.tasks.readers.keras_zip import keras_layer_order

    inner = keras.Sequential([layers.Dense(3, name="d3"), layers.Dense(2, name="d2")], name="inner")
    m = keras.Sequential([keras.Input((4,)), layers.Dense(5, name="zeta"), layers.BatchNormalization(name="alpha"), inner])
    p = tmp_path / "m.keras"
    m.save(p)
    q = tmp_path / "m.zip"  # no .keras suffix: a zip with config.json and model.weights.h5 is still one (it was read as an .npz)
    q.write_bytes(p.read_bytes())
    np.savez(tmp_path / "plain.bin", a=np.ones(2))
    assert [detect_format(x, "auto") for x in (p, q, tmp_path / "plain.bin.npz")] == ["keras", "keras", "npz"]
    assert keras_layer_order(p) == ["zeta", "alpha", "inner", "inner/d3", "inner/d2"]
    before = set(tmp_path.rglob("*"))
    recs = scan_source(q)
    want = {v.path.removeprefix(f"{m.name}/"): keras.ops.convert_to_numpy(v) for v in m.weights}
    assert [r.key for r in recs] == list(want)  # the model's order
    got = _values(recs)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)
    assert all(r.offset > 0 for r in recs) and isinstance(open_array(recs[0]), np.memmap)
    assert not _left_behind(tmp_path, before), "nothing is extracted to disk"


def test_keras_native_file_layer_order_comes_from_its_config_not_the_file_layout(tmp_path):
    """Layers written to model.weights.h5 in one order and listed in config.json in another: the config wins."""
    import io
    import json
    import zipfile

    h5py = pytest.importorskip("h5py")
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        for segment, name in (("dense", "first_written"), ("dense_1", "head")):
            f[f"layers/{segment}/vars/0"] = np.ones((2, 2), np.float32)
            f[f"layers/{segment}/vars/1"] = np.ones(2, np.float32)
            f[f"layers/{segment}/vars"].attrs["name"] = name
    p = tmp_path / "m.keras"
    dense = [{"class_name": "Dense", "config": {"name": n}} for n in ("head", "first_written")]
    cfg = {"class_name": "Functional", "config": {"layers": dense}}
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("config.json", json.dumps(cfg))
        zf.writestr("model.weights.h5", buf.getvalue())
    assert [r.key for r in scan_source(p)] == ["head/kernel", "head/bias", "first_written/kernel", "first_written/bias"]


def test_keras_native_file_rezipped_with_deflate_is_inflated_under_the_bound(tmp_path):
    import zipfile

    keras = _keras()
    from keras import layers

    m = keras.Sequential([keras.Input((4,)), layers.Dense(5, name="fc"), layers.Dense(2, name="head")])
    p = tmp_path / "m.keras"
    m.save(p)
    q = tmp_path / "deflated.keras"
    with zipfile.ZipFile(p) as src, zipfile.ZipFile(q, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    recs = scan_source(q)
    assert all(r.offset == -1 and r.reader == "keras" for r in recs)  # not a byte range of the file: read through the reader
    got = _values(recs)
    for v in m.weights:
        np.testing.assert_array_equal(got[v.path.removeprefix(f"{m.name}/")], keras.ops.convert_to_numpy(v))
