"""The engine's pool never hands out a connection that the server has closed.

The pool checks liveness without a round trip (``service.infra.database._replace_if_closed``). These
tests end a pooled connection's session on the server, as a restart or an administrator would,
and use the pool again: through the raw asyncpg driver (the projector's transactions) and
through SQLAlchemy (queries).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.projection import begin
from service.infra.database import create_engine
from tests.support.database import admin


async def _until_closed(connection: asyncpg.Connection, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not connection.is_closed():
        assert time.monotonic() < deadline, "asyncpg never noticed the session was ended"
        await asyncio.sleep(0.01)  # polling the condition, bounded by the deadline


async def test_a_connection_ended_by_the_server_is_replaced_for_raw_transactions(
    database_url: str,
) -> None:
    engine = create_engine(database_url, pool_size=1, overflow=False, autocommit=True)
    try:
        async with begin(engine) as connection:
            pooled = connection
            pid = await connection.fetchval("SELECT pg_backend_pid()")
        assert await admin(database_url, "SELECT pg_terminate_backend($1)", pid)
        await _until_closed(pooled)
        async with begin(engine) as connection:  # the only pooled connection was the dead one
            assert await connection.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await engine.dispose()


async def test_a_connection_ended_by_the_server_is_replaced_for_queries(
    database_url: str,
) -> None:
    engine = create_engine(database_url, pool_size=1, overflow=False, autocommit=True)
    try:
        async with engine.connect() as connection:
            raw = await connection.get_raw_connection()
            pooled = raw.driver_connection
            assert isinstance(pooled, asyncpg.Connection)
            pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        assert await admin(database_url, "SELECT pg_terminate_backend($1)", pid)
        await _until_closed(pooled)
        async with engine.connect() as connection:
            assert (
                await connection.execute(sa.text("SELECT pg_backend_pid()"))
            ).scalar_one() != pid
    finally:
        await engine.dispose()


class _Failed(Exception):
    """What went wrong inside a transaction, which callers decide on (retry or halt)."""


async def _fail_after_the_server_ends_the_session(engine: AsyncEngine, url: str) -> int:
    async with begin(engine) as connection:
        pid: int = await connection.fetchval("SELECT pg_backend_pid()")
        assert await admin(url, "SELECT pg_terminate_backend($1)", pid)
        await _until_closed(connection)
        raise _Failed(pid)


async def test_a_transaction_whose_rollback_fails_raises_its_own_error(
    database_url: str,
) -> None:
    """When the server goes away mid-transaction, the rollback fails too; the error raised must
    still be the one that says why (the projector retries on it), not the rollback's."""
    engine = create_engine(database_url, pool_size=1, overflow=False, autocommit=True)
    try:
        with pytest.raises(_Failed) as failed:
            await _fail_after_the_server_ends_the_session(engine, database_url)
        async with begin(engine) as connection:
            assert await connection.fetchval("SELECT pg_backend_pid()") != failed.value.args[0]
    finally:
        await engine.dispose()
