"""np2torch: turn NumPy-saved parameters into a verified PyTorch checkpoint.

The Python API (each also documented on its own, e.g. ``help(np2torch.load_into)``):

* ``np2torch.load_into(model, "weights.npz", preset="keras", reference=(x, y))`` — load into an
  existing ``nn.Module``; returns ``(model, manifest)``;
* ``np2torch.plan(config)`` / ``np2torch.inspect(path)`` — pandas DataFrames, nothing written;
* ``np2torch.convert(config, overrides=[...])`` — the whole pipeline (a Prefect flow run by
  default); returns a ``ConversionResult``;
* ``np2torch.port("model.keras", out="ported", reference=(x, y))`` — write a PyTorch module for a
  Keras model and convert its weights into it; returns ``(ModuleClass, manifest)``.

The pipeline lives in :mod:`np2torch.tasks` (one module per stage) and :mod:`np2torch.flows`
(the Prefect flows and the CLI). ``import np2torch`` itself imports neither torch, pandas nor
Prefect: each verb imports what it needs when called.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("np2torch")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "load_into", "plan", "inspect", "convert", "port", "Manifest", "ConversionResult"]

_API = {"load_into", "plan", "inspect", "convert", "Manifest", "ConversionResult", "OutputFile", "StageTiming"}


def __getattr__(name: str) -> Any:  # PEP 562: the API module loads on first use
    if name == "port":  # np2torch/porting.py (a module named `port` would shadow this function once imported)
        from np2torch.porting import port

        return port
    if name in _API:
        from np2torch import api

        return getattr(api, name)
    raise AttributeError(f"module 'np2torch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API | {"port"})
