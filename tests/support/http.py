"""Calling the app over ASGI in the test's own event loop."""

from __future__ import annotations

import httpx
from litestar import Litestar


def serve(app: Litestar) -> httpx.AsyncClient:
    """A client calling the app in this event loop.

    Not litestar.testing.AsyncTestClient: in Litestar 2 it runs the app on another event loop
    in another thread (litestar-org/litestar#1920), where the writer and the engine made in the
    test's loop cannot be used, and each request blocks this loop.
    """
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
