"""Seconds per small command, as a user types them (issue 12 targets), and where they go.

Every command runs as a subprocess of the CLI (``python -m np2torch.cli``) with its own
data folder under a temporary directory; nothing is written into the repository. Rows:

- ``--help``; a config error (a misspelled key); a missing source file;
- keras-cnn ``convert`` with no server running, from a folder outside the repository with its own
  home: the first starts the lasting local server (issue 20), then cached and computed against it;
- keras-cnn ``convert`` with Prefect's temporary server: computed (empty cache), then cached;
- ``server start`` (a lasting local server on a free port, and its warm runner), then keras-cnn
  ``convert`` against it through the warm runner (computed, cached, ``--refresh``) and in its
  own process (``NP2TORCH_WARM=0``: cached, ``--refresh``), and ``batch`` of the six bundled
  conversions (warm runner: computed, cached; own process: cached);
- ``server stop``.

The start-up breakdown of a cached convert: imports (``import np2torch.flows.convert``), the
temporary server (temporary-server row minus own-process row), what the warm runner saves
(own-process row minus warm-runner row), the stages (the audit record's seconds) and the rest.

    .venv/bin/python bench/startup.py            # prints a markdown table; --json for raw numbers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = ["mlp", "seed-flat", "seed-layers", "seed-pickled", "keras-cnn", "keras-cnn-auto"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], env: dict[str, str], *, expect: int = 0, cwd: Path = REPO) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "np2torch.cli", *args], env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - t
    if p.returncode != expect:
        print(f"unexpected exit {p.returncode} for {args}:\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}", file=sys.stderr)
    return wall, p


def stage_seconds(report: Path) -> float:
    rec = json.loads(report.read_text())
    return float(rec["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="np2torch-startup-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NP2TORCH_"))}
    base.update(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", NP2TORCH_PROGRESS="0")
    rows: dict[str, float] = {}
    warm_used: dict[str, bool] = {}
    kc = REPO / "configs" / "examples" / "keras-cnn.yaml"
    server_env = {**base, "NP2TORCH_DATA_DIR": str(tmp / "server-data")}
    try:
        imports = []
        for _ in range(3):  # the first one also pays a cold page cache; the best of three is what a user sees
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import np2torch.flows.convert, np2torch.flows.batch"], env=base, check=True)
            imports.append(time.perf_counter() - t)
        rows["imports (np2torch.flows.convert + batch, Prefect, torch), best of 3"] = min(imports)
        rows["--help"], _ = run(["--help"], base)
        bad = tmp / "typo.yaml"
        bad.write_text(kc.read_text().replace("name:", "nmae:", 1))
        rows["config error (misspelled key)"], _ = run(["convert", str(bad)], base, expect=2)
        rows["missing source file"], _ = run(["convert", str(kc), "--set", "source.path=/nonexistent.npz"], base, expect=1)
        rows["dead PREFECT_API_URL"], _ = run(["convert", str(kc)], {**base, "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"},
                                              expect=1)

        # no server running, from a folder outside the repository with its own home: the first convert
        # starts the lasting local server in the background (issue 20); the next ones use it
        env_a, away = {**base, "NP2TORCH_HOME": str(tmp / "auto-home")}, tmp / "elsewhere"
        away.mkdir()
        conv_a = ["convert", str(kc), "--set", f"export.dir={tmp / 'out-auto'}"]
        try:
            rows["keras-cnn convert, no server running: first (starts the lasting server)"], pa = run(conv_a, env_a, cwd=away)
            rows["keras-cnn convert, after that: cached, best of 2"] = min(run(conv_a, env_a, cwd=away)[0] for _ in range(2))
            rows["keras-cnn convert, after that: --refresh (computed), best of 2"] = min(
                run([*conv_a, "--refresh"], env_a, cwd=away)[0] for _ in range(2))
            _, pc = run(conv_a, env_a, cwd=away)
            rows["lines a cached convert prints (not a terminal)"] = len((pc.stdout + pc.stderr).splitlines())
        finally:
            run(["server", "stop"], env_a, cwd=away)

        env_t = {**base, "NP2TORCH_DATA_DIR": str(tmp / "temp-data"), "NP2TORCH_NO_SERVER": "1"}  # the temporary server
        out_t = tmp / "out-temp"
        rows["keras-cnn convert, temporary server, computed"], _ = run(["convert", str(kc), "--set", f"export.dir={out_t}"], env_t)
        rows["keras-cnn convert, temporary server, cached, best of 2"] = min(
            run(["convert", str(kc), "--set", f"export.dir={out_t}"], env_t)[0] for _ in range(2))

        port = _free_port()
        t = time.perf_counter()
        _, p = run(["server", "start", "--port", str(port)], server_env)
        rows["server start (first: creates the database; warms the runner)"] = time.perf_counter() - t
        out_s = tmp / "out-server"
        conv = ["convert", str(kc), "--set", f"export.dir={out_s}"]
        own = {**server_env, "NP2TORCH_WARM": "0"}  # the same command in its own process (no warm runner)
        rows["keras-cnn convert, running server, warm runner, computed (first run)"], p1 = run(conv, server_env)
        warm_used["computed"] = "warm runner)" in p1.stdout
        cached = [run(conv, server_env) for _ in range(2)]
        rows["keras-cnn convert, running server, warm runner, cached, best of 2"] = min(w for w, _ in cached)
        warm_used["cached"] = all("warm runner)" in q.stdout for _, q in cached)
        p2 = cached[-1][1]
        stages_cached = stage_seconds(out_s / "report.json")
        rows["keras-cnn convert, running server, warm runner, --refresh (all stages computed), best of 2"] = min(
            run([*conv, "--refresh"], server_env)[0] for _ in range(2))
        rows["keras-cnn convert, running server, own process, cached, best of 2"] = min(run(conv, own)[0] for _ in range(2))
        rows["keras-cnn convert, running server, own process, --refresh, best of 2"] = min(
            run([*conv, "--refresh"], own)[0] for _ in range(2))
        batch = tmp / "six.yaml"
        entries = [{"config": str(REPO / "configs" / "examples" / f"{n}.yaml"), "set": [f"export.dir={tmp / 'batch-out' / n}"]}
                   for n in EXAMPLES]
        batch.write_text(json.dumps({"conversions": entries, "max_parallel": 2}))
        rows["batch of six, running server, warm runner, computed"], _ = run(["batch", str(batch)], server_env)
        rows["batch of six, running server, warm runner, cached, best of 2"] = min(
            run(["batch", str(batch)], server_env)[0] for _ in range(2))
        rows["batch of six, running server, own process, cached"], _ = run(["batch", str(batch)], own)
        t = time.perf_counter()
        run(["server", "stop"], server_env)
        rows["server stop (and its runner)"] = time.perf_counter() - t
        url_line = next((ln for ln in p2.stderr.splitlines() if "Prefect UI" in ln), "(no UI line)")
    finally:
        subprocess.run([sys.executable, "-m", "np2torch.cli", "server", "stop"], env=server_env, capture_output=True, cwd=REPO)
        shutil.rmtree(tmp, ignore_errors=True)

    imports = rows["imports (np2torch.flows.convert + batch, Prefect, torch), best of 3"]
    cached_own = rows["keras-cnn convert, running server, own process, cached, best of 2"]
    cached_warm = rows["keras-cnn convert, running server, warm runner, cached, best of 2"]
    breakdown = {
        "imports (a fresh process; paid by the runner once, at `server start`)": imports,
        "temporary server (start beside the imports, stop)": rows["keras-cnn convert, temporary server, cached, best of 2"] - cached_own,
        "own process, beyond the warm runner (imports a cached run needs, start-up)": cached_own - cached_warm,
        "stages (audit record, cached run)": stages_cached,
        "with the warm runner: client, preflight, fork, flow and task runs, API calls, artifacts": cached_warm - stages_cached,
    }
    res = {"machine": {"nproc": os.cpu_count(), "loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}, "rows": rows,
           "breakdown_cached_convert": breakdown, "ui_line": url_line, "warm_runner_used": warm_used}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"{res['machine']['date']}, {os.cpu_count()} cores, load average at end {os.getloadavg()[0]:.1f}\n")
    print("| command | wall s |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} |")
    print("\nStart-up breakdown of a cached keras-cnn convert (temporary-server row minus running-server row for the server):\n")
    print("| part | s |\n|---|---|")
    for k, v in breakdown.items():
        print(f"| {k} | {v:.2f} |")
    print(f"\nUI line printed by convert: `{url_line}`; warm runner used: {warm_used}")


if __name__ == "__main__":
    main()
