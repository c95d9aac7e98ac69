"""Keras 3 native ``.keras`` files (format ``keras``): a zip of ``config.json``, ``metadata.json``
and ``model.weights.h5``, as ``model.save("x.keras")`` writes it.

Nothing is extracted to disk and nothing in it is deserialised: ``config.json`` is read as JSON
data (size-capped, duplicate names refused) for the model's layer order only, so a ``Lambda``
layer's marshalled code or a custom object's class name is never looked up or run. Keras
stores the members uncompressed, so ``model.weights.h5`` is opened in place, a byte range of
the ``.keras`` file (:class:`~.keras_h5.Window`), and its contiguous datasets are
memory-mapped from the ``.keras`` file itself; a deflated one (a re-zipped file) is inflated
into memory under the same bounds as a dataset (:func:`~.keras_h5.max_inflate` and the
compression-ratio cap). The archive is untrusted: member names that are paths out of the
archive (``..``, absolute, drive letters), symbolic links, duplicates, control characters and
encrypted members are refused before anything is read.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from np2torch.tasks.errors import LoadError, short
from np2torch.tasks.fingerprint import open_regular
from np2torch.tasks.readers.base import ArrayRecord, ScanContext, no_dup_keys
from np2torch.tasks.readers.keras_h5 import MAX_COMPRESSION_RATIO, h5_file, max_inflate, read_dataset, scan_h5
from np2torch.tasks.readers.npz import _check_names, _data_offset, _open_zip

__all__ = ["scan", "sniff", "claims", "open_member", "keras_layer_order", "MAX_CONFIG"]

CONFIG, WEIGHTS = "config.json", "model.weights.h5"
MAX_CONFIG = 64 << 20  # a model's config.json is kilobytes; a large one is hostile
_MAX_DEPTH = 64
_FIX = "re-save the model with Keras (model.save('x.keras')), or check where this file came from"
_S_IFMT, _S_IFLNK = 0o170000, 0o120000


def _zip(fh, path: Path) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    zf = _open_zip(fh, path, ".keras", _FIX)
    infos = zf.infolist()
    _check_names(infos, path)  # control characters, duplicates
    for i in infos:
        n = i.filename
        if n.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", n) or ".." in re.split(r"[/\\]", n):
            raise LoadError(f"archive member name {short(n)!r} is an absolute path or climbs out with '..'; refusing a hostile archive",
                            key=str(path), fix=_FIX)
        if (i.external_attr >> 16) & _S_IFMT == _S_IFLNK:
            raise LoadError(f"archive member {short(n)!r} is a symbolic link; refusing a hostile archive", key=str(path), fix=_FIX)
        if i.flag_bits & 0x61:
            raise LoadError("archive member is encrypted or patched; only plain members can be read", key=f"{path}::{n}", fix=_FIX)
    members = {i.filename: i for i in infos}
    missing = [m for m in (CONFIG, WEIGHTS) if m not in members]
    if missing:
        raise LoadError(f"not a Keras .keras file: the archive has no {' and no '.join(missing)}", key=str(path),
                        expected=f"{CONFIG} and {WEIGHTS}", actual=short(", ".join(sorted(members)) or "no members"), fix=_FIX)
    return zf, members


def _inflate(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, limit: int) -> bytes:
    """A member's bytes, never more than ``limit`` nor ``MAX_COMPRESSION_RATIO`` times its stored size."""
    bound = min(limit, max(info.compress_size, 1) * MAX_COMPRESSION_RATIO) if info.compress_type != zipfile.ZIP_STORED else limit
    if info.file_size > bound:
        raise LoadError(f"archive member would inflate to {info.file_size} bytes from {info.compress_size}, more than the {bound} allowed",
                        key=where, expected=f"at most {bound} bytes", actual=info.file_size, fix=_FIX)
    try:
        with zf.open(info) as mf:
            data = mf.read(bound + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        raise LoadError(f"archive member is corrupt: {short(str(exc))}", key=where, fix=_FIX) from None
    if len(data) > bound:
        raise LoadError(f"archive member inflates past the {bound} bytes allowed", key=where, fix=_FIX)
    return data


def _config(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Any:
    where = f"{path}::{CONFIG}"
    try:
        return json.loads(_inflate(zf, info, where, MAX_CONFIG).decode("utf-8"), object_pairs_hook=no_dup_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LoadError(f"config.json is not valid JSON: {short(str(exc))}", key=where, fix=_FIX) from None


def layer_order(config: Any) -> list[str]:
    """Layer name paths in the config's order (a nested model's layers as ``outer/inner``), read as data."""
    out: list[str] = []

    def walk(layer: Any, prefix: str, depth: int) -> None:
        cfg = layer.get("config") if isinstance(layer, dict) else None
        layers = cfg.get("layers") if isinstance(cfg, dict) else None
        if depth > _MAX_DEPTH or not isinstance(layers, list):
            return
        for sub in layers:
            name = sub.get("config", {}).get("name") if isinstance(sub, dict) and isinstance(sub.get("config"), dict) else None
            if isinstance(name, str) and sub.get("class_name") != "InputLayer":  # an input holds no weights
                out.append(prefix + name)
                walk(sub, f"{prefix}{name}/", depth + 1)

    walk(config, "", 0)
    return out


def keras_layer_order(path: str | Path) -> list[str]:
    """The layer order of a ``.keras`` file's model config (``config.json``, read as data): layer
    name paths as the weight keys start (``dense``, ``inner/dense_1``), nested models' layers
    after their model."""
    path = Path(path)
    with open_regular(path) as fh:
        zf, members = _zip(fh, path)
        with zf:
            return layer_order(_config(zf, members[CONFIG], path))


def scan(path: Path, ctx: ScanContext) -> list[ArrayRecord]:
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        zf, members = _zip(fh, path)
        with zf:
            order = layer_order(_config(zf, members[CONFIG], path))
            info, where = members[WEIGHTS], f"{path}::{WEIGHTS}"
            if info.compress_type == zipfile.ZIP_STORED:  # as Keras writes it: read in place
                start = _data_offset(fh, info, where)
                if start + info.file_size > size:
                    raise LoadError("archive member is truncated", key=where, expected=info.file_size, actual=max(0, size - start),
                                    fix=_FIX)
                with h5_file(path, start, info.file_size) as f:
                    return scan_h5(f, path, ctx, base=start, size=info.file_size, order=order, what="keras-info1")
            data = _inflate(zf, info, where, max_inflate())
            with h5_file(path, data=data) as f:
                return scan_h5(f, path, ctx, base=None, size=len(data), order=order, what="keras-info1")


def open_member(rec: ArrayRecord) -> np.ndarray:
    """A dataset the scan could not map (chunked, compressed, or in a deflated member)."""
    path, where = Path(rec.file), f"{rec.file}::{WEIGHTS}{rec.member}"
    with open_regular(path) as fh:
        zf, members = _zip(fh, path)
        with zf:
            info = members[WEIGHTS]
            if info.compress_type == zipfile.ZIP_STORED:
                with h5_file(path, _data_offset(fh, info, where), info.file_size) as f:
                    return read_dataset(f, rec.member, where)
            with h5_file(path, data=_inflate(zf, info, where, max_inflate())) as f:
                return read_dataset(f, rec.member, where)


def sniff(head: bytes, size: int) -> bool:
    return head[:4] == b"PK\x03\x04"


def claims(path: Path) -> bool:
    """A zip holding ``config.json`` and ``model.weights.h5`` is a ``.keras`` file, whatever its name."""
    try:
        with open_regular(path) as fh, _open_zip(fh, path) as zf:
            names = set(zf.namelist())
    except (LoadError, OSError):
        return False
    return {CONFIG, WEIGHTS} <= names
