"""Scale of many small things (issue 13 item 5): load-arrays on many tiny files and members.

Prints one line per case with its wall time. Run:  .venv/bin/python bench/many_small.py [N]
Cases: a folder of N tiny .npy (scan alone, and the stage's key + scan + inputs as a
conversion runs them, fresh files and files dated 10 s back as on a user's disk); an .npz of N
members (stored, then compressed); an .npz declaring 200,000 members (refused).
Everything is written under a temporary folder that is removed at the end.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np


def _timed(label: str, fn):
    t = time.perf_counter()
    try:
        out = fn()
        note = f"{len(out)} arrays" if isinstance(out, list) else ""
    except Exception as exc:  # noqa: BLE001 - the refusal cases end in an error on purpose
        note = f"refused: {str(exc).splitlines()[0][:150]}"
    dt = time.perf_counter() - t
    print(f"{label:<62} {dt:8.2f} s  {note}", flush=True)
    return dt


def _settle(folder: Path) -> None:
    old = time.time_ns() - 10**10
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(old, old))


def _stage(src: Path):
    from np2torch.tasks import load_arrays

    files = sorted(p for p in src.rglob("*.npy") if p.is_file()) if src.is_dir() else [src]
    load_arrays.fingerprint_files(files)  # the cache key: one read per file
    recs = load_arrays.scan_source(src)
    load_arrays.input_fingerprints(recs)  # the audit record's inputs
    return recs


def main(n: int = 20_000) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="np2torch-bench-"))
    os.environ["NP2TORCH_DATA_DIR"] = str(tmp / "data")
    from np2torch.tasks.load_arrays import scan_source

    try:
        folder = tmp / "many"
        for i in range(n):
            sub = folder / f"layer_{i // 1000}"
            sub.mkdir(parents=True, exist_ok=True)
            np.save(sub / f"w_{i}.npy", np.full(4, i, np.float32))
        print(f"{n} tiny .npy files written under {folder}")
        _timed(f"scan_source, folder of {n} .npy (fresh files)", lambda: scan_source(folder))
        _timed(f"stage reads (key+scan+inputs), {n} fresh .npy", lambda: _stage(folder))
        _settle(folder)
        _timed(f"stage reads, {n} settled .npy, stat cache cold", lambda: _stage(folder))
        _timed(f"stage reads, {n} settled .npy, stat cache warm", lambda: _stage(folder))

        arrays = {f"layer_{i}/w": np.full(4, i, np.float32) for i in range(n)}
        stored, packed = tmp / "stored.npz", tmp / "packed.npz"
        np.savez(stored, **arrays)
        np.savez_compressed(packed, **arrays)
        os.environ["NP2TORCH_READ_ONLY"] = "1"  # as `np2torch inspect` runs
        _timed(f"inspect-style scan, .npz of {n} stored members", lambda: scan_source(stored))
        _timed(f"inspect-style scan, .npz of {n} compressed members", lambda: scan_source(packed))
        del os.environ["NP2TORCH_READ_ONLY"]

        big = tmp / "200k.npz"
        buf = io.BytesIO()
        np.save(buf, np.zeros(1, np.float32))
        payload = buf.getvalue()
        with zipfile.ZipFile(big, "w") as zf:
            for i in range(200_000):
                zf.writestr(f"m{i}.npy", payload)
        _timed(".npz of 200,000 members (refused)", lambda: scan_source(big))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
