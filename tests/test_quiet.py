"""Issue 20 items 3 and 4, as a user sees them: a convert typed from a folder outside the repository,
with a temporary home; the lines it prints (terminal or not), an honest summary, ``-v``."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def user(tmp_path: Path, tiny) -> tuple[Path, dict[str, str], Path]:
    """(a folder outside the repository, the environment of a user with a temporary home, the tiny config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ("NP2TORCH_DATA_DIR", "NP2TORCH_T0")}
    env.update(NP2TORCH_HOME=str(tmp_path / "home"), NP2TORCH_NO_SERVER="1", NP2TORCH_WARM="0")
    folder = tmp_path / "work"
    folder.mkdir()
    return folder, env, tiny("model")


def _convert(user, *args: str, tty: bool = False) -> tuple[int, list[str]]:
    """Run ``np2torch convert`` as typed; (exit status, every line stdout and stderr showed)."""
    folder, env, config = user
    cmd = [sys.executable, "-m", "np2torch.cli", "convert", str(config), *args]
    if not tty:
        r = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        return r.returncode, (r.stdout + r.stderr).splitlines()
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the command closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    return proc.wait(timeout=300), [ln for ln in re.split(r"\r?\n", text) if ln.strip()]


def test_a_convert_not_on_a_terminal_prints_at_most_6_lines_and_an_honest_summary(user) -> None:
    code, lines = _convert(user)
    assert code == 0, "\n".join(lines)
    assert len(lines) <= 6, "\n".join(lines)
    text = "\n".join(lines)
    head = next(ln for ln in lines if " converted (" in ln)
    assert re.search(r"converted \(success, computed\) in \d+\.\ds \(stages \d+\.\d\ds\)", head), head
    assert re.search(r"wrote in .*/: model\.safetensors, model\.pt, manifest\.csv, report\.json", text), text
    assert "INFO" not in text and "attempt 1 of" not in text and "Cached(type" not in text  # Prefect's lines: in the log file only
    assert (Path(user[1]["NP2TORCH_HOME"]) / "logs" / "np2torch.log").is_file()
    assert not (user[0] / "data").exists()  # state lands in the home, not the folder

    code, lines = _convert(user)  # the same again: every stage cached
    text = "\n".join(lines)
    assert code == 0 and len(lines) <= 6, text
    assert "converted (success, all 6 stages cached)" in text
    assert "wrote in" not in text and "model.safetensors" in text
    assert re.search(r"kept \(unchanged, export cached\) in .*/: model\.safetensors, model\.pt, manifest\.csv; wrote report\.json", text)
    # the command's time (its start-up included) is shown beside the stages'
    command_s, stages_s = map(float, re.search(r"in (\d+\.\d)s \(stages (\d+\.\d+)s\)", text).groups())
    assert command_s > stages_s


def test_a_convert_on_a_terminal_prints_at_most_12_lines_and_v_shows_prefect(user) -> None:
    code, lines = _convert(user, tty=True)
    assert code == 0 and len(lines) <= 12, "\n".join(lines)
    assert sum(1 for ln in lines if re.match(r"\s+\S+\s+(computed|cached)\s+\d", ln)) == 6  # one line per stage
    code, lines = _convert(user, "-v")
    assert code == 0, "\n".join(lines)
    assert any("Finished in state" in ln for ln in lines), "\n".join(lines)  # Prefect's own lines, on request


def test_the_python_api_is_quiet_unless_verbose(prefect_harness, tiny) -> None:
    """As in a notebook: a fresh interpreter (this session's logging is shaped by every earlier
    test), against the session's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    config = tiny("api")
    code = ("import sys, np2torch\n"
            "for verbose in (False, True, False):\n"
            "    print(f'--- verbose={verbose}', file=sys.stderr, flush=True)\n"
            f"    np2torch.convert({str(config)!r}, verbose=verbose)\n")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    quiet, loud, quiet_again = (r.stdout + r.stderr).split("--- verbose=")[1:]
    assert "Finished in state" not in quiet and "attempt 1 of" not in quiet, quiet
    assert "Finished in state" in loud, loud
    assert "Finished in state" not in quiet_again, quiet_again


def test_convert_and_batch_take_verbose_and_no_server() -> None:
    from np2torch.cli import build_parser

    for command in ("convert", "batch"):
        args = build_parser().parse_args([command, "x.yaml", "-v", "--no-server"])
        assert args.verbose and args.no_server
        assert not build_parser().parse_args([command, "x.yaml"]).verbose
