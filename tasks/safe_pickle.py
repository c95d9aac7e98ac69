"""A restricted unpickler that rebuilds NumPy arrays and plain containers, and nothing else.

``np.load(allow_pickle=True)`` runs arbitrary code from the file (any ``__reduce__``). Model
files come from strangers, so even when the user opts in to pickles we only allow the handful of
globals NumPy needs to rebuild an ndarray; anything else (``os.system``, ``builtins.eval``,
``subprocess``…) is refused before it is called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

__all__ = ["SafeUnpickler", "safe_loads", "UnsafePickleError"]

# (module, name) pairs needed to rebuild ndarrays and dtypes, across NumPy 1.x and 2.x, plus the
# containers people pickle weights in. Each is data-only: none of them runs user code.
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),  # NumPy 1.x ndarray.__reduce__
        ("numpy._core.multiarray", "_reconstruct"),  # NumPy 2.x
        ("numpy.core.multiarray", "scalar"),  # NumPy scalars (np.float32(1.0))
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles: frombuffer(bytes).reshape, data only
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        *(("numpy.dtypes", f"{k}DType") for k in ("Bool", "Float16", "Float32", "Float64", "LongDouble", "Int8", "Int16", "Int32",
                                                  "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Byte", "UByte", "Short",
                                                  "UShort", "Int", "UInt", "Long", "ULong", "LongLong", "ULongLong")),
        ("collections", "OrderedDict"),  # state dicts
        ("_codecs", "encode"),  # protocol-2 pickles of bytes go through codecs.encode(str, 'latin1')
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global that is not on the allow-list."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        super().__init__(f"pickle wants to call {module}.{name}, which is not allowed (only NumPy arrays and plain containers are)")


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(module, name)
        if module == "_codecs":
            import _codecs

            def encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
                if encoding != "latin1":
                    raise UnsafePickleError(module, f"{name}({encoding})")
                return _codecs.encode(obj, encoding, errors)

            return encode
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:  # torch's zip pickles; never here
        raise UnsafePickleError("persistent_load", str(pid)[:40])


def safe_loads(data: bytes | memoryview) -> Any:
    return SafeUnpickler(io.BytesIO(bytes(data))).load()
