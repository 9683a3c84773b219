"""The peer: a tutorial-style projector on the same topic, and ours as a multiple of it."""

from __future__ import annotations

import logging
import os

from benchmarks import naive_projector, projector
from benchmarks.context import Context
from benchmarks.meters import CpuMeter, cpu_details
from benchmarks.report import Row, div, n, ratio, times

_log = logging.getLogger("benchmarks")


async def naive_peer(ctx: Context) -> None:
    """A tutorial-style projector on the same topic; ours as a multiple of it."""
    ctx.require_topic()
    plan = ctx.plan
    async with projector.fresh_database(ctx.infra.database_url) as database_url:
        _log.info(
            "naive projector: up to %d events or %.0f s", plan.naive_events, plan.naive_seconds
        )
        meter = CpuMeter(ctx.infra_pids() | {"bench (naive)": os.getpid()})
        meter.start()
        run = await naive_projector.run(
            ctx.infra.kafka_bootstrap_servers,
            projector.asyncpg_dsn(database_url),
            ctx.topic,
            max_events=plan.naive_events,
            max_seconds=plan.naive_seconds,
        )
        cpu = meter.stop()
        equal = different = 0
        if ctx.projector_database:  # the same orders, as our projector wrote them in (a)
            equal, different = await naive_projector.compare_with(
                projector.asyncpg_dsn(database_url), projector.asyncpg_dsn(ctx.projector_database)
            )
    ctx.naive_run = run
    ours = ctx.limit("projector")
    consume_rate = ctx.limit("raw_consume")
    ctx.results["naive_peer"] = {
        "events": run.events,
        "seconds": run.seconds,
        "join_seconds": run.join_seconds,
        "per_second": run.per_second,
        "ours_multiple": div(ours, run.per_second),
        "cpu_percent_of_one_core": cpu,
        "samples": run.samples,
        "orders_equal_to_ours": equal,
        "orders_different_from_ours": different,
    }
    check = f"its orders rows equal ours for {equal:,} orders" + (
        f", DIFFER for {different:,}" if different else ""
    )
    ctx.rows += [
        Row(
            "Peer: naive projector (1 tx + 1 offset commit per event, orders table only)",
            n(run.per_second, "events/s"),
            n(consume_rate, "events/s (raw consume)"),
            ratio(run.per_second, consume_rate),
            f"{run.events:,} events in {run.seconds:.1f} s; {check}; {cpu_details(cpu)}",
        ),
        Row(
            "Ours (a) as a multiple of the peer",
            times(ours, run.per_second),
            details="ours maintains 4 read models exactly-once, the peer 1",
        ),
    ]
