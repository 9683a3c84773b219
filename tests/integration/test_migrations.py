"""The schema is managed by alembic: every migration upgrades and downgrades cleanly."""

from __future__ import annotations

from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from service.infra.database import create_engine, migrate


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    return set(names)


async def test_migrations_upgrade_to_head_and_downgrade_to_base_cleanly(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine, revision="base", action="downgrade")
        assert await _tables(engine) <= {"alembic_version"}
        await migrate(engine)
        upgraded = await _tables(engine)
        assert "projection_checkpoints" in upgraded
        await migrate(engine, revision="base", action="downgrade")
        assert await _tables(engine) <= {"alembic_version"}
        await migrate(engine)
        assert await _tables(engine) == upgraded
    finally:
        await engine.dispose()
