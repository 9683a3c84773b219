"""Commands refused fast when the service is behind: an ASGI wrapper around the whole app
that answers a command (a request with a method that changes something) with a ready-made
503 problem before routing, authentication or any other work, so that a refusal costs almost
nothing. The decision is ``limits.Backlog``'s."""

from __future__ import annotations

import asyncio

import msgspec
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    Scope,
    Send,
)
from prometheus_client import Counter

from service.edge.http.limits import Backlog
from service.edge.http.problems import PROBLEM_JSON, problem_type

_COMMAND_METHODS = frozenset({"POST", "PATCH", "DELETE", "PUT"})
SHED = Counter("orders_http_shed", "Commands refused (503) before the app by admission control")
DETAIL = "the service is at capacity: the command was not recorded; retry shortly"


class CommandAdmission:
    def __init__(self, app: ASGIApp, backlog: Backlog) -> None:
        self.app = app
        self.backlog = backlog

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") not in _COMMAND_METHODS:  # queries, websockets, lifespan
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        if not self.backlog.admit(loop.time()):
            SHED.inc()
            await _refuse(scope["path"], send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.backlog.leave(loop.time())


async def _refuse(path: str, send: Send) -> None:
    body = msgspec.json.encode(
        {
            "type": problem_type("unavailable"),
            "title": "Service Unavailable",
            "status": 503,
            "detail": DETAIL,
            "instance": path,
        }
    )
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", PROBLEM_JSON.encode()),
            (b"retry-after", b"1"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(start)
    await send(end)
