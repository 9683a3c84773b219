"""The PostgreSQL limits: asyncpg COPY and batched unnest upserts of orders-shaped rows."""

from __future__ import annotations

import logging

from benchmarks import projector, raw
from benchmarks.context import Context
from benchmarks.report import Row, n, ratio

_log = logging.getLogger("benchmarks")


async def limits_postgres(ctx: Context) -> None:
    """asyncpg COPY and batched unnest upserts of orders-shaped rows."""
    rows = ctx.plan.pg_rows
    async with projector.fresh_database(ctx.infra.database_url) as database_url:
        dsn = projector.asyncpg_dsn(database_url)
        _log.info("raw COPY: %d rows", rows)
        copied = await raw.copy_rows(dsn, count=rows, batch=5000, timeout=300)
        _log.info("raw upsert: %d rows, twice", rows)
        upserted = await raw.upsert_rows(dsn, count=rows, batch=5000, timeout=300)
    ctx.results["raw_copy"] = {
        "rows": copied.count,
        "seconds": copied.seconds,
        "per_second": copied.per_second,
    }
    ctx.results["raw_upsert"] = {
        "rows": rows,
        "insert_per_second": upserted.inserted.per_second,
        "update_per_second": upserted.updated.per_second,
        "per_second": upserted.per_second,
    }
    ctx.rows += [
        Row(
            "Raw COPY (asyncpg copy_records_to_table)",
            n(copied.per_second, "rows/s"),
            "(a limit)",
            details=f"{rows:,} orders rows into a copy of the table with its indexes, "
            "5,000 rows per transaction",
        ),
        Row(
            "Raw upsert (INSERT ... SELECT * FROM unnest(...) ON CONFLICT DO UPDATE)",
            n(upserted.per_second, "rows/s"),
            n(copied.per_second, "rows/s (COPY)"),
            ratio(upserted.per_second, copied.per_second),
            f"one statement per 5,000 rows; new keys {upserted.inserted.per_second:,.0f}/s, "
            f"existing keys (conflict path) {upserted.updated.per_second:,.0f}/s",
        ),
    ]
