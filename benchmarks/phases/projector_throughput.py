"""(a) The projector over the N events in a process of its own, and (e) that process's memory."""

from __future__ import annotations

import logging
import os

from benchmarks import projector
from benchmarks.context import Context, empty_log_file
from benchmarks.meters import CpuMeter, cpu_details, rss
from benchmarks.report import Row, Target, div, n, ratio
from service.infra.database import create_engine

_log = logging.getLogger("benchmarks")


async def projector_throughput(ctx: Context) -> None:
    """(a) all projections in their own process over the N events; (e) that process's RSS."""
    filled = ctx.require_topic()
    bootstrap = ctx.infra.kafka_bootstrap_servers
    consume_rate = ctx.limit("raw_consume")
    async with projector.fresh_database(ctx.infra.database_url) as database_url:
        ctx.projector_database = database_url
    await projector.warm_group_coordinator(bootstrap, ctx.topic)
    log_file = empty_log_file("projector")
    engine = create_engine(database_url, pool_size=1)
    try:
        _log.info("projector: %d events, all projections, own process", filled.events)
        with projector.projector_process(
            bootstrap=bootstrap, database_url=database_url, topic=ctx.topic, log_file=log_file
        ) as process:
            meter = CpuMeter(ctx.infra_pids() | {"projector": process.pid, "bench": os.getpid()})
            meter.start()
            run = await projector.follow(
                engine,
                topic=ctx.topic,
                offsets=filled.offsets,
                process=process,
                log_file=log_file,
                timeout=ctx.plan.projector_timeout,
            )
            cpu = meter.stop()
            rss_after = rss(process.pid)
    finally:
        await engine.dispose()
    ctx.projector_run = run
    sustained = run.sustained_per_second()
    overall = run.overall_per_second()
    ctx.results["projector"] = {
        "events": run.events,
        "applied": run.applied,
        "finished": run.finished,
        "seconds": run.seconds,
        "first_progress_seconds": run.first_progress_seconds,
        "per_second": sustained,
        "sustained_10_90_per_second": sustained,
        "overall_per_second": overall,
        "ratio_to_raw_consume": div(sustained, consume_rate),
        "caught_up_seconds": run.caught_up,
        "cpu_percent_of_one_core": cpu,
        "samples_slowest_projection": run.samples,
        "samples_mean_of_projections": run.mean_samples,
    }
    ctx.results["projector_memory"] = {
        "rss_after_bytes": rss_after,
        "rss_max_bytes": max(run.rss_bytes_samples, default=0),
    }
    state = (
        f"{run.events:,} events in {run.seconds:.1f} s"
        if run.finished
        else f"NOT caught up: {run.applied:,} of {run.events:,} events in {run.seconds:.0f} s"
    )
    slowest = (
        max(run.caught_up, key=run.caught_up.__getitem__) if run.caught_up else "none caught up"
    )
    ctx.rows += [
        Row(
            f"(a) Projector, all {run.projections} projections, exactly-once, sustained",
            n(sustained, "events/s"),
            n(consume_rate, "events/s (raw consume)"),
            ratio(sustained, consume_rate),
            f"{state}; rate between 10% and 90% of the events; overall {overall:,.0f}/s from "
            f"process start (first checkpoint after {run.first_progress_seconds:.1f} s); "
            f"slowest {slowest}; {cpu_details(cpu)}",
        ),
        Row(
            "(e) Projector memory after (a)",
            n(rss_after / 2**20, "MiB RSS"),
            details=f"peak sampled {max(run.rss_bytes_samples, default=0) / 2**20:,.0f} MiB",
        ),
    ]
    ctx.targets += [
        Target(
            "Projector sustained",
            ">= 25,000 events/s",
            n(sustained, "events/s"),
            run.finished and sustained >= 25_000,
        ),
        Target(
            "Projector vs raw consume",
            ">= 0.4x",
            f"{div(sustained, consume_rate) or 0:.2f}x",
            run.finished and sustained >= 0.4 * consume_rate > 0,
        ),
    ]
