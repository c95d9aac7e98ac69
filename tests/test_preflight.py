"""Everything checkable without a stage fails before Prefect starts: all problems at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from np2torch.flows.preflight import check_config
from np2torch.tasks.config import load_config
from np2torch.tasks.errors import ExportError, LoadError, ModelError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def conv(tiny) -> Path:
    """The tiny conversion, one .npy per array (a byte can be flipped in one of them)."""
    return tiny("conv", npy_dir=True)


def test_a_good_config_passes(conv: Path) -> None:
    check_config(load_config(conv))


def test_missing_source_and_unknown_model_name_are_reported_together(conv: Path) -> None:
    cfg = load_config(conv, ["source.path=nowhere", "model.target=" + str(REPO / "configs/models/mlp.py") + ":MPL"])
    with pytest.raises(LoadError) as info:
        check_config(cfg)
    err = info.value
    assert err.message == "2 problems found before starting"
    lines = [p.line() for p in err.problems]
    assert "source path does not exist" in lines[0] and str(conv.parent / "nowhere") in lines[0]
    assert "mlp.py defines no 'MPL'" in lines[1]


@pytest.mark.parametrize("target, message", [
    ("no_such_pkg_xyz.models:Net", "cannot import module 'no_such_pkg_xyz.models'"),
    ("missing.py:Net", "model file does not exist"),
])
def test_a_model_target_that_cannot_exist(conv: Path, target: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        check_config(load_config(conv, [f"model.target={target}"]))


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
