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

import asyncio
from typing import Any
from urllib.parse import quote, urlsplit

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
# An idle connection older than this is closed rather than used: uvicorn closes them at 5 s.
_KEEP_IDLE_S = 4.0


class Forwarded(Exception):
    """The owner's answer to a forwarded command, relayed as this request's response."""

    def __init__(self, response: Response[Any]) -> None:
        super().__init__("forwarded to the partition's owner")
        self.response = response


class Forwarder:
    """Sends commands on to their partitions' owners over kept-alive HTTP/1.1 connections.

    A plain client on asyncio streams: the owners are instances of this service (uvicorn),
    whose answers to commands always carry a Content-Length. (httpx spent about 5 ms of CPU per
    forward here, most of it checking every pooled connection before each request.)"""

    def __init__(self, address: str, *, timeout: float = 30.0) -> None:
        self.address = address
        self._timeout = timeout
        # Per owner, idle connections and when each went idle (loop time).
        self._idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]] = {}

    async def close(self) -> None:
        for connections in self._idle.values():
            for _, writer, _ in connections:
                writer.close()
        self._idle.clear()

    async def forward(
        self, request: Request[Any, Any, Any], body: bytes, owner: str, correlation_id: str | None
    ) -> Response[Any]:
        """The owner's answer to ``request`` (whose ``body`` the handler read). Raises
        ``WriterUnavailable`` (503, Retry-After) when the owner does not answer."""
        lines = [
            f"{name}: {value}"
            for name, value in request.headers.items()
            if name.lower() not in _HOP_BY_HOP
        ]
        lines.append(f"{FORWARDED_BY}: {self.address}")
        if correlation_id is not None and CORRELATION_HEADER.lower() not in request.headers:
            lines.append(f"{CORRELATION_HEADER}: {correlation_id}")
        query = request.scope.get("query_string", b"").decode("latin-1")
        raw_path = request.scope.get("raw_path")  # as the client sent it (still encoded)
        path = raw_path.decode("latin-1") if raw_path else quote(request.scope["path"])
        target = path + (f"?{query}" if query else "")
        address = urlsplit(owner)
        host = address.hostname or "localhost"
        head = (
            f"{request.method} {target} HTTP/1.1\r\nHost: {address.netloc}"
            f"\r\nContent-Length: {len(body)}\r\n" + "".join(f"{line}\r\n" for line in lines)
        )
        try:
            async with asyncio.timeout(self._timeout):
                status, headers, content = await self._exchange(
                    owner, host, address.port or 80, head.encode("latin-1") + b"\r\n" + body
                )
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ValueError,
        ) as error:
            raise WriterUnavailable(
                f"the instance that owns this order's partition ({owner}) did not answer "
                f"({type(error).__name__}): the command may not have been recorded; retry with "
                "the same Idempotency-Key"
            ) from error
        return Response(
            content=content,
            status_code=status,
            media_type=headers.get("content-type"),
            headers={name: value for name, value in headers.items() if name not in _NOT_RELAYED},
        )

    async def _exchange(
        self, owner: str, host: str, port: int, sent: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await self._connection(owner, host, port)
        try:
            writer.write(sent)
            await writer.drain()
            raw = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = raw[:-4].decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = headers.get("content-length")
            if length is None:
                raise ValueError("an answer without Content-Length")
            content = await reader.readexactly(int(length))
        except BaseException:
            writer.close()  # in an unknown state
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            loop = asyncio.get_running_loop()
            self._idle.setdefault(owner, []).append((reader, writer, loop.time()))
        return status, headers, content

    async def _connection(
        self, owner: str, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An idle connection to ``owner`` still open (the server closes those idle for 5 s;
        none idle for 4 s is used), or a new one."""
        idle = self._idle.get(owner, [])
        now = asyncio.get_running_loop().time()
        while idle:
            reader, writer, since = idle.pop()
            if now - since < _KEEP_IDLE_S and not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(host, port)


def forwarded(request: Request[Any, Any, Any]) -> bool:
    """Whether ``request`` was forwarded here by another instance."""
    return FORWARDED_BY.lower() in request.headers


def relay(_request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """The exception handler of ``Forwarded``: the owner's answer."""
    assert isinstance(error, Forwarded)
    return error.response
