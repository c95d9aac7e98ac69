"""Scale of many small things (issue 13 item 5): load-arrays on many tiny files and members.

Prints one line per case with its wall time (imports excluded). Each case runs in a fresh
Python process, as a new `np2torch` command would, so nothing is remembered in memory between
cases; the on-disk stat cache is kept where the case says "disk cache warm". Run:

    .venv/bin/python bench/many_small.py [N]          # N = 20000 by default

Everything is written under a temporary folder that is removed at the end.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np


def _stage(src: Path):
    """What the load-arrays stage reads: the cache key (sha256 of every file), the scan, the audit inputs."""
    from np2torch.tasks import load_arrays

    files = sorted(p for p in src.rglob("*.npy") if p.is_file()) if src.is_dir() else [src]
    load_arrays.fingerprint_files(files)
    recs = load_arrays.scan_source(src)
    load_arrays.input_fingerprints(recs)
    return recs


def _case(name: str, src: Path) -> None:
    from np2torch.tasks.load_arrays import scan_source

    t = time.perf_counter()
    try:
        out = _stage(src) if name == "stage" else scan_source(src)
        note = f"{len(out)} arrays"
    except Exception as exc:  # noqa: BLE001 - the refusal cases end in an error on purpose
        note = f"refused: {str(exc).splitlines()[0][:160]}"
    print(f"{time.perf_counter() - t:.3f} {note}", flush=True)


def _run(label: str, name: str, src: Path, env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, __file__, "--case", name, str(src)], env={**os.environ, **env},
                         capture_output=True, text=True, check=False)
    line = (out.stdout.strip().splitlines() or [out.stderr.strip()[-300:]])[-1]
    secs, _, note = line.partition(" ")
    print(f"{label:<66} {secs:>8} s  {note}", flush=True)


def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="np2torch-bench-"))
    env = {"NP2TORCH_DATA_DIR": str(tmp / "data")}
    try:
        folder = tmp / "many"
        for i in range(n):
            sub = folder / f"layer_{i // 1000}"
            sub.mkdir(parents=True, exist_ok=True)
            np.save(sub / f"w_{i}.npy", np.full(4, i, np.float32))
        print(f"{n} tiny .npy files under {folder}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
        _run(f"scan_source, {n} just-written .npy, disk cache cold", "scan", folder, env)
        _run("stage reads (key+scan+inputs), same files, disk cache warm", "stage", folder, env)
        old = time.time_ns() - 10**10
        for p in folder.rglob("*.npy"):
            os.utime(p, ns=(old, old))
        _run(f"stage reads, {n} settled .npy (as on a user's disk), cache cold", "stage", folder, env)
        _run(f"stage reads, {n} settled .npy, disk cache warm (a rerun)", "stage", folder, env)

        arrays = {f"layer_{i}/w": np.full(4, i, np.float32) for i in range(n)}
        stored, packed = tmp / "stored.npz", tmp / "packed.npz"
        np.savez(stored, **arrays)
        np.savez_compressed(packed, **arrays)
        ro = {**env, "NP2TORCH_READ_ONLY": "1"}  # as `np2torch inspect` runs
        _run(f"inspect-style scan, .npz of {n} stored members", "scan", stored, ro)
        _run(f"inspect-style scan, .npz of {n} compressed members", "scan", packed, ro)

        big = tmp / "200k.npz"
        buf = io.BytesIO()
        np.save(buf, np.zeros(1, np.float32))
        with zipfile.ZipFile(big, "w") as zf:
            for i in range(200_000):
                zf.writestr(f"m{i}.npy", buf.getvalue())
        _run(".npz of 200,000 members", "scan", big, ro)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        _case(sys.argv[2], Path(sys.argv[3]))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
