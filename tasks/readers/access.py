"""Array access for every stage, whatever the format (:mod:`.table` picks the reader): describe a
source's arrays (:func:`scan_source`), read one array's values (:func:`open_array`), and name
and hash the files a source consists of (:func:`source_files`, :func:`fingerprint_files`: what the
load-arrays cache key hashes). A domain module below the stages: load-arrays builds its table
with it, and convert, verify and the mapping read arrays with it, so no stage imports another.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks.errors import LoadError, TransientIOError
from np2torch.tasks.fingerprint import check_regular, file_fingerprint, pack
from np2torch.tasks.readers.base import ArrayRecord, ScanContext, check_keys, with_key
from np2torch.tasks.readers.table import detect_format, reader_of

__all__ = ["ArrayRecord", "scan_source", "open_array", "source_files", "fingerprint_files"]

Progress = Callable[[int], None] | None
log = logging.getLogger("np2torch")


def scan_source(path: str | Path, *, fmt: str = "auto", allow_pickle: bool = False, key_prefix: str = "",
                progress: Progress = None, notes: list[str] | None = None) -> list[ArrayRecord]:
    """Describe every array of a source (headers, fingerprints, value statistics), in source order.

    ``progress`` is called with the number of source bytes read, as they are read; ``notes``
    gets one line per kind of array the reader left out on purpose (a Keras file's optimizer
    state), which is also logged once.
    """
    path = Path(path)
    if not path.exists():
        raise LoadError("source path does not exist", key=str(path),
                        fix="check source.path (relative paths are relative to the config file)")
    reader = reader_of(detect_format(path, fmt), str(path))
    if reader.folder is not None and reader.folder != path.is_dir():
        want, got = ("folder", "file") if reader.folder else ("file", "folder")
        raise LoadError(f"format {reader.name} needs a {want}, got a {got}", key=str(path),
                        fix=f"point source.path at a {want}, or set source.format: auto (it tells the format from the {got})")
    if not path.is_dir():
        check_regular(path)
    ctx = ScanContext(allow_pickle=allow_pickle, progress=progress)
    with os_errors(path):
        records = reader.scan(path, ctx)
    for note in ctx.notes:  # what a reader left out on purpose: one line each, not one per array
        log.warning("%s: %s", path, note)
    if notes is not None:
        notes += ctx.notes
    if ctx.problems:
        raise LoadError(f"{len(ctx.problems)} array(s) cannot be model parameters", key=str(path), problems=ctx.problems,
                        fix=ctx.problems[0]["fix"])
    check_keys(records, str(path))  # printable (before stripping: the message must not carry an ESC either)
    if key_prefix:
        records = [with_key(r, r.key[len(key_prefix):]) if r.key.startswith(key_prefix) else r for r in records]
        check_keys(records, str(path))
    return [r if r.reader else replace(r, reader=reader.name) for r in records]


@contextlib.contextmanager
def os_errors(path: Path) -> Iterator[None]:
    """An OS error while reading a source (no permission, a symbolic link loop, a file gone) is
    one LoadError naming the file or link, not a traceback."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, TransientIOError) or exc.errno in (errno.EIO, errno.EAGAIN, errno.EBUSY):
            raise
        what = {errno.ELOOP: "is a symbolic link loop (or too many links deep)", errno.EACCES: "cannot be read: permission denied",
                errno.EPERM: "cannot be read: permission denied"}.get(exc.errno, f"cannot be read: {exc.strerror or exc}")
        raise LoadError(what, key=exc.filename or str(path),
                        fix="remove or fix the link" if exc.errno == errno.ELOOP else "check the file and its permissions") from None


def open_array(rec: ArrayRecord) -> np.ndarray:
    """The array's values: a read-only memory map when it is a byte range of its file, else read
    by its format's reader (inflated, unpickled: pickles only after the scan checked ``allow_pickle``)."""
    if rec.offset < 0:
        reader = reader_of(rec.reader, f"{rec.file}::{rec.key}")
        if reader.open is None:
            raise LoadError(f"format {reader.name} describes no array it cannot memory-map", key=f"{rec.file}::{rec.key}",
                            fix="rerun with --refresh")
        return reader.open(rec)
    dtype = np.dtype(rec.dtype)
    if rec.nbytes == 0:
        return np.empty(rec.shape, dtype=dtype)
    size = check_regular(rec.file).st_size
    if rec.offset + rec.nbytes > size:  # touching a mapping past the end of a file is SIGBUS, not an error
        raise LoadError("file is shorter than when it was scanned (it changed or was cut short)", key=f"{rec.file}::{rec.key}",
                        expected=rec.offset + rec.nbytes, actual=size, fix="rerun with --refresh")
    return np.memmap(rec.file, dtype=dtype, mode="r", offset=rec.offset, shape=rec.shape, order="F" if rec.fortran_order else "C")


def source_files(path: str | Path, fmt: str = "auto") -> tuple[Path, list[Path]]:
    """The source's root (paths in the array table are relative to it) and every file the source
    consists of, in the reader's order: what the load-arrays cache key hashes. No files when the
    path does not exist (the scan then says so)."""
    path = Path(path)
    if not path.exists():
        return path.parent, []
    with os_errors(path):
        reader = reader_of(detect_format(path, fmt), str(path))
        if reader.folder is not None and reader.folder != path.is_dir():  # the scan says what is wrong
            return (path, []) if path.is_dir() else (path.parent, [path])
        return (path if path.is_dir() else path.parent), reader.files(path)


def fingerprint_files(paths: list[Path] | list[str], *, progress: Progress = None) -> list[dict[str, Any]]:
    """path, bytes, sha256 per source file, each file read ONCE (``progress``: bytes done).

    The read that computes a file's sha256 is its reader's scan, so the array fingerprints and
    value statistics :func:`scan_source` needs land in the stat cache in the same pass and the
    scan reads nothing again. Anything unusual about a file is left for :func:`scan_source` to
    report, except a path that is not a regular file: that is refused here, before a byte is read.
    """
    with pack(paths):
        for p in map(Path, paths):
            with os_errors(p):
                check_regular(p)
            try:
                reader_of(detect_format(p, "auto")).scan(p, ScanContext())
            except (LoadError, OSError, ValueError):
                pass
            if progress is not None:
                progress(p.stat().st_size)
        return [file_fingerprint(p) for p in paths]
