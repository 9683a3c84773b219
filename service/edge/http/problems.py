"""Every error the API can answer, mapped to an RFC 9457 problem response in this one place."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import asyncpg
import msgspec
from aiokafka.errors import KafkaError, KafkaTimeoutError
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from sqlalchemy import exc as sa_exc

from projections.checkpoints import TooManyWaitingQueries
from service.edge.http.auth import REALM, RateLimited, Unauthenticated
from service.edge.http.forwarding import Forwarded, relay
from service.infra.database import connection_lost, refused_by_environment, sqlstate
from service.kernel import domain
from service.kernel.errors import (
    AccessDenied,
    BadEvent,
    Conflict,
    DomainError,
    EnvironmentProblem,
    OperatorRefusal,
    OrdersError,
    Unavailable,
)
from service.write.contract import IdempotencyKeyReused, VersionMismatch

_log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://orders.example/problems/"

# Domain error -> HTTP status. The domain knows nothing of HTTP; this is the translation.
_DOMAIN_STATUS: dict[type[DomainError], int] = {
    domain.OrderNotFound: 404,
    domain.ItemNotFound: 404,
    domain.OrderAlreadyExists: 409,
    domain.InvalidTransition: 409,
    domain.DuplicateItem: 409,
    domain.EmptyOrder: 409,
    domain.TooManyItems: 409,
    domain.TooManyEvents: 409,
    domain.PaymentMismatch: 422,
    domain.InvalidCommand: 422,
}


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """The body of every error response (RFC 9457); some problems add members of their own."""

    type: str
    title: str
    status: int
    detail: str
    instance: str


_PROBLEM_DESCRIPTIONS = {
    400: "Malformed request: invalid JSON, unknown fields, values out of range, bad headers",
    401: "No valid bearer token: missing, malformed, expired, or not for this service",
    403: "The token lacks a scope this request needs (or names another customer)",
    404: "No such order, customer or projection",
    409: "The command is not allowed in the order's current state (or the operator's action "
    "would do harm: see the detail)",
    412: "If-Match names a version the order is not at",
    413: "The request body is larger than the configured limit",
    415: "The request body is not application/json",
    422: "A business rule refused the command, or the Idempotency-Key was reused",
    429: "This caller's rate limit is spent; see Retry-After",
    503: "Temporarily unavailable (event log, writer start-up or at capacity, database, too "
    "many queries waiting for their consistency tokens; see Retry-After), or the database "
    "refuses what the service's login may not do",
}


# What every route that needs a token can answer.
_ACCESS_STATUSES = (401, 403, 429)


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI documentation of the problem responses a route that needs a token can answer
    with: ``statuses`` and those of access control."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=_PROBLEM_DESCRIPTIONS[status],
            media_type=PROBLEM_JSON,
            generate_examples=False,
        )
        for status in sorted({*statuses, *_ACCESS_STATUSES})
    }


class QueryProblem(DomainError):
    """A request the caller must change: a filter, cursor, consistency token or partition the
    API cannot take (400), or an id or name it knows nothing of (404). ``code`` is the problem
    type."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code


class ClientGone(OrdersError):
    """The client disconnected while its command was queued: the command was not written."""


class NotYetConsistent(Unavailable):
    """The read model has not yet applied the event a consistency token names: retry shortly."""

    code = "not-yet-consistent"


def problem_type(code: str) -> str:
    """The URI of a problem type (RFC 9457 ``type``)."""
    return _TYPE_BASE + code


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    request: Request[Any, Any, Any],
    *,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> Response[Any]:
    """An RFC 9457 problem response; ``extensions`` become extra members of the body."""
    body = {
        "type": problem_type(code),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extensions,
    }
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


# -- the error tree: one handler per family ---------------------------------------------------


def _domain_error(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """404, 409 or 422 by the rule broken; a query problem has its own 400 or 404."""
    assert isinstance(error, DomainError)
    if isinstance(error, QueryProblem):
        status = error.status
    else:
        status = _DOMAIN_STATUS.get(type(error), 422)
    return problem(status, error.code, _titled(error.code), str(error), request)


def _conflict(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """412 for an If-Match the order is not at, 422 for a reused Idempotency-Key, else 409."""
    match error:
        case VersionMismatch(actual=actual):
            return problem(
                412,
                "version-mismatch",
                "Precondition Failed",
                str(error),
                request,
                headers={"ETag": f'"{actual}"'},
                current_version=actual,
            )
        case IdempotencyKeyReused():
            return problem(
                422, "idempotency-key-reused", "Idempotency-Key reused", str(error), request
            )
    return problem(409, "conflict", _phrase(409), str(error), request)


def _unavailable(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """503 with Retry-After; a read model not yet consistent, or too many queries waiting for
    theirs, say so."""
    assert isinstance(error, Unavailable)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    if isinstance(error, NotYetConsistent | TooManyWaitingQueries):
        code, title = error.code, _titled(error.code)
    else:
        code, title = "unavailable", "Service Unavailable"
    return problem(503, code, title, str(error), request, headers=headers)


def _access_denied(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """403 naming the scopes that would do (RFC 6750 ``insufficient_scope``)."""
    assert isinstance(error, AccessDenied)
    scopes = " ".join(error.any_of)
    challenge = f'Bearer realm="{REALM}", error="insufficient_scope", scope="{scopes}"'
    return problem(
        403,
        "insufficient-scope",
        _phrase(403),
        str(error),
        request,
        headers={"WWW-Authenticate": challenge},
        required_scopes=list(error.any_of),
    )


def _unauthenticated(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """401 with the ``WWW-Authenticate`` challenge of RFC 6750."""
    assert isinstance(error, Unauthenticated)
    return problem(
        401,
        "unauthenticated",
        _phrase(401),
        f"{error.reason}; send Authorization: Bearer <access token>",
        request,
        headers={"WWW-Authenticate": error.challenge},
    )


def _rate_limited(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    assert isinstance(error, RateLimited)
    return problem(
        429,
        "rate-limited",
        _phrase(429),
        str(error),
        request,
        headers={"Retry-After": str(error.retry_after)},
    )


def _client_gone(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """Nobody reads this: the client disconnected, and its command was not written."""
    return problem(499, "client-closed-request", "Client Closed Request", str(error), request)


def _refused(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """409: an operator's action that would do harm, or clash with one running (the same
    refusal as the CLI's); nothing was done."""
    return problem(409, "refused", _phrase(409), str(error), request)


def _titled(code: str) -> str:
    return code.replace("-", " ").capitalize()


# -- Litestar's own errors and those of the drivers -------------------------------------------


def _validation(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    assert isinstance(error, ValidationException)
    extra = error.extra if isinstance(error.extra, list) else []
    return problem(
        400, "invalid-request", "Invalid request", str(error.detail), request, errors=extra
    )


def _http(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    assert isinstance(error, HTTPException)
    status = error.status_code
    if status >= 500:
        _log.error("server error on %s %s: %s", request.method, request.url.path, error.detail)
    code = {
        400: "invalid-request",
        404: "not-found",
        405: "method-not-allowed",
        413: "body-too-large",
        415: "unsupported-media-type",
    }.get(status, "http-error")
    # The title names the kind of problem and never varies with the occurrence (RFC 9457 3.1.4);
    # what went wrong this time (e.g. where the JSON is malformed) is the detail.
    return problem(status, code, _phrase(status), str(error.detail), request, headers=error.headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "HTTP error"


def _is_outage(error: Exception) -> bool:
    """A lost or refused connection, or the pool's timeout; not a statement the database
    refused (that is our bug)."""
    return connection_lost(error) or isinstance(error, sa_exc.TimeoutError)


def _database_unavailable(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    if refused_by_environment(error):
        return _database_refused(request, error)
    if not _is_outage(error):
        return _unexpected(request, error)
    return _unreachable(request, error, "the database")


def _database_refused(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """503, no Retry-After: the database refuses what this process's login may not do, or is
    read-only. With the roles of least privilege the API only reads, so an operator's action
    that writes (park, retry, skip) runs as an operator instead."""
    _log.error(
        "the database refused %s %s (SQLSTATE %s): %s",
        request.method,
        request.url.path,
        sqlstate(error),
        str(error).splitlines()[0] if str(error) else type(error).__name__,
    )
    return problem(
        503,
        "database-refused",
        "Service Unavailable",
        f"the database refuses this request (SQLSTATE {sqlstate(error)}: read-only, or a "
        "privilege this service's login lacks); with the roles of least privilege the API "
        "only reads: run operators' actions with `orders projections ...` (docs/security.md)",
        request,
    )


def _event_log_unavailable(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """Kafka unreachable or not answering in time (operations read it directly); any other
    Kafka error (a bug, a misconfiguration) is a 500, logged."""
    assert isinstance(error, KafkaError)
    if not (error.retriable or isinstance(error, KafkaTimeoutError)):
        return _unexpected(request, error)
    return _unreachable(request, error, "the event log (Kafka)")


def _unreachable(request: Request[Any, Any, Any], error: Exception, what: str) -> Response[Any]:
    _log.warning("%s unavailable on %s %s: %r", what, request.method, request.url.path, error)
    return problem(
        503,
        "unavailable",
        "Service Unavailable",
        f"{what} cannot be reached; retry shortly",
        request,
        headers={"Retry-After": "1"},
    )


def _unexpected(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    _log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
    return problem(
        HTTP_500_INTERNAL_SERVER_ERROR,
        "internal-error",
        "Internal Server Error",
        "the server failed; the error is logged",
        request,
    )


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    # The error tree, one family at a time (a handler refines a subclass's status where noted).
    DomainError: _domain_error,
    Conflict: _conflict,
    Unavailable: _unavailable,
    OperatorRefusal: _refused,
    AccessDenied: _access_denied,
    Unauthenticated: _unauthenticated,
    RateLimited: _rate_limited,
    ClientGone: _client_gone,
    Forwarded: relay,  # the answer of the instance that owns the order's partition
    # The server's environment needs its operator, or a reader let a bad event through: a 500,
    # logged with its traceback (the client can do nothing about either).
    EnvironmentProblem: _unexpected,
    BadEvent: _unexpected,
    ValidationException: _validation,
    HTTPException: _http,
    # Postgres down, restarting or unreachable (connection refused, reset, pool timeout): 503.
    sa_exc.DBAPIError: _database_unavailable,
    sa_exc.TimeoutError: _database_unavailable,
    OSError: _database_unavailable,
    # The same from the raw asyncpg driver, which SQLAlchemy does not wrap.
    asyncpg.PostgresError: _database_unavailable,
    asyncpg.InterfaceError: _database_unavailable,
    asyncpg.InternalClientError: _database_unavailable,
    # Kafka down or unreachable where the API reads it itself (operations): 503.
    KafkaError: _event_log_unavailable,
    Exception: _unexpected,
}
