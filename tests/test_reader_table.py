"""The readers table: every part of np2torch that knows about formats reads one table, so a new
format is one module plus one row. A toy format, written here into a temporary module that no
np2torch file mentions, goes end to end through ``plan`` (API and CLI), ``inspect`` and the
load-arrays cache key."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import numpy as np
import pytest
import yaml

from np2torch.tasks import readers
from np2torch.tasks.config import load_config
from np2torch.tasks.errors import ConfigError, LoadError
from tiny_conversion import make_tiny

TOY_MODULE = '''
"""A toy weights format: b"TOY1\\\\n", one "name dim,dim,...\\\\n" line per array, an empty line,
then each array's little-endian float32 bytes in that order."""
from pathlib import Path

import numpy as np

from np2torch.tasks.errors import LoadError
from np2torch.tasks.fingerprint import open_regular
from np2torch.tasks.readers import Layout, Reader, ScanContext, register_reader, scan_layouts


def scan(path: Path, ctx: ScanContext):
    layouts = []
    with open_regular(path) as fh:
        if fh.readline() != b"TOY1\\n":
            raise LoadError("not a toy file", key=str(path), fix="write it with write_toy")
        entries = [line.decode().split() for line in iter(fh.readline, b"\\n")]
        offset = fh.tell()
    for name, dims in entries:
        layouts.append(Layout(name, tuple(int(d) for d in dims.split(",") if d), np.dtype("<f4"), offset))
        offset += layouts[-1].nbytes
    return scan_layouts(path, layouts, ctx)


def write_toy(path: Path, arrays: dict) -> None:
    head = "".join(f"{k} {','.join(map(str, v.shape))}\\n" for k, v in arrays.items())
    path.write_bytes(b"TOY1\\n" + head.encode() + b"\\n" + b"".join(np.ascontiguousarray(v, "<f4").tobytes() for v in arrays.values()))


READER = register_reader(Reader("toy", scan, "toy weights (.toy)", (".toy",), lambda head, size: head.startswith(b"TOY1\\n")))
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy format, registered from a module in a temporary folder (removed from the table after)."""
    (tmp_path / "toy_np2torch_format.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(readers.READERS)
    mod = importlib.import_module("toy_np2torch_format")
    yield mod
    readers.READERS.clear()
    readers.READERS.update(before)
    sys.modules.pop("toy_np2torch_format", None)


def _toy_case(tmp_path, toy, fmt: str) -> tuple:
    cfg_path = make_tiny(tmp_path / "case")
    weights = {f.stem: np.load(f) for f in sorted((tmp_path / "case" / "weights").glob("*.npy"))}
    toy.write_toy(tmp_path / "case" / "weights.toy", weights)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["source"] = {"path": "weights.toy", "format": fmt}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_path, weights


@pytest.mark.parametrize("fmt", ["toy", "auto"])
def test_a_toy_format_in_a_temporary_module_goes_through_plan(tmp_path, toy, fmt, capsys, monkeypatch):
    import np2torch
    from np2torch.cli import main

    cfg_path, weights = _toy_case(tmp_path, toy, fmt)
    assert readers.detect_format(tmp_path / "case" / "weights.toy", "auto") == "toy"
    assert "toy" in readers.formats() and load_config(cfg_path).source.format == fmt  # the config reads the table

    df = np2torch.plan(cfg_path)
    assert df.attrs["valid"], df.attrs["problems"]
    targets = df[df.status == "mapped"]
    assert sorted(targets.target_key) == sorted(weights) and (targets.target_key == targets.source_key).all()

    monkeypatch.setenv("NP2TORCH_READ_ONLY", "1")  # what `np2torch plan` sets, undone after the test
    assert main(["plan", str(cfg_path), "--format", "json"]) == 0  # the CLI too
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] and sorted(r["source_key"] for r in out["rows"] if r["status"] == "mapped") == sorted(weights)

    table = np2torch.inspect(tmp_path / "case" / "weights.toy")  # inspect reads the same table
    assert list(table.key) == list(weights) and set(table.offset) != {"compressed"}
    assert main(["inspect", str(tmp_path / "case" / "weights.toy"), "--source-format", "toy", "--format", "json"]) == 0
    assert [r["key"] for r in json.loads(capsys.readouterr().out)] == list(weights)


def test_a_toy_format_converts_bit_exact_and_its_key_hashes_its_files(tmp_path, toy):
    from safetensors.numpy import load_file

    from np2torch.tasks import stages

    cfg_path, weights = _toy_case(tmp_path, toy, "toy")
    cfg = load_config(cfg_path)
    root, files = readers.source_files(cfg.source.path, "toy")
    assert (root, files) == (cfg.source.path.parent, [cfg.source.path])
    key = stages.key_of(stages.BY_NAME["load-arrays"], cfg, None)
    out = stages.run_all(cfg)
    assert out["verify-forward-pass"].metrics["passed"]
    got = load_file(str(out["convert-to-device"].file))
    for k, v in weights.items():
        assert np.array_equal(got[k], v) and got[k].dtype == v.dtype
    first = readers.scan_source(cfg.source.path)[0]
    assert np.array_equal(readers.open_array(first), weights[first.key])  # memory-mapped from the toy file
    # one changed byte of the toy file changes the load-arrays key (its file is what the key hashes)
    data = bytearray(cfg.source.path.read_bytes())
    data[-1] ^= 1
    cfg.source.path.write_bytes(bytes(data))
    assert stages.key_of(stages.BY_NAME["load-arrays"], cfg, None) != key


def test_the_config_and_cli_refuse_a_format_not_in_the_table(tmp_path, capsys):
    from np2torch.cli import main

    cfg_path = make_tiny(tmp_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["source"]["format"] = "toy"
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="toy"):
        load_config(cfg_path)
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path), "--source-format", "toy"])
    assert "invalid choice: 'toy'" in capsys.readouterr().err
    with pytest.raises(LoadError, match="unknown format 'toy'"):
        readers.scan_source(tmp_path, fmt="toy")


def test_every_row_has_one_signature_and_auto_detects_by_suffix_then_first_bytes(tmp_path):
    import inspect as pyinspect

    for r in readers.READERS.values():
        assert list(pyinspect.signature(r.scan).parameters) == ["path", "ctx"], r.name
    np.save(tmp_path / "a.npy", np.zeros(3, np.float32))
    (tmp_path / "a.bin").write_bytes((tmp_path / "a.npy").read_bytes())  # no known suffix: the magic says npy
    np.savez(tmp_path / "b.npz", x=np.zeros(2))
    (tmp_path / "b.bin").write_bytes((tmp_path / "b.npz").read_bytes())
    assert [readers.detect_format(tmp_path / n, "auto") for n in ("a.npy", "a.bin", "b.npz", "b.bin")] == ["npy", "npy", "npz", "npz"]
    assert readers.detect_format(tmp_path, "auto") == "npy-dir"
    (tmp_path / "c.bin").write_bytes(b"hello")
    with pytest.raises(LoadError, match="cannot tell the format"):
        readers.detect_format(tmp_path / "c.bin", "auto")
