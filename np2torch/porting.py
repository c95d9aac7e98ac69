"""``np2torch port``: a Keras ``.keras`` / legacy ``.h5`` file → ``DIR/model.py`` + ``DIR/config.yaml`` → the usual conversion.

The module is written by :mod:`np2torch.port_keras` from the architecture alone (read as data).
The config is an ordinary conversion config (``model.target: model.py:<Class>``, the keras
preset, ``verify`` from the given input and reference), and the conversion is the one
``np2torch convert`` runs, so ``DIR/out`` holds the usual safetensors, manifest and report and
``np2torch convert DIR/config.yaml`` re-runs it later without ``port``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.port_keras import Generated, PortError, generate, read_keras_config

__all__ = ["PortError", "port", "write_port"]

LAYOUTS = ("channels_first", "channels_last")
TOL = {"rtol": 1e-4, "atol": 1e-5}  # a correct float32 port of a deep network differs from Keras by ~1e-5


def _arrays(value: Any, what: str) -> list[np.ndarray]:
    """A path (.npy / .npz) or array(s) → the list of arrays, in order."""
    if isinstance(value, (str, Path)):
        p = Path(value)
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return [np.asarray(z[k]) for k in z.files]
        return [np.load(p, allow_pickle=False)]
    if isinstance(value, (list, tuple)):
        return [np.asarray(v) for v in value]
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return [np.asarray(value)]
    raise PortError(f"{what} must be a .npy/.npz path or arrays", key=what, actual=type(value).__name__)


def _to_torch_layout(arrays: list[np.ndarray], cf: list[bool], what: str) -> list[np.ndarray]:
    if len(arrays) != len(cf):
        raise PortError(f"{what}: the Keras model has {len(cf)} of them, got {len(arrays)}", key=what, expected=len(cf), actual=len(arrays),
                        fix="give one array per model input/output (an .npz in the model's order for several)")
    return [np.ascontiguousarray(np.moveaxis(a, -1, 1)) if c and a.ndim >= 3 else a for a, c in zip(arrays, cf, strict=True)]


def _save(arrays: list[np.ndarray], path: Path) -> Path:
    if len(arrays) == 1:
        np.save(path.with_suffix(".npy"), arrays[0])
        return path.with_suffix(".npy")
    np.savez(path.with_suffix(".npz"), *arrays)  # arr_0, arr_1 …: the forward's positional order
    return path.with_suffix(".npz")


def _weights_source(source: Path) -> tuple[Path, str]:
    """The file the conversion reads, and its format: the ``.keras`` zip itself (read in place by
    the ``keras`` reader, its config's layer order used) or the legacy ``.h5``."""
    with open(source, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return source, "h5"
    with zipfile.ZipFile(source) as zf:
        if "model.weights.h5" not in zf.namelist():
            raise PortError(".keras zip has no model.weights.h5", key=str(source), fix="re-save with model.save('x.keras')")
    return source, "keras"


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def _write_files(source: Path, out: Path, gen: Generated, xs: list[np.ndarray] | None, ys: list[np.ndarray] | None, layout: str,
                 name: str | None) -> None:
    import yaml

    (out / "model.py.tmp").write_text(gen.source)
    os.replace(out / "model.py.tmp", out / "model.py")
    weights, fmt = _weights_source(source)
    verify: dict[str, Any] = dict(TOL)
    if xs is not None:
        verify["input"] = _save(xs, out / "verify_input").name
        if ys is not None:
            verify["reference_output"] = _save(ys, out / "verify_reference").name
    elif len(gen.input_specs) == 1:  # no input given: a generated one of the traced shape (shapes and finiteness only)
        verify["input"] = {"shape": gen.input_specs[0][0], "dtype": gen.input_specs[0][1]}
    cname = name or re.sub(r"[^a-z0-9]+", "-", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", gen.class_name).lower()).strip("-") or "port"
    raw = {"name": cname, "source": {"path": _rel(weights, out), "format": fmt},
           "model": {"target": f"model.py:{gen.class_name}"},
           "mapping": {"strategy": "auto", "preset": "keras", **({"rules": gen.rules} if gen.rules else {}),
                       "allow_missing": [r".*num_batches_tracked", *gen.allow_missing]},
           "convert": {"dtype": "float32", "device": "cpu"},
           "verify": {k: v for k, v in verify.items() if v is not None}, "export": {"dir": "out"}}
    header = (f"# Written by `np2torch port` from {source.name!r} (layout {layout}); re-run with `np2torch convert config.yaml`.\n"
              if re.fullmatch(r"[\w.\- ]+", source.name) else f"# Written by `np2torch port` (layout {layout}).\n")
    if xs is not None and any(cf for _, cf in gen.inputs):
        header += "# verify_input is the given input permuted to the module's channels-first layout (Keras's last axis moved to 1).\n"
    (out / "config.yaml").write_text(header + yaml.safe_dump(raw, sort_keys=False))


def write_port(source: str | Path, out: str | Path, *, reference: tuple[Any, Any] | None = None, inputs: Any = None,
               layout: str = "channels_first", allow_placeholders: bool = False, name: str | None = None) -> tuple[Path, Generated]:
    """Write ``out/model.py`` and ``out/config.yaml`` (and the verify arrays in the module's layout);
    return the config's path and what was generated. Nothing is written when the model cannot be ported."""
    source, out = Path(source), Path(out)
    if layout not in LAYOUTS:
        raise PortError(f"unknown layout {layout!r}", key="layout", expected=" | ".join(LAYOUTS), actual=layout)
    gen = generate(read_keras_config(source), layout=layout, allow_placeholders=allow_placeholders)
    x, y = (reference if reference is not None else (inputs, None))
    xs = _to_torch_layout(_arrays(x, "input"), [cf for _, cf in gen.inputs], "input") if x is not None else None
    ys = _to_torch_layout(_arrays(y, "reference"), gen.outputs, "reference") if y is not None else None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write_files(source, out, gen, xs, ys, layout, name)
    except BaseException:
        if created:  # a failed port leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out / "config.yaml", gen


def port(source: str | Path, *, out: str | Path, reference: tuple[Any, Any] | None = None, layout: str = "channels_first",
         allow_placeholders: bool = False, orchestrate: bool = True) -> tuple[type, Any]:
    """Write a PyTorch module for a Keras model, convert its weights into it and verify them.

    Args:
        source: a Keras 3 ``.keras`` file or a legacy ``.h5`` saved with ``model.save``.
        out: the folder for ``model.py``, ``config.yaml`` and ``out/`` (safetensors, manifest, report).
        reference: ``(x, y)``: what the Keras model was given and answered, in Keras's layout
            (arrays, or ``.npy``/``.npz`` paths; several inputs or outputs as a list/tuple).
        layout: ``channels_first`` (images ``(N, C, H, W)``) or ``channels_last`` (Keras's own).
        orchestrate: run the conversion as a Prefect flow (as ``np2torch convert``) or as plain stages.

    Returns:
        ``(ModuleClass, manifest)``: the generated class (``ModuleClass()`` builds it) and the
        conversion's :class:`np2torch.Manifest`.
    """
    from np2torch.api import Manifest, convert
    from np2torch.tasks.model import import_target

    config, gen = write_port(source, out, reference=reference, layout=layout, allow_placeholders=allow_placeholders)
    cls = import_target(f"{Path(out) / 'model.py'}:{gen.class_name}")
    if gen.placeholders:
        print(f"np2torch port: {len(gen.placeholders)} placeholder(s) in model.py: {', '.join(gen.placeholders)}; "
              "write them by hand, then run `np2torch convert config.yaml`", file=sys.stderr)
        return cls, None
    from np2torch.tasks.manifest import read_manifest

    result = convert(config, orchestrate=orchestrate)
    path = result.record.get("manifest_path")
    rows = read_manifest(path) if path and Path(path).is_file() else []
    return cls, Manifest(tuple(rows), verification=result.verification, name=result.name)


def cli_port(args: Any, *, convert: Any) -> int:
    """``np2torch port SOURCE --out DIR …``: write the module and config, then ``convert`` (the CLI's
    own convert command, given as a callable so the conversion runs exactly as ``np2torch convert``)."""
    import argparse
    import time

    t0 = time.perf_counter()
    ref = (args.input, args.reference) if args.input is not None and args.reference is not None else None
    if (args.input is None) != (args.reference is None):
        print("np2torch port: --input and --reference go together (the reference answers that input)", file=sys.stderr)
        return 2
    config, gen = write_port(args.source, args.out, reference=ref, layout=args.layout, allow_placeholders=args.allow_placeholders)
    out = Path(args.out)
    print(f"np2torch port: wrote {out / 'model.py'} (class {gen.class_name}, {gen.layers} layer calls) and {config} "
          f"in {time.perf_counter() - t0:.2f}s")
    for (arg, cf), (shape, _) in zip(gen.inputs, gen.input_specs, strict=True):
        if cf and ref is not None:
            print(f"  verify input {arg}: Keras's channels-last array permuted to channels-first (N, {', '.join(map(str, shape[1:]))})")
    if gen.placeholders:
        print(f"np2torch port: PLACEHOLDERS in model.py for {', '.join(gen.placeholders)}: write them by hand, then run "
              f"`np2torch convert {config}`", file=sys.stderr)
        return 0
    return convert(argparse.Namespace(config=str(config.resolve()), set=[], refresh=False, argv=["convert", str(config.resolve())],
                                      verbose=getattr(args, "verbose", False), no_server=getattr(args, "no_server", False)))
