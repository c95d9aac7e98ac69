"""Everything checkable without a stage fails before Prefect starts: all problems at once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from np2torch.flows.preflight import check_config
from np2torch.tasks.config import load_config
from np2torch.tasks.errors import ConfigError, ExportError, LoadError, ModelError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def conv(tiny) -> Path:
    """The tiny conversion, one .npy per array (a byte can be flipped in one of them)."""
    return tiny("conv", npy_dir=True)


def test_a_good_config_passes(conv: Path) -> None:
    check_config(load_config(conv))


def test_missing_source_and_unknown_model_name_are_reported_together(conv: Path) -> None:
    cfg = load_config(conv, ["source.path=nowhere", "model.target=" + str(REPO / "configs/models/mlp.py") + ":MPL"])
    with pytest.raises(ConfigError) as info:  # a config error among them: the whole is one (exit 2)
        check_config(cfg)
    err = info.value
    assert err.message == "2 problems found before starting" and err.exit_code == 2
    lines = [p.line() for p in err.problems]
    assert "mlp.py defines no 'MPL'; did you mean `MLP`?" in lines[0]
    assert "source path does not exist" in lines[1] and str(conv.parent / "nowhere") in lines[1]


@pytest.mark.parametrize("target, message", [
    ("no_such_pkg_xyz.models:Net", "cannot import module 'no_such_pkg_xyz.models'"),
    ("missing.py:Net", "model file .*missing.py does not exist; .py files there: tiny_model.py"),
    ("tiny_modle.py:Tiny", "model file .*tiny_modle.py does not exist; did you mean `tiny_model.py`\\?"),
    ("tiny_model.py:Tiyn", "tiny_model.py defines no 'Tiyn'; did you mean `Tiny`\\?"),
])
def test_a_model_target_that_does_not_exist_is_a_config_error(conv: Path, target: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_config(load_config(conv, [f"model.target={target}"]))
    assert info.value.exit_code == 2 and info.value.key == "model.target"
    assert re.search(message, info.value.message), info.value.message


def test_a_model_file_with_a_syntax_error(conv: Path) -> None:
    (conv.parent / "broken.py").write_text("class Net(:\n    pass\n")
    with pytest.raises(ModelError, match="syntax error at line 1"):
        check_config(load_config(conv, ["model.target=broken.py:Net"]))


def test_names_defined_by_import_or_assignment_count(conv: Path) -> None:
    (conv.parent / "reexport.py").write_text("from mlp_impl import MLP as Net\nFactory = Net\n")
    check_config(load_config(conv, ["model.target=reexport.py:Net"]))
    check_config(load_config(conv, ["model.target=reexport.py:Factory"]))


def test_an_export_folder_below_a_file(conv: Path) -> None:
    (conv.parent / "afile").write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        check_config(load_config(conv, ["export.dir=afile/out"]))


def test_a_fifo_source_is_refused_before_reading(conv: Path) -> None:
    fifo = conv.parent / "pipe.npz"
    os.mkfifo(fifo)
    with pytest.raises(LoadError, match="not a regular file or a folder"):
        check_config(load_config(conv, [f"source.path={fifo}", "source.format=npz"]))


def test_the_cli_reports_them_without_starting_prefect(conv: Path, tmp_path: Path) -> None:
    code = ("import sys\nfrom np2torch.cli import main\nrc = main(sys.argv[1:])\n"
            "print('prefect imported' if 'prefect' in sys.modules else 'prefect not imported')\nsys.exit(rc)")
    env = {**os.environ, "NP2TORCH_DATA_DIR": str(tmp_path / "data")}
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run([sys.executable, "-c", code, "convert", str(conv), "--set", "source.path=nowhere"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "[load-arrays]" in r.stderr and "source path does not exist" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout.strip() == "prefect not imported"


_MAIN = ("import sys\nfrom np2torch.cli import main\nrc = main(sys.argv[1:])\n"
         "print('prefect imported' if 'prefect' in sys.modules else 'prefect not imported')\nsys.exit(rc)")


def test_a_missing_model_file_exits_2_with_a_did_you_mean_and_an_audit_line(conv: Path, tmp_path: Path) -> None:
    """As a user types it, from another folder: exit 2 before Prefect starts; the audit log says it was rejected and why."""
    from np2torch.tasks.audit import read_records

    home = tmp_path / "home"
    env = {**os.environ, "NP2TORCH_HOME": str(home)}
    for var in ("PREFECT_API_URL", "NP2TORCH_DATA_DIR"):
        env.pop(var, None)
    (tmp_path / "elsewhere").mkdir()
    r = subprocess.run([sys.executable, "-c", _MAIN, "convert", str(conv), "--set", "model.target=tiny_modle.py:Tiny"], env=env,
                       cwd=tmp_path / "elsewhere", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "[config] `model.target`: model file" in r.stderr and "did you mean `tiny_model.py`?" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout.strip() == "prefect not imported"
    records, bad = read_records(home / "audit.jsonl")
    assert bad == 0 and len(records) == 1
    rec = records[0]
    assert rec["status"] == "rejected" and rec["name"] == conv.stem and rec["command"] == "convert"
    assert "tiny_modle.py does not exist" in rec["reason"] and rec["error"]["stage"] == "config"
    assert not (tmp_path / "elsewhere" / "data").exists()  # state lands in the home, not the folder


def test_a_dask_batch_without_the_dask_extra_is_refused_before_prefect(tmp_path: Path, tiny) -> None:
    """``task_runner: dask`` when prefect-dask is not importable (hidden here as a missing package is): exit 2, no Prefect."""
    import yaml

    batch = tmp_path / "batch.yaml"
    batch.write_text(yaml.safe_dump({"conversions": [str(tiny("a"))], "task_runner": "dask"}))
    hide = "import sys\nsys.modules['prefect_dask'] = None\n"  # what `import prefect_dask` sees when the extra is absent
    env = {**os.environ, "NP2TORCH_HOME": str(tmp_path / "home")}
    for var in ("PREFECT_API_URL", "NP2TORCH_DATA_DIR"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-c", hide + _MAIN, "batch", str(batch)], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "[config] `task_runner`: the Dask task runner needs the dask extra" in r.stderr and "prefect_dask not importable" in r.stderr
    assert "pip install 'np2torch[dask]'" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout.strip() == "prefect not imported"
    from np2torch.tasks.audit import read_records

    (rec,), _ = read_records(tmp_path / "home" / "audit.jsonl")
    assert rec["status"] == "rejected" and rec["command"] == "batch" and "dask extra" in rec["reason"]
