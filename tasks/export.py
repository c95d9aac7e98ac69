"""Stage 6, ``export``: converted tensors → ``model.safetensors`` (+ ``model.pt``), ``manifest.csv``.

The safetensors file is rewritten with its final ``__metadata__`` (config digest, source
fingerprint, np2torch version: no paths or timestamps, so reruns are byte-identical) by
copying the converted data in the kernel (``copy_file_range``), not through Python. Every file
is written under a temporary name and renamed, so a killed run never leaves a partial file
under a final name and the previous export survives until the new one is complete. Before
success is reported, the exported file is re-read and every tensor checked against the
converted one (dtype, shape, bytes).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tasks.errors import ExportError
from tasks.fingerprint import blake3_bytes, file_fingerprint
from tasks.manifest import to_csv
from tasks.paths import atomic_writer
from tasks.st_io import ST_DTYPES, mmap_state_dict, plan_header, read_header

__all__ = ["write_safetensors_with_metadata", "check_export", "export_outputs"]

_COPY_CHUNK = 64 << 20


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy bytes between files without passing them through user space where possible."""
    done = 0
    while done < count:
        n = min(_COPY_CHUNK, count - done)
        try:
            k = os.copy_file_range(src_fd, dst_fd, n, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            k = os.write(dst_fd, os.pread(src_fd, n, offset + done))
        if k == 0:
            raise ExportError("source ended early while copying", key="model.safetensors", expected=count, actual=done)
        done += k


def write_safetensors_with_metadata(src: Path, dst: Path, metadata: dict[str, str]) -> None:
    """Write ``src``'s tensors to ``dst`` (atomically) with a new ``__metadata__``."""
    header, base = read_header(src)
    tensors = [(k, _torch_name(v["dtype"]), tuple(v["shape"])) for k, v in sorted(header.items(), key=_by_offset) if k != "__metadata__"]
    new_header, _ = plan_header(tensors, metadata)
    size = src.stat().st_size - base
    with atomic_writer(dst, "wb") as fh, open(src, "rb") as sf:
        fh.write(new_header)
        fh.flush()
        _copy_range(sf.fileno(), fh.fileno(), base, size)


def _by_offset(item: tuple[str, Any]) -> int:
    k, v = item
    return -1 if k == "__metadata__" else v["data_offsets"][0]


def _torch_name(code: str) -> str:
    return next(k for k, v in ST_DTYPES.items() if v == code)


def check_export(path: Path, tensors: dict[str, dict[str, Any]]) -> None:
    """Re-read ``path`` and check every tensor against what the convert stage produced."""
    problems = []
    try:
        with safe_open(str(path), framework="pt") as f:  # the reference parser must accept it
            keys = set(f.keys())
        header, base = read_header(path)
    except Exception as exc:
        raise ExportError(f"the written file does not parse as safetensors: {exc}", key=str(path), fix="rerun with --refresh") from None
    if keys != set(tensors):
        raise ExportError("exported keys differ from the converted ones", key=str(path), expected=sorted(tensors)[:10], actual=sorted(keys)[:10])
    with open(path, "rb") as fh:
        for k, info in tensors.items():
            h = header[k]
            if h["dtype"] != ST_DTYPES[info["dtype"]] or h["shape"] != list(info["shape"]):
                problems.append(k)
                continue
            a, b = h["data_offsets"]
            if blake3_bytes(os.pread(fh.fileno(), b - a, base + a)) != info["blake3"]:
                problems.append(k)
    if problems:
        raise ExportError(f"{len(problems)} exported tensor(s) differ from the converted ones", key=problems[0], fix="the disk may be faulty; rerun with --refresh")


def export_outputs(*, converted: Path, tensors: dict[str, dict[str, Any]], manifest_rows: list[dict[str, Any]], out_dir: Path,
                   formats: list[str], metadata: dict[str, str]) -> list[dict[str, Any]]:
    """Write the export files into ``out_dir``; return path/bytes/sha256 for each."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".np2torch-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ExportError(f"cannot write to the export folder: {exc.strerror}", key=str(out_dir), fix="choose a writable export.dir (--set export.dir=...)") from None
    outputs = []
    try:
        st = out_dir / "model.safetensors"
        write_safetensors_with_metadata(converted, st, metadata)
        check_export(st, tensors)
        outputs.append(st)
        if "pt" in formats:
            pt = out_dir / "model.pt"
            state = mmap_state_dict(converted)
            with atomic_writer(pt, "wb") as fh:
                torch.save(state, fh)
            del state
            outputs.append(pt)
        mf = out_dir / "manifest.csv"
        with atomic_writer(mf, "w") as fh:
            fh.write(to_csv(manifest_rows))
        outputs.append(mf)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ExportError("the disk is full; the previous export (if any) is untouched", key=str(out_dir),
                              fix="free space or choose another export.dir, then rerun") from None
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise ExportError(f"cannot write: {exc.strerror}", key=str(exc.filename or out_dir), fix="choose a writable export.dir") from None
        raise
    return [file_fingerprint(p) for p in outputs]


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
