"""(a) again with two projector processes in one consumer group: what scaling out gives."""

from __future__ import annotations

import contextlib
import logging
import uuid

from benchmarks import projector
from benchmarks.context import Context, empty_log_file
from benchmarks.meters import CpuMeter, cpu_details
from benchmarks.report import Row, div, n, ratio
from service.infra.database import create_engine

_log = logging.getLogger("benchmarks")


async def projector_scale_out(ctx: Context) -> None:
    """(a) again, with TWO projector processes in one consumer group (the partitions split
    between them), into a fresh database: what scaling out on the same machine gives."""
    filled = ctx.require_topic()
    bootstrap = ctx.infra.kafka_bootstrap_servers
    consume_rate = ctx.limit("raw_consume")
    async with projector.fresh_database(ctx.infra.database_url) as database_url:
        pass
    group_prefix = f"bench-{uuid.uuid4().hex[:8]}"
    logs = [empty_log_file("projector-1"), empty_log_file("projector-2")]
    engine = create_engine(database_url, pool_size=1)
    try:
        _log.info("projector: %d events, two processes in one group", filled.events)
        with contextlib.ExitStack() as stack:
            first, second = (
                stack.enter_context(
                    projector.projector_process(
                        bootstrap=bootstrap,
                        database_url=database_url,
                        topic=ctx.topic,
                        log_file=log,
                        group_prefix=group_prefix,
                    )
                )
                for log in logs
            )
            meter = CpuMeter(
                ctx.infra_pids() | {"projector 1": first.pid, "projector 2": second.pid}
            )
            meter.start()
            run = await projector.follow(
                engine,
                topic=ctx.topic,
                offsets=filled.offsets,
                process=first,
                log_file=logs[0],
                timeout=ctx.plan.projector_timeout,
                others=[(second, logs[1])],
            )
            cpu = meter.stop()
    finally:
        await engine.dispose()
    sustained = run.sustained_per_second()
    ctx.results["projector_two_processes"] = {
        "events": run.events,
        "finished": run.finished,
        "seconds": run.seconds,
        "per_second": sustained,
        "overall_per_second": run.overall_per_second(),
        "ratio_to_raw_consume": div(sustained, consume_rate),
        "cpu_percent_of_one_core": cpu,
    }
    state = (
        f"{run.events:,} events in {run.seconds:.1f} s"
        if run.finished
        else f"NOT caught up: {run.applied:,} of {run.events:,} events in {run.seconds:.0f} s"
    )
    ctx.rows.append(
        Row(
            "(a) Projector scaled out: 2 processes, one consumer group, sustained",
            n(sustained, "events/s"),
            n(consume_rate, "events/s (raw consume)"),
            ratio(sustained, consume_rate),
            f"{state}; overall {run.overall_per_second():,.0f}/s from process start; "
            f"{cpu_details(cpu)}",
        )
    )
