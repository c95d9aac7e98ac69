"""Property-based fuzzing of the array readers (issue 7; safetensors and Flax msgpack: issue 11).

Valid ``.npy``, ``.npz``, ``.safetensors`` and Flax ``.msgpack`` bytes are mutated (truncation, bit flips, byte overwrites,
insertions, header edits). Whatever comes out, the reader (``scan_source`` + ``open_array`` +
``np.asarray`` of each) either returns exactly the arrays NumPy itself reads from those bytes, or
raises np2torch's :class:`LoadError` — never another exception, never a crash, never a hang.

CI runs a bounded budget (profile ``ci``: 150 examples per test, deterministic). To fuzz longer::

    HYPOTHESIS_PROFILE=long PYTHONPATH=$PWD python -m pytest -q tests/test_fuzz.py   # 20 000 examples each
    HYPOTHESIS_PROFILE=long HYPOTHESIS_MAX_EXAMPLES=200000 python -m pytest -q tests/test_fuzz.py

Failures are shrunk to a minimal mutation and printed; they are stored in ``.hypothesis/``
and replayed first on the next run.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import signal
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from np2torch.tasks.errors import LoadError
from np2torch.tasks.load_arrays import open_array, scan_source

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 20_000)), deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HANG_SECONDS = 10  # one read of a few-KB file takes milliseconds; this long is a hang
_counter = itertools.count()


class Hang(Exception):
    pass


@contextmanager
def deadline(seconds: float):
    """Fail an example that runs too long (SIGALRM interrupts a pure-Python loop or a blocking read)."""

    def on_alarm(signum, frame):
        raise Hang(f"reader still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _npy(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def _npz(arrays: dict[str, np.ndarray], compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


rng = np.random.default_rng(7)
NPY_SEEDS = [
    _npy(rng.standard_normal((3, 4)).astype(np.float32)),
    _npy(np.asfortranarray(rng.standard_normal((2, 3, 2)))),  # Fortran order, float64
    _npy(rng.standard_normal(5).astype(">f4")),  # big-endian
    _npy(np.arange(6, dtype=np.int64).reshape(2, 3)),
    _npy(np.float16(1.5) * np.ones((2, 2), np.float16)),
    _npy(np.array(3.25, np.float32)),  # 0-d
    _npy(np.zeros((0, 3), np.float32)),  # empty
    _npy(np.array([True, False, True])),
]
NPZ_SEEDS = [
    _npz({"a": rng.standard_normal((3, 2)).astype(np.float32), "b/c": np.arange(4, dtype=np.int32)}, compressed=False),
    _npz({"w": rng.standard_normal((4, 3)), "bias": np.zeros(3, ">f4")}, compressed=True),
    _npz({"x": np.asfortranarray(rng.standard_normal((2, 5)).astype(np.float32))}, compressed=False),
]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """One seed with 1-4 mutations: truncate, flip a bit, overwrite, insert, or edit the header text."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "header"]))
        if op == "truncate":
            del data[draw(st.integers(0, len(data) - 1)):]
        elif op == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            i = draw(st.integers(0, len(data) - 1))
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[i : i + len(chunk)] = chunk
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:  # header edits: replace a token the parser cares about with another plausible one
            tokens = [b"'<f4'", b"'<f8'", b"'>f4'", b"'<i8'", b"'|b1'", b"'<f2'", b"(3, 4)", b"(2, 3, 2)", b"(5,)", b"(2, 3)",
                      b"()", b"(0, 3)", b"False", b"True", b"'descr'", b"'shape'", b"'fortran_order'", b"\x01\x00", b"\x02\x00"]
            present = [t for t in tokens if t in data]
            if not present:
                continue
            old = draw(st.sampled_from(present))
            new = draw(st.sampled_from(tokens + [b"(1000000000, 1000000000)", b"(-1,)", b"'<c8'", b"'O'", b"'<U3'", b"'<M8[s]'",
                                                 b"(3, 'x')", b"None", b"{}", b"'<f4', 'x': (", b"(2**62,)",
                                                 b"(4294967296, 4294967296, 16)"]))
            at = draw(st.sampled_from([i for i in range(len(data)) if data.startswith(old, i)]))
            data[at : at + len(old)] = new
    return bytes(data)


def _reference(raw: bytes, suffix: str) -> dict[str, np.ndarray] | Exception:
    """What NumPy itself reads from these bytes (no pickles), or why it cannot."""
    try:
        if suffix == ".npz":  # what np.load does after its magic check (zipfile also accepts a prefix before the archive)
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                return {n.removesuffix(".npy"): np.lib.format.read_array(zf.open(n), allow_pickle=False) for n in zf.namelist()}
        return {"w": np.load(io.BytesIO(raw), allow_pickle=False)}
    except Exception as exc:  # noqa: BLE001 - any failure means "NumPy cannot read it"
        return exc


def _read_with_np2torch(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for rec in scan_source(path):
        arr = np.asarray(open_array(rec))
        assert arr.shape == rec.shape and arr.dtype.str == rec.dtype, (rec, arr.shape, arr.dtype)
        out[rec.key] = np.array(arr)  # touch every byte of the memory map
    return out


def _check(tmp_path: Path, raw: bytes, suffix: str) -> None:
    path = tmp_path / f"fuzz-{next(_counter)}{suffix}"  # a fresh file each time: no stat-cache aliasing
    path.write_bytes(raw)
    try:
        with deadline(HANG_SECONDS):
            got = _read_with_np2torch(path)
    except LoadError:
        return  # np2torch's own, clear error: fine
    if suffix == ".npy":  # one array, keyed by the file stem
        got = {"w": got.pop(path.stem)}
    ref = _reference(raw, suffix)
    assert not isinstance(ref, Exception), f"np2torch read {sorted(got)} from bytes NumPy cannot read: {ref!r}"
    assert sorted(got) == sorted(ref)
    for k, a in got.items():
        b = ref[k]
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, b.dtype, a.shape, b.shape)
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"values of {k} differ from NumPy's"


@pytest.fixture(autouse=True)
def _no_stat_cache_writes(monkeypatch):
    monkeypatch.setenv("NP2TORCH_READ_ONLY", "1")


@PROFILE
@given(raw=mutated(NPY_SEEDS))
def test_fuzz_npy(tmp_path, raw):
    _check(tmp_path, raw, ".npy")


@PROFILE
@given(raw=mutated(NPZ_SEEDS))
def test_fuzz_npz(tmp_path, raw):
    _check(tmp_path, raw, ".npz")


def _object_array(*items: np.ndarray) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = list(items) if len({i.shape for i in items}) > 1 else [None] * len(items)
    for i, a in enumerate(items):
        out[i] = a
    return out


PICKLE_SEEDS = [
    pickle.dumps([np.ones((2, 3), np.float32), np.arange(3.0)], protocol=p) for p in (2, 4, 5)
] + [_npy(_object_array(np.ones(2, np.float32), np.zeros((2, 2))), allow_pickle=True)]


@PROFILE
@given(raw=mutated(PICKLE_SEEDS))
def test_fuzz_restricted_unpickler(tmp_path, raw):
    """Mutated pickles (opted in): numeric arrays or LoadError; nothing else, and no global outside the allow-list."""
    path = tmp_path / f"fuzz-{next(_counter)}.pkl"
    path.write_bytes(raw)
    try:
        with deadline(HANG_SECONDS):
            recs = scan_source(path, allow_pickle=True)
            arrays = [np.asarray(open_array(r)) for r in recs]
    except LoadError:
        return
    for r, a in zip(recs, arrays):
        assert a.dtype.kind in "fiub" and a.shape == r.shape and a.dtype.str == r.dtype


def test_fuzz_seeds_read_back_exactly(tmp_path):
    """The unmutated seeds are read exactly as NumPy reads them (the oracle's control)."""
    for raw in NPY_SEEDS:
        _check(tmp_path, raw, ".npy")
        path = tmp_path / f"seed-{next(_counter)}.npy"
        path.write_bytes(raw)
        assert len(_read_with_np2torch(path)) == 1
    for raw in NPZ_SEEDS:
        path = tmp_path / f"seed-{next(_counter)}.npz"
        path.write_bytes(raw)
        assert sorted(_read_with_np2torch(path)) == sorted(_reference(raw, ".npz"))


# ---------------------------------------------------------------------------------------------
# safetensors and Flax msgpack (issue 11 item 7): the oracle is the format's own library


def _safetensors(arrays: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(arrays)


def _flax_msgpack(tree: dict) -> bytes:
    msgpack = pytest.importorskip("msgpack")

    def ext(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
        return x

    return msgpack.packb(tree, default=ext, strict_types=True, use_bin_type=True)


ST_SEEDS = [
    _safetensors({"fc.weight": rng.standard_normal((3, 4)).astype(np.float32), "fc.bias": np.zeros(3, np.float16)}),
    _safetensors({"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.array([True, False])}),
]
MSGPACK_SEEDS = [
    _flax_msgpack({"params": {"Dense_0": {"kernel": rng.standard_normal((3, 2)).astype(np.float32), "bias": np.zeros(2, np.float32)}}}),
    _flax_msgpack({"params": {"w": rng.standard_normal(4)}, "batch_stats": {"mean": np.ones(2, np.float32)}, "step": 3}),
]


def _reference_other(raw: bytes, fmt: str) -> dict[str, np.ndarray] | Exception:
    try:
        if fmt == "safetensors":
            from safetensors.numpy import load

            return load(raw)
        msgpack = pytest.importorskip("msgpack")

        def ext_hook(code, data):
            if code != 1:
                raise ValueError(f"ext {code}")
            shape, name, buf = msgpack.unpackb(data, raw=False)
            return np.frombuffer(buf, dtype=np.dtype(name)).reshape(shape)

        out: dict[str, np.ndarray] = {}

        def walk(prefix, node):
            for k, v in node.items():
                key = f"{prefix}/{k}" if prefix else str(k)
                if isinstance(v, dict):
                    walk(key, v)
                elif isinstance(v, np.ndarray):
                    out[key] = v

        walk("", msgpack.unpackb(raw, ext_hook=ext_hook, raw=False, strict_map_key=False))
        return out
    except Exception as exc:  # noqa: BLE001 - any failure means "the library cannot read it"
        return exc


def _check_other(tmp_path: Path, raw: bytes, fmt: str) -> None:
    path = tmp_path / f"fuzz-{next(_counter)}.{fmt}"
    path.write_bytes(raw)
    try:
        with deadline(HANG_SECONDS):
            got = {}
            for rec in scan_source(path, fmt=fmt):
                arr = np.asarray(open_array(rec))
                assert arr.shape == rec.shape and arr.dtype.str == rec.dtype
                got[rec.key] = np.array(arr)
    except LoadError:
        return
    ref = _reference_other(raw, fmt)
    assert not isinstance(ref, Exception), f"np2torch read {sorted(got)} from bytes the library cannot read: {ref!r}"
    assert sorted(got) == sorted(ref)
    for k, a in got.items():
        b = ref[k]
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"values of {k} differ"


@PROFILE
@given(raw=mutated(ST_SEEDS))
def test_fuzz_safetensors(tmp_path, raw):
    _check_other(tmp_path, raw, "safetensors")


@PROFILE
@given(raw=mutated(MSGPACK_SEEDS))
def test_fuzz_flax_msgpack(tmp_path, raw):
    _check_other(tmp_path, raw, "msgpack")


def test_fuzz_other_seeds_read_back_exactly(tmp_path):
    for raw, fmt in [(r, "safetensors") for r in ST_SEEDS] + [(r, "msgpack") for r in MSGPACK_SEEDS]:
        ref = _reference_other(raw, fmt)
        assert not isinstance(ref, Exception)
        path = tmp_path / f"seed-{next(_counter)}.{fmt}"
        path.write_bytes(raw)
        assert sorted(r.key for r in scan_source(path, fmt=fmt)) == sorted(ref)
