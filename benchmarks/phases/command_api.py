"""(c) The command API: the writer alone in-process, then over HTTP in open and closed loops."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any

from benchmarks import events, httpload, writer_direct
from benchmarks.context import HOST, Context, empty_log_file
from benchmarks.loads import latencies, measured, measured_open_loop
from benchmarks.meters import CpuMeter
from benchmarks.report import Row, Target, ms, n, ratio

_log = logging.getLogger("benchmarks")


async def command_api(ctx: Context) -> None:
    """(c) the writer alone, then the API over HTTP: open loop levels, closed loop."""
    plan, infra = ctx.plan, ctx.infra
    produce_rate = ctx.limit("raw_produce")
    topic = f"bench.api.{uuid.uuid4().hex[:8]}"
    counts = (1, max(plan.closed_clients))
    _log.info("writer.submit in-process: %s clients, %.0f s each", counts, plan.http_seconds)
    await events.create_topic(infra.kafka_bootstrap_servers, f"{topic}.direct")
    direct = await writer_direct.closed_loop(
        infra.kafka_bootstrap_servers,
        f"{topic}.direct",
        clients=counts,
        duration=plan.http_seconds,
        warm_up=1.0,
        timeout=len(counts) * plan.http_seconds + 120,
    )
    ctx.results["writer_direct"] = [run.summary() for run in direct]
    for run in direct:
        ctx.rows.append(
            Row(
                f"Writer.submit in-process (no HTTP), {run.connections} client(s), closed loop",
                n(run.achieved_per_second, "cmd/s"),
                n(produce_rate, "events/s (raw produce)"),
                ratio(run.achieved_per_second, produce_rate),
                latencies(run),
            )
        )
    runs: list[dict[str, Any]] = []
    ctx.results["http"] = runs
    with httpload.api_process(
        bootstrap=infra.kafka_bootstrap_servers,
        database_url=infra.database_url,
        topic=topic,
        log_file=empty_log_file("api"),
    ) as api:
        ready = await httpload.wait_ready(api, timeout=90)
        _log.info("API ready after %.1f s on port %d", ready, api.port)
        workload = httpload.Workload()
        meter = CpuMeter(ctx.infra_pids() | {"api": api.process.pid, "loadgen": os.getpid()})
        await httpload.open_loop(HOST, api.port, workload, rate=200, duration=1.0, connections=32)
        for rate in plan.http_rates:
            _log.info("command API, open loop: %d commands/s for %.0f s", rate, plan.http_seconds)
            load = await measured_open_loop(meter, api.port, workload, rate, plan)
            ctx.api_open[rate] = load
            runs.append(load.summary())
            ceiling = ctx.ceiling.get(rate)
            ctx.rows.append(
                Row(
                    f"(c) Command API, open loop, offered {rate}/s",
                    f"{n(load.achieved_per_second, 'cmd/s')}, p50 {ms(load.percentile(0.5))}, "
                    f"p99 {ms(load.percentile(0.99))}",
                    f"{rate}/s offered; ceiling p99 "
                    + (ms(ceiling.percentile(0.99)) if ceiling else "n/a"),
                    ratio(load.achieved_per_second, rate),
                    latencies(load),
                )
            )
            await asyncio.sleep(1.0)  # let the writer's queue drain between levels
        closed: list[tuple[int, httpload.LoadResult]] = []
        for clients in plan.closed_clients:
            _log.info("command API, closed loop: %d clients for %.0f s", clients, plan.http_seconds)
            load = await measured(
                meter,
                httpload.closed_loop(
                    HOST, api.port, workload, clients=clients, duration=plan.http_seconds
                ),
            )
            runs.append(load.summary())
            closed.append((clients, load))
            await asyncio.sleep(1.0)
        if api.process.poll() is not None:
            raise RuntimeError("the API died during the run; see bench-results/api.log")
    ceiling_rate = ctx.ceiling_closed.achieved_per_second if ctx.ceiling_closed else 0.0
    best = max(load.achieved_per_second for _, load in closed)
    for clients, load in closed:
        sustained = " (sustained: the best)" if load.achieved_per_second == best else ""
        ctx.rows.append(
            Row(
                f"(c) Command API, closed loop, {clients} clients{sustained}",
                n(load.achieved_per_second, "cmd/s"),
                n(ceiling_rate, "req/s (HTTP ceiling)"),
                ratio(load.achieved_per_second, ceiling_rate),
                latencies(load) + f"; raw produce {produce_rate:,.0f} events/s",
            )
        )
    ctx.results["command_api"] = {"per_second": best}
    at_1000 = ctx.api_open.get(1000)
    ctx.targets += [
        Target("Command API sustained", ">= 2,000 cmd/s", n(best, "cmd/s"), best >= 2000),
        Target(
            "Command API p99 at 1,000/s offered",
            "<= 50 ms",
            ms(at_1000.percentile(0.99)) if at_1000 else "n/a",
            None
            if at_1000 is None
            else at_1000.percentile(0.99) <= 0.050 and at_1000.error_count == 0,
        ),
    ]
