"""Each family of the error tree answers HTTP with the problem it always has: status, type,
title, and the headers that go with it."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import get
from litestar.testing import create_test_client

from projections.parking import ParkingRefused
from projections.projection import ProjectionBug
from service.edge.http.problems import EXCEPTION_HANDLERS, NotYetConsistent, QueryProblem
from service.infra.topic import TopicMissing
from service.kernel.domain import InvalidCommand, OrderNotFound, PaymentMismatch, TooManyEvents
from service.kernel.errors import Conflict
from service.write.contract import IdempotencyKeyReused, VersionMismatch, WriterUnavailable


def _answer_to(error: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    @get("/fails", sync_to_thread=False)
    def fails() -> None:
        raise error

    with create_test_client([fails], exception_handlers=EXCEPTION_HANDLERS) as client:
        response = client.get("/fails")
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.status_code, response.json(), dict(response.headers)


@pytest.mark.parametrize(
    ("error", "status", "code", "title"),
    [
        (OrderNotFound("o-1"), 404, "order-not-found", "Order not found"),
        (TooManyEvents(1000), 409, "order-event-limit", "Order event limit"),
        (InvalidCommand("quantity", "must be positive"), 422, "invalid-command", "Invalid command"),
        (
            PaymentMismatch(
                expected_amount=2500, expected_currency="EUR", amount=2400, currency="EUR"
            ),
            422,
            "payment-mismatch",
            "Payment mismatch",
        ),
        (QueryProblem(400, "invalid-filter", "from is after to"), 400, "invalid-filter", None),
        (
            QueryProblem(404, "customer-not-found", "no customer 'c'"),
            404,
            "customer-not-found",
            None,
        ),
        (IdempotencyKeyReused("k-1"), 422, "idempotency-key-reused", "Idempotency-Key reused"),
        (Conflict("someone else moved it"), 409, "conflict", "Conflict"),
        (ParkingRefused("orders is not halted"), 409, "refused", "Conflict"),
        (TopicMissing("no topic t"), 500, "internal-error", "Internal Server Error"),
        (ProjectionBug("order o-1 created twice"), 500, "internal-error", "Internal Server Error"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_each_family_answers_with_its_problem(
    error: Exception, status: int, code: str, title: str | None
) -> None:
    answered, body, _ = _answer_to(error)

    assert (answered, body["status"]) == (status, status)
    assert body["type"] == f"https://orders.example/problems/{code}"
    assert body["title"] == (title or code.replace("-", " ").capitalize())
    assert body["instance"] == "/fails"


def test_a_version_mismatch_is_412_with_the_current_version() -> None:
    status, body, headers = _answer_to(VersionMismatch(3, 5))

    assert (status, body["title"], body["current_version"]) == (412, "Precondition Failed", 5)
    assert body["type"].endswith("/version-mismatch")
    assert headers["etag"] == '"5"'


def test_an_unavailable_writer_is_503_with_retry_after() -> None:
    status, body, headers = _answer_to(WriterUnavailable("the writer is starting", retry_after=2))

    assert (status, body["title"], body["detail"]) == (
        503,
        "Service Unavailable",
        "the writer is starting",
    )
    assert body["type"].endswith("/unavailable")
    assert headers["retry-after"] == "2"


def test_a_read_model_not_yet_consistent_is_503_of_its_own_type() -> None:
    status, body, headers = _answer_to(NotYetConsistent("orders has not applied 0:7; retry"))

    assert (status, body["title"]) == (503, "Not yet consistent")
    assert body["type"].endswith("/not-yet-consistent")
    assert headers["retry-after"] == "1"
