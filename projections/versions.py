"""Versions of a projection: where each keeps its tables, which one readers see, the switch.

Each version of a projection keeps its tables in its own Postgres schema (``schema_for``).
Queries read views in ``public`` named like the tables; they point at the LIVE version. A
rebuild creates a BUILDING version (empty tables with primary keys only), fills it from offset
0, builds its secondary indexes once the bulk is in, and then, in ONE transaction that waits
for no reader, makes it live and repoints the views. Runners lock their version's registry row
(``FOR SHARE``) in every batch, so the switch (``FOR UPDATE``) happens between batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import sqlalchemy as sa

from projections.projection import Projection
from projections.schema import is_append_only, schema_for
from service.kernel.errors import EnvironmentProblem, OperatorRefusal


@dataclass(frozen=True)
class Target:
    """One version of one projection: what a runner applies events to."""

    projection: Projection
    version: int

    @property
    def name(self) -> str:
        return self.projection.name

    @property
    def schema(self) -> str:
        return schema_for(self.name, self.version)

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


class NoLiveVersion(EnvironmentProblem):
    """A projection in the code has no live version in the database: migrations are missing."""


class VersionIsLive(OperatorRefusal):
    """A live version cannot be dropped: queries read it."""


class NotCaughtUp(OperatorRefusal):
    """The building version is behind the live one in some partition: it cannot switch yet."""


async def versions(
    connection: asyncpg.Connection, names: Sequence[str]
) -> dict[str, dict[int, str]]:
    """projection -> {version: state}, for the named projections."""
    rows = await connection.fetch(
        "SELECT projection, version, state FROM projection_versions "
        "WHERE projection = ANY($1::text[]) ORDER BY projection, version",
        list(names),
    )
    found: dict[str, dict[int, str]] = {name: {} for name in names}
    for row in rows:
        found[row["projection"]][row["version"]] = row["state"]
    return found


async def live_targets(
    connection: asyncpg.Connection, projections: Sequence[Projection]
) -> list[Target]:
    """The live version of each projection."""
    known = await versions(connection, [p.name for p in projections])
    targets = []
    for projection in projections:
        live = [v for v, state in known[projection.name].items() if state == "live"]
        if not live:
            raise NoLiveVersion(
                f"projection {projection.name} has no live version in the database: "
                "run `orders migrate` (a new projection needs its migration)"
            )
        targets.append(Target(projection, live[0]))
    return targets


async def building(connection: asyncpg.Connection, projection: Projection) -> Target | None:
    """The version being built (left by an interrupted rebuild), if any."""
    known = await versions(connection, [projection.name])
    for version, state in known[projection.name].items():
        if state == "building":
            return Target(projection, version)
    return None


async def create_building(connection: asyncpg.Connection, live: Target) -> Target:
    """A new, empty version next to ``live``: same tables, no secondary indexes yet, and the
    keys of the tables it upserts into (an append-only table's key comes with the indexes)."""
    known = await versions(connection, [live.name])
    new = Target(live.projection, max(known[live.name]) + 1)
    await connection.execute(f'CREATE SCHEMA "{new.schema}"')
    for table in live.projection.tables:
        await connection.execute(
            f'CREATE TABLE "{new.schema}"."{table.name}" (LIKE "{live.schema}"."{table.name}" '
            "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING IDENTITY)"
        )
        if not is_append_only(table):
            await _add_missing_keys(connection, live, new, table)
    await connection.execute(
        "INSERT INTO projection_versions (projection, version, state) VALUES ($1, $2, 'building')",
        new.name,
        new.version,
    )
    return new


async def _add_missing_keys(
    connection: asyncpg.Connection, live: Target, new: Target, table: sa.Table
) -> None:
    """Give ``new``'s ``table`` the primary and unique keys of ``live``'s that it lacks."""
    keys = await connection.fetch(
        "SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint "
        "WHERE conrelid = $1::regclass AND contype IN ('p', 'u') AND conname NOT IN ("
        "  SELECT conname FROM pg_constraint WHERE conrelid = $2::regclass)",
        f'"{live.schema}"."{table.name}"',
        f'"{new.schema}"."{table.name}"',
    )
    for key in keys:
        await connection.execute(
            f'ALTER TABLE "{new.schema}"."{table.name}" '
            f'ADD CONSTRAINT "{key["conname"]}" {key["definition"]}'
        )


async def build_indexes(connection: asyncpg.Connection, live: Target, new: Target) -> int:
    """Give ``new`` the secondary indexes ``live`` has, and the keys of its append-only tables.

    After the bulk load, each is built in one sort instead of one B-tree insert per row. An
    append-only table is only ever appended to (never read by key while a batch is applied),
    so its key only guards against a row stored twice; such a row makes this step fail, loudly,
    and the version is never switched to.
    """
    for table in new.projection.tables:
        await _add_missing_keys(connection, live, new, table)
    definitions = await connection.fetch(
        "SELECT i.indexdef FROM pg_indexes i WHERE i.schemaname = $1 AND NOT EXISTS ("
        "  SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname"
        "  AND c.connamespace = $1::regnamespace)",
        live.schema,
    )
    for row in definitions:
        definition: str = row["indexdef"]
        statement = definition.replace(f" ON {live.schema}.", f' ON "{new.schema}".', 1)
        statement = statement.replace(" INDEX ", " INDEX IF NOT EXISTS ", 1)
        await connection.execute(statement)
    return len(definitions)


async def behind(
    connection: asyncpg.Connection, live: Target, new: Target, topic: str
) -> dict[int, tuple[int, int]]:
    """Partitions where ``new`` has applied less than ``live``: partition -> (new, live)."""
    rows = await connection.fetch(
        "SELECT l.partition, l.next_offset AS live, COALESCE(n.next_offset, 0) AS new "
        "FROM projection_checkpoints l LEFT JOIN projection_checkpoints n "
        "  ON n.projection = l.projection AND n.version = $3 AND n.topic = l.topic "
        "  AND n.partition = l.partition "
        "WHERE l.projection = $1 AND l.version = $2 AND l.topic = $4",
        live.name,
        live.version,
        new.version,
        topic,
    )
    return {row["partition"]: (row["new"], row["live"]) for row in rows if row["new"] < row["live"]}


async def switch(connection: asyncpg.Connection, live: Target, new: Target, topic: str) -> None:
    """Make ``new`` the version readers see, in the caller's transaction.

    Waits for batches in flight on either version (their ``FOR SHARE`` locks), then refuses
    with ``NotCaughtUp`` if ``new`` is behind ``live`` anywhere: a reader holding a consistency
    token from the live version must never see an older state after the switch.
    """
    states = await connection.fetch(
        "SELECT version, state FROM projection_versions WHERE projection = $1 "
        "AND version = ANY($2::int[]) ORDER BY version FOR UPDATE",
        live.name,
        [live.version, new.version],
    )
    found = {row["version"]: row["state"] for row in states}
    if found != {live.version: "live", new.version: "building"}:
        raise NotCaughtUp(f"{new} cannot switch: versions are now {found}")
    lagging = await behind(connection, live, new, topic)
    if lagging:
        raise NotCaughtUp(f"{new} is behind {live} in partitions {sorted(lagging)}")
    # Old first: the unique index on a projection's live version is checked row by row, so one
    # UPDATE of both rows fails whenever it reaches the new version's row first.
    for target, state in ((live, "retired"), (new, "live")):
        await connection.execute(
            "UPDATE projection_versions SET state = $3, switched_at = now() "
            "WHERE projection = $1 AND version = $2",
            target.name,
            target.version,
            state,
        )
    for table in new.projection.tables:
        await connection.execute(
            f'CREATE OR REPLACE VIEW public."{table.name}" AS '
            f'SELECT * FROM "{new.schema}"."{table.name}"'
        )


async def drop(connection: asyncpg.Connection, target: Target) -> None:
    """Drop a version that is no longer live: its tables, checkpoints, halts and parked events.

    In the caller's transaction. The version's registry row is locked first (a switch in
    flight finishes before), and a live version is refused (``VersionIsLive``) before anything
    is dropped: its schema's CASCADE would take the public views with it.
    """
    state = await connection.fetchval(
        "SELECT state FROM projection_versions WHERE projection = $1 AND version = $2 FOR UPDATE",
        target.name,
        target.version,
    )
    if state == "live":
        raise VersionIsLive(
            f"{target} is live (queries read it): it cannot be dropped; to replace it, "
            f"rebuild it: orders projections rebuild {target.name}"
        )
    await connection.execute(f'DROP SCHEMA IF EXISTS "{target.schema}" CASCADE')
    for table in ("projection_checkpoints", "projection_halts", "parked_orders", "parked_events"):
        await connection.execute(
            f"DELETE FROM {table} WHERE projection = $1 AND version = $2",
            target.name,
            target.version,
        )
    await connection.execute(
        "UPDATE projection_versions SET state = 'dropped' WHERE projection = $1 AND version = $2",
        target.name,
        target.version,
    )


async def reset(connection: asyncpg.Connection, target: Target) -> None:
    """Empty a version's tables and put its checkpoints back to 0, in the caller's transaction.

    The registry row is locked first, so no batch of a running projector is half-way.
    """
    await connection.execute(
        "SELECT 1 FROM projection_versions WHERE projection = $1 AND version = $2 FOR UPDATE",
        target.name,
        target.version,
    )
    names = ", ".join(f'"{target.schema}"."{table.name}"' for table in target.projection.tables)
    await connection.execute(f"TRUNCATE {names}")
    await connection.execute(
        "UPDATE projection_checkpoints SET next_offset = 0, last_event_at = NULL, "
        "updated_at = now() WHERE projection = $1 AND version = $2",
        target.name,
        target.version,
    )
    for table in ("projection_halts", "parked_orders", "parked_events"):
        await connection.execute(
            f"DELETE FROM {table} WHERE projection = $1 AND version = $2",
            target.name,
            target.version,
        )
