"""Where things go by default, and how files are written so that none is ever half-written."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["data_dir", "cache_dir", "audit_log_path", "atomic_write_text", "atomic_writer", "natural_key"]


def natural_key(text: str) -> list[str | int]:
    """Sort key reading digit runs as numbers: ``dense < dense_1 < dense_2 < dense_10``, ``w2.npy < w10.npy``.

    Splitting on digit runs alternates text and digits, so two keys never compare a number with text.
    """
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", text))]


def data_dir() -> Path:
    """``$NP2TORCH_DATA_DIR`` or ``./data``: outputs, cache and audit log go under it."""
    return Path(os.environ.get("NP2TORCH_DATA_DIR", "data")).resolve()


def cache_dir() -> Path:
    return Path(os.environ.get("NP2TORCH_CACHE_DIR", data_dir() / "cache")).resolve()


def audit_log_path() -> Path:
    return Path(os.environ.get("NP2TORCH_AUDIT_LOG", data_dir() / "audit.jsonl")).resolve()


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
