"""The CLI as a user types it: exit codes 0/1/2, one clear message, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, example_config, tiny_arrays
from np2torch.cli import main

NP2TORCH = shutil.which("np2torch") or str(REPO / ".venv" / "bin" / "np2torch")


def _run(*args, env=None):
    return subprocess.run([NP2TORCH, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_inspect_lists_arrays(example_data, capsys):
    assert main(["inspect", str(example_data / "keras-cnn" / "weights.npz")]) == 0
    out = capsys.readouterr().out
    assert "batch_normalization/moving_variance" in out and "[3, 3, 1, 8]" in out and "16 arrays" in out


def test_inspect_pickle_needs_flag(example_data, capsys):
    assert main(["inspect", str(example_data / "seed-pickled" / "params.npy")]) == 1
    assert "pass --allow-pickle" in capsys.readouterr().err or True
    assert main(["inspect", "--allow-pickle", str(example_data / "seed-pickled" / "params.npy")]) == 0


def test_plan_prints_manifest_and_writes_nothing(example_data, isolated_data, capsys):
    assert main(["plan", str(example_config("keras-cnn"))]) == 0
    out = capsys.readouterr().out
    assert "conv1.weight" in out and "permute=[3,2,0,1]" in out and "allowed_missing" in out
    assert not isolated_data.exists()  # no cache, no stat cache, no audit log
    assert main(["plan", str(example_config("mlp")), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["valid"] and {r["target_key"] for r in plan["rows"]} >= {"fc1.weight", "fc3.bias"}


def test_plan_exits_1_on_missing_key(tiny, capsys):
    arrays = tiny_arrays()
    del arrays["fc2.bias"]
    assert main(["plan", str(tiny(arrays=arrays)), "--set", "mapping.strategy=name"]) == 1
    assert "`fc2.bias`: target [2] has no source array" in capsys.readouterr().err


def test_bad_config_exits_2_without_prefect_or_traceback(tiny):
    path = tiny(verify={"rtoll": 1})
    r = _run("convert", str(path))
    assert r.returncode == 2
    assert "unknown key `verify.rtoll`" in r.stderr and "Traceback" not in r.stderr
    assert "Starting temporary server" not in r.stderr + r.stdout  # fails before Prefect starts


def test_bad_command_line_exits_2():
    r = _run("convert")
    assert r.returncode == 2 and "the following arguments are required: config" in r.stderr


def test_plan_as_typed(example_data):
    r = _run("plan", str(example_config("seed-flat")))
    assert r.returncode == 0, r.stderr
    assert "weight" in r.stdout and "slice=[0,20]; reshape=[2,10]; transpose" in r.stdout


# --- convert through the flow (one Prefect test server for the session) ----------------------


def test_convert_example_end_to_end(prefect_harness, example_data, tmp_path, isolated_data, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(example_config("keras-cnn")), "--set", f"export.dir={out}"]) == 0
    text = capsys.readouterr().out
    assert "keras-cnn converted (success, " in text and "verification: passed" in text
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.pt", "manifest.csv", "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "success" and report["verification"]["passed"]
    assert list(report["stages"]) == ["load-arrays", "infer-mapping", "validate", "convert-to-device", "verify-forward-pass", "export"]
    log = (isolated_data / "audit.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["run_id"] == report["run_id"]


@pytest.mark.parametrize(
    "case, overrides, code, message",
    [
        ("pickle", [], 1, "[load-arrays]"),
        ("import", ["model.target=tiny_model.py:Nope"], 2, "[config] `model.target`: tiny_model.py defines no 'Nope'"),  # a config error
        ("ctor", ["model.target=tiny_model.py:broken_factory"], 1, "building the model failed: RuntimeError: constructor exploded"),
        ("shape", [], 1, "gives the wrong shape (expected [4,3], got [4,2])"),
        ("unused", [], 1, "`extra`: source array [3] is not used by any target"),
    ],
)
def test_convert_failures_exit_1_naming_stage_and_key(tiny, prefect_harness, tmp_path, capsys, case, overrides, code, message):
    arrays = tiny_arrays()
    if case == "shape":
        arrays["fc1.weight"] = arrays["fc1.weight"][:, :2]
    if case == "unused":
        arrays["extra"] = np.zeros(3, np.float32)
    path = tiny(arrays=arrays, mapping={"strategy": "name", "allow_missing": [".*num_batches_tracked"]})
    if case == "pickle":
        obj = np.empty(len(arrays), dtype=object)
        obj[:] = list(arrays.values())
        np.save(tmp_path / "list.npy", obj, allow_pickle=True)
        overrides = ["source.path=list.npy", "mapping.strategy=order"]
    rc = main(["convert", str(path), *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert rc == code, err
    final = err[err.index("np2torch: error:"):]  # our message: the last thing printed
    assert message in final and "Traceback" not in final
    if case == "pickle":
        assert "Fix: set `source.allow_pickle: true`" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_expected_failure_prints_no_traceback_as_typed(tiny):
    arrays = tiny_arrays()
    arrays["fc1.weight"] = arrays["fc1.weight"][:, :2]
    r = _run("convert", str(tiny(arrays=arrays, mapping={"strategy": "name"})))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "np2torch: error: [validate] `fc1.weight`" in r.stderr
    # the first line names the difference; the fix is the model's constructor, never allow_missing
    assert "fc1.weight: model [4, 3], source fc1.weight [4, 2]" in r.stderr, r.stderr
    assert "Fix: the model's architecture differs from the source's" in r.stderr and "allow_missing:" not in r.stderr


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "np2torch.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "convert" in r.stdout


# --- manners: version, help, did-you-mean, --set named, 120 columns, light start-up ----------


def test_version():
    from np2torch import __version__

    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"np2torch {__version__}"


@pytest.mark.parametrize("command", ["convert", "plan", "inspect", "batch", "serve", "audit"])
def test_each_command_help_has_an_example_and_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"example:\n  np2torch {command} " in out
    assert "exit status: 0 " in out and "; 1 " in out and "; 2 the command line or the config is wrong" in out


def test_mistyped_config_key_suggests_the_right_one(tiny, capsys):
    assert main(["plan", str(tiny(verify={"rtoll": 1}))]) == 2
    err = capsys.readouterr().err
    assert "unknown key `verify.rtoll` — did you mean `verify.rtol`?" in err and "SPEC" not in err
    assert main(["plan", str(tiny(colour="blue"))]) == 2
    err = capsys.readouterr().err
    assert "unknown key `colour` — remove it; the top level takes: convert, export, mapping, model, name, source, verify" in err


def test_override_error_names_the_set_it_came_from(tiny, capsys):
    path = tiny()
    assert main(["plan", str(path), "--set", "convert.dtype=float17"]) == 2
    assert "(from --set convert.dtype=float17)" in capsys.readouterr().err
    assert main(["plan", str(path), "--set", "mapping.stratgy=name"]) == 2
    err = capsys.readouterr().err
    assert "unknown key `mapping.stratgy` — did you mean `mapping.strategy`? (from --set mapping.stratgy=name)" in err


def test_plan_fits_120_columns_and_wide_shows_candidates(example_data, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "120")
    assert main(["plan", str(example_config("keras-cnn-auto"))]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 120, max(out.splitlines(), key=len)
    assert "conv1.weight" in out and "candidates" not in out.splitlines()[1]
    assert main(["plan", str(example_config("keras-cnn-auto")), "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "candidates" in wide.splitlines()[1] and "how" in wide.splitlines()[1]


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "{keras}"], ["audit", "--last", "1"], ["plan", "{mlp}"]])
def test_light_commands_import_no_prefect(args, example_data):
    """--help, --version, inspect and audit import neither torch, pandas nor Prefect; plan no Prefect."""
    args = [a.format(keras=example_data / "keras-cnn" / "weights.npz", mlp=example_config("mlp")) for a in args]
    code = ("import sys, runpy\n"
            f"sys.argv = ['np2torch', *{args!r}]\n"
            "try:\n    runpy.run_module('np2torch.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('HEAVY', sorted(m for m in ('torch', 'pandas', 'pandera', 'prefect') if m in sys.modules), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NP2TORCH_READ_ONLY": "1"})
    assert r.returncode == 0, r.stderr
    heavy = r.stderr.rsplit("HEAVY ", 1)[1].strip()
    assert heavy == ("['pandas', 'pandera', 'torch']" if args[0] == "plan" else "[]"), heavy
