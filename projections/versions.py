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

import asyncpg
import sqlalchemy as sa

from projections.bookkeeping.checkpoints import behind, forget_version, reset_checkpoints
from projections.bookkeeping.registry import (
    add_version,
    lock_version_states,
    set_version_state,
    version_states,
)
from projections.bookkeeping.topics import topic_ids
from projections.projection import Projection, Target
from projections.schema import is_append_only
from service.kernel.errors import EnvironmentProblem, OperatorRefusal


class NoLiveVersion(EnvironmentProblem):
    """A projection in the code has no live version in the database: migrations are missing."""


class VersionIsLive(OperatorRefusal):
    """A live version cannot be dropped: queries read it."""


class NotCaughtUp(OperatorRefusal):
    """The building version is behind the live one in some partition: it cannot switch yet."""


async def live_targets(
    connection: asyncpg.Connection, projections: Sequence[Projection]
) -> list[Target]:
    """The live version of each projection."""
    known = await version_states(connection, [p.name for p in projections])
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
    known = await version_states(connection, [projection.name])
    for version, state in known[projection.name].items():
        if state == "building":
            return Target(projection, version)
    return None


async def create_building(connection: asyncpg.Connection, live: Target) -> Target:
    """A new, empty version next to ``live``: same tables, no secondary indexes yet, and the
    keys of the tables it upserts into (an append-only table's key comes with the indexes)."""
    known = await version_states(connection, [live.name])
    new = Target(live.projection, max(known[live.name]) + 1)
    await connection.execute(f'CREATE SCHEMA "{new.schema}"')
    for table in live.projection.tables:
        await connection.execute(
            f'CREATE TABLE "{new.schema}"."{table.name}" (LIKE "{live.schema}"."{table.name}" '
            "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING IDENTITY)"
        )
        if not is_append_only(table):
            await _add_missing_keys(connection, live, new, table)
    await add_version(connection, new, "building")
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


async def switch(connection: asyncpg.Connection, live: Target, new: Target, topic: str) -> None:
    """Make ``new`` the version readers see, in the caller's transaction.

    Waits for batches in flight on either version (their ``FOR SHARE`` locks), then refuses
    with ``NotCaughtUp`` if ``new`` is behind ``live`` anywhere: a reader holding a consistency
    token from the live version must never see an older state after the switch.
    """
    found = await lock_version_states(connection, live.name, [live.version, new.version])
    if found != {live.version: "live", new.version: "building"}:
        raise NotCaughtUp(f"{new} cannot switch: versions are now {found}")
    ids = await topic_ids(connection, [live, new], topic)
    # A live version built from an earlier topic of this name is no measure (a rebuild after
    # the topic was deleted and created again is how it is left behind).
    replaced = live in ids and new in ids and ids[live] != ids[new]
    lagging = {} if replaced else await behind(connection, live, new, topic)
    if lagging:
        raise NotCaughtUp(f"{new} is behind {live} in partitions {sorted(lagging)}")
    # Old first: the unique index on a projection's live version is checked row by row, so one
    # UPDATE of both rows fails whenever it reaches the new version's row first.
    for target, state in ((live, "retired"), (new, "live")):
        await set_version_state(connection, target, state, switched=True)
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
    state = (await lock_version_states(connection, target.name, [target.version])).get(
        target.version
    )
    if state == "live":
        raise VersionIsLive(
            f"{target} is live (queries read it): it cannot be dropped; to replace it, "
            f"rebuild it: orders projections rebuild {target.name}"
        )
    await connection.execute(f'DROP SCHEMA IF EXISTS "{target.schema}" CASCADE')
    await forget_version(connection, target)
    await set_version_state(connection, target, "dropped")


async def reset(connection: asyncpg.Connection, target: Target) -> None:
    """Empty a version's tables and put its checkpoints back to 0, in the caller's transaction.

    The registry row is locked first, so no batch of a running projector is half-way.
    """
    await lock_version_states(connection, target.name, [target.version])
    names = ", ".join(f'"{target.schema}"."{table.name}"' for table in target.projection.tables)
    await connection.execute(f"TRUNCATE {names}")
    await reset_checkpoints(connection, target)
