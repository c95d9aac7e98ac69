"""Generate the bundled example inputs for np2torch, deterministically.

    python data/make_examples.py [--out data/examples]

For each example this writes the source arrays (in the layout the "source framework" would
have saved them), a verify input and a reference output. The reference output is computed on
the source side, in NumPy (float64, saved as float32), never through the PyTorch model class or
np2torch, so verifying a conversion against it is an independent check.

Every file is byte-for-byte reproducible (fixed seeds; .npz members carry a fixed timestamp),
so the source fingerprints np2torch records stay stable across regenerations.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # works both as a script and when imported by file path
    sys.path.insert(0, str(_HERE))

import reference_ops as ops  # noqa: E402

EXAMPLES = ("mlp", "seed-flat", "seed-layers", "seed-pickled", "keras-cnn")
KERAS_CNN_FLAT_CHW = (16, 11, 11)  # conv2d_1 output before Flatten: C, H, W (28 -> 26 -> 13 -> 11)

F32 = np.float32


# ----------------------------------------------------------------------------- writers

def _save_npy(path: Path, arr: np.ndarray, allow_pickle: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=allow_pickle)
    os.replace(tmp, path)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez (stored, member "<key>.npy"), but with a fixed timestamp: reproducible bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def _object_array(arrays: list[np.ndarray]) -> np.ndarray:
    """np.array(arrays, dtype=object), but always a 1-D array of the arrays themselves.

    (np.array(list, dtype=object) tries to broadcast when the leading dims happen to agree.)
    """
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _init(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(F32)


# ----------------------------------------------------------------------------- examples

def _mlp(d: Path) -> None:
    rng = np.random.default_rng(1001)
    sizes = [8, 16, 16, 4]
    w: dict[str, np.ndarray] = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        w[f"fc{i}.weight"] = _init(rng, (n_out, n_in), n_in)  # PyTorch layout (out, in)
        w[f"fc{i}.bias"] = _init(rng, (n_out,), n_in)
    x = rng.standard_normal((4, 8)).astype(F32)
    h = ops.relu(ops.dense(x, w["fc1.weight"].T, w["fc1.bias"]))
    h = ops.relu(ops.dense(h, w["fc2.weight"].T, w["fc2.bias"]))
    y = ops.dense(h, w["fc3.weight"].T, w["fc3.bias"])
    _save_npz(d / "weights.npz", w)
    _save_npy(d / "input.npy", x)
    _save_npy(d / "ref_out.npy", y.astype(F32))


def _seed_flat(d: Path) -> None:
    """Seed Example 1: one flat vector; the weight is stored (in, out) = (2, 10), then 10 biases."""
    rng = np.random.default_rng(1002)
    w_in_out = _init(rng, (2, 10), 2)
    b = _init(rng, (10,), 2)
    params = np.concatenate([w_in_out.ravel(), b]).astype(F32)
    x = rng.standard_normal((4, 2)).astype(F32)
    y = ops.dense(x, w_in_out, b)
    _save_npy(d / "params.npy", params)
    _save_npy(d / "input.npy", x)
    _save_npy(d / "ref_out.npy", y.astype(F32))


def _seed_layers(d: Path) -> None:
    """Seed Example 2: one flat .npy per parametrized layer: weight (PyTorch layout, C-order), then bias."""
    rng = np.random.default_rng(1003)
    conv_w = _init(rng, (16, 3, 3, 3), 3 * 9)  # OIHW
    conv_b = _init(rng, (16,), 3 * 9)
    fc1_w = _init(rng, (128, 16 * 26 * 26), 16 * 26 * 26)
    fc1_b = _init(rng, (128,), 16 * 26 * 26)
    fc2_w = _init(rng, (10, 128), 128)
    fc2_b = _init(rng, (10,), 128)
    x = rng.random((2, 3, 28, 28)).astype(F32)  # NCHW

    # Forward of the PyTorch-layout model, in NumPy: run the NHWC conv op on transposed data.
    h = ops.conv2d_nhwc(x.transpose(0, 2, 3, 1), conv_w.transpose(2, 3, 1, 0), conv_b)
    h = ops.relu(h).transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # flatten in (C, H, W) order
    h = ops.relu(ops.dense(h, fc1_w.T, fc1_b))
    y = ops.dense(h, fc2_w.T, fc2_b)

    layers = d / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    for i, (w, b) in enumerate([(conv_w, conv_b), (fc1_w, fc1_b), (fc2_w, fc2_b)]):
        _save_npy(layers / f"layer_{i}.npy", np.concatenate([w.ravel(), b]).astype(F32))
    _save_npy(d / "input.npy", x)
    _save_npy(d / "ref_out.npy", y.astype(F32))


def _seed_pickled(d: Path) -> None:
    """Seed Example 3: a pickled object array of the parameters in model.parameters() order."""
    rng = np.random.default_rng(1004)
    fc1_w, fc1_b = _init(rng, (8, 4), 4), _init(rng, (8,), 4)
    fc2_w, fc2_b = _init(rng, (3, 8), 8), _init(rng, (3,), 8)
    x = rng.standard_normal((4, 4)).astype(F32)
    y = ops.dense(ops.relu(ops.dense(x, fc1_w.T, fc1_b)), fc2_w.T, fc2_b)
    _save_npy(d / "params.npy", _object_array([fc1_w, fc1_b, fc2_w, fc2_b]), allow_pickle=True)
    _save_npy(d / "input.npy", x)
    _save_npy(d / "ref_out.npy", y.astype(F32))


def _bn_params(rng: np.random.Generator, c: int, prefix: str) -> dict[str, np.ndarray]:
    return {
        f"{prefix}/gamma": rng.uniform(0.5, 1.5, c).astype(F32),
        f"{prefix}/beta": (0.2 * rng.standard_normal(c)).astype(F32),
        f"{prefix}/moving_mean": (0.5 * rng.standard_normal(c)).astype(F32),
        f"{prefix}/moving_variance": rng.uniform(0.3, 2.5, c).astype(F32),
    }


def _keras_cnn(d: Path) -> None:
    """A small Keras CNN saved with Keras names and layouts (HWIO kernels, (in, out) dense)."""
    rng = np.random.default_rng(1005)
    c, h, w_ = KERAS_CNN_FLAT_CHW
    n_flat = c * h * w_
    p: dict[str, np.ndarray] = {}
    p["conv2d/kernel"] = _init(rng, (3, 3, 1, 8), 9)
    p["conv2d/bias"] = _init(rng, (8,), 9)
    p.update(_bn_params(rng, 8, "batch_normalization"))
    p["conv2d_1/kernel"] = _init(rng, (3, 3, 8, 16), 9 * 8)
    p["conv2d_1/bias"] = _init(rng, (16,), 9 * 8)
    p.update(_bn_params(rng, 16, "batch_normalization_1"))
    p["dense/kernel"] = _init(rng, (n_flat, 32), n_flat)
    p["dense/bias"] = _init(rng, (32,), n_flat)
    p["dense_1/kernel"] = _init(rng, (32, 10), 32)
    p["dense_1/bias"] = _init(rng, (10,), 32)
    x = rng.random((4, 28, 28, 1)).astype(F32)  # NHWC, like Keras

    def bn(t, prefix):
        return ops.batchnorm(t, p[f"{prefix}/gamma"], p[f"{prefix}/beta"],
                             p[f"{prefix}/moving_mean"], p[f"{prefix}/moving_variance"], eps=1e-3)

    t = ops.conv2d_nhwc(x, p["conv2d/kernel"], p["conv2d/bias"])
    t = ops.maxpool2d_nhwc(ops.relu(bn(t, "batch_normalization")), 2)
    t = ops.conv2d_nhwc(t, p["conv2d_1/kernel"], p["conv2d_1/bias"])
    t = ops.relu(bn(t, "batch_normalization_1"))
    assert t.shape[1:] == (h, w_, c), t.shape
    t = ops.flatten_nhwc(t)  # channels-last feature order: the point of this example
    t = ops.relu(ops.dense(t, p["dense/kernel"], p["dense/bias"]))
    y = ops.dense(t, p["dense_1/kernel"], p["dense_1/bias"])

    _save_npz(d / "weights.npz", p)
    _save_npy(d / "input.npy", x)
    _save_npy(d / "ref_out.npy", y.astype(F32))


_BUILDERS = {
    "mlp": _mlp,
    "seed-flat": _seed_flat,
    "seed-layers": _seed_layers,
    "seed-pickled": _seed_pickled,
    "keras-cnn": _keras_cnn,
}


def make_examples(out_dir: Path) -> dict[str, Path]:
    """Write every example under out_dir/<name>/; return {name: folder}."""
    out_dir = Path(out_dir)
    result: dict[str, Path] = {}
    for name in EXAMPLES:
        d = out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        _BUILDERS[name](d)
        result[name] = d
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=_HERE / "examples",
                    help="output folder (default: data/examples next to this script)")
    args = ap.parse_args(argv)
    made = make_examples(args.out)
    print(f"example data (the bundled examples' weights, inputs and reference outputs) in {args.out}:")
    for name, d in made.items():
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        print(f"  example {name:13s} {d}  ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
