"""Processes on this host: is a recorded pid still a running process?"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pid_alive", "stop_pid"]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a running process (ours or another user's); a zombie (exited, not yet
    reaped by its parent) is not running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def stop_pid(pid: int, *, group: bool = False, timeout: float = 5.0) -> bool:
    """SIGTERM ``pid`` (its whole process group with ``group``), SIGKILL after ``timeout`` s, reap it
    if it is our child; True when it was running."""
    import contextlib
    import signal
    import time

    alive = pid_alive(pid)
    if alive:
        send = os.killpg if group else os.kill
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(pid, signal.SIGTERM)
        t0 = time.monotonic()
        while pid_alive(pid) and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                send(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it when this process started it
    return alive
