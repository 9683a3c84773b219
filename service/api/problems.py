"""Every error the API can answer, mapped to an RFC 9457 problem response in this one place."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from service import domain
from service.writer import IdempotencyKeyReused, VersionMismatch, WriterUnavailable

_log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://orders.example/problems/"

# Domain error -> HTTP status. The domain knows nothing of HTTP; this is the translation.
_DOMAIN_STATUS: dict[type[domain.DomainError], int] = {
    domain.OrderNotFound: 404,
    domain.ItemNotFound: 404,
    domain.OrderAlreadyExists: 409,
    domain.InvalidTransition: 409,
    domain.DuplicateItem: 409,
    domain.EmptyOrder: 409,
    domain.TooManyItems: 409,
    domain.PaymentMismatch: 422,
    domain.InvalidCommand: 422,
}


class QueryProblem(Exception):
    """A query-side error with its own status (bad filter, unknown id, not yet consistent)."""

    def __init__(self, status: int, code: str, detail: str, *, retry_after: int | None = None):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after


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
    body = {
        "type": _TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extensions,
    }
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _domain_error(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    assert isinstance(error, domain.DomainError)
    status = _DOMAIN_STATUS.get(type(error), 422)
    return problem(
        status, error.code, error.code.replace("-", " ").capitalize(), str(error), request
    )


def _version_mismatch(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    assert isinstance(error, VersionMismatch)
    return problem(
        412,
        "version-mismatch",
        "Precondition Failed",
        str(error),
        request,
        headers={"ETag": f'"{error.actual}"'},
        current_version=error.actual,
    )


def _idempotency_reused(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    return problem(422, "idempotency-key-reused", "Idempotency-Key reused", str(error), request)


def _unavailable(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    assert isinstance(error, WriterUnavailable)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return problem(
        503, "unavailable", "Service Unavailable", error.reason, request, headers=headers
    )


def _query_problem(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    assert isinstance(error, QueryProblem)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return problem(
        error.status,
        error.code,
        error.code.replace("-", " ").capitalize(),
        error.detail,
        request,
        headers=headers,
    )


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
    return problem(
        status,
        code,
        str(error.detail) if status < 500 else "Server error",
        str(error.detail),
        request,
        headers=error.headers,
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
    domain.DomainError: _domain_error,
    VersionMismatch: _version_mismatch,
    IdempotencyKeyReused: _idempotency_reused,
    WriterUnavailable: _unavailable,
    QueryProblem: _query_problem,
    ValidationException: _validation,
    HTTPException: _http,
    Exception: _unexpected,
}
