"""One np2torch home, found the same way from any folder (issue 20, item 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE = ("from np2torch.tasks import paths; h, why = paths.home_origin(); print(h); print(why); print(paths.cache_dir()); "
        "print(paths.audit_log_path())")


def _where(cwd: Path, home: Path, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NP2TORCH_") and k != "XDG_DATA_HOME"}
    r = subprocess.run([sys.executable, "-c", CODE], cwd=cwd, env={**clean, "HOME": str(home), **env}, capture_output=True, text=True,
                       timeout=60, check=True)
    return r.stdout.splitlines()


@pytest.fixture
def user(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_outside_any_project_state_goes_to_the_per_user_home_not_the_folder(tmp_path, user):
    proj = tmp_path / "myproj"
    (proj / "sub").mkdir(parents=True)
    first, second = _where(proj, user), _where(proj / "sub", user)
    want = user / ".local" / "share" / "np2torch"
    assert first == second == [str(want), "per-user default", str(want / "cache"), str(want / "audit.jsonl")]
    assert not (proj / "data").exists()
    xdg = tmp_path / "xdg"
    assert _where(proj, user, XDG_DATA_HOME=str(xdg))[0] == str(xdg / "np2torch")


def test_a_pin_file_is_found_from_any_subfolder_like_git(tmp_path, user):
    proj = tmp_path / "proj"
    deep = proj / "a" / "b"
    deep.mkdir(parents=True)
    (proj / ".np2torch-home").write_text("# where this project keeps its np2torch state\nstate\n")
    for cwd in (proj, deep):
        home, why, *_ = _where(cwd, user)
        assert home == str(proj / "state") and why == f"pinned by {proj / '.np2torch-home'}"


def test_environment_wins_over_a_pin_and_the_old_variable_keeps_working(tmp_path, user):
    (tmp_path / ".np2torch-home").write_text("pinned\n")
    assert _where(tmp_path, user, NP2TORCH_HOME=str(tmp_path / "h"))[:2] == [str(tmp_path / "h"), "$NP2TORCH_HOME"]
    assert _where(tmp_path, user, NP2TORCH_DATA_DIR=str(tmp_path / "d"))[:2] == [str(tmp_path / "d"), "$NP2TORCH_DATA_DIR"]
    out = _where(tmp_path, user, NP2TORCH_HOME=str(tmp_path / "h"), NP2TORCH_CACHE_DIR=str(tmp_path / "c"))
    assert out[2] == str(tmp_path / "c") and out[3] == str(tmp_path / "h" / "audit.jsonl")


def test_this_repository_pins_its_data_folder():
    assert _where(REPO / "tests", Path("/nonexistent"))[:2] == [str(REPO / "data"), f"pinned by {REPO / '.np2torch-home'}"]
