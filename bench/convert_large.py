"""Benchmark: convert a large Keras-layout model with np2torch vs ``cp`` vs the plain way.

    python bench/convert_large.py --gb 1.6          # the README table
    python bench/convert_large.py --gb 0.1          # a quick check

One run generates the model (blocks of Dense 2048→8192→2048 with biases and LayerNorm, Keras
``(in, out)`` kernels) as a folder of ``.npy`` and as an uncompressed ``.npz`` under
``data/bench/`` (git-ignored), writes the matching PyTorch module and np2torch configs next to
it, then times each contender in its own subprocess (wall clock, and peak RSS from
``os.wait4``'s rusage for that one child):

- ``cp -r`` of the ``.npy`` folder (the floor for reading and writing the same bytes), the same
  followed by ``sync``, and one sha256 pass over the inputs with ``openssl dgst -sha256`` (and,
  for comparison, coreutils ``sha256sum``): ``cp + sync`` plus ``openssl`` is the floor of a
  durable, audited copy, which the stages' work is compared with;
- the plain approach the seed article teaches: instantiate the model, ``np.load`` each array,
  transpose-copy, ``param.data.copy_``, ``torch.save``;
- np2torch's six stages called as plain functions (no Prefect), on the folder and on the .npz;
- np2torch through the CLI (``np2torch convert``: the Prefect flow, with its start-up);
- the same stages again with unchanged inputs (every stage a cache hit);
- the export stage alone (stages 1-5 cached, export recomputed).

Every contender starts after ``sync`` with the inputs in the page cache (warm: they were just
written and read). The bench data is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
D_MODEL, D_FF = 2048, 8192

MODEL_SOURCE = '''"""Bench model: pre-norm MLP blocks (LayerNorm → Dense d→f → ReLU → Dense f→d, residual)."""
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class BigMLP(nn.Module):
    def __init__(self, n_blocks: int, d: int = 2048, f: int = 8192):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, f) for _ in range(n_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x
'''


def block_arrays(i: int, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """One block's arrays under Keras names, kernels as (in, out)."""
    def dense(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        k = rng.standard_normal((n_in, n_out), dtype=np.float32)
        k *= np.float32(1.0 / np.sqrt(n_in))
        return k, rng.standard_normal(n_out, dtype=np.float32) * np.float32(0.02)

    k1, b1 = dense(D_MODEL, D_FF)
    k2, b2 = dense(D_FF, D_MODEL)
    gamma = (1 + 0.1 * rng.standard_normal(D_MODEL)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(D_MODEL)).astype(np.float32)
    p = f"blocks/{i}"
    return [(f"{p}/norm/gamma", gamma), (f"{p}/norm/beta", beta), (f"{p}/fc1/kernel", k1), (f"{p}/fc1/bias", b1),
            (f"{p}/fc2/kernel", k2), (f"{p}/fc2/bias", b2)]


def _ref_block(x: np.ndarray, arrs: dict[str, np.ndarray], p: str) -> np.ndarray:
    """Keras semantics in float64: x + relu(norm(x) @ k1 + b1) @ k2 + b2."""
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    h = (x - mu) / np.sqrt(var + 1e-5) * arrs[f"{p}/norm/gamma"] + arrs[f"{p}/norm/beta"]
    h = np.maximum(h @ arrs[f"{p}/fc1/kernel"].astype(np.float64) + arrs[f"{p}/fc1/bias"], 0)
    return x + h @ arrs[f"{p}/fc2/kernel"].astype(np.float64) + arrs[f"{p}/fc2/bias"]


def generate(root: Path, gb: float) -> dict:
    """Write the npy folder, the npz, the model module, verify input/reference and the configs."""
    block_bytes = 4 * (2 * D_MODEL * D_FF + D_FF + 3 * D_MODEL)
    n_blocks = max(1, round(gb * 1e9 / block_bytes))
    npy_dir, npz = root / "weights", root / "weights.npz"
    rng = np.random.default_rng(0)
    x = np.random.default_rng(1).standard_normal((2, D_MODEL))
    np.save(root / "input.npy", x.astype(np.float32))
    x = x.astype(np.float32).astype(np.float64)
    nbytes = 0
    with zipfile.ZipFile(npz, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i in range(n_blocks):
            arrs = dict(block_arrays(i, rng))
            for key, a in arrs.items():
                f = npy_dir / f"{key}.npy"
                f.parent.mkdir(parents=True, exist_ok=True)
                np.save(f, a)
                with zf.open(f"{key}.npy", "w", force_zip64=True) as mf:
                    np.lib.format.write_array(mf, a)
                nbytes += a.nbytes
            x = _ref_block(x, arrs, f"blocks/{i}")
            del arrs
    np.save(root / "ref_out.npy", x)
    (root / "bench_model.py").write_text(MODEL_SOURCE)
    for name, src in (("npy-dir", npy_dir), ("npz", npz)):
        cfg = {
            "name": f"bench-{name}",
            "source": {"path": str(src), "format": name},
            "model": {"target": f"{root / 'bench_model.py'}:BigMLP", "kwargs": {"n_blocks": n_blocks, "d": D_MODEL, "f": D_FF}},
            "mapping": {"strategy": "name", "preset": "keras"},
            "convert": {"dtype": "float32", "device": "cpu"},
            "verify": {"input": str(root / "input.npy"), "reference_output": str(root / "ref_out.npy"), "rtol": 1e-4, "atol": 1e-4},
            "export": {"dir": str(root / f"out-{name}"), "formats": ["safetensors"]},
        }
        (root / f"{name}.yaml").write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return {"n_blocks": n_blocks, "model_bytes": nbytes, "npy_dir": str(npy_dir), "npz": str(npz)}


# ---------------------------------------------------------------------------------------------
# contenders run in child processes (``--role``)


def role_plain(root: Path, n_blocks: int, out: Path) -> dict:
    """The seed article's way: a real model, np.load, transpose-copy, copy_, torch.save."""
    t0 = time.perf_counter()
    import torch

    sys.path.insert(0, str(root))
    from bench_model import BigMLP

    t1 = time.perf_counter()
    model = BigMLP(n_blocks, D_MODEL, D_FF)
    with torch.no_grad():
        for name, param in model.named_parameters():
            mod, leaf = name.rsplit(".", 1)
            kleaf = {"weight": "kernel", "bias": "bias"}[leaf]
            if mod.endswith("norm"):
                kleaf = {"weight": "gamma", "bias": "beta"}[leaf]
            arr = np.load(root / "weights" / (mod.replace(".", "/") + f"/{kleaf}.npy"))
            if arr.ndim == 2:
                arr = arr.T.copy()  # Keras (in, out) → PyTorch (out, in)
            param.data.copy_(torch.from_numpy(arr))
    torch.save(model.state_dict(), out)
    return {"import_s": t1 - t0, "work_s": time.perf_counter() - t1}


def role_stages(config: Path, export_only: bool) -> dict:
    """np2torch's six stages as plain functions; per-stage seconds and peak RSS so far."""
    t0 = time.perf_counter()
    # the stage modules (torch, pandera) are imported by a stage when it first computes; import
    # them here so that, as for the plain script, "work" excludes the imports
    from np2torch.tasks import convert, export, infer_mapping, stages, validate, verify  # noqa: F401
    from np2torch.tasks.config import load_config

    def maxrss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cfg = load_config(config, [])
    t1 = time.perf_counter()
    out: dict = {"import_s": t1 - t0, "rss_after_import_mb": maxrss(), "stages": {}}

    local = stages.Local()

    def timed(stage, cfg, deps, key, refresh):  # the runner's executor, noting peak RSS after each stage
        if stage.name == "export":
            out["rss_before_export_mb"] = maxrss()
        rec = local(stage, cfg, deps, key, refresh or (export_only and stage.name == "export"))
        out["stages"][stage.name] = {"cached": bool(rec.cached), "maxrss_mb": maxrss()}
        return rec

    recs = stages.run_all(cfg, call=timed)
    for name, rec in recs.items():
        out["stages"][name]["s"] = rec.seconds  # its key (hashing the sources) included
    out["work_s"] = time.perf_counter() - t1
    out["verification"] = {k: recs["verify-forward-pass"].metrics.get(k) for k in ("passed", "max_abs_error", "max_rel_error")}
    return out


# ---------------------------------------------------------------------------------------------
# the parent: run, measure, report


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run one contender after ``sync``; wall seconds, peak RSS (MiB) and its JSON line, if any.

    Peak RSS comes from ``/usr/bin/time``, which forks a tiny process before the exec: measuring
    with ``wait4`` from here would count this (bigger) parent's pages copied at fork time.
    """
    subprocess.run(["sync"], check=True)
    tfile = Path(os.environ.get("TMPDIR", "/tmp")) / f"np2torch-bench-time-{os.getpid()}.txt"
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M %e %U %S", "-o", str(tfile), *cmd], capture_output=True, env=env, cwd=REPO, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(f"contender failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}", file=sys.stderr)
        return {"wall_s": float("nan"), "maxrss_mb": float("nan"), "cpu_s": float("nan"), "info": {}, "failed": p.returncode}
    maxrss_kb, _, user, system = tfile.read_text().split()[-4:]
    tfile.unlink()
    info = {}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            info = json.loads(line)
            break
    return {"wall_s": wall, "maxrss_mb": int(maxrss_kb) / 1024, "cpu_s": float(user) + float(system), "info": info,
            "warm_runner": "(warm runner)" in p.stdout}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor())
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "ram_gib": round(mem / 2**20, 1), "cpu": cpu, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "loadavg_at_start": os.getloadavg(), "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.6, help="model size in GB (1e9 bytes) of float32 parameters")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "bench", help="where the bench data goes (removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and outputs")
    ap.add_argument("--skip-cli", action="store_true", help="skip the Prefect flow (CLI) contender")
    ap.add_argument("--role", choices=["plain", "stages", "export-only"], help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n-blocks", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "plain":
        print(json.dumps(role_plain(args.data, args.n_blocks, args.out)))
        return
    if args.role in ("stages", "export-only"):
        print(json.dumps(role_stages(args.config, args.role == "export-only")))
        return

    root = args.data.resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    try:
        report(root, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def report(root: Path, args: argparse.Namespace) -> None:
    mach = machine()
    t = time.perf_counter()
    gen = generate(root, args.gb)
    print(f"generated {gen['n_blocks']} blocks, {gen['model_bytes'] / 1e9:.3f} GB in {time.perf_counter() - t:.1f}s under {root}",
          flush=True)
    py = sys.executable
    me = str(Path(__file__).resolve())
    base_env = {**os.environ, "PYTHONPATH": str(REPO), "NP2TORCH_AUDIT_LOG": str(root / "audit.jsonl")}

    def env_for(tag: str) -> dict:
        return {**base_env, "NP2TORCH_DATA_DIR": str(root / f"np2torch-{tag}")}

    def stages_cmd(cfg: str, role: str = "stages") -> list[str]:
        return [py, me, "--role", role, "--config", str(root / cfg)]

    # warm the page cache for every contender alike: read all inputs once
    subprocess.run(f"cat {root}/weights.npz > /dev/null; find {root}/weights -name '*.npy' -exec cat {{}} + > /dev/null",
                   shell=True, check=True)
    rows: dict[str, dict] = {}

    def go(name: str, cmd: list[str], env: dict | None = None) -> dict:
        r = run_child(cmd, env)
        rows[name] = r
        extra = ""
        if r["info"].get("work_s") is not None:
            extra = f"  (import {r['info']['import_s']:.2f}s, work {r['info']['work_s']:.2f}s)"
        print(f"{name:<34} wall {r['wall_s']:7.2f}s  cpu {r['cpu_s']:7.2f}s  peak RSS {r['maxrss_mb']:8.0f} MiB{extra}", flush=True)
        return r

    go("cp -r (npy folder)", ["cp", "-r", gen["npy_dir"], str(root / "cp-out")])
    go("cp + sync", ["sh", "-c", f"cp -r {gen['npy_dir']} {root / 'cp-out2'} && sync"])
    inputs = f"find {gen['npy_dir']} -name '*.npy' -print0 | xargs -0"
    go("openssl dgst -sha256 (inputs)", ["sh", "-c", f"{inputs} openssl dgst -sha256 > /dev/null"])
    go("sha256sum (inputs)", ["sh", "-c", f"{inputs} sha256sum > /dev/null"])
    go("plain (article)", [py, me, "--role", "plain", "--data", str(root), "--n-blocks", str(gen["n_blocks"]),
                           "--out", str(root / "plain.pt")])
    go("np2torch stages (npy-dir)", stages_cmd("npy-dir.yaml"), env_for("stages"))
    go("np2torch stages rerun (unchanged)", stages_cmd("npy-dir.yaml"), env_for("stages"))
    go("np2torch export stage alone", stages_cmd("npy-dir.yaml", "export-only"), env_for("stages"))
    go("np2torch stages (npz)", stages_cmd("npz.yaml"), env_for("stages-npz"))
    if not args.skip_cli:
        # a loaded machine can take longer than Prefect's default 20 s to start its temporary server
        cli_env = {**env_for("cli"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "NP2TORCH_PROGRESS": "0"}
        cli_env.pop("PREFECT_API_URL", None)
        cli = [py, "-m", "np2torch.cli", "convert", str(root / "npy-dir.yaml")]
        go("np2torch CLI flow (temporary server)", cli, cli_env)
        # the same, against a lasting local server (`np2torch server start`), with its own empty cache
        srv_env = {**base_env, "NP2TORCH_DATA_DIR": str(root / "server-data")}
        srv = subprocess.run([py, "-m", "np2torch.cli", "server", "start", "--port", str(_free_port())], env=srv_env, cwd=REPO,
                             capture_output=True, text=True)
        try:
            # typed in the environment `server start` ran in: the warm runner runs it (a forked child
            # that has imported everything already); /usr/bin/time sees only the small client, so the
            # row's CPU and RSS are the client's, and the own-process row below gives the conversion's
            r = go("np2torch CLI flow (running server)", cli, {**srv_env, "NP2TORCH_PROGRESS": "0"})
            r["maxrss_mb"] = float("nan")
            api = next(ln.split("API:", 1)[1].strip() for ln in srv.stdout.splitlines() if "API:" in ln)
            go("np2torch CLI flow (running server, own process)", cli,
               {**env_for("cli-server"), "PREFECT_API_URL": api, "NP2TORCH_PROGRESS": "0", "NP2TORCH_WARM": "0"})
        finally:
            subprocess.run([py, "-m", "np2torch.cli", "server", "stop"], env=srv_env, cwd=REPO, capture_output=True)

    results = {"machine": mach, "gen": gen, "rows": {k: v for k, v in rows.items()}}
    Path(REPO / "bench" / f"results-{args.gb:g}gb.json").write_text(json.dumps(results, indent=1))
    print()
    print(markdown(results))


def markdown(res: dict) -> str:
    m, gen, rows = res["machine"], res["gen"], res["rows"]
    mb = gen["model_bytes"] / 2**20
    cp = rows["cp -r (npy folder)"]["wall_s"]
    st = rows["np2torch stages (npy-dir)"]
    st_work = st["info"]["work_s"]
    plain = rows["plain (article)"]
    rerun = rows["np2torch stages rerun (unchanged)"]
    exp = rows["np2torch export stage alone"]
    lines = [f"Model: {gen['n_blocks']} blocks, {gen['model_bytes'] / 1e9:.3f} GB float32 ({mb:.0f} MiB). "
             f"Machine: {m['nproc']} cores, {m['ram_gib']} GiB RAM, {m['cpu']}; {m['date']}; "
             f"load average at start {m['loadavg_at_start'][0]:.2f}. "
             "Page cache: warm (inputs read once before the first contender; `sync` before each).", "",
             "| contender | wall s | work s (excl. imports) | CPU s (user+sys) | peak RSS MiB | RSS / model bytes |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        work = r["info"].get("work_s")
        lines.append(f"| {name} | {r['wall_s']:.2f} | {'' if work is None else f'{work:.2f}'} | {r['cpu_s']:.2f} | "
                     f"{r['maxrss_mb']:.0f} | {r['maxrss_mb'] / mb:.2f} |")
    stage_line = ", ".join(f"{k} {v['s']:.2f}s" for k, v in st["info"]["stages"].items())
    lines += ["", f"Stages (first run, npy-dir): {stage_line}.", ""]
    exp_rss = exp["info"]["stages"]["export"]["maxrss_mb"]
    floor = rows["cp + sync"]["wall_s"] + rows["openssl dgst -sha256 (inputs)"]["wall_s"]
    lines += [
        "| ratio | value | target |", "|---|---|---|",
        f"| np2torch stages (work) / (cp + sync + openssl sha256: a durable, audited copy, {floor:.2f} s) | {st_work / floor:.2f} | ≤ 2 |",
        f"| np2torch stages (work) / cp | {st_work / cp:.2f} | |",
        f"| np2torch stages (process wall) / cp | {st['wall_s'] / cp:.2f} | |",
        f"| plain (wall) / np2torch stages (process wall) | {plain['wall_s'] / st['wall_s']:.2f} | |",
        f"| plain (work) / np2torch stages (work) | {plain['info']['work_s'] / st_work:.2f} | ≥ 2.5 |",
        f"| plain (CPU s) / np2torch stages (CPU s) | {plain['cpu_s'] / st['cpu_s']:.2f} | |",
        f"| peak RSS / model bytes (stages) | {st['maxrss_mb'] / mb:.2f} | ≤ 0.3 |",
        f"| peak RSS / model bytes (export stage alone, process) | {exp_rss / mb:.2f} | ≤ 0.3 |",
        f"| export stage alone: RSS growth over the stages before it / model bytes | "
        f"{(exp_rss - exp['info']['rss_before_export_mb']) / mb:.3f} | |",
        f"| rerun (work) / first (work) | {rerun['info']['work_s'] / st_work:.3f} | ≤ 0.02 |",
        f"| rerun (process wall) / first (process wall) | {rerun['wall_s'] / st['wall_s']:.3f} | |",
    ]
    for name, target in (("np2torch CLI flow (running server)", "≤ 1.3"), ("np2torch CLI flow (running server, own process)", ""),
                         ("np2torch CLI flow (temporary server)", "")):
        if name in rows and rows[name]["wall_s"] == rows[name]["wall_s"]:
            lines.append(f"| {name[9:]} (wall) / np2torch stages (process wall) | {rows[name]['wall_s'] / st['wall_s']:.2f} | {target} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
