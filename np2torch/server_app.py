"""np2torch's lasting local server: Prefect's own API and UI app, with busy database writes retried in the server.

``np2torch server start`` runs ``python -m np2torch.server_app`` in the background. It
serves exactly the app ``prefect server start`` serves (:func:`prefect.server.api.server.create_app`
with its background services), wrapped in one small ASGI layer, :class:`RetryBusyWrites`.

Why the layer: the local server keeps its history in SQLite. When two clients write at once
(a batch runs two conversions in parallel, each creating flow runs and setting states), SQLite
can refuse one write with ``SQLITE_BUSY`` and Prefect answers ``503 Service Unavailable``. The
Prefect client retries a 503 after 2, 4, 8, … seconds, so a batch of six cached conversions
spent most of its 20 s asleep. A 503 comes from a rolled-back transaction, so replaying the same
request is safe (it is what the client does); the layer replays it inside the server after a
few milliseconds, up to :data:`MAX_REPLAYS` times, and only then passes the 503 on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["RetryBusyWrites", "MAX_REPLAYS", "main"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_REPLAYS = 40  # with the delays below: about 4 s of contention absorbed before the client's own backoff
_MAX_BODY = 64 * 1024 * 1024  # requests larger than this are passed through unbuffered (never replayed)


def _delay(attempt: int) -> float:
    return min(0.01 * (attempt + 1), 0.15)


class RetryBusyWrites:
    """ASGI middleware: replay an HTTP request whose response is 503 (a busy database), a few times."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, max_replays: int = MAX_REPLAYS) -> None:
        self.app = app
        self.max_replays = max_replays

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # websockets (events, logs) and lifespan pass through
            await self.app(scope, receive, send)
            return
        body, more = await self._read_body(receive)
        if more:  # too large to buffer: no replay
            await self.app(scope, _replay(body, receive), send)
            return
        for attempt in range(self.max_replays + 1):
            last = attempt == self.max_replays
            sent_start = False
            busy = False

            async def guarded_send(message: Message, last: bool = last) -> None:  # bound now: called within this try only
                nonlocal sent_start, busy
                if message["type"] == "http.response.start":
                    busy = message["status"] == 503 and not last
                    if busy:
                        return
                    sent_start = True
                elif busy:
                    return  # the body of a 503 that will be replayed
                await send(message)

            try:
                await self.app(dict(scope), _replay(body, None), guarded_send)  # routing edits the scope: a fresh one per try
            except Exception:
                # Starlette's ServerErrorMiddleware re-raises after sending its error response;
                # only a swallowed 503 is retried, anything else goes on to the server's logging
                if not busy or sent_start:
                    raise
            if not busy or sent_start:
                return
            await asyncio.sleep(_delay(attempt))

    @staticmethod
    async def _read_body(receive: Receive) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), False
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False
            if size > _MAX_BODY:
                return b"".join(chunks), True


def _replay(body: bytes, rest: Receive | None) -> Receive:
    """A ``receive`` that yields the buffered body once, then the rest of the stream (or waits)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": rest is not None}
        if rest is not None:
            return await rest()
        await asyncio.Event().wait()  # like a client that keeps the connection open
        raise AssertionError("unreachable")

    return receive


def _stop_when_idle(idle_s: float) -> None:
    """Stop this server (and its warm runner) once no command has used it for ``idle_s`` seconds.

    Each command that reports to the local server touches its ``last-used`` file
    (:func:`np2torch.flows.runtime.choose_api`); the state file goes first, so that no command
    picks a server that is stopping.
    """
    from np2torch import warm
    from np2torch.flows.runtime import last_used_file, server_state, server_state_file

    started = time.time()
    while True:
        time.sleep(max(0.5, min(idle_s / 4, 60.0)))
        try:
            last = max(started, last_used_file().stat().st_mtime)
        except OSError:
            last = started
        if time.time() - last < idle_s:
            continue
        state = server_state()
        if state is not None and int(state["pid"]) == os.getpid():
            server_state_file().unlink(missing_ok=True)
            warm.stop_runner()
        print(f"np2torch: no command for {idle_s:g} s: stopping", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
        return


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m np2torch.server_app", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=4200)
    ap.add_argument("--log-level", default=os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "warning").lower())
    ap.add_argument("--ephemeral", action="store_true", help="what Prefect's temporary server serves (API only, no UI)")
    ap.add_argument("--idle-stop", type=float, default=0.0, metavar="SECONDS",
                    help="stop (with the warm runner) after this long without a command using it (0: never)")
    args = ap.parse_args(argv)
    if args.idle_stop > 0:
        threading.Thread(target=_stop_when_idle, args=(args.idle_stop,), daemon=True, name="np2torch-idle-stop").start()

    import prefect
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import get_current_settings

    if args.ephemeral:  # as prefect.server.api.server.SubprocessASGIServer starts it
        app = create_app(final=True, ephemeral=True)
    else:
        app = create_app(final=True, webserver_only=False)  # what `prefect server start` serves, services included
    print(f"np2torch: Prefect {prefect.__version__} server (busy writes retried in the server) at http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(app=RetryBusyWrites(app), host=args.host, port=args.port, log_level=args.log_level,
                timeout_keep_alive=get_current_settings().server.api.keepalive_timeout)


if __name__ == "__main__":
    main()
