"""(d) Command-to-queryable: API and projector in their own processes; a command, then its query."""

from __future__ import annotations

import logging
import os
import uuid

from benchmarks import httpload, projector, queryable
from benchmarks.context import HOST, Context, empty_log_file
from benchmarks.loads import metering
from benchmarks.meters import CpuMeter, cpu_details
from benchmarks.report import Row, Target, ms

_log = logging.getLogger("benchmarks")


async def command_to_queryable(ctx: Context) -> None:
    """(d) API and projector in their own processes; each command then its consistent query."""
    plan, infra = ctx.plan, ctx.infra
    topic = f"bench.visible.{uuid.uuid4().hex[:8]}"
    async with projector.fresh_database(infra.database_url) as database_url:
        pass
    with httpload.api_process(
        bootstrap=infra.kafka_bootstrap_servers,
        database_url=database_url,
        topic=topic,
        log_file=empty_log_file("api-queryable"),
    ) as api:
        await httpload.wait_ready(api, timeout=90)  # the API creates the topic
        with projector.projector_process(
            bootstrap=infra.kafka_bootstrap_servers,
            database_url=database_url,
            topic=topic,
            log_file=empty_log_file("projector-queryable"),
        ) as process:
            workload = httpload.Workload(seed=9)
            await queryable.warm_up(HOST, api.port, workload, timeout=60)
            meter = CpuMeter(
                ctx.infra_pids()
                | {"api": api.process.pid, "projector": process.pid, "loadgen": os.getpid()}
            )
            _log.info(
                "command-to-queryable: %d commands/s for %.0f s",
                plan.queryable_rate,
                plan.queryable_seconds,
            )
            with metering(meter) as metered:
                result = await queryable.open_loop(
                    HOST,
                    api.port,
                    workload,
                    rate=plan.queryable_rate,
                    duration=plan.queryable_seconds,
                    connections=plan.http_connections,
                )
            cpu = metered.cpu
            if process.poll() is not None or api.process.poll() is not None:
                raise RuntimeError("the API or the projector died; see bench-results/*.log")
    ctx.visible = result
    ctx.results["queryable"] = result.summary() | {
        "cpu_percent_of_one_core": cpu,
        "loadgen_gc_longest_ms": metered.gc_longest_s * 1000,
    }
    commands = result.commands
    ceiling = ctx.ceiling.get(plan.queryable_rate)
    floor = ceiling.percentile(0.99) if ceiling else float("nan")
    p99 = result.percentile(0.99)
    failures = ", ".join(f"{k} x{v}" for k, v in sorted(result.failures.items())) or "0"
    ctx.rows.append(
        Row(
            f"(d) Command-to-queryable at {plan.queryable_rate} cmd/s offered",
            f"p50 {ms(result.percentile(0.5))}, p99 {ms(p99)}",
            f"HTTP ceiling p99 {ms(floor)}",
            f"{p99 / floor:.0f}x" if floor == floor and floor > 0 and p99 == p99 else "",
            f"{len(result.visible):,} queries answered 200, {result.retries} retried after 503, "
            f"failures {failures}; commands {commands.achieved_per_second:,.0f}/s, command "
            f"p99 {ms(commands.percentile(0.99))}; load generator's longest GC pause "
            f"{ms(metered.gc_longest_s)}; {cpu_details(cpu)}",
        )
    )
    ctx.targets.append(
        Target(
            f"Command-to-queryable p99 at {plan.queryable_rate}/s",
            "<= 100 ms",
            ms(p99),
            p99 <= 0.100 and not result.failures and commands.error_count == 0,
        )
    )
