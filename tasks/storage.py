"""A full, over-quota or read-only disk is one clear error naming the folder, never a traceback.

``ENOSPC``, ``EDQUOT`` and ``EROFS`` can hit any write np2torch makes: the stage cache, Prefect's
result records under it, the export folder, the audit log. Wherever they happen they become a
:class:`StorageError` (a :class:`~np2torch.tasks.errors.ConversionError`: exit status 1, one
message) that says which folder, what went wrong and how to fix it. Nothing is left half-written:
every write goes to a temporary name first, and the writer removes it when the write fails, so
a rerun after freeing space starts clean and completes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from np2torch.tasks.errors import ConversionError

__all__ = ["StorageError", "STORAGE_ERRNOS", "storage_errors", "as_storage_error"]

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}

_WHAT = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
         errno.EROFS: "the file system is read-only"}


class StorageError(ConversionError):
    """The disk under a folder np2torch writes to is full, over quota or read-only."""

    stage = "storage"
    errno: int | None = None  # ENOSPC, EDQUOT or EROFS
    folder: str | None = None

    def __reduce__(self):  # keep errno and folder across pickling (Prefect persists failed states)
        return (_rebuild, (self.message, self.key, self.fix, self.stage, self.errno, self.folder))


def _rebuild(message, key, fix, stage, errno_, folder):
    exc = StorageError(message, key=key, fix=fix, stage=stage)
    exc.errno, exc.folder = errno_, folder
    return exc


def _free(folder: Path) -> str:
    with contextlib.suppress(OSError):
        return f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free now"
    return "free space unknown"


def as_storage_error(exc: OSError, folder: str | Path, *, what: str = "write", stage: str | None = None) -> StorageError:
    """``exc`` (one of :data:`STORAGE_ERRNOS`) as a :class:`StorageError` naming ``folder``.

    The folder named is ``folder``, or, when the error names a file outside it, that file's folder.
    """
    folder = Path(folder)
    if exc.filename:
        p = Path(os.fsdecode(exc.filename))
        if p != folder and folder not in p.parents:
            folder = p if p.is_dir() else p.parent
    if exc.errno == errno.EROFS:
        fix = f"make {folder} writable, or point np2torch elsewhere (NP2TORCH_DATA_DIR, NP2TORCH_CACHE_DIR, export.dir)"
    else:
        fix = (f"free space under {folder} ({_free(folder)}) "
               "or point np2torch elsewhere (NP2TORCH_DATA_DIR, NP2TORCH_CACHE_DIR, export.dir), then rerun")
    err = StorageError(f"could not {what} in {folder}: {_WHAT.get(exc.errno, os.strerror(exc.errno or 0))} "
                       f"([Errno {exc.errno}] {errno.errorcode.get(exc.errno or 0, '?')}); nothing was left half-written",
                       key=str(folder), fix=fix, stage=stage)
    err.errno, err.folder = exc.errno, str(folder)
    return err


@contextlib.contextmanager
def storage_errors(folder: str | Path, *, what: str = "write", stage: str | None = None) -> Iterator[None]:
    """Turn a disk-full/quota/read-only ``OSError`` raised inside into a :class:`StorageError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        raise as_storage_error(exc, folder, what=what, stage=stage) from None
