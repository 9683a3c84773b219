"""Calling the app over ASGI in the test's own event loop, as a well-behaved client does."""

from __future__ import annotations

import uuid

import httpx
from litestar.types import ASGIApp

from tests.support.identity import BACK_OFFICE, bearer


def _with_idempotency_key(request: httpx.Request) -> None:
    """A well-behaved client sends POST /orders with an Idempotency-Key."""
    if request.method == "POST" and request.url.path.rstrip("/") == "/orders":
        request.headers.setdefault("Idempotency-Key", str(uuid.uuid4()))


async def _create_with_idempotency_key(request: httpx.Request) -> None:
    _with_idempotency_key(request)


def client(base_url: str, *, token: str | None = BACK_OFFICE, timeout: float = 30) -> httpx.Client:
    """A synchronous client of a served service, as ``serve`` makes an asynchronous one."""
    return httpx.Client(
        base_url=base_url,
        timeout=timeout,
        headers=bearer(token) if token is not None else None,
        event_hooks={"request": [_with_idempotency_key]},
    )


def serve(app: ASGIApp, *, token: str | None = BACK_OFFICE, raw: bool = False) -> httpx.AsyncClient:
    """A client calling the app in this event loop, with ``token`` as its bearer token (None:
    no Authorization header). Unless ``raw``, a POST /orders without an Idempotency-Key gets
    a fresh one, as a well-behaved client's does.

    Not litestar.testing.AsyncTestClient: in Litestar 2 it runs the app on another event loop
    in another thread (litestar-org/litestar#1920), where the writer and the engine made in the
    test's loop cannot be used, and each request blocks this loop.
    """
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://test",
        headers=bearer(token) if token is not None else None,
        event_hooks={"request": [] if raw else [_create_with_idempotency_key]},
    )
