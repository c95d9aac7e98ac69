"""``python -m np2torch.tasks._orphan_guard PARENT_PID -m MODULE ARGS...``: run MODULE as
``python -m MODULE ARGS...`` would, and stop it when process PARENT_PID is gone.

Used for Prefect's temporary API server (see :mod:`np2torch.tasks.lifecycle`): when the np2torch
process that started it dies, even by ``kill -9``, the server gets SIGTERM within a fraction of
a second (its own shutdown), then SIGKILL if it is still there two seconds later.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

POLL_SECONDS = 0.2
KILL_AFTER_SECONDS = 2.0


def _parent_gone(parent: int) -> bool:
    if os.getppid() != parent:  # reparented: the parent died
        return True
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _watch(parent: int) -> None:
    while not _parent_gone(parent):
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(KILL_AFTER_SECONDS)
    os._exit(1)


def main() -> None:
    parent = int(sys.argv[1])
    if sys.argv[2] != "-m":
        raise SystemExit("usage: python -m np2torch.tasks._orphan_guard PARENT_PID -m MODULE [ARGS...]")
    module = sys.argv[3]
    threading.Thread(target=_watch, args=(parent,), name="np2torch-orphan-guard", daemon=True).start()
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
