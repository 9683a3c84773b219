"""The schema is managed by alembic: every migration upgrades and downgrades cleanly."""

from __future__ import annotations

from sqlalchemy import inspect, text
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


async def _columns(engine: AsyncEngine, schema: str, table: str) -> list[str]:
    async with engine.connect() as connection:
        found = await connection.execute(
            text(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = :schema AND table_name = :table ORDER BY ordinal_position"
            ),
            {"schema": schema, "table": table},
        )
        return [name for (name,) in found]


async def test_the_history_actor_columns_reach_every_version_and_the_view_and_go_again(
    database_url: str,
) -> None:
    """0004 adds the actor to the live version, to a version a rebuild left building (resumed
    after the upgrade, it writes every column), and to the view readers query; rows stored
    before have none. Downgraded, all of them lose it and the rows stay."""
    engine = create_engine(database_url)
    actor = ["actor_sub", "actor_client_id"]
    try:
        await migrate(engine)
        await migrate(engine, revision="0003", action="downgrade")
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO proj_order_history_v1.order_history VALUES ('o-1', 1, 'e-1', "
                    "'OrderCreated', 1, now(), 'c-1', 'r-1', '{}', 0, 0)"
                )
            )
            await connection.execute(text("CREATE SCHEMA proj_order_history_v2"))
            await connection.execute(
                text(
                    "CREATE TABLE proj_order_history_v2.order_history "
                    "(LIKE proj_order_history_v1.order_history)"
                )
            )
            await connection.execute(
                text(
                    "INSERT INTO projection_versions (projection, version, state) VALUES "
                    "('order_history', 2, 'building'), ('order_history', 3, 'dropped')"
                )
            )
        before = await _columns(engine, "public", "order_history")

        await migrate(engine)

        for schema in ("proj_order_history_v1", "proj_order_history_v2", "public"):
            assert await _columns(engine, schema, "order_history") == before + actor, schema
        async with engine.connect() as connection:
            stored = (
                await connection.execute(
                    text("SELECT order_id, actor_sub, actor_client_id FROM public.order_history")
                )
            ).all()
        assert [tuple(row) for row in stored] == [("o-1", None, None)]

        await migrate(engine, revision="0003", action="downgrade")

        for schema in ("proj_order_history_v1", "proj_order_history_v2", "public"):
            assert await _columns(engine, schema, "order_history") == before, schema
        async with engine.connect() as connection:
            kept = await connection.scalar(text("SELECT count(*) FROM public.order_history"))
        assert kept == 1
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("DROP SCHEMA IF EXISTS proj_order_history_v2 CASCADE"))
            await connection.execute(
                text(
                    "DELETE FROM projection_versions "
                    "WHERE projection = 'order_history' AND version > 1"
                )
            )
        await migrate(engine)
        await engine.dispose()
