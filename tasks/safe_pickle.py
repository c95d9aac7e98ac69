"""A restricted unpickler that rebuilds NumPy arrays and plain containers, and nothing else.

``np.load(allow_pickle=True)`` runs arbitrary code from the file (any ``__reduce__``). Model
files come from strangers, so even when the user opts in to pickles we only allow the handful of
globals NumPy needs to rebuild an ndarray; anything else (``os.system``, ``builtins.eval``,
``subprocess``…) is refused before it is called.

An allow-list of globals is not enough on its own: NumPy's own pickle hooks trust their input.
``dtype.__setstate__`` accepts any flags (a float64 dtype flagged as holding object pointers
makes NumPy dereference the data as pointers), ``np.dtype(..., copy=False)`` returns the global
singleton that a later ``BUILD`` would mutate for the whole process, and ``ndarray(shape)`` or
``ndarray.__setstate__`` of an object array allocates from a declared shape before checking the
data. So this unpickler (the pure-Python one, whose opcodes can be overridden) also checks the
arguments of every call and the state of every ``BUILD`` against what NumPy itself writes:
fresh dtype copies only, a state that changes nothing but the byte order, and array data whose
size matches the declared shape. Anything else is refused before NumPy sees it.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["SafeUnpickler", "safe_loads", "UnsafePickleError"]

_NP_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")  # NumPy 1.x, 2.x
_NP_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global, a call or a state that is not on the allow-list."""

    def __init__(self, module: str, name: str, why: str | None = None):
        self.module, self.name = module, name
        super().__init__(why or f"pickle wants to call {module}.{name}, which is not allowed (only NumPy arrays and plain containers are)")


def _refuse(what: str) -> UnsafePickleError:
    return UnsafePickleError("numpy", what, f"pickle holds {what}, which NumPy never writes for a plain array; refused")


def _check_dtype(dt: Any) -> np.dtype:
    if not isinstance(dt, np.dtype) or dt.fields is not None or dt.subdtype is not None or dt.kind not in "fiubcO":
        raise _refuse(f"an unsupported dtype {dt!r}")
    return dt


def _numel(shape: Any) -> int:
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise _refuse(f"an invalid shape {shape!r}")
    n = 1
    for d in shape:
        n *= d
    return n


def _make_dtype(obj: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """``numpy.dtype(obj, align, copy)`` for a plain type string; always a fresh copy, never the singleton."""
    if not isinstance(obj, str) or len(obj) > 8 or not isinstance(align, bool):
        raise _refuse(f"a dtype built from {obj!r}")
    try:
        return _check_dtype(np.dtype(obj, align=False, copy=True))
    except TypeError as exc:
        raise _refuse(f"a dtype built from {obj!r} ({exc})") from None


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """``ndarray.__reduce__``'s constructor: an empty placeholder that ``BUILD`` then fills."""
    if subtype is not np.ndarray or _numel(shape) > 1 or not (dtype == b"b" or isinstance(dtype, np.dtype)):
        raise _refuse(f"an array placeholder {shape!r}")
    return np.ndarray.__new__(np.ndarray, shape, _check_dtype(np.dtype(dtype) if isinstance(dtype, bytes) else dtype))


def _scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _check_dtype(dtype)
    if dtype.hasobject:
        return data
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _refuse(f"a {dtype} scalar of {len(data) if isinstance(data, bytes) else type(data).__name__} bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Protocol-5 arrays: a view of bytes already in the pickle, reshaped (no allocation)."""
    dtype = _check_dtype(dtype)
    if dtype.hasobject or order not in ("C", "F") or not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
        raise _refuse("an out-of-band buffer")
    raw = memoryview(buf).cast("B")
    if _numel(shape) * dtype.itemsize != raw.nbytes:
        raise _refuse(f"array data of {raw.nbytes} bytes for shape {shape!r} {dtype}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order=order)


def _latin1(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode``: protocol-2 pickles store bytes as a latin-1 str."""
    if not isinstance(obj, str) or encoding != "latin1" or errors != "strict":
        raise UnsafePickleError("_codecs", f"encode({encoding})")
    return obj.encode("latin1")


# (module, name) → what the pickle gets. Only the callables here can be called (REDUCE);
# np.ndarray is given only as _reconstruct's first argument.
_GLOBALS: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _reconstruct for m in _NP_CORE},
    **{(m, "scalar"): _scalar for m in _NP_CORE},
    **{(m, "_frombuffer"): _frombuffer for m in _NP_NUMERIC},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _make_dtype,
    ("collections", "OrderedDict"): OrderedDict,  # state dicts
    ("_codecs", "encode"): _latin1,
}
_CALLABLE = {id(f) for f in (_reconstruct, _scalar, _frombuffer, _make_dtype, _latin1, OrderedDict)}


def _check_dtype_state(dt: np.dtype, state: Any) -> None:
    """Only the byte order may change: flags, fields, sizes must be what a fresh dtype has."""
    if any(dt is np.dtype(c) for c in np.typecodes["All"]):
        raise _refuse("a change to a shared NumPy dtype")
    if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise _refuse("a malformed dtype state")
    _, byteorder, subarray, names, fields, elsize, alignment, flags = state[:8]
    meta = state[8] if len(state) == 9 else None
    if (byteorder not in ("<", ">", "|", "=") or subarray is not None or names is not None or fields is not None
            or elsize != -1 or alignment != -1 or flags != dt.flags or meta not in (None, {})):
        raise _refuse(f"a dtype state {state!r:.120} that changes more than the byte order")


def _check_array_state(arr: np.ndarray, state: Any) -> None:
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise _refuse("a malformed array state")
    shape, dtype, fortran, data = state[-4:]
    n = _numel(shape)
    dtype = _check_dtype(dtype)
    if not isinstance(fortran, bool):
        raise _refuse("a malformed array state")
    if dtype.hasobject:
        if not isinstance(data, list) or len(data) != n:
            raise _refuse(f"an object array of {n} elements with {len(data) if isinstance(data, list) else 'no'} items")
    elif not isinstance(data, (bytes, bytearray)) or len(data) != n * dtype.itemsize:
        raise _refuse(f"array data of {len(data) if isinstance(data, (bytes, bytearray)) else '?'} bytes for shape {shape!r} {dtype}")


class SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcode table can be overridden
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(str(module), str(name)) from None

    def persistent_load(self, pid: Any) -> Any:  # torch's zip pickles; never here
        raise UnsafePickleError("persistent_load", str(pid)[:40])

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in _CALLABLE or not isinstance(args, tuple):
            raise UnsafePickleError(getattr(func, "__module__", "?") or "?", getattr(func, "__name__", type(func).__name__),
                                    f"pickle calls {getattr(func, '__name__', type(func).__name__)}, which is not allowed")
        self.stack[-1] = func(*args)

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            _check_dtype_state(inst, state)
        elif type(inst) is np.ndarray:
            _check_array_state(inst, state)
        else:
            raise _refuse(f"state for a {type(inst).__name__}")
        inst.__setstate__(state)

    def _refuse_new(self) -> None:
        raise _refuse("an object built with NEWOBJ/OBJ/INST")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    for _op in (pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.OBJ, pickle.INST):
        dispatch[_op[0]] = _refuse_new
    del _op


def safe_loads(data: bytes | memoryview) -> Any:
    return SafeUnpickler(io.BytesIO(bytes(data))).load()
