"""Checks that need no stage, run before any Prefect server or flow starts.

A config typo, a missing source file, an export folder that cannot be written or a model
target that does not exist used to surface after Prefect had started (~20 s); here they are
found in well under a second, all at once: the config schema (:func:`load_config`), the source
(exists, is a regular file or a folder, readable), the export folder (creatable and writable),
the model target (the file or module exists and defines the name, checked by reading its
source, not by running it: importing a model module imports torch), then the Prefect API
(:func:`np2torch.flows.runtime.choose_api`). Nothing here imports torch, pandas or Prefect.
Verify files are left to their stage: a manifest that fails validation is the more useful
first message than a reference file the run would only need later.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import stat
from pathlib import Path
from typing import Any

from np2torch.tasks.config import Config, load_batch_config, load_config
from np2torch.tasks.errors import ConfigError, ConversionError, ExportError, LoadError, ModelError, Problem

__all__ = ["check_config", "preflight_convert", "preflight_batch", "dask_problem", "missing_model_file"]


def _source_problem(path: Path) -> LoadError | None:
    try:
        st = path.stat()  # follows links: what a read would open
    except FileNotFoundError:
        return LoadError("source path does not exist", key=str(path),
                         fix="check source.path (relative paths are relative to the config file)")
    except OSError as exc:
        return LoadError(f"source path cannot be read: {exc.strerror}", key=str(path), fix="check source.path and its permissions")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return LoadError("source is not a regular file or a folder (a device, FIFO or socket)", key=str(path),
                         fix="point source.path at the saved arrays")
    if not os.access(path, os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)):
        return LoadError("source path is not readable by this user", key=str(path), fix="fix its permissions (chmod u+r)")
    return None


def _export_problem(out_dir: Path) -> ExportError | None:
    """The export folder, or its nearest existing parent, must be a writable folder."""
    p = out_dir
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        return ExportError(f"{p} is a file, not a folder", key=str(out_dir), fix="choose another export.dir (--set export.dir=...)")
    if not os.access(p, os.W_OK | os.X_OK):
        return ExportError(f"cannot write to the export folder ({p} is not writable)", key=str(out_dir),
                           fix="choose a writable export.dir (--set export.dir=...)")
    return None


def _defines(tree: ast.Module, name: str) -> bool | None:
    """Whether the module's top level binds ``name``; None when it cannot tell (star import, __getattr__)."""
    unsure = False
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name == name:
                return True
            unsure |= node.name == "__getattr__"
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(t)):
                    return True
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    unsure = True
                elif (alias.asname or alias.name.split(".")[0]) == name:
                    return True
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            unsure = True  # conditional definitions: trust the import at build time
    return None if unsure else False


def _suggest(name: str, choices: list[str], listing: str) -> str:
    """``; did you mean `mlp.py`?`` from ``choices``, else ``; <listing>: a, b``, else nothing (as for config keys)."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; {listing}: {', '.join(sorted(choices)[:20])}" if choices else ""


def missing_model_file(path: Path, target: str) -> ConfigError:
    folder = path.parent
    try:
        siblings = [p.name for p in folder.iterdir() if p.suffix == path.suffix and p.is_file()]
    except OSError:
        siblings = []
    hint = _suggest(path.name, siblings, f"{path.suffix} files there")
    return ConfigError(f"model file {path} does not exist{hint}", key="model.target", expected="an existing file", actual=target,
                       fix="check model.target (paths are relative to the config file)")


def _model_problem(target: str) -> ConversionError | None:
    """A model file, module or name that does not exist is a config error (exit 2); a file that exists but
    cannot be parsed or read is the model's (exit 1)."""
    mod, _, attr = target.rpartition(":")
    if mod.endswith((".pt", ".pth", ".py")) and not Path(mod).is_file():
        return missing_model_file(Path(mod), target)
    if mod.endswith((".pt", ".pth")):
        return None
    if mod.endswith(".py"):
        path = Path(mod)
    else:
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError) as exc:
            spec, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = "no such module"
        if spec is None:
            return ConfigError(f"cannot import module {mod!r} ({why})", key="model.target", actual=target,
                               fix="check model.target: 'pkg.module:Class' must be importable, or use 'path/to/file.py:Class'")
        path = Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
        if path is None:
            return None  # a compiled or namespace module: checked when it is imported
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as exc:
        return ModelError(f"the model file has a syntax error at line {exc.lineno}: {exc.msg}", key=str(path), fix="fix the model file")
    except OSError as exc:
        return ModelError(f"the model file cannot be read: {exc.strerror}", key=str(path), fix="check its permissions")
    head = attr.split(".")[0]
    if _defines(tree, head) is False:
        names = sorted(n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and not n.name.startswith("_"))
        return ConfigError(f"{path.name} defines no {head!r}{_suggest(head, names, 'it defines')}", key="model.target",
                           actual=target, fix="check the name after ':' in model.target")
    return None


def check_config(cfg: Config) -> None:
    """Every check on a loaded config that needs no stage; raises one error listing all problems."""
    found: list[ConversionError] = [e for e in (_source_problem(cfg.source.path), _export_problem(cfg.export.dir),
                                                _model_problem(cfg.model.target)) if e is not None]
    if not found:
        return
    found.sort(key=lambda e: -e.exit_code)  # a config error among them makes the whole a config error (exit 2)
    first = found[0]
    if len(found) > 1:  # one message with every problem, under the first one's stage and exit status
        problems = [Problem(e.key or e.stage, f"[{e.stage}] {e.message}", fix=e.fix or "") for e in found]
        raise type(first)(f"{len(found)} problems found before starting", key=first.key, problems=problems, fix=first.fix)
    raise first


def preflight_convert(config: str | Path, overrides: list[str] | None = None, start_server: Any = None) -> tuple[Config, Any]:
    """Config schema, paths, model target, then the Prefect API; return the checked config (what the
    flow runs: the file is parsed once per command) and the chosen API."""
    from np2torch.flows.runtime import choose_api

    cfg = load_config(config, list(overrides or []))
    check_config(cfg)
    return cfg, choose_api(start=start_server)


def dask_problem() -> ConfigError | None:
    """The Dask task runner's packages (the ``dask`` extra), looked up without importing them."""
    missing = [m for m in ("prefect_dask", "distributed") if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return ConfigError("the Dask task runner needs the dask extra", key="task_runner",
                       expected="prefect-dask and dask[distributed] installed",
                       actual=f"{', '.join(missing)} not importable",
                       fix="pip install 'np2torch[dask]', or run on threads (task_runner: thread, without --dask)")


def preflight_batch(batch_config: str | Path, overrides: list[str] | None = None, dask: str | None = None,
                    start_server: Any = None) -> Any:
    """The batch config's schema, each conversion's config (its failures are reported per conversion
    by the batch, not here), the Dask extra when the batch runs on Dask, then the Prefect API."""
    from np2torch.flows.runtime import choose_api

    bc = load_batch_config(batch_config, list(overrides or []))
    if (dask is not None or bc.task_runner == "dask") and (problem := dask_problem()) is not None:
        raise problem
    return choose_api(start=start_server)
