"""Correlation ids and the access log line (the ASGI wrapper that uses them:
``service.edge.http.telemetry.RequestTelemetry``).

Each request gets a correlation id: its ``X-Correlation-Id`` when that is a sane token (1 to
128 visible ASCII characters, as the command headers allow), else the trace id of its W3C
``traceparent``, else a new one (128 random bits in hex, like a trace id). The id is echoed in
the response's ``X-Correlation-Id`` (problem responses and admission's 503s too), is what a
command's events carry, and is in ``service.edge.logs.CORRELATION_ID`` while the request runs,
so every line logged for it carries it. When the response is done, one access line on
``orders.access``: method, route template, status, duration, the caller's ``sub``,
correlation id, order id.

It wraps the whole application, outside admission control and authentication, so that
requests they refuse (503, 401, 429) are logged and echoed as well.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from litestar.types import HTTPScope

from service.edge.logs import ACCESS_LOGGER, write_straight
from service.kernel.access import Caller

HEADER = "X-Correlation-Id"
HEADER_NAME = b"x-correlation-id"
_TRACEPARENT = b"traceparent"
# The command headers' rule (service.edge.http.commands.HEADER_TOKEN_PATTERN), at most 128.
_SANE = re.compile(rb"[!-~]{1,128}")
# W3C Trace Context: version-traceid-parentid-flags, lowercase hex; version ff is invalid.
_TRACE_CONTEXT = re.compile(rb"(?!ff)[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_NO_TRACE = "0" * 32

_access = logging.getLogger(ACCESS_LOGGER)


def correlation_id_for(headers: Any) -> str:
    """The correlation id of a request with these ASGI ``headers`` (lowercase names)."""
    given: bytes | None = None
    traceparent: bytes | None = None
    for name, value in headers:
        if name == HEADER_NAME:
            given = value
        elif name == _TRACEPARENT:
            traceparent = value
    if given is not None and _SANE.fullmatch(given):
        return given.decode("ascii")
    if traceparent is not None:
        match = _TRACE_CONTEXT.match(traceparent.strip())
        if match is not None and match.group(1) != _NO_TRACE.encode():
            return match.group(1).decode("ascii")
    return os.urandom(16).hex()  # a uuid4's randomness at a fifth of its cost


def log_access(scope: HTTPScope, status: int, duration_s: float, correlation_id: str) -> None:
    """The access line: straight to the JSON log stream when logging is as set up
    (``service.edge.logs.write_straight``), else as a record of ``orders.access``."""
    user = scope.get("user")
    path_params = scope.get("path_params")
    method = scope["method"]
    message = f"{method} {scope['path']} {status}"
    context = {
        "method": method,
        # The route template (None when no route matched, e.g. a 404 or a 503 of admission).
        "route": scope.get("path_template"),
        "status": status,
        "duration_ms": round(duration_s * 1000, 3),
        "sub": user.sub if isinstance(user, Caller) else None,
        "correlation_id": correlation_id,
        "order_id": path_params.get("order_id") if path_params else None,
    }
    if not write_straight(_access, message, context):
        # Not ``Logger.info``, which would look up the calling frame: a few microseconds.
        record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 0, message, None, None)
        record.__dict__.update(context)
        _access.handle(record)
