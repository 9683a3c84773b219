"""Forwarding a command to the instance that owns its partition (``service.write.ownership``).

Any instance takes any request: a client behind a plain load balancer needs no routing. A
command whose partition another instance owns is sent there as it came (method, path, query,
headers, body), one hop at most, and the owner's answer is relayed as it is: status, body,
ETag, consistency token, Location, Retry-After, byte for byte. The owner authenticates and
decides the command as if the client had reached it directly, so a forwarded command and a
direct one, and their Idempotency-Key replays, answer the same.

A forwarded request carries ``X-Orders-Forwarded-By``. An instance that gets one for a
partition it does not own (the owners just changed) answers 503 + Retry-After instead of
forwarding again: two instances with different views of a rebalance never pass it around.
"""

from __future__ import annotations

from typing import Any

import httpx
from litestar import Request, Response

from service.edge.http.correlation import HEADER as CORRELATION_HEADER
from service.write.contract import WriterUnavailable

FORWARDED_BY = "X-Orders-Forwarded-By"

# Not passed on: what belongs to one connection, or is set again for the next hop.
_HOP_BY_HOP = frozenset(
    {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"}
)
# Not relayed from the owner's answer: this hop sets its own (the correlation id is the same).
_NOT_RELAYED = _HOP_BY_HOP | {"date", "server", "content-type", CORRELATION_HEADER.lower()}


class Forwarded(Exception):
    """The owner's answer to a forwarded command, relayed as this request's response."""

    def __init__(self, response: Response[Any]) -> None:
        super().__init__("forwarded to the partition's owner")
        self.response = response


class Forwarder:
    """Sends commands on to their partitions' owners over one pool of kept-alive connections."""

    def __init__(self, address: str, *, timeout: float = 30.0) -> None:
        self.address = address
        self._client = httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_keepalive_connections=64)
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def forward(
        self, request: Request[Any, Any, Any], body: bytes, owner: str, correlation_id: str | None
    ) -> Response[Any]:
        """The owner's answer to ``request`` (whose ``body`` the handler read). Raises
        ``WriterUnavailable`` (503, Retry-After) when the owner does not answer."""
        headers = [
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in _HOP_BY_HOP
        ]
        headers.append((FORWARDED_BY, self.address))
        if correlation_id is not None and CORRELATION_HEADER.lower() not in request.headers:
            headers.append((CORRELATION_HEADER, correlation_id))
        query = request.scope.get("query_string", b"").decode("latin-1")
        url = f"{owner.rstrip('/')}{request.scope['path']}" + (f"?{query}" if query else "")
        try:
            answer = await self._client.request(request.method, url, content=body, headers=headers)
        except httpx.HTTPError as error:
            raise WriterUnavailable(
                f"the instance that owns this order's partition ({owner}) did not answer "
                f"({type(error).__name__}): the command may not have been recorded; retry with "
                "the same Idempotency-Key"
            ) from error
        return Response(
            content=answer.content,
            status_code=answer.status_code,
            media_type=answer.headers.get("content-type"),
            headers={
                name: value
                for name, value in answer.headers.items()
                if name.lower() not in _NOT_RELAYED
            },
        )


def forwarded(request: Request[Any, Any, Any]) -> bool:
    """Whether ``request`` was forwarded here by another instance."""
    return FORWARDED_BY.lower() in request.headers


def relay(_request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """The exception handler of ``Forwarded``: the owner's answer."""
    assert isinstance(error, Forwarded)
    return error.response
