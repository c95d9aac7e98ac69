"""np2torch: turn NumPy-saved parameters into a verified PyTorch checkpoint.

The pipeline lives in :mod:`np2torch.tasks` (one module per stage) and :mod:`np2torch.flows`
(the Prefect flows and the CLI).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("np2torch")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
