"""Where the seconds of the large path go: stage by stage, and the pieces of convert/export.

Generates the convert_large.py model at ``--gb`` (default 0.4), then, each in a fresh process
with an empty cache, alternating so that machine noise hits both alike:

- the six stages (tensors streamed in cache-sized blocks, write-back started as each tensor is
  hashed, one fsync before the rename; the alternative write engines and write-back modes this
  once compared were removed from the product after bench/README.md's measurements);
- micro-measurements of the pieces: reading the sources (``cat``), a transposed copy of one
  kernel (torch ``copy_``, 1 and N threads), ``pwrite`` of the converted bytes into the page
  cache, the final ``fsync``, sha256 of the same bytes, ``os.link`` + rename.

    PYTHONPATH=$PWD .venv/bin/python bench/profile_stages.py --gb 0.4 [--reps 2]

Removes its data at the end (unless --keep).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def pieces(root: Path) -> dict[str, float]:
    """Seconds of each elementary piece over the whole model's bytes."""
    import numpy as np
    import torch

    files = sorted((root / "weights").rglob("*.npy"))
    total = sum(f.stat().st_size for f in files)
    out: dict[str, float] = {"model_gb": total / 1e9}
    t = time.perf_counter()
    subprocess.run(["sh", "-c", f"find {root}/weights -name '*.npy' -exec cat {{}} + > /dev/null"], check=True)
    out["read all (cat, page cache)"] = time.perf_counter() - t
    kernels = [f for f in files if f.name == "kernel.npy"]
    for threads in (1, os.cpu_count() or 1):
        torch.set_num_threads(threads)
        t = time.perf_counter()
        for f in kernels:
            a = np.load(f, mmap_mode="r")
            dst = torch.empty(a.shape[::-1], dtype=torch.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only memmap: only read
                dst.copy_(torch.from_numpy(np.asarray(a)).T)
        out[f"transpose kernels, torch copy_ ({threads} thread)"] = time.perf_counter() - t
    buf = np.random.default_rng(0).standard_normal(16 << 20).astype(np.float32)  # 64 MiB
    n = max(1, round(total / buf.nbytes))
    path = root / "pwrite.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, n * buf.nbytes)
    t = time.perf_counter()
    for i in range(n):
        os.pwrite(fd, buf, i * buf.nbytes)
    out["pwrite into page cache (from a 64 MiB buffer)"] = time.perf_counter() - t
    t = time.perf_counter()
    os.fsync(fd)
    out["fsync once"] = time.perf_counter() - t
    os.close(fd)
    t = time.perf_counter()
    h = hashlib.sha256()
    for _ in range(n):
        h.update(buf)
    out["sha256 (hashlib, 1 thread)"] = time.perf_counter() - t
    small = buf[: 64 << 10]  # 256 KiB, stays in cache
    path.unlink()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.posix_fallocate(fd, 0, n * buf.nbytes)
    t = time.perf_counter()
    for off in range(0, n * buf.nbytes, small.nbytes):
        os.pwrite(fd, small, off)
    out["pwrite into page cache (256 KiB blocks, in cache, fallocated)"] = time.perf_counter() - t
    os.close(fd)
    t = time.perf_counter()
    os.link(path, root / "linked.tmp")
    os.replace(root / "linked.tmp", root / "linked.bin")
    out["os.link + rename"] = time.perf_counter() - t
    path.unlink()
    (root / "linked.bin").unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=0.4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--data", type=Path, default=REPO / "data" / "bench-profile")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    import convert_large as cl

    root = args.data.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        gen = cl.generate(root, args.gb)
        print(f"model {gen['model_bytes'] / 1e9:.3f} GB, load average {os.getloadavg()[0]:.1f}", flush=True)
        print(json.dumps(pieces(root), indent=1), flush=True)
        modes = ["stages"]
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for rep in range(args.reps):
            for mode in modes:
                env = {**os.environ, "PYTHONPATH": str(REPO),
                       "NP2TORCH_DATA_DIR": str(root / f"d-{rep}"), "NP2TORCH_AUDIT_LOG": str(root / "audit.jsonl")}
                subprocess.run(["sync"], check=True)
                p = subprocess.run([sys.executable, str(REPO / "bench" / "convert_large.py"), "--role", "stages", "--config",
                                    str(root / "npy-dir.yaml")], env=env, capture_output=True, text=True, check=True)
                info = json.loads(p.stdout.strip().splitlines()[-1])
                runs[mode].append(info)
                st = ", ".join(f"{k} {v['s']:.2f}" for k, v in info["stages"].items())
                print(f"{mode:<14} rep {rep}: work {info['work_s']:.2f} s  [{st}]  load {os.getloadavg()[0]:.1f}", flush=True)
                shutil.rmtree(root / f"d-{rep}", ignore_errors=True)
                shutil.rmtree(root / "out-npy-dir", ignore_errors=True)
        for mode, infos in runs.items():
            conv = [i["stages"]["convert-to-device"]["s"] for i in infos]
            print(f"{mode:<14} convert-to-device min {min(conv):.2f} s, work min {min(i['work_s'] for i in infos):.2f} s")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
