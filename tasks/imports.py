"""np2torch's own import graph, read from the source with ``ast`` (nothing is imported).

A stage's cache key hashes the code of every np2torch module its domain module imports,
directly or not, lazy imports inside functions included (:func:`closure`); the structure tests
walk the same graph for cycles and layering.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from functools import cache, lru_cache
from pathlib import Path

__all__ = ["PACKAGES", "closure", "graph", "imports_of", "modules", "remembered_graph"]

PACKAGES = ("np2torch", "np2torch.tasks", "np2torch.flows")


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name (packages by their ``__init__``), found without importing them."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)  # imports the parent package only (np2torch: light)
        folder = Path(next(iter(spec.submodule_search_locations)))
        nested = {Path(next(iter(importlib.util.find_spec(p).submodule_search_locations))) for p in PACKAGES if p.startswith(pkg + ".")}
        for f in sorted(folder.rglob("*.py")):
            if any(n in f.parents for n in nested):
                continue  # np2torch/tasks in a wheel: listed under its own package
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def imports_of(name: str, path: Path, known: set[str] | frozenset[str]) -> set[str]:
    """np2torch modules that ``name`` imports anywhere in its source (lazy imports inside functions too)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    # a dotted import names its parents too, but only the deepest module is what this one needs
    return {m for m in found if m in known and m != name and m != "np2torch"}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, frozenset(mods)) for name, path in mods.items()}


def _versions(mods: dict[str, Path]) -> dict[str, list]:
    out = {}
    for name, path in mods.items():
        st = path.stat()
        out[name] = [str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return out


@lru_cache(maxsize=1)
def remembered_graph() -> dict[str, frozenset[str]]:
    """:func:`graph`, remembered in the cache folder while no module file changed (a fresh
    process then reads one small file instead of parsing every module: a cached run's keys
    cost milliseconds, not a second)."""
    from np2torch.tasks.paths import atomic_write_text, cache_dir

    mods = modules()
    versions = _versions(mods)
    store = cache_dir() / "imports-graph.json"
    try:
        saved = json.loads(store.read_text())
        if saved.get("versions") == versions:
            return {k: frozenset(v) for k, v in saved["graph"].items()}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    g = graph()
    if os.environ.get("NP2TORCH_READ_ONLY") != "1":
        try:
            atomic_write_text(store, json.dumps({"versions": versions, "graph": {k: sorted(v) for k, v in g.items()}}))
        except OSError:  # a read-only cache folder: computed again next time
            pass
    return {k: frozenset(v) for k, v in g.items()}


@cache
def closure(root: str) -> tuple[str, ...]:
    """``root`` and every np2torch module it imports, transitively, sorted (what a stage's code hash covers)."""
    g = remembered_graph()
    if root not in g:
        raise ModuleNotFoundError(f"no source file for np2torch module {root!r}")
    seen, todo = {root}, [root]
    while todo:
        m = todo.pop()
        for dep in g[m]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return tuple(sorted(seen))
