"""Stage 1, ``load-arrays``: source spec → array table.

Reads headers, not data: every array becomes a small :class:`ArrayRecord` (key, file, byte
offset, shape, dtype with byte order, Fortran order, fingerprint, value statistics). The bytes
stay on disk and are memory-mapped later by :func:`open_array`, so a 20 GB checkpoint costs no
RAM here. The formats (SPEC ``source.format``) each have a reader in
:mod:`np2torch.tasks.readers`, and :mod:`np2torch.tasks.readers.access` picks one and checks
the keys (printable, unique after ``key_prefix``); this module re-exports that access, reads
and writes the table, and fingerprints the source files for the stage's cache key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

from np2torch.tasks.dtypes import FLOAT_LIMITS
from np2torch.tasks.errors import LoadError
from np2torch.tasks.fingerprint import check_regular, file_fingerprint, pack
from np2torch.tasks.readers import (FORMATS, access, base, detect, flax_msgpack, keras_h5, npy, npy_header, npz, pickled, regions,
                                    safetensors_file, stats)
from np2torch.tasks.readers.access import SCANNERS, open_array, scan_source
from np2torch.tasks.readers.base import ArrayRecord
from np2torch.tasks.readers.detect import detect_format

__all__ = ["ArrayRecord", "FLOAT_LIMITS", "FORMATS", "scan_source", "open_array", "read_table", "write_table", "detect_format",
           "fingerprint_files", "input_fingerprints", "source_files", "READER_MODULES"]

# the code the stage's output depends on (its cache key hashes their source)
READER_MODULES: tuple[ModuleType, ...] = (access, base, detect, flax_msgpack, keras_h5, npy, npy_header, npz, pickled, regions,
                                          safetensors_file, stats)

Progress = Callable[[int], None] | None


def write_table(records: list[ArrayRecord], path: Path) -> None:
    from np2torch.tasks.paths import atomic_write_text

    atomic_write_text(path, json.dumps([asdict(r) for r in records], indent=1))


def read_table(path: str | Path) -> list[ArrayRecord]:
    out = []
    for d in json.loads(Path(path).read_text()):
        d["shape"] = tuple(d["shape"])
        out.append(ArrayRecord(**d))
    return out


def source_files(records: list[ArrayRecord]) -> list[str]:
    return sorted({r.file for r in records})


def fingerprint_files(paths: list[Path] | list[str], *, progress: Progress = None) -> list[dict[str, Any]]:
    """path, bytes, sha256 per source file, each file read once (``progress``: bytes done).

    For a ``.npy`` or ``.npz`` the same read also computes what :func:`scan_source` needs (array
    fingerprints, value statistics, CRCs) into the stat cache, so the scan reads nothing again.
    Anything unusual about a file is left for :func:`scan_source` to report, except a path
    that is not a regular file: that is refused here, before a byte is read.
    """
    with pack(paths):
        for p in map(Path, paths):
            check_regular(p)
            try:
                _prime_file(p)
            except (LoadError, OSError, ValueError):
                pass
            if progress is not None:
                progress(p.stat().st_size)
        return [file_fingerprint(p) for p in paths]


def _prime_file(path: Path) -> None:
    fmt = "npy" if path.suffix == ".npy" else detect_format(path, "auto")
    if fmt in ("npy", "flat"):
        npy.prime_npy(path)
    elif fmt == "npz":
        npz.prime_npz(path)
    elif fmt in SCANNERS:
        SCANNERS[fmt](path, None)




def input_fingerprints(records: list[ArrayRecord]) -> list[dict[str, Any]]:
    """path, bytes, sha256 per source file (the audit record's ``inputs``)."""
    return [file_fingerprint(f) for f in source_files(records)]
