"""(c) The command API: the writer alone in-process, then over HTTP in open and closed loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from typing import Any

from benchmarks import events, httpload, writer_direct
from benchmarks.auth_cost import PAUSE_S, Alternated, Compared, alternate, cpu_per_command_us, side
from benchmarks.callers import NEVER_BITES, NO_SHEDDING
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
    with contextlib.ExitStack() as stack:
        apis = {
            auth: stack.enter_context(
                httpload.api_process(
                    bootstrap=infra.kafka_bootstrap_servers,
                    database_url=infra.database_url,
                    topic=topic if auth else f"{topic}.auth-off",
                    log_file=empty_log_file("api" if auth else "api-auth-off"),
                    settings=ctx.callers.environment(auth=auth, rate_limit=NEVER_BITES)
                    | NO_SHEDDING,
                )
            )
            for auth in (True, False)
        }
        for auth, process in apis.items():
            ready = await httpload.wait_ready(process, timeout=90)
            _log.info(
                "API (auth %s) ready after %.1f s on port %d", side(auth), ready, process.port
            )
        pids = {auth: process.process.pid for auth, process in apis.items()}
        meters = {
            auth: CpuMeter(
                ctx.infra_pids()
                | {"api": pids[auth], "idle api": pids[not auth], "loadgen": os.getpid()}
            )
            for auth in (True, False)
        }
        workloads = {auth: httpload.Workload(ctx.callers.customers) for auth in (True, False)}
        introduced: dict[bool, httpload.LoadResult] = {}
        for auth in (True, False):
            _log.info("auth %s: %d customers' first orders", side(auth), plan.customers)
            introduced[auth] = await measured(
                meters[auth],
                httpload.introduce(
                    HOST,
                    apis[auth].port,
                    workloads[auth],
                    clients=max(plan.closed_clients),
                    timeout=120,
                ),
            )
            await httpload.open_loop(
                HOST, apis[auth].port, workloads[auth], rate=200, duration=1.0, connections=32
            )
        compared = await _auth_on_and_off(ctx, apis, workloads, meters)
        api, workload, meter = apis[True], workloads[True], meters[True]
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
        for auth, process in apis.items():
            if process.process.poll() is not None:
                raise RuntimeError(f"the API (auth {side(auth)}) died; see {process.log_file}")
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
    _report_auth_cost(ctx, introduced, *compared)
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


async def _auth_on_and_off(
    ctx: Context,
    apis: dict[bool, httpload.ApiProcess],
    workloads: dict[bool, httpload.Workload],
    meters: dict[bool, CpuMeter],
) -> tuple[Compared, Compared]:
    """The sustained closed loop, then an open loop well below it, auth on and off in turn."""
    plan = ctx.plan
    clients = max(plan.closed_clients)

    async def measure(auth: bool) -> tuple[httpload.LoadResult, httpload.LoadResult]:
        port, workload, meter = apis[auth].port, workloads[auth], meters[auth]
        closed = await measured(
            meter,
            httpload.closed_loop(HOST, port, workload, clients=clients, duration=plan.auth_seconds),
        )
        await asyncio.sleep(PAUSE_S)
        opened = await measured(
            meter,
            httpload.open_loop(
                HOST,
                port,
                workload,
                rate=plan.auth_open_rate,
                duration=plan.auth_seconds,
                connections=plan.http_connections,
            ),
        )
        return closed, opened

    _log.info(
        "command API, auth on and off in turn: %d clients closed loop, then %d/s open loop, "
        "%.0f s each",
        clients,
        plan.auth_open_rate,
        plan.auth_seconds,
    )
    runs = await alternate(measure, runs=plan.auth_runs)
    closed = Compared(Alternated([(auth, pair[0]) for auth, pair in runs.runs]))
    opened = Compared(Alternated([(auth, pair[1]) for auth, pair in runs.runs]))
    return closed, opened


def _report_auth_cost(
    ctx: Context,
    introduced: dict[bool, httpload.LoadResult],
    closed: Compared,
    opened: Compared,
) -> None:
    plan = ctx.plan
    clients = max(plan.closed_clients)
    first = {auth: introduced[auth] for auth in (True, False)}
    ctx.results["auth_cost"] = ctx.results.get("auth_cost", {}) | {
        "customers": plan.customers,
        "rate_limit": NEVER_BITES.environment(),
        "command_api_first_requests": {
            side(auth): load.summary() | {"api_cpu_us_per_command": cpu_per_command_us(load)}
            for auth, load in first.items()
        },
        "command_api_closed_loop": closed.summary(),
        "command_api_open_loop": opened.summary(),
    }
    on, off = closed.on, closed.off
    rate_ratio = closed.rate_ratio()
    ctx.rows.append(
        Row(
            f"(c) Auth on / off: closed loop, {clients} clients (sustained)",
            f"{n(on.achieved_per_second)} / {n(off.achieved_per_second, 'cmd/s')}",
            "auth off, same run",
            ratio(on.achieved_per_second, off.achieved_per_second),
            closed.details()
            + f"; {plan.customers:,} customers, one token each; rate limit "
            + NEVER_BITES.describe(),
        )
    )
    on, off = opened.on, opened.off
    added = opened.p50_added_s()
    ctx.rows.append(
        Row(
            f"(c) Auth on / off: open loop, offered {plan.auth_open_rate}/s",
            f"p50 {ms(on.percentile(0.5))} / {ms(off.percentile(0.5))} ({added * 1000:+.1f} ms), "
            f"p99 {ms(on.percentile(0.99))} / {ms(off.percentile(0.99))}",
            "auth off, same run",
            ratio(on.percentile(0.5), off.percentile(0.5)),
            opened.details(),
        )
    )
    on, off = first[True], first[False]
    ctx.rows.append(
        Row(
            "(c) Auth on / off: each customer's first order (its token checked once)",
            f"{n(on.achieved_per_second)} / {n(off.achieved_per_second, 'cmd/s')}",
            "auth off, same run",
            ratio(on.achieved_per_second, off.achieved_per_second),
            f"{plan.customers:,} creates, {clients} clients, closed loop, on then off (a warm-up,"
            f" not alternated); p50 {ms(on.percentile(0.5))} / {ms(off.percentile(0.5))}; API "
            f"CPU per command {cpu_per_command_us(on):,.0f} / {cpu_per_command_us(off):,.0f} us",
        )
    )
    ctx.targets += [
        Target(
            "Auth cost: sustained commands/s, auth on / off",
            ">= 0.90",
            f"{rate_ratio:.2f}",
            None if rate_ratio != rate_ratio else rate_ratio >= 0.90,
        ),
        Target(
            f"Auth cost: p50 added at {plan.auth_open_rate:,}/s offered",
            "<= 2 ms",
            f"{added * 1000:+.1f} ms",
            None if added != added else added <= 0.002,
        ),
    ]
