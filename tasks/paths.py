"""Where things go by default, and how files are written so that none is ever half-written."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["PIN_FILE", "home", "home_origin", "home_line", "data_dir", "cache_dir", "audit_log_path", "atomic_write_text", "atomic_writer"]

# A project pins its own np2torch home with this file at its root (one line: the home's path,
# relative to the file's folder), found from any subfolder as git finds ``.git``.
PIN_FILE = ".np2torch-home"


def _user_home() -> Path:
    """The per-user default, by the platform's conventions (XDG on Linux)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "np2torch"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "np2torch"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "np2torch"


def _pinned(start: Path) -> tuple[Path, Path] | None:
    """(home, pin file) from the nearest pin file at or above ``start``, if any."""
    for folder in (start, *start.parents):
        pin = folder / PIN_FILE
        if pin.is_file():
            line = next((ln.strip() for ln in pin.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")), ".")
            return (folder / Path(line).expanduser()).resolve(), pin
    return None


def home_origin() -> tuple[Path, str]:
    """np2torch's home (server, stage cache, stat cache, audit log) and what chose it.

    ``$NP2TORCH_DATA_DIR`` (kept for compatibility) or ``$NP2TORCH_HOME``, else the nearest
    ``.np2torch-home`` pin at or above the current folder, else the per-user location.
    """
    for var in ("NP2TORCH_DATA_DIR", "NP2TORCH_HOME"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser().resolve(), f"${var}"
    found = _pinned(Path.cwd())
    if found is not None:
        return found[0], f"pinned by {found[1]}"
    return _user_home().resolve(), "per-user default"


def home_line() -> str:
    """``np2torch home: PATH (what chose it)``: what ``server status``, ``audit`` and ``cache du`` print."""
    path, why = home_origin()
    return f"np2torch home: {path} ({why})"


def home() -> Path:
    return home_origin()[0]


def data_dir() -> Path:
    """The home: the stage cache, stat cache, audit log and local Prefect server live under it."""
    return home()


def cache_dir() -> Path:
    return Path(os.environ.get("NP2TORCH_CACHE_DIR") or data_dir() / "cache").resolve()


def audit_log_path() -> Path:
    return Path(os.environ.get("NP2TORCH_AUDIT_LOG") or data_dir() / "audit.jsonl").resolve()


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``.

    A crash or an exception leaves the previous file (if any) untouched and no partial file
    under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; final files get the usual mode
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, racily, across threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path, "w") as fh:
        fh.write(text)
