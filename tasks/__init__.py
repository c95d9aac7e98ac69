"""np2torch stages: one module per pipeline stage plus the domain modules they share.

Read the pipeline top to bottom: ``load_arrays`` → ``infer_mapping`` → ``validate`` →
``convert`` → ``verify`` → ``export``. Each stage is a plain function on plain data; the
Prefect ``@task`` wrappers live in ``np2torch.tasks.prefect_tasks`` and add caching, retries and
logging, nothing else.
"""

from np2torch import __version__

__all__ = ["__version__"]
