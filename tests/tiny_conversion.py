"""A tiny, fully controlled conversion for cache/retry/audit tests (no bundled example needed).

An MLP(4, 6, 3) saved as one ``.npy`` per state-dict key in a folder, a verify input file, and
a config that points at them with relative paths, so the whole tree can be copied elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "configs" / "models" / "mlp.py"
KWARGS = {"in_features": 4, "hidden": 6, "out_features": 3}


def make_tiny(root: Path, *, name: str = "tiny", with_reference: bool = True) -> Path:
    """Write ``root/{weights/, input.npy, ref_out.npy, tiny.yaml}``; return the config path."""
    import importlib.util

    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("tiny_mlp", MODEL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.MLP(**KWARGS).eval()
    weights = root / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    for k, v in model.state_dict().items():
        np.save(weights / f"{k}.npy", v.numpy())
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.save(root / "input.npy", x)
    with torch.no_grad():
        np.save(root / "ref_out.npy", model(torch.from_numpy(x)).numpy())
    cfg = {
        "name": name,
        "source": {"path": "weights", "format": "npy-dir"},
        "model": {"target": f"{MODEL}:MLP", "kwargs": KWARGS},
        "mapping": {"strategy": "name", "preset": "none"},
        "convert": {"dtype": "float32", "device": "cpu"},
        "verify": {"input": "input.npy", "reference_output": "ref_out.npy" if with_reference else None, "rtol": 1e-5, "atol": 1e-6},
        "export": {"dir": "out", "formats": ["safetensors", "pt"]},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cached_stage_in_process(data_dir: str, calls: str, barrier, out) -> None:  # noqa: ANN001 - multiprocessing objects
    """Child process body: run one cached stage whose compute is slow and leaves a trace."""
    import os
    import time

    os.environ["NP2TORCH_DATA_DIR"] = data_dir
    from np2torch.tasks import cache

    def compute(work: Path) -> dict:
        with open(calls, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for the other process to reach the lock
        (work / "artifact.bin").write_bytes(os.urandom(64))
        return {"pid": os.getpid()}

    barrier.wait(30)
    rec = cache.run_cached("demo", "d" * 64, compute)
    out.put({"cached": rec.cached, "pid": rec.record["pid"]})


def flip_byte(path: Path, *, from_end: int = 1) -> None:
    """Change one byte of a file in place (the last data byte of an .npy by default)."""
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x01
    path.write_bytes(bytes(data))
