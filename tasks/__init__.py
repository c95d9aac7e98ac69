"""np2torch stages: one module per pipeline stage plus the domain modules they share.

Read the pipeline top to bottom: ``load_arrays`` → ``infer_mapping`` → ``validate`` →
``convert`` → ``verify`` → ``export``. Each stage is a plain function on plain data; the
Prefect ``@task`` wrappers live in ``tasks.prefect_tasks`` and add caching, retries and
logging, nothing else.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("np2torch")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
