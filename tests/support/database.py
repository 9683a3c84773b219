"""The test database: administrative statements, and resetting the read side between tests
(live versions empty, no other versions, no bookkeeping)."""

from __future__ import annotations

from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.models import catalog
from projections.schema import BOOKKEEPING, schema_for


async def admin(url: str, statement: str, *args: Any) -> Any:
    """``statement``'s first value, on a connection of its own (outside any pool) to ``url``."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval(statement, *args)
    finally:
        await connection.close()


async def reset_read_side(engine: AsyncEngine) -> None:
    """Every live read-model table and checkpoint emptied; versions left by rebuilds dropped."""
    async with engine.begin() as connection:
        live = dict(
            (
                await connection.execute(
                    text("SELECT projection, version FROM projection_versions WHERE state = 'live'")
                )
            ).all()
        )
        others = (
            await connection.execute(
                text("SELECT projection, version FROM projection_versions WHERE state <> 'live'")
            )
        ).all()
        for projection, version in others:
            await connection.execute(
                text(f'DROP SCHEMA IF EXISTS "{schema_for(projection, version)}" CASCADE')
            )
        await connection.execute(text("DELETE FROM projection_versions WHERE state <> 'live'"))
        tables = [
            f'"{schema_for(name, live[name])}"."{table.name}"'
            for name, projection in catalog.PROJECTIONS.items()
            for table in projection.tables
        ]
        tables += [
            f'"{table.name}"' for table in BOOKKEEPING if table.name != "projection_versions"
        ]
        await connection.execute(text(f"TRUNCATE {', '.join(tables)}"))
