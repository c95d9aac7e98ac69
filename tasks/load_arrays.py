"""Stage 1, ``load-arrays``: source spec → array table.

Reads headers, not data: every array becomes a small :class:`ArrayRecord` (key, file, byte
offset, shape, dtype with byte order, Fortran order, fingerprint, value statistics). The bytes
stay on disk and are memory-mapped later by :func:`open_array`, so a 20 GB checkpoint costs no
RAM here. The formats (SPEC ``source.format``) are the rows of one table in
:mod:`np2torch.tasks.readers`, which also picks a source's reader, checks the keys (printable,
unique after ``key_prefix``) and fingerprints the source files for the stage's cache key; this
module reads and writes the array table.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from np2torch.tasks.dtypes import FLOAT_LIMITS
from np2torch.tasks.fingerprint import file_fingerprint
from np2torch.tasks.readers import ArrayRecord, detect_format, fingerprint_files, open_array, reader_modules, scan_source

__all__ = ["ArrayRecord", "FLOAT_LIMITS", "scan_source", "open_array", "read_table", "write_table", "detect_format",
           "fingerprint_files", "input_fingerprints", "source_files", "READER_MODULES"]  # noqa: F822 (module __getattr__)



def __getattr__(name: str) -> Any:
    if name == "READER_MODULES":  # the code the stage's output depends on: every reader in the table, as registered now
        return tuple(reader_modules())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def input_fingerprints(records: list[ArrayRecord]) -> list[dict[str, Any]]:
    """path, bytes, sha256 per source file (the audit record's ``inputs``)."""
    return [file_fingerprint(f) for f in source_files(records)]
