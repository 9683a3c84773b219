"""The database edge: engines and migrations."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from alembic import command
from alembic.config import Config
from asyncpg.exceptions._base import DataError as _ClientDataError
from sqlalchemy import Connection, event, exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# asyncpg's own DataError, for a value its encoders cannot send (an integer beyond its column's
# range, a wrong type), before anything reaches the server. Not exported by asyncpg:
# ``asyncpg.DataError`` is the server's refusal (SQLSTATE class 22).
EncodingRefused = _ClientDataError


def create_engine(
    url: str, *, pool_size: int = 10, overflow: bool = True, autocommit: bool = False
) -> AsyncEngine:
    """An asyncpg-backed engine; nothing connects until first use.

    ``autocommit``: SQLAlchemy opens no transaction of its own, so a single statement costs one
    round trip, not BEGIN, statement, ROLLBACK. For processes that only read one statement at
    a time through SQLAlchemy and open their transactions explicitly
    (``projections.projection.begin``): the API and the projector. Never for migrations.

    ``overflow=False``: never more than ``pool_size`` connections; a burst waits for one
    instead of opening (and then closing) extra ones, each a TLS attempt and a login.

    jsonb values (an order's items, a customer's lifetime value) are decoded by msgspec: a
    three-item list took 7.2 us with ``json.loads`` and 2.1 us with it, for every order a
    projector batch loads and every order a query reads.
    """
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size if overflow else 0,
        isolation_level="AUTOCOMMIT" if autocommit else None,
        json_deserializer=msgspec.json.decode,
    )
    event.listen(engine.sync_engine, "checkout", _replace_if_closed)
    return engine


def _replace_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """The pool's liveness check, without a round trip (``pool_pre_ping`` costs one per
    checkout, as much as a whole point query).

    A server that restarts or ends a session closes its socket; asyncpg sees the end of the
    stream and marks its connection closed, and the pool replaces it here before handing it
    out. Connections are also used through their asyncpg driver directly
    (``projections.projection.begin``), whose errors SQLAlchemy never sees, so this check is
    what keeps a dead connection from being handed out again and again. A connection broken
    without its socket noticing fails its one statement, is closed by it, and is replaced.
    """
    if dbapi_connection.driver_connection.is_closed():
        raise exc.DisconnectionError("the server closed this connection")


def sqlstate(error: BaseException) -> str:
    """The SQLSTATE of a database error, raw asyncpg or wrapped by SQLAlchemy; "" if none."""
    if isinstance(error, exc.DBAPIError) and error.orig is not None:
        error = error.orig
    return str(getattr(error, "sqlstate", "") or getattr(error, "pgcode", "") or "")


def connection_lost(error: BaseException) -> bool:
    """The connection failed, not the statement: the server is away, restarting or unreachable,
    or the connection was left out of step (asyncpg's ``InternalClientError``, "another
    operation is in progress", after the server was killed mid-statement). Such a connection is
    never reused; the statement may succeed on a new one. Raw asyncpg errors (statements sent
    through the driver, which SQLAlchemy never sees) and SQLAlchemy's wrapped ones alike.
    """
    if isinstance(error, EncodingRefused):  # an InterfaceError, but about a value
        return False
    lost = OSError | asyncpg.InterfaceError | asyncpg.InternalClientError
    if isinstance(error, lost | exc.OperationalError | exc.InterfaceError):
        return True
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    # 08xxx: connection exceptions; 57P01-57P03: the server is shutting down, crashed, or is
    # starting up ("cannot connect now"), which asyncpg reports as a plain error.
    state = sqlstate(error)
    return state.startswith("08") or state in {"57P01", "57P02", "57P03"}


@contextlib.asynccontextmanager
async def reading(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for ONE read-only statement at a time, in autocommit: each statement is
    its own snapshot, and no BEGIN and ROLLBACK round trips go with it.

    A statement sent through the raw driver (``driver_of``) that fails because of the
    connection (e.g. asyncpg's "another operation is in progress", a connection left out of
    step by a server killed mid-statement) discards it: SQLAlchemy never sees that error, and
    the pool would hand the same connection out again."""
    async with engine.connect() as connection:
        try:
            yield await connection.execution_options(isolation_level="AUTOCOMMIT")
        except Exception as error:
            if connection_lost(error):
                await connection.invalidate()
            raise


async def driver_of(connection: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a pooled SQLAlchemy one (it carries the pool's codecs)."""
    driver = (await connection.get_raw_connection()).driver_connection
    assert isinstance(driver, asyncpg.Connection)
    return driver


def alembic_config(url: str | None = None) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.attributes["skip_logging_config"] = True
    if url is not None:
        config.attributes["url"] = url
    return config


def _run(connection: Connection, config: Config, action: str, revision: str) -> None:
    config.attributes["connection"] = connection
    if action == "upgrade":
        command.upgrade(config, revision)
    else:
        command.downgrade(config, revision)


async def migrate(engine: AsyncEngine, *, revision: str = "head", action: str = "upgrade") -> None:
    """Upgrade (or downgrade) the schema on ``engine``'s database, in one transaction."""
    config = alembic_config()
    async with engine.begin() as connection:
        await connection.run_sync(_run, config, action, revision)
