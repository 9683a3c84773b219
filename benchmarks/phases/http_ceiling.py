"""The HTTP ceiling: a bare Litestar endpoint, same server settings, load generator and levels."""

from __future__ import annotations

import logging
import os

from benchmarks import httpload
from benchmarks.context import HOST, Context, empty_log_file
from benchmarks.loads import measured, measured_open_loop
from benchmarks.meters import CpuMeter, cpu_details
from benchmarks.report import Row, ms, n

_log = logging.getLogger("benchmarks")


async def http_ceiling(ctx: Context) -> None:
    """A bare Litestar endpoint, same server settings, same load generator and levels."""
    plan = ctx.plan
    with httpload.bare_process(log_file=empty_log_file("bare-http")) as bare:
        await httpload.wait_ready(bare, timeout=60)
        workload = httpload.Workload(ctx.callers.customers)
        meter = CpuMeter({"bare http": bare.process.pid, "loadgen": os.getpid()})
        await httpload.open_loop(HOST, bare.port, workload, rate=200, duration=1.0, connections=32)
        runs = []
        for rate in plan.http_rates:
            _log.info("HTTP ceiling, open loop: %d requests/s", rate)
            load = await measured_open_loop(meter, bare.port, workload, rate, plan)
            ctx.ceiling[rate] = load
            runs.append(load.summary())
        clients = max(plan.closed_clients)
        closed = await measured(
            meter,
            httpload.closed_loop(
                HOST, bare.port, workload, clients=clients, duration=plan.http_seconds
            ),
        )
        ctx.ceiling_closed = closed
        runs.append(closed.summary())
    ctx.results["http_ceiling"] = {"runs": runs, "per_second": closed.achieved_per_second}
    ctx.rows.append(
        Row(
            f"HTTP ceiling: bare Litestar, closed loop, {clients} clients",
            n(closed.achieved_per_second, "req/s"),
            "(a limit)",
            details=f"p50 {ms(closed.percentile(0.5))}, p99 {ms(closed.percentile(0.99))}; "
            + "; ".join(
                f"open loop {rate}/s: p99 {ms(load.percentile(0.99))}"
                for rate, load in ctx.ceiling.items()
            )
            + f"; {cpu_details(closed.cpu)}",
        )
    )
