"""The database edge: engines and migrations."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from alembic import command
from alembic.config import Config
from asyncpg.exceptions._base import DataError as _ClientDataError
from sqlalchemy import Connection, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from service.kernel.errors import EnvironmentProblem
from service.kernel.settings import sqlalchemy_url

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# The database roles of least privilege (``projections.roles`` grants them; docs/security.md):
# the owner of every schema and table, the projector (writes rows, never DDL), the API (reads).
OWNER_ROLE = "orders_migrator"
PROJECTOR_ROLE = "orders_projector"
API_ROLE = "orders_api"

# asyncpg's own DataError, for a value its encoders cannot send (an integer beyond its column's
# range, a wrong type), before anything reaches the server. Not exported by asyncpg:
# ``asyncpg.DataError`` is the server's refusal (SQLSTATE class 22).
EncodingRefused = _ClientDataError


def driver_dsn(url: str) -> str:
    """``url`` as the libpq-style URL asyncpg parses itself.

    SQLAlchemy's asyncpg dialect hands the URL's query to ``asyncpg.connect`` as keyword
    arguments, and asyncpg understands ``sslmode``, ``sslrootcert``, ``sslcert`` and the other
    libpq parameters only inside a DSN (sqlalchemy/sqlalchemy#6275, MagicStack/asyncpg#737).
    So every connection of the service is opened from this DSN: TCP, a socket directory in
    ``host=``, no host at all, ``sslmode``, ``passfile`` all mean what they mean to libpq.
    """
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def with_password(url: str, password: str | None) -> str:
    """``url`` with ``password`` (from ``ORDERS_DATABASE_PASSWORD_FILE``) unless it names one
    itself, or names no user for it."""
    parsed = make_url(url)
    if password is None or parsed.password is not None:
        return url
    if not parsed.username:
        raise EnvironmentProblem(
            f"{shown_url(url)} names no user for the password of ORDERS_DATABASE_PASSWORD_FILE: "
            "write postgresql://USER@host/db"
        )
    return parsed.set(password=password).render_as_string(hide_password=False)


def shown_url(url: str) -> str:
    """``url`` fit for a log line or an error: its password masked."""
    return make_url(url).render_as_string(hide_password=True)


Connector = Callable[[], Awaitable[asyncpg.Connection]]


def connector(url: str, *, as_owner: bool = False) -> Connector:
    """Opens one asyncpg connection to ``url`` (``driver_dsn``).

    ``as_owner``: for migrations and operators' commands, which create, alter and drop tables:
    the session takes the owner role (``OWNER_ROLE``) where ``orders migrate
    --create-roles`` set it up and the login may take it, so what it creates is owned by that
    role and gets the grants its default privileges give to the projector and the API.
    """
    dsn = driver_dsn(url)

    async def connect() -> asyncpg.Connection:
        connection = await asyncpg.connect(dsn)
        if as_owner:
            try:
                await assume_owner_role(connection)
            except BaseException:
                await connection.close()
                raise
        return connection

    return connect


async def assume_owner_role(connection: asyncpg.Connection) -> None:
    """``SET ROLE`` to the owner role when it exists, owns this database's schema (it may
    create in it) and the login is a member; otherwise stay who the login is."""
    may = await connection.fetchval(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) "
        "THEN pg_has_role(current_user, $1, 'MEMBER') "
        "AND has_database_privilege($1, current_database(), 'CREATE') ELSE false END",
        OWNER_ROLE,
    )
    if may:
        await connection.execute(f'SET ROLE "{OWNER_ROLE}"')


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    overflow: bool = True,
    autocommit: bool = False,
    as_owner: bool = False,
) -> AsyncEngine:
    """An asyncpg-backed engine; nothing connects until first use. Its connections come from
    ``connector`` (libpq's URL forms, ``postgresql://`` or ``postgresql+asyncpg://``;
    ``as_owner``: DDL as the owner role).

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
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size if overflow else 0,
        isolation_level="AUTOCOMMIT" if autocommit else None,
        json_deserializer=msgspec.json.decode,
        async_creator=connector(url, as_owner=as_owner),
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


def refused_by_environment(error: BaseException) -> bool:
    """The database refuses the work, not the data: a read-only database or transaction
    (SQLSTATE class 25, e.g. a standby, or ``default_transaction_read_only``) or a missing
    privilege (42501). Someone must change the database or the grants; the same statement
    succeeds afterwards. Not 25P02 ("current transaction is aborted"): it only echoes an
    earlier error of the same transaction, which is the one to judge."""
    state = sqlstate(error)
    return (state.startswith("25") and state != "25P02") or state == "42501"


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
