"""A warm runner: ``convert`` and ``batch`` start in milliseconds instead of seconds.

A conversion command spends more time importing (Prefect ~2.5 s, torch ~2.5 s, pandera ~1 s
on a 2-core machine) and warming torch's lazy paths (~2 s the first time a model is traced on
``meta``) than a cached conversion spends in its stages. ``np2torch server start`` therefore
starts, beside the Prefect server, a runner process that has done all of that once and then
waits on a Unix socket. A ``convert`` or ``batch`` command that reports to that same local
server sends the runner its arguments, working folder, environment and its terminal (the file
descriptors of stdin, stdout and stderr, passed over the socket); the runner forks a child
that runs the command exactly as the CLI would, in that folder, with that environment, writing
to that terminal (progress bars included), and sends back the exit status. Each command gets
a fresh child, so nothing of one conversion (the user's model module, a failed state) is seen
by the next.

When the runner is not used (the command runs in its own process, as without a server):

- no runner answers, or it is busy starting;
- this command would report to another Prefect API than the runner's, or its environment
  differs in a variable that is read at import time (``PREFECT_*``, ``NP2TORCH_*``, thread
  counts, CUDA, ``PYTHONPATH``, …), or in a resource limit (``ulimit -v``, ``-n``, …), or it
  runs another Python interpreter;
- any module file the runner imported has changed since it started (np2torch or a package
  was edited or upgraded): the runner restarts itself with the new code, and this command runs
  in its own process meanwhile.

Signals: Ctrl-C or SIGTERM on the command is forwarded to its child, which stops as the CLI does
(exit 130 / 143); if the command itself is killed, the child sees its socket close and stops
too. The socket is the user's own (mode 0600, peer uid checked): no other user can ask the
runner to run anything. ``NP2TORCH_WARM=0`` turns the runner off for one command.

Importing this module imports only the standard library and np2torch's light modules (no Prefect, no torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from np2torch.flows.runtime import configure_prefect, server_dir  # the runner lives in the local server's folder
from np2torch.tasks.procs import pid_alive, stop_pid

__all__ = ["socket_path", "try_delegate", "serve", "runner_state", "start_runner", "stop_runner", "ENV_COMPARED", "PROTOCOL"]

PROTOCOL = 1
_MAX_MSG = 4 * 1024 * 1024
# variables read when torch / Prefect / np2torch are imported (or that choose what they load):
# a command whose values differ from the runner's runs in its own process
ENV_COMPARED = ("PREFECT_", "NP2TORCH_", "OMP_", "MKL_", "OPENBLAS_", "TORCH_", "PYTORCH_", "CUDA_", "PYTHONPATH", "PYTHONHASHSEED",
                "LD_LIBRARY_PATH", "LD_PRELOAD", "HOME", "DO_NOT_TRACK")
_PER_COMMAND = ("NP2TORCH_PROGRESS", "NP2TORCH_WARM", "NP2TORCH_IN_RUNNER", "NP2TORCH_T0")  # read at run time: may differ


# ---------------------------------------------------------------------------------------------
# where it lives


def socket_path() -> Path:
    """The runner's socket: in the server folder, or under /tmp when that path is too long for a socket."""
    p = server_dir() / "runner.sock"
    if len(str(p).encode()) < 100:
        return p
    digest = hashlib.sha256(str(p).encode()).hexdigest()[:16]
    return Path("/tmp") / f"np2torch-{os.getuid()}-{digest}.sock"


def _state_file() -> Path:
    return server_dir() / "runner.json"


def runner_state() -> dict[str, Any] | None:
    try:
        st = json.loads(_state_file().read_text())
        return st if isinstance(st, dict) and "pid" in st else None
    except (OSError, ValueError):
        return None


# resource limits a user sets to bound a run (`ulimit -v`, `-n`, …): a child would inherit the runner's
_LIMITS = ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_RSS", "RLIMIT_NOFILE", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_STACK", "RLIMIT_NPROC")


def _limits() -> dict[str, list[int]]:
    import resource

    return {name: list(resource.getrlimit(getattr(resource, name))) for name in _LIMITS if hasattr(resource, name)}


def _compared_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(ENV_COMPARED) and k not in _PER_COMMAND}


# ---------------------------------------------------------------------------------------------
# messages: 4-byte length + JSON (the first one may carry file descriptors)


def _send_msg(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], fds)
    else:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


def _recv_msg(sock: socket.socket, *, with_fds: bool = False) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    if with_fds:
        data, fds, _flags, _addr = socket.recv_fds(sock, 64 * 1024, 8)
        if not data:
            raise EOFError("connection closed")
        head = bytes(data)
    else:
        head = _recv_exact(sock, 4)
    (n,) = struct.unpack("!I", head[:4])
    if n > _MAX_MSG:
        raise ValueError("message too large")
    body = head[4:]
    if len(body) < n:
        body += _recv_exact(sock, n - len(body))
    return json.loads(body[:n]), fds


# ---------------------------------------------------------------------------------------------
# the client side (the `np2torch` command)


def try_delegate(argv: list[str]) -> int | None:
    """Run this command in the warm runner; its exit status, or None to run it in this process."""
    if os.environ.get("NP2TORCH_WARM", "1") in ("0", "false", "no") or os.environ.get("NP2TORCH_IN_RUNNER"):
        return None
    path = socket_path()
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(str(path))
        umask = os.umask(0o022)
        os.umask(umask)
        request = {"protocol": PROTOCOL, "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "sys_path": list(sys.path),
                   "executable": sys.executable, "umask": umask, "limits": _limits()}
        _send_msg(sock, request, fds=[0, 1, 2])
        reply, _ = _recv_msg(sock)
    except (OSError, EOFError, ValueError):
        sock.close()
        return None
    if not reply.get("ok"):
        sock.close()
        if reply.get("note"):
            print(f"np2torch: {reply['note']}", file=sys.stderr)
        return None
    return _wait_for_child(sock, int(reply["pid"]))


def _wait_for_child(sock: socket.socket, pid: int) -> int:
    """Forward SIGINT/SIGTERM/SIGHUP to the child until it reports its exit status."""

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        sock.settimeout(None)
        while True:
            try:
                msg, _ = _recv_msg(sock)
            except InterruptedError:
                continue
            except (EOFError, OSError, ValueError):
                print("np2torch: error: the conversion's process in the warm runner ended without an exit status "
                      "(killed?); see `np2torch audit` for what it recorded", file=sys.stderr)
                return 1
            if "exit" in msg:
                return int(msg["exit"])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sock.close()


# ---------------------------------------------------------------------------------------------
# the runner


def _module_files() -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if not f or f in out:
            continue
        try:
            st = os.stat(f)
        except OSError:
            continue
        out[f] = (st.st_mtime_ns, st.st_size)
    return out


def _changed(snapshot: dict[str, tuple[int, int]]) -> str | None:
    for f, sig in snapshot.items():
        try:
            st = os.stat(f)
        except OSError:
            return f
        if (st.st_mtime_ns, st.st_size) != sig:
            return f
    return None


# what a conversion imports, by name: the runner sits beside the CLI (it runs the CLI's entry point
# in each child), so it names the modules it preloads rather than importing them as a dependency
# (then every stage's domain module, from the stage table)
PRELOAD = ("torch", "torch.fx", "pandas", "pandera.pandas", "safetensors.torch", "np2torch.cli", "np2torch.flows.convert",
           "np2torch.flows.batch", "np2torch.tasks.prefect_tasks")
ENTRY = "np2torch.cli:main"  # what each child runs, with the command's arguments


def _native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _warm_up() -> None:
    """Import what a conversion imports, and run torch's lazy paths once (a meta-device trace).

    Never a computation on the CPU: that starts the OpenMP thread pool, and a child forked after
    it hangs in its first parallel loop (GNU OpenMP is not fork-safe). :func:`serve` checks that
    no native thread was started beyond those ``import torch`` starts.
    """
    import importlib

    import torch

    baseline = _native_threads()
    for name in PRELOAD:
        importlib.import_module(name)
    for stage in importlib.import_module("np2torch.tasks.stages").STAGES:
        importlib.import_module(stage.module)
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(144, 8), torch.nn.LayerNorm(8))
        m(torch.empty(2, 3, 8, 8))
    if _native_threads() > baseline or threading.active_count() != 1:
        raise SystemExit(f"np2torch runner: warming up started threads ({_native_threads()} native, {threading.enumerate()}); "
                         "a forked child could hang, so the runner does not serve; commands run in their own process")


def _entry() -> Any:
    import importlib

    module, _, attr = ENTRY.partition(":")
    return getattr(importlib.import_module(module), attr)


def _incompatible(req: dict[str, Any], env_snapshot: dict[str, str], limits: dict[str, list[int]] | None = None) -> str | None:
    if req.get("protocol") != PROTOCOL:
        return "protocol"
    if req.get("executable") != sys.executable:
        return "interpreter"
    if _compared_env(req.get("env") or {}) != env_snapshot:
        return "environment"
    if (req.get("limits") or {}) != (_limits() if limits is None else limits):
        return "resource limits"
    return None


def serve(path: Path) -> None:
    """Warm up, then fork one child per command that connects (never returns)."""
    configure_prefect()
    _warm_up()
    env_snapshot = _compared_env(dict(os.environ))
    modules = _module_files()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        srv.bind(str(path))
    finally:
        os.umask(old_umask)
    srv.listen(16)
    print(f"np2torch runner ready on {path} (pid {os.getpid()}, {len(modules)} module files watched)", flush=True)
    while True:
        conn, _ = srv.accept()
        try:
            _handle(conn, srv, path, env_snapshot, modules)
        except EOFError:  # a readiness probe (`server start`) connects and closes
            conn.close()
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the runner
            print(f"np2torch runner: request failed: {type(exc).__name__}: {exc}", flush=True)
            conn.close()


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _handle(conn: socket.socket, srv: socket.socket, path: Path, env_snapshot: dict[str, str],
            modules: dict[str, tuple[int, int]]) -> None:
    if _peer_uid(conn) != os.getuid():
        conn.close()
        return
    conn.settimeout(5.0)
    req, fds = _recv_msg(conn, with_fds=True)
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        _send_msg(conn, {"ok": False, "why": "no terminal"})
        conn.close()
        return
    why = _incompatible(req, env_snapshot)
    stale = _changed(modules) if why is None else None
    if why or stale:
        for fd in fds:
            os.close(fd)
        note = None
        if stale:
            note = f"the warm runner restarts: {Path(stale).name} changed since it started; this command runs in its own process"
        _send_msg(conn, {"ok": False, "why": why or "stale", **({"note": note} if note else {})})
        conn.close()
        if stale:
            srv.close()
            os.execv(sys.executable, [sys.executable, "-m", "np2torch.warm", "serve", str(path)])
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # nothing of the runner's own log may be written a second time by the child
    pid = os.fork()
    if pid == 0:
        try:
            srv.close()
            _child(conn, fds, req)  # never returns
        finally:
            os._exit(1)  # whatever happens, a child never goes back into the runner's loop
    for fd in fds:
        os.close(fd)
    conn.close()


def _child(conn: socket.socket, fds: list[int], req: dict[str, Any]) -> None:
    """Become the command: its terminal, folder, environment and arguments; report the exit status."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # subprocesses must be waitable again
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.reconfigure(line_buffering=stream.isatty())
        os.chdir(req["cwd"])
        os.umask(int(req.get("umask", 0o022)))  # the files it writes get the command's permissions
        os.environ.clear()
        os.environ.update(req["env"])
        os.environ["NP2TORCH_IN_RUNNER"] = "1"
        sys.path[:] = req["sys_path"]
        sys.argv = ["np2torch", *req["argv"]]
        _reset_console_logging()
        conn.settimeout(None)
        _send_msg(conn, {"ok": True, "pid": os.getpid()})
        threading.Thread(target=_watch_client, args=(conn,), daemon=True, name="np2torch-runner-client").start()
        main = _entry()
        try:
            code = int(main(req["argv"]) or 0)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - report, never fall back into the runner's loop
        with contextlib.suppress(Exception):
            print(f"np2torch: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # from here on, only the exit status is left to send
            signal.signal(s, signal.SIG_IGN)
        with contextlib.suppress(Exception):
            import atexit

            atexit._run_exitfuncs()  # what a normal exit runs: Prefect ships its last logs
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(Exception):
            _send_msg(conn, {"exit": code})
        os._exit(code)


def _watch_client(conn: socket.socket) -> None:
    """The command went away (killed, terminal closed): stop this conversion as SIGTERM would."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def _reset_console_logging() -> None:
    """Prefect's console handlers were made for the runner's log file: make them again for this terminal."""
    with contextlib.suppress(Exception):
        from prefect.logging.configuration import setup_logging

        setup_logging(incremental=False)


# ---------------------------------------------------------------------------------------------
# start / stop (called by `np2torch server start|stop`)


def start_runner(api_url: str, log: Path) -> dict[str, Any]:
    """Start the runner in the background for the server at ``api_url``; do not wait for it."""
    import subprocess

    stop_runner()
    path = socket_path()
    env = dict(os.environ)
    env["PREFECT_API_URL"] = api_url
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "np2torch.warm", "serve", str(path)], env=env, stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    state = {"pid": proc.pid, "socket": str(path), "log": str(log), "api_url": api_url,
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = _state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, _state_file())
    return state


def wait_ready(timeout: float) -> bool:
    """True once the runner's socket accepts connections."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = runner_state()
        if st is None or not pid_alive(int(st["pid"])):
            return False
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(socket_path()))
            return True
        time.sleep(0.2)
    return False


def stop_runner() -> bool:
    st = runner_state()
    if st is None:
        return False
    alive = stop_pid(int(st["pid"]), timeout=5.0)  # its children (running commands) finish on their own
    with contextlib.suppress(OSError):
        Path(st.get("socket") or socket_path()).unlink()
    _state_file().unlink(missing_ok=True)
    return alive


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "serve":
        raise SystemExit("usage: python -m np2torch.warm serve SOCKET_PATH")
    serve(Path(args[1]))


if __name__ == "__main__":
    main()
