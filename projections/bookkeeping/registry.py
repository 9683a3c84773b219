"""The version registry: which version of each projection is live, building or retired.

Each function runs in the caller's transaction, on its raw asyncpg connection.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from projections.projection import Target


async def version_states(
    connection: asyncpg.Connection, names: Sequence[str], *, states: Sequence[str] | None = None
) -> dict[str, dict[int, str]]:
    """projection -> {version: state}, for the named projections (only ``states``, if given)."""
    rows = await connection.fetch(
        "SELECT projection, version, state FROM projection_versions "
        "WHERE projection = ANY($1::text[]) AND ($2::text[] IS NULL OR state = ANY($2::text[])) "
        "ORDER BY projection, version",
        list(names),
        None if states is None else list(states),
    )
    found: dict[str, dict[int, str]] = {name: {} for name in names}
    for row in rows:
        found[row["projection"]][row["version"]] = row["state"]
    return found


async def share_version_states(
    connection: asyncpg.Connection, names: Sequence[str]
) -> dict[tuple[str, int], str]:
    """(projection, version) -> state, locked FOR SHARE: no switch until the transaction ends."""
    rows = await connection.fetch(
        "SELECT projection, version, state FROM projection_versions "
        "WHERE projection = ANY($1::text[]) FOR SHARE",
        list(names),
    )
    return {(row["projection"], row["version"]): row["state"] for row in rows}


async def lock_version_states(
    connection: asyncpg.Connection, name: str, versions: Sequence[int]
) -> dict[int, str]:
    """version -> state of these versions of ``name``, locked FOR UPDATE (in version order)."""
    rows = await connection.fetch(
        "SELECT version, state FROM projection_versions WHERE projection = $1 "
        "AND version = ANY($2::int[]) ORDER BY version FOR UPDATE",
        name,
        list(versions),
    )
    return {row["version"]: row["state"] for row in rows}


async def add_version(connection: asyncpg.Connection, target: Target, state: str) -> None:
    """Register ``target`` in ``state``."""
    await connection.execute(
        "INSERT INTO projection_versions (projection, version, state) VALUES ($1, $2, $3)",
        target.name,
        target.version,
        state,
    )


async def set_version_state(
    connection: asyncpg.Connection, target: Target, state: str, *, switched: bool = False
) -> None:
    """Put ``target`` in ``state`` (``switched``: also record the time of the switch)."""
    await connection.execute(
        "UPDATE projection_versions SET state = $3"
        f"{', switched_at = now()' if switched else ''} WHERE projection = $1 AND version = $2",
        target.name,
        target.version,
        state,
    )
