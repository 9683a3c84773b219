"""Overload at the HTTP edge, over a real uvicorn server in the test's event loop: a command
the writer cannot take in time is a fast 503 with Retry-After, and a command whose client hung
up while it was queued is never written."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import uvicorn

from service.edge.bootstrap import server_config
from service.edge.http.admission import DETAIL, CommandAdmission
from service.edge.http.app import Resources, create_app
from service.edge.http.limits import Backlog
from service.infra.embedded import free_port
from service.write.contract import Accepted, CommandRequest, WriterConfig
from service.write.writer import Writer
from tests.support.http import serve
from tests.support.identity import BACK_OFFICE, access, bearer
from tests.support.topics import new_topic

DEADLINE_S = 20.0


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # polling interval, bounded by the deadline


@contextlib.asynccontextmanager
async def _served(writer: Writer) -> AsyncIterator[int]:
    """The app around ``writer``, served by uvicorn in this event loop: its port."""
    port = free_port()
    app = create_app(Resources(writer=writer), access=access())
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port))
    serving = asyncio.create_task(server.serve())
    try:
        await _until(lambda: server.started, "uvicorn to listen")
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, DEADLINE_S)


@pytest.fixture
async def base_url(hasty_writer: Writer) -> AsyncIterator[str]:
    async with _served(hasty_writer) as port:
        yield f"http://127.0.0.1:{port}"


def _create(customer_id: str, key: str) -> bytes:
    body = json.dumps({"customer_id": customer_id, "currency": "EUR"}).encode()
    return (
        "POST /orders HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {BACK_OFFICE}\r\nIdempotency-Key: {key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@contextlib.asynccontextmanager
async def _writer(bootstrap: str, topic: str, max_queue_delay: float) -> AsyncIterator[Writer]:
    await new_topic(bootstrap, topic, 4)
    writer = Writer(
        WriterConfig(
            kafka=bootstrap,
            topic=topic,
            transactional_id=f"writer-{uuid.uuid4().hex[:8]}",
            max_queue_delay=max_queue_delay,
        )
    )
    await writer.start()
    try:
        yield writer
    finally:
        await writer.stop()


@pytest.fixture
async def patient_writer(bootstrap: str, topic: str) -> AsyncIterator[Writer]:
    """A writer whose commands may queue for 30 s: only a client that leaves drops one."""
    async with _writer(bootstrap, topic, 30) as writer:
        yield writer


@pytest.fixture
async def hasty_writer(bootstrap: str, topic: str) -> AsyncIterator[Writer]:
    """A writer with the default queue delay (0.3 s)."""
    async with _writer(bootstrap, topic, WriterConfig.max_queue_delay) as writer:
        yield writer


async def test_a_client_that_hangs_up_while_its_command_is_queued_has_nothing_written(
    patient_writer: Writer,
) -> None:
    writer = patient_writer
    queued, withdrawn = asyncio.Event(), asyncio.Event()
    submit = writer.submit

    async def observed_submit(request: CommandRequest) -> Accepted:
        queued.set()  # submit queues the command before it first waits
        try:
            return await submit(request)
        except asyncio.CancelledError:
            withdrawn.set()
            raise

    writer.submit = observed_submit  # type: ignore[method-assign]
    async with _served(writer) as port:
        async with writer._busy:  # the decision loop cannot begin a batch meanwhile
            _, sent = await asyncio.open_connection("127.0.0.1", port)
            sent.write(_create("c-gone", "gone-1"))
            await sent.drain()
            await asyncio.wait_for(queued.wait(), DEADLINE_S)
            sent.close()  # the client gives up
            await sent.wait_closed()
            await asyncio.wait_for(withdrawn.wait(), DEADLINE_S)  # the server saw it go
        # The batch that begins now skips it: nothing of c-gone's is decided or written.
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=bearer(BACK_OFFICE)
        ) as client:
            after = await client.post(
                "/orders",
                json={"customer_id": "c-after", "currency": "EUR"},
                headers={"Idempotency-Key": "after-1"},
            )
    assert after.status_code == 201, after.text
    assert {order.customer_id for order in writer.orders.values()} == {"c-after"}


async def test_commands_the_writer_cannot_take_in_time_are_a_fast_503_with_retry_after(
    hasty_writer: Writer, base_url: str
) -> None:
    writer = hasty_writer
    async with httpx.AsyncClient(
        base_url=base_url, headers=bearer(BACK_OFFICE), timeout=DEADLINE_S
    ) as client:

        async def create(n: int) -> httpx.Response:
            return await client.post(
                "/orders",
                json={"customer_id": f"c-{n}", "currency": "EUR"},
                headers={"Idempotency-Key": f"busy-{n}"},
            )

        # The writer is stuck until every answer is in: each was given without it.
        async with writer._busy:
            refused = await asyncio.gather(*(create(n) for n in range(5)))
    assert [response.status_code for response in refused] == [503] * 5
    assert all(response.headers["retry-after"] == "1" for response in refused)
    assert all("capacity" in response.json()["detail"] for response in refused)
    assert writer.orders == {}


async def test_commands_past_what_the_service_keeps_in_flight_are_refused_before_auth(
    patient_writer: Writer,
) -> None:
    # A service answering about 10 commands a second may hold 2 for its 0.2 s.
    backlog = Backlog(0.2, floor=2)
    for n in range(10):
        backlog.admit(n / 10)
        backlog.leave((n + 1) / 10)
    app = CommandAdmission(create_app(Resources(writer=patient_writer), access=access()), backlog)
    async with serve(app) as client:

        async def create(n: int) -> httpx.Response:
            return await client.post("/orders", json={"customer_id": f"c-{n}", "currency": "EUR"})

        async with patient_writer._busy:  # the two taken in stay in the service
            stuck = [asyncio.create_task(create(n)) for n in range(2)]
            await _until(lambda: backlog.in_flight == 2, "two commands in flight")
            refused = await create(3)
            # Refused before its token was looked at: a bad one gets the same answer.
            async with serve(app, token="not-a-token") as stranger:
                also_refused = await stranger.post(
                    "/orders", json={"customer_id": "c-9", "currency": "EUR"}
                )
            health = await client.get("/health")  # queries and health are not commands
        taken = await asyncio.gather(*stuck)
    assert refused.status_code == also_refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json() == {
        "type": "https://orders.example/problems/unavailable",
        "title": "Service Unavailable",
        "status": 503,
        "detail": DETAIL,
        "instance": "/orders",
    }
    assert health.status_code == 200
    assert [response.status_code for response in taken] == [201, 201]
    assert backlog.in_flight == 0
