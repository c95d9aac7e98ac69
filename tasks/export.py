"""Stage 6, ``export``: converted tensors → ``model.safetensors`` (+ ``model.pt``), ``manifest.csv``.

Above ``export.max_shard_size`` the convert stage wrote shards instead: they are exported as
``model-0000K-of-0000N.safetensors`` plus ``model.safetensors.index.json`` (``metadata.total_size``,
``weight_map``), the layout transformers and accelerate load directly; each shard is handled as
the single file is below, the index renamed into place after every shard, and files of the other
layout left by a previous export (a single file, or shards of another count) removed only then.

The safetensors file carries its final ``__metadata__`` (config digest, source fingerprint,
np2torch version: no paths or timestamps, so reruns are byte-identical). When the converted
file already has exactly that header it *is* the export: it is hard-linked into place (no data
written; a copy where links are impossible). Otherwise the header is rewritten and the data
copied in the kernel (``copy_file_range``), not through Python.

Every file is first written, fsynced and checked under a hidden staging name in the export
folder; only when all of them are complete are they renamed over the final names. A full
disk, an error or ``kill -9`` therefore never leaves a partial file under a final name, and the
previous export stays byte-identical until the new one is complete (the renames themselves
take microseconds). Staging files of a killed run are removed by the next export into the same
folder. Before a file is published, the staged safetensors is re-read once, streaming: every
tensor's sha256 is checked against the converted one (and the file's sha256 computed in the
same read, for the audit record). The checks read through np2torch's own bounded reader (the
header, then ranges streamed through a few buffers) and map no file, so a model larger than the
machine's memory is checked as any other.

Memory stays at a few read buffers whatever the model size; only ``model.pt`` (``torch.save``
of the memory-mapped tensors) touches every page of the model while it is written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from np2torch.tasks.cache import pause_point
from np2torch.tasks.errors import ExportError
from np2torch.tasks.fingerprint import Region, file_digests, file_fingerprint, peek, remember, stat_key
from np2torch.tasks.manifest import to_csv
from np2torch.tasks.paths import atomic_writer
from np2torch.tasks.procs import pid_alive
from np2torch.tasks.progress import track
from np2torch.tasks.st_io import INDEX_NAME, ST_DTYPES, MappedSafetensors, check_layout, checkpoint_files, plan_header, read_header

__all__ = ["write_safetensors_with_metadata", "check_export", "export_outputs"]

_COPY_CHUNK = 64 << 20
# ".np2torch.<host>.<pid>.<token>.<final name>" (and atomic_writer's "." + that + ".XXXX.tmp")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_STAGED = re.compile(r"^\.+np2torch\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.")


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


def write_safetensors_with_metadata(src: Path, dst: Path, metadata: dict[str, str]) -> bool:
    """Write ``src``'s tensors to ``dst`` (atomically) with a new ``__metadata__``; True if linked, not copied."""
    header, base = read_header(src)
    tensors = [(k, _torch_name(v["dtype"]), tuple(v["shape"])) for k, v in sorted(header.items(), key=_by_offset) if k != "__metadata__"]
    new_header, _ = plan_header(tensors, metadata)
    with open(src, "rb") as sf:
        same = sf.read(base) == new_header
    if same and _link_into_place(src, dst):
        return True
    size = src.stat().st_size - base
    with atomic_writer(dst, "wb") as fh, open(src, "rb") as sf:
        fh.write(new_header)
        fh.flush()
        _copy_range(sf.fileno(), fh.fileno(), base, size)
    return False


def _link_into_place(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` as ``dst`` (atomically); False where the file system cannot.

    The two names then share one inode: replacing either name later (as every writer here does)
    leaves the other intact, and the cache re-hashes an entry whose file changed.
    """
    sha = peek(src, "sha256")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
    except OSError:
        return False
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sha is not None:
        remember(dst, "sha256", sha, own=True)  # a link changes the inode's ctime, not its bytes
    return True


def _by_offset(item: tuple[str, Any]) -> int:
    k, v = item
    return -1 if k == "__metadata__" else v["data_offsets"][0]


def _torch_name(code: str) -> str:
    return next(k for k, v in ST_DTYPES.items() if v == code)


def check_export(path: Path, tensors: dict[str, dict[str, Any]], *, reread: bool = True, reference: Path | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
    """Re-read ``path`` once and check every tensor against what the convert stage produced.

    Each tensor's bytes are compared by sha256 with ``tensors[k]["sha256"]`` when the record
    has one, else with the same tensor in ``reference`` (the converted file, read in the same
    way: the convert stage no longer hashes each tensor, since the export links that very file
    and only a copy needs the comparison).

    The same read yields the file's sha256 (remembered for the audit record) unless the stat
    cache already knows it. Without ``reread`` (the file is the converted file itself, linked),
    the header is checked and the bytes are trusted when the stat cache holds the sha256 the
    convert stage computed while writing them, for this very version of the file.
    ``progress`` gets the tensor bytes re-read.
    """
    problems = []
    try:  # the layout a strict safetensors parser checks, from the header alone
        header, base = read_header(path)
        if bad := check_layout(header, base, path.stat().st_size):
            raise ValueError("; ".join(bad[:3]))
    except Exception as exc:
        raise ExportError(f"the written file does not parse as safetensors: {exc}", key=str(path), fix="rerun with --refresh") from None
    keys = set(header) - {"__metadata__"}
    if keys != set(tensors):
        raise ExportError("exported keys differ from the converted ones", key=str(path), expected=sorted(tensors)[:10],
                          actual=sorted(keys)[:10])
    names = []
    for k, info in tensors.items():
        h = header[k]
        if h["dtype"] != ST_DTYPES[info["dtype"]] or h["shape"] != list(info["shape"]):
            problems.append(k)
        else:
            names.append(k)
    version = stat_key(path)
    known_sha = peek(path, "sha256")
    if not reread and known_sha is not None and not problems:
        return
    tick = (lambda piece: progress(len(piece))) if progress is not None else None
    regions = [Region(base + header[k]["data_offsets"][0], header[k]["data_offsets"][1] - header[k]["data_offsets"][0], on_chunk=tick)
               for k in names]
    sha, digests = file_digests(path, regions, sha256=known_sha is None)
    expected = _expected_digests(names, tensors, reference)
    problems += [k for k, d in zip(names, digests) if d != expected[k]]
    if problems:
        raise ExportError(f"{len(problems)} exported tensor(s) differ from the converted ones", key=problems[0],
                          fix="the disk may be faulty; rerun with --refresh")
    if known_sha is None and stat_key(path) == version:
        remember(path, "sha256", sha, own=True)  # np2torch wrote it and just re-read every byte


def _expected_digests(names: list[str], tensors: dict[str, dict[str, Any]], reference: Path | None) -> dict[str, str | None]:
    """Each tensor's sha256: from the convert record, or read from the converted file ``reference``."""
    out: dict[str, str | None] = {k: tensors[k].get("sha256") for k in names}
    todo = [k for k in names if out[k] is None]
    if todo and reference is not None:
        header, base = read_header(reference)
        regions = [Region(base + header[k]["data_offsets"][0], header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
                   for k in todo if k in header]
        _, digests = file_digests(reference, regions, sha256=False)
        out.update(zip([k for k in todo if k in header], digests))
    return out


def _staging_path(out_dir: Path, final: str) -> Path:
    return out_dir / f".np2torch.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.{final}"


def _clear_dead_staging(out_dir: Path) -> None:
    """Remove staging files left by a killed export on this host (a live one's are kept)."""
    for p in out_dir.iterdir():
        m = _STAGED.match(p.name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                p.unlink()


def _publish(staged: list[tuple[Path, Path]], out_dir: Path) -> None:
    """Rename every complete staged file over its final name, then make the renames durable."""
    for tmp, final in staged:
        os.replace(tmp, final)
    _fsync_dir(out_dir)


_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _remove_other_layout(out_dir: Path, kept: set[str]) -> None:
    """Once the new files are in place: remove a previous export's files of the other layout
    (a single ``model.safetensors`` beside new shards, shards and index beside a new single
    file, or shards of another count), so that a loader finds one checkpoint only."""
    stale = [p for p in out_dir.iterdir() if p.name not in kept and
             (_SHARD.match(p.name) or p.name in ("model.safetensors", INDEX_NAME)) and p.is_file()]
    for p in stale:
        with contextlib.suppress(OSError):
            p.unlink()
    if stale:
        _fsync_dir(out_dir)


def _fsync_dir(out_dir: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export_outputs(*, converted: Path, tensors: dict[str, dict[str, Any]], manifest_rows: list[dict[str, Any]], out_dir: Path,
                   formats: list[str], metadata: dict[str, str], progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Write the export files into ``out_dir``; return path/bytes/sha256 for each.

    ``progress`` gets the bytes of the safetensors re-read to check it (none when it is linked).
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".np2torch-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ExportError(f"cannot write to the export folder: {exc.strerror}", key=str(out_dir),
                          fix="choose a writable export.dir (--set export.dir=...)") from None
    outputs = []
    staged: list[tuple[Path, Path]] = []

    def stage(name: str) -> Path:
        staged.append((_staging_path(out_dir, name), out_dir / name))
        outputs.append(out_dir / name)
        return staged[-1][0]

    files = checkpoint_files(converted)
    try:
        _clear_dead_staging(out_dir)
        total = sum(int(t["offsets"][1]) - int(t["offsets"][0]) for t in tensors.values() if "offsets" in t) or None
        with track("export", "export (re-checking)", total, unit="B", progress=progress) as cb:
            for f in files:
                st = stage(f.name if len(files) > 1 else "model.safetensors")
                linked = write_safetensors_with_metadata(f, st, metadata)
                mine = {k: t for k, t in tensors.items() if t.get("file", f.name) == f.name}
                check_export(st, mine, reread=not linked, reference=f, progress=cb)
        if len(files) > 1:
            with atomic_writer(stage(INDEX_NAME), "wb") as fh:  # after every shard: renamed into place last of them
                fh.write(converted.read_bytes())
        if "pt" in formats:
            with MappedSafetensors(converted) as mapped, atomic_writer(stage("model.pt"), "wb") as fh:
                torch.save(mapped.state, fh)
        with atomic_writer(stage("manifest.csv"), "w") as fh:
            fh.write(to_csv(manifest_rows))
        # every staged file's sha256 (the safetensors' is known from writing or checking it):
        # a rename changes the inode's ctime, so the stat cache must learn them again afterwards
        digests = [file_fingerprint(tmp)["sha256"] for tmp, _ in staged]
        pause_point("export-publish")  # tests: a run killed here must leave the previous export whole
        _publish(staged, out_dir)
        _remove_other_layout(out_dir, {final.name for _, final in staged})
    except BaseException as exc:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(exc, OSError) and (err := _export_error(exc, out_dir)) is not None:
            raise err from None
        raise
    for p, sha in zip(outputs, digests):  # written and hashed by np2torch just now: nobody re-reads them
        remember(p, "sha256", sha, own=True)
    return [file_fingerprint(p) for p in outputs]


def _export_error(exc: OSError, out_dir: Path) -> ExportError | None:
    """The user-facing error for a write that failed for a reason the user can fix; None otherwise."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExportError("the disk is full; the previous export (if any) is untouched", key=str(out_dir),
                           fix="free space or choose another export.dir, then rerun")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return ExportError(f"cannot write: {exc.strerror}; the previous export (if any) is untouched", key=str(exc.filename or out_dir),
                           fix="choose a writable export.dir")
    return None
