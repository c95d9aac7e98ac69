"""Readers of source files, one module per format, below the load-arrays stage.

Each reader turns a file (or folder) into :class:`~np2torch.tasks.readers.base.ArrayRecord`
rows from headers alone, memory-mapping data where the format allows, and reads every source
byte once: the file's sha256, every array's value statistics and (for an inflated member) the
sha256 of its inflated bytes in one pass; an array's fingerprint is derived from those
(:func:`~np2torch.tasks.readers.stats.fingerprint_of`). None runs code from a file; all refuse
anything that is not a regular file before reading a byte, cap counts and sizes, and report
hostile or broken input as one :class:`~np2torch.tasks.errors.LoadError`.

The formats are the rows of ONE table, :data:`~np2torch.tasks.readers.table.READERS`; every
reader has the same signature, ``scan(path, ctx: ScanContext) -> list[ArrayRecord]``:

===================  ==========================================  ==========================
``source.format``    files                                       module
===================  ==========================================  ==========================
npz                  ``np.savez`` / ``np.savez_compressed``      :mod:`.npz`
npy, flat            ``.npy``                                    :mod:`.npy`
npy-dir              a folder of ``.npy`` (nested folders)       :mod:`.npy`
pickle-list          ``get_weights()`` pickles (opt-in only)     :mod:`.npy`, :mod:`.pickled`
h5                   Keras 3 ``.weights.h5``, legacy Keras .h5   :mod:`.keras_h5`
keras                Keras 3 native ``.keras`` (a zip)           :mod:`.keras_zip`
safetensors          ``.safetensors``                            :mod:`.safetensors_file`
safetensors-sharded  a folder of shards + ``*.index.json``       :mod:`.sharded`
                     (or the index file itself)
msgpack              Flax ``to_bytes`` checkpoints               :mod:`.flax_msgpack`
===================  ==========================================  ==========================
"""

from np2torch.tasks.readers.access import fingerprint_files, open_array, scan_source, source_files
from np2torch.tasks.readers.base import ArrayRecord, Reader, ScanContext, natural_key
from np2torch.tasks.readers.stats import Layout, layout_infos, scan_layouts
from np2torch.tasks.readers.table import READERS, detect_format, formats, reader_of, register_reader

__all__ = ["ArrayRecord", "Reader", "ScanContext", "READERS", "register_reader", "formats", "reader_of", "detect_format", "scan_source",
           "open_array", "source_files", "fingerprint_files", "Layout", "layout_infos", "scan_layouts", "natural_key", "reader_modules"]


def reader_modules() -> list[str]:
    """The modules whose code the array table depends on: every registered reader's, and the shared ones."""
    shared = ["access", "base", "npy_header", "stats", "table"]
    own = {f.__module__ for r in READERS.values() for f in (r.scan, r.sniff, r.files, r.open) if f is not None}
    return sorted({f"np2torch.tasks.readers.{m}" for m in shared} | own)
