"""The readers table: ``source.format`` name → :class:`~np2torch.tasks.readers.base.Reader`.

Everything that knows about formats reads this table: ``source.format: auto`` (:func:`detect_format`),
the config's allowed values and the CLI's choices (:func:`formats`), the scan, opening an array
and the files a source's cache key hashes (:mod:`.access`), and ``np2torch inspect``. Adding a
format is one module (its ``scan``, and ``sniff``/``open``/``files`` when it needs them) plus one
row here, or, from outside the package, one :func:`register_reader` call.

The order of the rows is the order ``auto`` asks a file's first bytes (safetensors before msgpack:
a safetensors header length can start with a byte that also opens a msgpack map; keras before
npz: both are zips, and keras claims only one holding ``config.json`` and ``model.weights.h5``),
and a folder's readers (an index of shards before a folder of ``.npy``).
"""

from __future__ import annotations

from pathlib import Path

import np2torch.tasks.readers.flax_msgpack as flax_msgpack
import np2torch.tasks.readers.keras_h5 as keras_h5
import np2torch.tasks.readers.keras_zip as keras_zip
import np2torch.tasks.readers.npy as npy
import np2torch.tasks.readers.npz as npz
import np2torch.tasks.readers.pickled as pickled
import np2torch.tasks.readers.safetensors_file as safetensors_file
import np2torch.tasks.readers.sharded as sharded
from np2torch.tasks.errors import LoadError
from np2torch.tasks.fingerprint import open_regular
from np2torch.tasks.readers.base import Reader

__all__ = ["READERS", "register_reader", "formats", "reader_of", "detect_format"]

READERS: dict[str, Reader] = {}


def register_reader(reader: Reader) -> Reader:
    """Add (or replace) the row for ``reader.name``: the config, the CLI, ``auto`` and the scan then know it."""
    if not reader.name or reader.name == "auto" or not reader.name.replace("-", "").isalnum():
        raise ValueError(f"a reader's name must be letters, digits and dashes, not 'auto' (got {reader.name!r})")
    READERS[reader.name] = reader
    return reader


for _row in (
    Reader("keras", keras_zip.scan, "Keras 3 native .keras files (zip of config.json + model.weights.h5)", (".keras",), keras_zip.sniff,
           open=keras_zip.open_member, claims=keras_zip.claims),
    Reader("safetensors-sharded", sharded.scan, "sharded safetensors: a folder with *.safetensors.index.json, or that index",
           folder=None, files=sharded.shard_files, claims=sharded.claims),
    Reader("npz", npz.scan, "np.savez / np.savez_compressed archives (.npz)", (".npz",), npz.sniff, open=npz.open_member),
    Reader("npy", npy.scan, "one array saved by np.save (.npy)", (".npy",), npy.sniff),
    Reader("npy-dir", npy.scan_dir, "a folder of .npy files (nested folders)", folder=True, files=npy.npy_files),
    Reader("pickle-list", npy.scan_pickle_list, "pickled get_weights() lists (.pkl; opt-in only)", (".pkl", ".pickle"),
           open=pickled.open_record),
    Reader("flat", npy.scan_flat, "one 1-D vector of every parameter (.npy)"),
    Reader("h5", keras_h5.scan, "Keras 3 .weights.h5 and legacy Keras .h5", (".h5", ".hdf5", ".keras5"), keras_h5.sniff,
           open=keras_h5.open_dataset),
    Reader("safetensors", safetensors_file.scan, "safetensors files", (".safetensors",), safetensors_file.sniff),
    Reader("msgpack", flax_msgpack.scan, "Flax to_bytes checkpoints (.msgpack)", (".msgpack",), flax_msgpack.sniff),
):
    register_reader(_row)


def formats() -> tuple[str, ...]:
    """Every value ``source.format`` may take: ``auto`` and each reader's name."""
    return ("auto", *READERS)


def reader_of(name: str, where: str = "source.format") -> Reader:
    if name not in READERS:
        raise LoadError(f"unknown format {name!r}", key=where, expected=" | ".join(READERS), actual=name,
                        fix=f"set source.format to one of {' | '.join(formats())}")
    return READERS[name]


def detect_format(path: Path, fmt: str) -> str:
    """The format a source needs: ``fmt`` itself unless ``auto``; for a folder the first folder
    reader that ``claims`` it; for a file the reader that claims its suffix, else the first
    whose ``sniff`` accepts its first 16 bytes and whose ``claims`` (when it has one) accepts it."""
    if fmt != "auto":
        return reader_of(fmt, str(path)).name
    rows = list(READERS.values())
    if path.is_dir():
        for r in rows:
            if r.folder is not False and (r.claims is None or r.claims(path)):
                return r.name
    else:
        for r in rows:
            if path.suffix in r.suffixes and not r.folder:
                return r.name
        with open_regular(path) as fh:
            head = fh.read(16)
            size = fh.seek(0, 2)
        for r in rows:
            if r.folder is not True and (r.sniff or r.claims) and (r.sniff is None or r.sniff(head, size)) \
                    and (r.claims is None or r.claims(path)):
                return r.name
    known = ", ".join(f"{r.name} ({r.about})" for r in rows)
    raise LoadError(f"cannot tell the format of this {'folder' if path.is_dir() else 'file'}; np2torch reads {known}", key=str(path),
                    fix=f"set `source.format` to one of {' | '.join(READERS)}")
