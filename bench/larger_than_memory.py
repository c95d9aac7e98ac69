"""Benchmark: convert a model larger than this machine's memory, end to end, with sharded export.

    python bench/larger_than_memory.py                # larger than RAM (MemTotal × 1.1): needs ~2.2× that on disk
    python bench/larger_than_memory.py --gb 1 --shard-size 300MB   # a small trial

Generates at run time blocks of Dense 4096→16384→4096 (ReLU, residual; Keras ``(in, out)``
kernels and biases), one ``.npy`` per array, plus a verify input and its float64 reference
output, under ``data/bench-ltm/`` (git-ignored). Then, each in its own process after ``sync``:

- the floor: one pass that reads every input, hashes it (``openssl dgst -sha256``), writes the
  same bytes to one file and syncs it (``cat | tee | openssl`` then ``sync``);
- np2torch's six stages as plain functions (no Prefect), ``export.max_shard_size`` set, wall
  time and peak RSS (``/usr/bin/time``), per-stage seconds.

Then every exported shard is opened on its own with ``safetensors`` (never the whole model at
once) and checked against the sources (a transposed kernel and a bias per block), and the index
against the shards. Everything generated is deleted at the end (unless ``--keep``).
Targets (issue 17): peak RSS ≤ 2 GB, wall ≤ 2 × the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_large as cl  # noqa: E402  (run_child, machine, the stages runner)

REPO = cl.REPO
D, F = 4096, 16384

MODEL_SOURCE = '''"""Bench model: Dense d→f → ReLU → Dense f→d, residual, per block."""
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class WideMLP(nn.Module):
    def __init__(self, n_blocks: int, d: int = 4096, f: int = 16384):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, f) for _ in range(n_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x
'''


def ram_bytes() -> int:
    return next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")) * 1024


def generate(root: Path, gb: float, shard_size: str) -> dict:
    block_bytes = 4 * (2 * D * F + F + D)
    n_blocks = max(1, -(-int(gb * 1e9) // block_bytes))  # at least gb
    weights = root / "weights"
    rng = np.random.default_rng(0)
    x = np.random.default_rng(1).standard_normal((2, D)).astype(np.float32)
    np.save(root / "input.npy", x)
    h = x.astype(np.float64)
    for i in range(n_blocks):
        p = weights / "blocks" / str(i)
        arrs = {}
        for name, (n_in, n_out) in (("fc1", (D, F)), ("fc2", (F, D))):
            k = rng.standard_normal((n_in, n_out), dtype=np.float32)
            k *= np.float32(0.5 / np.sqrt(n_in))
            b = rng.standard_normal(n_out, dtype=np.float32) * np.float32(0.02)
            (p / name).mkdir(parents=True, exist_ok=True)
            np.save(p / name / "kernel.npy", k)
            np.save(p / name / "bias.npy", b)
            arrs[name] = (k, b)
        (k1, b1), (k2, b2) = arrs["fc1"], arrs["fc2"]
        h = h + np.maximum(h @ k1 + b1, 0) @ k2 + b2  # the Keras model in float64, block by block
        del arrs, k1, k2
    np.save(root / "ref_out.npy", h)
    (root / "wide_model.py").write_text(MODEL_SOURCE)
    cfg = {
        "name": "bench-ltm",
        "source": {"path": str(weights), "format": "npy-dir"},
        "model": {"target": f"{root / 'wide_model.py'}:WideMLP", "kwargs": {"n_blocks": n_blocks, "d": D, "f": F}},
        "mapping": {"strategy": "name", "preset": "keras"},
        "convert": {"dtype": "float32", "device": "cpu"},
        "verify": {"input": str(root / "input.npy"), "reference_output": str(root / "ref_out.npy"), "rtol": 1e-3, "atol": 1e-3},
        "export": {"dir": str(root / "out"), "formats": ["safetensors"], "max_shard_size": shard_size},
    }
    (root / "ltm.yaml").write_text(json.dumps(cfg, indent=1))
    return {"n_blocks": n_blocks, "model_bytes": n_blocks * block_bytes, "weights": str(weights)}


def check_export(out: Path, weights: Path, n_blocks: int) -> dict:
    """Open each shard on its own (safetensors) and compare sampled tensors with the sources."""
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    seen, checked = set(), 0
    for s in shards:
        with safe_open(str(out / s), framework="np") as f:
            keys = set(f.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == s}, f"{s}: keys differ from the index"
            seen |= keys
            for k in sorted(keys):
                blk, name, leaf = k.split(".")[1], k.split(".")[2], k.split(".")[3]
                if leaf == "bias" or (int(blk) in (0, n_blocks - 1)):
                    src = np.load(weights / "blocks" / blk / name / f"{'kernel' if leaf == 'weight' else 'bias'}.npy", mmap_mode="r")
                    got = f.get_slice(k)[:64] if leaf == "weight" else f.get_tensor(k)
                    want = src.T[:64] if leaf == "weight" else src
                    assert np.array_equal(got, want), f"{k} differs from its source"
                    checked += 1
    assert len(seen) == 4 * n_blocks
    return {"shards": len(shards), "tensors": len(seen), "tensors_compared": checked, "total_size": index["metadata"]["total_size"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=None, help="model size in GB (1e9 bytes); default: 1.1 × this machine's RAM")
    ap.add_argument("--shard-size", default="5GB", help="export.max_shard_size (default 5GB, as transformers)")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "bench-ltm", help="where everything goes (deleted unless --keep)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    gb = args.gb if args.gb is not None else 1.1 * ram_bytes() / 1e9
    root = args.data.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    free = shutil.disk_usage(root).free
    if free < 2.2 * gb * 1e9:  # the inputs, then the floor's copy (deleted) or the converted shards (the export links them)
        sys.exit(f"needs about {2.2 * gb:.0f} GB free under {root}, has {free / 1e9:.0f} GB")
    try:
        mach = cl.machine()
        t = time.perf_counter()
        gen = generate(root, gb, args.shard_size)
        print(f"generated {gen['n_blocks']} blocks, {gen['model_bytes'] / 1e9:.2f} GB ({gen['model_bytes'] / ram_bytes():.2f} × RAM) "
              f"in {time.perf_counter() - t:.0f}s", flush=True)
        inputs = f"find {gen['weights']} -name '*.npy' -print0 | sort -z | xargs -0 cat"
        floor = cl.run_child(["sh", "-c", f"{inputs} | tee {root / 'floor.bin'} | openssl dgst -sha256 > /dev/null && sync"])
        (root / "floor.bin").unlink()
        env = {**os.environ, "PYTHONPATH": str(REPO), "NP2TORCH_DATA_DIR": str(root / "np2torch"),
               "NP2TORCH_AUDIT_LOG": str(root / "audit.jsonl"), "NP2TORCH_PROGRESS": "0"}
        conv = cl.run_child([sys.executable, str(Path(cl.__file__).resolve()), "--role", "stages", "--config", str(root / "ltm.yaml")], env)
        if conv.get("failed"):
            sys.exit("the conversion failed (see above)")
        checked = check_export(root / "out", Path(gen["weights"]), gen["n_blocks"])
        res = {"machine": mach, "gen": gen, "shard_size": args.shard_size, "floor": floor, "np2torch": conv, "export_check": checked}
        (REPO / "bench" / f"results-ltm-{gb:.3g}gb.json").write_text(json.dumps(res, indent=1))
        print(markdown(res))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def markdown(res: dict) -> str:
    gen, fl, cv, m = res["gen"], res["floor"], res["np2torch"], res["machine"]
    stages = ", ".join(f"{k} {v['s']:.1f}s" for k, v in cv["info"]["stages"].items())
    return "\n".join([
        f"Model: {gen['n_blocks']} blocks of Dense {D}↔{F}, {gen['model_bytes'] / 1e9:.2f} GB float32, one .npy per array; "
        f"machine {m['nproc']} cores, {m['ram_gib']} GiB RAM; load average at start {m['loadavg_at_start'][0]:.2f}; "
        f"export.max_shard_size {res['shard_size']}.", "",
        "| run | wall s | CPU s | peak RSS MiB |", "|---|---|---|---|",
        f"| floor: read + openssl sha256 + write + sync, one pass | {fl['wall_s']:.1f} | {fl['cpu_s']:.1f} | {fl['maxrss_mb']:.0f} |",
        f"| np2torch six stages, sharded export | {cv['wall_s']:.1f} | {cv['cpu_s']:.1f} | {cv['maxrss_mb']:.0f} |", "",
        f"Stages: {stages}. Verification: {cv['info'].get('verification')}.",
        f"Export: {res['export_check']['shards']} shards, {res['export_check']['tensors']} tensors, each shard opened on its own with "
        f"safetensors, {res['export_check']['tensors_compared']} tensors compared with their sources.", "",
        "| ratio | value | target |", "|---|---|---|",
        f"| np2torch wall / floor wall | {cv['wall_s'] / fl['wall_s']:.2f} | ≤ 2 |",
        f"| np2torch work (excl. {cv['info']['import_s']:.1f} s of imports) / floor wall | {cv['info']['work_s'] / fl['wall_s']:.2f} | |",
        f"| np2torch peak RSS | {cv['maxrss_mb'] / 1024:.2f} GiB | ≤ 2 GB |",
    ])


if __name__ == "__main__":
    main()
