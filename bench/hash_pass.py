"""The large-file read of load-arrays (issue 12 item 5): MB/s of one scan of a ~1 GB folder.

One pass per file computes its sha256 (every array's fingerprint derives from it) and its value
statistics. This prints the hardware references on the same bytes (a plain read, sha256 alone,
page cache warm) and np2torch's scan with a cold stat cache, in MB/s. Run:

    .venv/bin/python bench/hash_pass.py [MB]          # this checkout
    PYTHONPATH=/path/to/other/tree .venv/bin/python bench/hash_pass.py   # another version's code

The folder is written under a temporary folder and removed at the end.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rate(label: str, nbytes: int, fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    print(f"{label:<48} {nbytes / best / 1e6:9.0f} MB/s  ({best:.2f} s)", flush=True)
    return nbytes / best / 1e6


def _read_all(files: list[Path], per_chunk=None) -> None:
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                if per_chunk is not None:
                    per_chunk(memoryview(buf)[:n])


def main(mb: int = 1024) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="np2torch-hash-"))
    try:
        folder = tmp / "big"
        folder.mkdir()
        rng = np.random.default_rng(0)
        per = 64 << 20  # 64 MB files, float32
        for i in range(max(1, (mb << 20) // per)):
            np.save(folder / f"layer_{i}.npy", rng.standard_normal(per // 4, dtype=np.float32).reshape(-1, 1024))
        files = sorted(folder.glob("*.npy"))
        nbytes = sum(f.stat().st_size for f in files)
        print(f"{len(files)} files, {nbytes / 1e6:.0f} MB, {os.cpu_count()} CPUs, code from "
              f"{__import__('np2torch.tasks.load_arrays', fromlist=['x']).__file__}")
        _read_all(files)  # warm the page cache
        _rate("read only (page cache)", nbytes, lambda: _read_all(files))
        _rate("sha256 (hashlib, 16 MB blocks, 1 thread)", nbytes, lambda: _read_all(files, hashlib.sha256().update))
        from np2torch.tasks.load_arrays import scan_source

        def scan():
            os.environ["NP2TORCH_DATA_DIR"] = str(tmp / f"data-{time.perf_counter_ns()}")  # a cold stat cache each time
            from np2torch.tasks import fingerprint

            getattr(fingerprint, "_MEMO", {}).clear()
            recs = scan_source(folder)
            assert len(recs) == len(files) and recs[0].n_nonfinite == 0

        _rate("np2torch scan_source (sha256+stats, 1 read)", nbytes, scan)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1024)
