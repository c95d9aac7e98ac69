"""Readers of source files, one module per format, below the load-arrays stage.

Each reader turns a file (or folder) into :class:`~np2torch.tasks.readers.base.ArrayRecord`
rows from headers alone, memory-mapping data where the format allows, and reads every source
byte once (sha256, per-array blake3 and value statistics in one pass,
:func:`np2torch.tasks.fingerprint.file_digests`). None runs code from a file; all refuse
anything that is not a regular file before reading a byte, cap counts and sizes, and report
hostile or broken input as one :class:`~np2torch.tasks.errors.LoadError`.

=================  ==========================================  ==========================
``source.format``  files                                       module
=================  ==========================================  ==========================
npy, flat          ``.npy``                                    :mod:`.npy`
npy-dir            a folder of ``.npy`` (nested folders)       :mod:`.npy`
npz                ``np.savez`` / ``np.savez_compressed``      :mod:`.npz`
pickle-list        ``get_weights()`` pickles (opt-in only)     :mod:`.pickled`
h5                 Keras 3 ``.weights.h5``, legacy Keras .h5   :mod:`.keras_h5`
msgpack            Flax ``to_bytes`` checkpoints               :mod:`.flax_msgpack`
safetensors        ``.safetensors``                            :mod:`.safetensors_file`
=================  ==========================================  ==========================
"""

FORMATS = ("auto", "npz", "npy", "npy-dir", "pickle-list", "flat", "h5", "msgpack", "safetensors")
