"""The package's shape: one import name, no import cycles, stages that do not import each other.

The wheel test builds and installs np2torch into a fresh virtual environment outside the
repository, as a user would get it; the others read the source with ``ast``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from np2torch.tasks import imports

STAGE_MODULES = {f"np2torch.tasks.{m}" for m in ("load_arrays", "infer_mapping", "validate", "convert", "verify", "export")}
MAX_FUNCTION_LINES = 80
PYTHON = sys.executable


def _graph() -> dict[str, set[str]]:
    return imports.graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_walker_sees_the_pipeline():
    """The walker itself: it must find the edges we know exist, or the tests below prove nothing."""
    g = _graph()
    assert "np2torch.tasks.stages" in g and "np2torch.cli" in g
    assert {"np2torch.tasks.load_arrays", "np2torch.tasks.export", "np2torch.tasks.cache"} <= g["np2torch.tasks.stages"]
    assert "np2torch.flows.convert" in g["np2torch.flows.batch"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (lazy imports included): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_stage_imports_another_stage():
    g = _graph()
    bad = [f"{m} imports {d}" for m in sorted(STAGE_MODULES) for d in sorted(g.get(m, ()) & STAGE_MODULES)]
    assert not bad, "a stage module imports another stage (move the shared piece into a domain module): " + "; ".join(bad)


def _in_pipeline_order(found: list[str], order: list[str]) -> bool:
    """Three or more of ``order`` appear in ``found`` in that order: a copy of the pipeline's sequence."""
    seq = [order.index(x) for x in dict.fromkeys(found) if x in order]
    return len(seq) >= 3 and seq == sorted(seq)


def test_the_stage_sequence_is_defined_once():
    """Only the stage table names the stages in order: no other list, tuple, set or dict literal of three or more."""
    from np2torch.tasks import stages

    assert len(set(stages.NAMES)) == len(stages.NAMES) == 6
    copies = []
    for name, path in imports.modules().items():
        if name == "np2torch.tasks.stages":
            continue
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            elts = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else None
            found = [e.value for e in elts or () if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if _in_pipeline_order(found, stages.NAMES):
                copies.append(f"{name}:{node.lineno} {found}")
    assert not copies, "the stage sequence is written again outside tasks/stages.py (read stages.STAGES instead): " + "; ".join(copies)
    # and the check sees a copy when there is one
    assert _in_pipeline_order(["load-arrays", "x", "validate", "export"], stages.NAMES)
    assert not _in_pipeline_order(["export", "validate", "load-arrays"], stages.NAMES)


def test_no_module_outside_the_runner_imports_the_stage_modules_in_order():
    """Only the runner drives the stages: no other module imports three or more stage modules (lazily
    or not), nor names three of them in pipeline order (a preload list, a table of steps)."""
    from np2torch.tasks import stages

    order = [s.module for s in stages.STAGES]
    assert set(order) == STAGE_MODULES
    g = _graph()
    assert g["np2torch.tasks.stages"] >= STAGE_MODULES  # the walker sees the runner's own (lazy) imports
    runner = "np2torch.tasks.stages"
    bad = [f"{m} imports {sorted(deps & STAGE_MODULES)}" for m, deps in g.items() if m != runner and len(deps & STAGE_MODULES) >= 3]
    for name, path in imports.modules().items():
        tree = ast.parse(path.read_bytes(), str(path))
        named = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        if name != runner and _in_pipeline_order(named, order):
            bad.append(f"{name} names {[n for n in named if n in order]}")
    assert not bad, "modules that run the stages themselves (use np2torch.tasks.stages.run_all): " + "; ".join(bad)
def test_tasks_and_flows_never_import_the_entry_points():
    """The CLI and what sits beside it (server management, the warm runner, the cache commands) and the
    Python API are the top layer: nothing in tasks/ or flows/ imports them, lazily or not."""
    top = {f"np2torch.{m}" for m in ("cli", "api", "server", "server_app", "warm", "housekeeping")}
    g = _graph()
    assert top <= set(g), top - set(g)
    bad = [f"{m} imports {d}" for m in sorted(g) if m.startswith(("np2torch.tasks", "np2torch.flows")) for d in sorted(g[m] & top)]
    assert not bad, "an import upwards, from tasks/ or flows/ into the entry points: " + "; ".join(bad)


def test_no_long_functions_in_tasks():
    long = []
    for f in sorted((REPO / "tasks").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in tasks/: " + "; ".join(long)


def test_import_np2torch_is_light():
    """`import np2torch` (and the CLI module) import neither torch, pandas, pandera nor Prefect."""
    code = ("import sys, np2torch, np2torch.cli; heavy = [m for m in ('torch', 'pandas', 'pandera', 'prefect') if m in sys.modules]; "
            "print(heavy); assert callable(np2torch.load_into) and 'torch' not in sys.modules")
    r = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


# ---------------------------------------------------------------------------------------------
# running next to a user's own `tasks.py` and `flows/` package


def _user_project(root: Path) -> Path:
    """A folder laid out as invoke/Celery (tasks.py) and Prefect (flows/) projects are; importing either fails loudly."""
    root.mkdir(parents=True)
    (root / "tasks.py").write_text("raise RuntimeError('the user tasks.py was imported')\n")
    (root / "flows").mkdir()
    (root / "flows" / "__init__.py").write_text("raise RuntimeError('the user flows package was imported')\n")
    return root


def test_runs_beside_a_users_tasks_py_and_flows_package(tmp_path, example_data):
    proj = _user_project(tmp_path / "user-project")
    weights = example_data / "mlp" / "weights.npz"
    np2torch_cli = Path(PYTHON).parent / "np2torch"
    env = {**os.environ, "NP2TORCH_DATA_DIR": str(tmp_path / "data")}
    r = subprocess.run([str(np2torch_cli), "inspect", str(weights)], cwd=proj, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "fc1.weight" in r.stdout, r.stderr
    r = subprocess.run([str(np2torch_cli), "plan", str(REPO / "configs" / "examples" / "mlp.yaml")], cwd=proj, capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0 and "fc3.bias" in r.stdout, r.stderr
    # `python -c` puts the working folder first on sys.path, as Prefect's flow loader does
    code = textwrap.dedent(f"""
        import numpy as np, torch, np2torch
        import np2torch.tasks.audit, np2torch.flows.convert, np2torch.flows.batch  # the modules a clash broke
        import sys
        sys.path.insert(0, {str(REPO / "configs" / "models")!r})
        from mlp import MLP
        model, manifest = np2torch.load_into(MLP(in_features=8, hidden=16, out_features=4), {str(weights)!r})
        ref = np.load({str(weights)!r})
        assert np.array_equal(model.fc1.weight.detach().numpy(), ref["fc1.weight"])
        print("np2torch works here")
        import tasks  # the bare name is the user's module
    """)
    r = subprocess.run([PYTHON, "-c", code], cwd=proj, capture_output=True, text=True, env=env, timeout=300)
    assert "np2torch works here" in r.stdout, r.stderr
    assert "the user tasks.py was imported" in r.stderr, r.stderr  # only the last line reached the user's module


# ---------------------------------------------------------------------------------------------
# the wheel, installed into a fresh environment outside the repository


def _site_packages(python: str) -> str:
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.slow
def test_wheel_installs_np2torch_only_and_converts_outside_the_repo(tmp_path, example_data):
    # 1. build the wheel from the repository (the setuptools already in this environment; no download)
    dist = tmp_path / "dist"
    r = subprocess.run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = dist.glob("np2torch-*.whl")
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        files = [line.split(",")[0] for line in z.read(record).decode().splitlines() if line]
        entry_points = z.read(record.replace("RECORD", "entry_points.txt")).decode()
    tops = {f.split("/")[0] for f in files}
    assert "np2torch" in tops and not tops & {"tasks", "flows"}, tops
    assert {"np2torch/tasks/stages.py", "np2torch/cli.py", "np2torch/api.py"} <= set(files)
    assert "np2torch = np2torch.cli:main" in entry_points

    # 2. a fresh venv outside the repository; np2torch from the wheel, its dependencies from this
    #    environment (a .pth file: no download, and torch stays the CPU build)
    venv = tmp_path / "fresh-venv"
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = str(venv / "bin" / "python")
    r = subprocess.run([PYTHON, "-m", "pip", "--python", vpy, "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    Path(_site_packages(vpy), "deps-from-dev-env.pth").write_text(_site_packages(PYTHON) + "\n")

    # 3. a user's folder: the example config, model and data copied in (no repository around)
    work = _user_project(tmp_path / "elsewhere")
    shutil.copytree(REPO / "configs", work / "configs")
    shutil.copytree(example_data / "mlp", work / "data" / "examples" / "mlp")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PREFECT_API")}
    env |= {"NP2TORCH_DATA_DIR": str(work / "data"), "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"}
    run = lambda *a: subprocess.run(list(a), cwd=work, capture_output=True, text=True, env=env, timeout=600)  # noqa: E731

    where = run(vpy, "-c", "import np2torch, np2torch.tasks.stages as s; print(np2torch.__file__); print(s.__file__); import tasks")
    assert str(venv) in where.stdout and str(REPO) not in where.stdout, where.stdout
    assert "the user tasks.py was imported" in where.stderr  # the bare name `tasks` is the user's, never ours
    version = run(str(venv / "bin" / "np2torch"), "--version")
    assert version.returncode == 0 and version.stdout.startswith("np2torch 0."), version.stdout + version.stderr
    out = work / "out"
    conv = run(str(venv / "bin" / "np2torch"), "convert", "configs/examples/mlp.yaml", "--set", f"export.dir={out}")
    assert conv.returncode == 0, conv.stdout + conv.stderr
    assert "mlp converted (success, " in conv.stdout and "verification: passed" in conv.stdout
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.pt", "manifest.csv", "report.json"}
    assert "database is locked" not in conv.stderr
