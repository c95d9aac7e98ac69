"""The local server's retry of busy database writes (np2torch.server_app.RetryBusyWrites)."""

from __future__ import annotations

import asyncio
import json

from np2torch.server_app import RetryBusyWrites


class FakeApp:
    """An ASGI app answering 503 (a busy SQLite write) for the first ``busy`` calls, then 201.

    Like Starlette's ServerErrorMiddleware, it can re-raise after sending its 503; like its
    router, it edits the scope it is given.
    """

    def __init__(self, busy: int, *, raise_after_503: bool = False, status_after: int = 201) -> None:
        self.busy, self.raise_after_503, self.status_after = busy, raise_after_503, status_after
        self.calls: list[tuple[str, bytes]] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.calls.append((scope["path"], body))
        scope["path"] = "/mounted" + scope["path"]  # a router's edit: a replay must not see it
        status = 503 if len(self.calls) <= self.busy else self.status_after
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"status": status}).encode()})
        if status == 503 and self.raise_after_503:
            raise RuntimeError("database is locked")


def _request(app, body: bytes = b'{"name": "mlp"}'):
    scope = {"type": "http", "method": "POST", "path": "/api/flow_runs/", "headers": []}
    parts = [body[: len(body) // 2], body[len(body) // 2:]]  # a body in two messages
    queue = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent: list[dict] = []

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def go():
        await app(scope, receive, send)

    asyncio.run(go())
    return sent


def test_a_busy_write_is_replayed_in_the_server_with_the_same_body():
    fake = FakeApp(busy=3)
    sent = _request(RetryBusyWrites(fake))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [201]  # the client never saw the 503s
    assert len(fake.calls) == 4
    assert {c for c in fake.calls} == {("/api/flow_runs/", b'{"name": "mlp"}')}  # same path, same whole body each time
    assert json.loads(sent[-1]["body"]) == {"status": 201}


def test_a_503_the_app_raises_after_sending_is_still_replayed():
    fake = FakeApp(busy=2, raise_after_503=True)
    sent = _request(RetryBusyWrites(fake))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [201]
    assert len(fake.calls) == 3


def test_a_lasting_503_reaches_the_client_after_the_replays():
    fake = FakeApp(busy=100)
    sent = _request(RetryBusyWrites(fake, max_replays=3))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [503]  # one response, the last try's: the client's own backoff takes over
    assert len(fake.calls) == 4


def test_other_statuses_pass_through_once():
    fake = FakeApp(busy=0, status_after=404)
    sent = _request(RetryBusyWrites(fake))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [404]
    assert len(fake.calls) == 1


def test_websockets_and_lifespan_are_not_touched():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    async def nothing():
        return {}

    async def go():
        mw = RetryBusyWrites(app)
        await mw({"type": "lifespan"}, nothing, nothing)
        await mw({"type": "websocket", "path": "/api/events/in"}, nothing, nothing)

    asyncio.run(go())
    assert seen == ["lifespan", "websocket"]
