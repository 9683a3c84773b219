"""Commands refused fast when the service is behind: an ASGI middleware around every command
route (the methods that change something), before authentication, so that a refused command
costs almost nothing. The decision is ``limits.Backlog``'s."""

from __future__ import annotations

import asyncio

from litestar.types import ASGIApp, Receive, Scope, Send

from service.edge.http.limits import Backlog
from service.kernel.errors import Unavailable

_COMMAND_METHODS = frozenset({"POST", "PATCH", "DELETE", "PUT"})


class ServiceBehind(Unavailable):
    """Commands already in the service would keep this one longer than it may wait."""

    def __init__(self) -> None:
        super().__init__("the service is at capacity: the command was not recorded; retry shortly")


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
            raise ServiceBehind()
        try:
            await self.app(scope, receive, send)
        finally:
            self.backlog.leave(loop.time())
