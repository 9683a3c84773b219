"""Which correlation id a request gets, that every response echoes it (refusals too), and the
access log line each request leaves: the rules of ``service.edge.http.correlation``."""

from __future__ import annotations

import logging
import re
from typing import Annotated

import httpx
import pytest
from litestar import Litestar, get
from litestar.params import PathParameter

from service.edge.http.admission import CommandAdmission
from service.edge.http.correlation import correlation_id_for
from service.edge.http.limits import Backlog
from service.edge.http.telemetry import RequestTelemetry
from service.edge.logs import ACCESS_LOGGER, CORRELATION_ID

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
GENERATED = re.compile(r"^[0-9a-f]{32}$")
ACCESS_FIELDS = ("method", "route", "status", "duration_ms", "sub", "correlation_id", "order_id")


def _headers(**given: str | bytes) -> list[tuple[bytes, bytes]]:
    return [
        (name.replace("_", "-").encode(), value if isinstance(value, bytes) else value.encode())
        for name, value in given.items()
    ]


def test_the_callers_correlation_id_is_kept() -> None:
    assert correlation_id_for(_headers(x_correlation_id="checkout-7f3a")) == "checkout-7f3a"
    assert correlation_id_for(_headers(x_correlation_id="a" * 128)) == "a" * 128


def test_it_wins_over_a_traceparent() -> None:
    headers = _headers(traceparent=TRACEPARENT, x_correlation_id="checkout-7f3a")
    assert correlation_id_for(headers) == "checkout-7f3a"


def test_without_one_the_trace_id_of_the_traceparent_is_used() -> None:
    assert correlation_id_for(_headers(traceparent=TRACEPARENT)) == TRACE_ID


@pytest.mark.parametrize(
    "value", [b"", b"two words", b"k" * 129, b"caf\xc3\xa9", b"tab\there", b"\xff\xfe", b"a\n"]
)
def test_an_invalid_correlation_id_is_replaced(value: bytes) -> None:
    assert GENERATED.match(correlation_id_for(_headers(x_correlation_id=value)))
    with_trace = _headers(x_correlation_id=value, traceparent=TRACEPARENT)
    assert correlation_id_for(with_trace) == TRACE_ID


@pytest.mark.parametrize(
    "traceparent",
    [
        f"ff-{TRACE_ID}-00f067aa0ba902b7-01",  # version ff is invalid
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # so is an all-zero trace id
        f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01",
        f"00-{TRACE_ID[:-1]}-00f067aa0ba902b7-01",
        "banana",
    ],
)
def test_an_invalid_traceparent_is_ignored(traceparent: str) -> None:
    assert GENERATED.match(correlation_id_for(_headers(traceparent=traceparent)))


def test_without_either_each_request_gets_a_new_one() -> None:
    first, second = correlation_id_for([]), correlation_id_for([])
    assert GENERATED.match(first)
    assert first != second


# -- the middleware, around a small app and admission control ----------------------------------


class _Full(Backlog):
    """Admission control with no room: every command is refused (503) before the app."""

    def admit(self, now: float) -> bool:
        return False


@get("/orders/{order_id:str}")
async def _order(order_id: Annotated[str, PathParameter()]) -> dict[str, str | None]:
    logging.getLogger("orders.test").info("reading %s", order_id)
    return {"order_id": order_id, "correlation_id": CORRELATION_ID.get()}


@get("/broken")
async def _broken() -> None:
    raise RuntimeError("a bug")


def _client() -> httpx.AsyncClient:
    app = Litestar([_order, _broken], logging_config=None)
    wrapped = RequestTelemetry(CommandAdmission(app, _Full(0.3)))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://test")


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS_LOGGER]


async def test_the_id_is_echoed_logged_and_seen_by_the_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with _client() as client:
        response = await client.get("/orders/o-1", headers={"X-Correlation-Id": "req-1"})

    assert response.status_code == 200
    assert response.headers["x-correlation-id"] == "req-1"
    assert response.json()["correlation_id"] == "req-1"
    handler_line = next(r for r in caplog.records if r.name == "orders.test")
    assert CORRELATION_ID.get() is None  # only while the request runs
    [access] = _access_lines(caplog)
    assert access.getMessage() == "GET /orders/o-1 200"
    fields = {key: getattr(access, key, "missing") for key in ACCESS_FIELDS}
    assert fields == {
        "method": "GET",
        "route": "/orders/{order_id}",
        "status": 200,
        "duration_ms": fields["duration_ms"],
        "sub": None,
        "correlation_id": "req-1",
        "order_id": "o-1",
    }
    assert isinstance(fields["duration_ms"], float)
    assert 0 <= fields["duration_ms"] < 10_000
    assert handler_line.getMessage() == "reading o-1"


async def test_refusals_and_failures_echo_the_id_and_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with _client() as client:
        shed = await client.post("/orders", headers={"X-Correlation-Id": "req-503"})
        missing = await client.get("/nowhere", headers={"traceparent": TRACEPARENT})
        broken = await client.get("/broken", headers={"X-Correlation-Id": "two words"})

    assert (shed.status_code, shed.headers["x-correlation-id"]) == (503, "req-503")
    assert (missing.status_code, missing.headers["x-correlation-id"]) == (404, TRACE_ID)
    assert broken.status_code == 500
    assert GENERATED.match(broken.headers["x-correlation-id"])
    lines = [
        (vars(r)["status"], vars(r)["route"], vars(r)["correlation_id"])
        for r in _access_lines(caplog)
    ]
    assert lines == [
        (503, None, "req-503"),
        (404, None, TRACE_ID),
        (500, "/broken", broken.headers["x-correlation-id"]),
    ]
