"""The database edge: engines and migrations."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def create_engine(
    url: str, *, pool_size: int = 10, overflow: bool = True, autocommit: bool = False
) -> AsyncEngine:
    """An asyncpg-backed engine; nothing connects until first use.

    ``autocommit``: SQLAlchemy opens no transaction of its own, so a single statement costs one
    round trip (and the pool's liveness ping one, not BEGIN, ping, ROLLBACK). For processes
    that only read one statement at a time through SQLAlchemy and open their transactions
    explicitly (``projections.projection.begin``): the API and the projector. Never for
    migrations.

    ``overflow=False``: never more than ``pool_size`` connections; a burst waits for one
    instead of opening (and then closing) extra ones, each a TLS attempt and a login.
    """
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size if overflow else 0,
        pool_pre_ping=True,
        isolation_level="AUTOCOMMIT" if autocommit else None,
    )


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
