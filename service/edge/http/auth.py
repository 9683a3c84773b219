"""Who may call the API: bearer tokens checked by Litestar's authentication middleware, scopes
checked by guards, one rate limit per caller.

Every route needs a valid token except the health checks and (unless configured otherwise)
the OpenAPI schema. The middleware puts the ``Caller`` on the request (``request.user``);
a route's guard refuses a caller without one of its scopes (403); ownership (a customer may
touch only its own orders) is decided where the order is known: by the writer for commands,
by the query for reads.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.middleware.base import DefineMiddleware
from litestar.types import ASGIApp

from service.edge.http.limits import TokenBuckets
from service.infra.identity import TokenRejected, TokenVerifier
from service.kernel.access import UNAUTHENTICATED, Actor, Caller, Scope
from service.kernel.errors import OrdersError

_log = logging.getLogger(__name__)

# What the health checks and the schema carry in ``opt`` to be served without a token.
PUBLIC = "exclude_from_auth"
_BEARER = re.compile(r"^Bearer +([A-Za-z0-9._~+/-]+=*) *$", re.IGNORECASE)
REALM = "orders"
BEARER = "bearer"  # the OpenAPI security scheme


class Unauthenticated(OrdersError):
    """No valid bearer token (401): ``reason`` goes into ``WWW-Authenticate``."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing

    @property
    def challenge(self) -> str:
        if self.missing:  # RFC 6750 3.1: no error code when the request had no token
            return f'Bearer realm="{REALM}"'
        description = self.reason.replace("\\", "").replace('"', "'")
        return f'Bearer realm="{REALM}", error="invalid_token", error_description="{description}"'


class RateLimited(OrdersError):
    """The caller spent its rate limit (429)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many requests from this caller: retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Access:
    """How the app authenticates and limits callers; ``verifier`` None: authentication off."""

    verifier: TokenVerifier | None
    rate_limit: TokenBuckets | None = None
    public_schema: bool = True

    @property
    def enabled(self) -> bool:
        return self.verifier is not None

    def middleware(self) -> DefineMiddleware:
        exclude = [r"^/schema(?:/|$)"] if self.public_schema else None
        return DefineMiddleware(BearerAuthentication, access=self, exclude=exclude)


class BearerAuthentication(AbstractAuthenticationMiddleware):
    def __init__(self, app: ASGIApp, access: Access, exclude: list[str] | None = None) -> None:
        super().__init__(app, exclude=exclude, exclude_from_auth_key=PUBLIC)
        self.access = access

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        caller = await self._caller(connection)
        limit = self.access.rate_limit
        if limit is not None:
            key = caller.sub if caller.sub is not None else _client_host(connection)
            wait_s = limit.take(key, time.monotonic())
            if wait_s > 0:
                raise RateLimited(limit.retry_after(wait_s))
        return AuthenticationResult(user=caller, auth=None)

    async def _caller(self, connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
        verifier = self.access.verifier
        if verifier is None:
            return UNAUTHENTICATED
        header = connection.headers.get("authorization")
        if header is None:
            raise Unauthenticated("this request needs a bearer token", missing=True)
        match = _BEARER.match(header)
        if match is None:
            raise Unauthenticated('the Authorization header must be "Bearer <access token>"')
        try:
            claims = await verifier.verify(match.group(1))
        except TokenRejected as error:
            raise Unauthenticated(error.reason) from error
        return Caller(Actor(sub=claims.sub, client_id=claims.client_id), claims.scopes)


def _client_host(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    client = connection.client
    return client.host if client is not None else "unknown"


Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]


def requires(*any_of: Scope) -> dict[str, Any]:
    """What a route that needs one of ``any_of`` passes to its decorator (``**requires(...)``):
    the guard (403 naming them otherwise) and the OpenAPI security requirement saying so (in
    OpenAPI 3.1 a bearer scheme's requirement may list roles: one requirement per scope, any
    one of which will do)."""

    # async: Litestar runs a sync guard in a worker thread, a thread hop on every request
    # (about a sixth of the API's CPU under load, measured with py-spy).
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        caller: Caller = connection.user
        caller.require(*any_of)

    return {"guards": [guard], "security": [{BEARER: [scope.value]} for scope in any_of]}


def warn_if_off(access: Access) -> None:
    if not access.enabled:
        _log.warning(
            "AUTHENTICATION IS OFF (ORDERS_AUTH=off): anyone who reaches this service may do "
            "anything. Use this for local work only."
        )
