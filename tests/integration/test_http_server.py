"""The API's HTTP server (``service.edge.bootstrap.server_config``): uvicorn, with each connection's
writes of one turn of the event loop sent together."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from litestar import Litestar, get

from service.edge.bootstrap import _CoalescingTransport, _Server, server_config
from service.infra.embedded import free_port


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return f"extra {name}"


async def _next_turn() -> None:
    """Return once the callbacks already scheduled have run (the loop runs them in order)."""
    loop = asyncio.get_running_loop()
    turn = loop.create_future()
    loop.call_soon(turn.set_result, None)
    await turn


async def test_writes_of_one_turn_leave_as_one_and_close_sends_what_is_pending() -> None:
    real = _RecordingTransport()
    transport = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.writelines([b"bo", b"dy"])
    assert real.writes == []
    await _next_turn()
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    transport.write(b"last")
    transport.close()
    assert real.writes[-1] == b"last"
    assert real.closed
    assert transport.get_extra_info("peername") == "extra peername"  # the rest is the real one's


@get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


@get("/big")
async def big() -> str:
    return "x" * 1_000_000


async def _exchange(port: int, request: bytes, responses: int) -> list[bytes]:
    """Send ``request`` (one or more pipelined requests); the bodies of ``responses`` answers,
    each read by its Content-Length."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    bodies = []
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            for _ in range(responses):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK"), head
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                bodies.append(await reader.readexactly(length))
        return bodies
    finally:
        writer.close()


async def test_the_server_answers_pipelined_and_large_responses_whole() -> None:
    port = free_port()
    config: uvicorn.Config = server_config(
        Litestar(route_handlers=[hello, big], logging_config=None), host="127.0.0.1", port=port
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not server.started:
            assert asyncio.get_running_loop().time() < deadline, "uvicorn never listened"
            await asyncio.sleep(0.01)  # polling until uvicorn listens
        two = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n" * 2
        assert await _exchange(port, two, responses=2) == [b'{"hello":"world"}'] * 2
        big_one = b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n"
        assert await _exchange(port, big_one, responses=1) == [b"x" * 1_000_000]
    finally:
        server.should_exit = True
        await serving
