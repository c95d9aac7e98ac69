"""np2torch stages: one module per pipeline stage plus the domain modules they share.

Read the pipeline top to bottom: ``load_arrays`` → ``infer_mapping`` → ``validate`` →
``convert`` → ``verify`` → ``export``. Each stage is a plain function on plain data. The stage
table and its one runner live in ``np2torch.tasks.stages`` (what each stage reads, needs and
re-checks; its content key); ``np2torch.tasks.prefect_tasks`` makes one Prefect task per row and
adds caching, retries and logging, nothing else.

Three caches, from the outside in (docs/architecture.md has the whole picture):

1. **Prefect's result records** (``prefect_tasks``): a task whose cache key (the stage's content
   key + the task's source) was seen answers from its stored record without running. Only in a
   flow run; the runner re-checks the stage cache entry first and runs the task with
   ``refresh_cache`` if the entry is gone or altered.
2. **The stage cache** (``cache``, ``<cache dir>/<stage>/<key>/``): each stage's artifacts
   (array table, manifest, converted safetensors …) by content key, every file's hash recorded
   and re-checked on a hit. Used with or without Prefect (``stages.run_all``,
   ``np2torch.convert(orchestrate=False)``).
3. **The stat cache** (``fingerprint.cached_by_stat``, ``<cache dir>/stat/``): a file's sha256
   and scan statistics remembered by (device, inode, size, mtime, ctime), so an unchanged
   multi-GB source is not re-read to compute the keys above. ``NP2TORCH_READ_ONLY=1`` (plan,
   inspect, the Python API's ``load_into``) may read it but never writes it.

The audit log (``audit``) is a record of runs, not a cache: nothing is ever answered from it.
"""

from np2torch import __version__

__all__ = ["__version__"]
