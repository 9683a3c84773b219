"""(f) Overload: commands offered open loop at twice the sustained rate of (c).

The API runs as deployed: auth on, the service's default rate limit and writer queue limits
(nothing set). Arrivals are independent of the answers (``benchmarks.overload``), so what the
API does past its capacity shows: it should accept what it can at a bounded latency and refuse
the rest at once (503 with Retry-After), not queue without bound.
"""

from __future__ import annotations

import logging
import os
import uuid

from benchmarks import httpload, overload
from benchmarks.callers import RateLimit
from benchmarks.context import HOST, Context, empty_log_file
from benchmarks.loads import metering
from benchmarks.meters import CpuMeter, cpu_details
from benchmarks.report import Row, ms, n, ratio

_log = logging.getLogger("benchmarks")

OVERLOAD = 2.0  # times the sustained rate


async def command_overload(ctx: Context) -> None:
    """(f) open loop at twice (c)'s sustained rate: accepted, refused, how fast."""
    plan, infra = ctx.plan, ctx.infra
    sustained: float = ctx.results.get("command_api", {}).get("per_second", 0.0)
    if not sustained:
        raise RuntimeError("needs the command API's sustained rate, which was not measured")
    rate = OVERLOAD * sustained
    rate_limit = RateLimit.service_default()
    topic = f"bench.overload.{uuid.uuid4().hex[:8]}"
    with httpload.api_process(
        bootstrap=infra.kafka_bootstrap_servers,
        database_url=infra.database_url,
        topic=topic,
        log_file=empty_log_file("api-overload"),
        settings=ctx.callers.environment(auth=True, rate_limit=rate_limit),
    ) as api:
        await httpload.wait_ready(api, timeout=90)
        workload = httpload.Workload(ctx.callers.customers, seed=13)
        await httpload.introduce(
            HOST, api.port, workload, clients=max(plan.closed_clients), timeout=120
        )
        await httpload.open_loop(HOST, api.port, workload, rate=200, duration=1.0, connections=32)
        _log.info(
            "overload: %.0f commands/s (%.0fx sustained) open loop for %.0f s",
            rate,
            OVERLOAD,
            plan.overload_seconds,
        )
        meter = CpuMeter(ctx.infra_pids() | {"api": api.process.pid, "loadgen": os.getpid()})
        with metering(meter) as metered:
            result = await overload.offer(
                HOST,
                api.port,
                workload,
                rate=rate,
                duration=plan.overload_seconds,
                max_connections=plan.overload_connections,
            )
        result.cpu = metered.cpu
        if api.process.poll() is not None:
            raise RuntimeError(f"the API died under overload; see {api.log_file}")
    queue_limit = os.environ.get("ORDERS_MAX_QUEUE_DELAY_MS") or "unset (the default)"
    ctx.results["overload"] = result.summary() | {
        "sustained_per_second": sustained,
        "rate_limit": rate_limit.environment(),
        "ORDERS_MAX_QUEUE_DELAY_MS": queue_limit,
    }
    accepted_per_s = result.accepted_per_second
    ctx.rows.append(
        Row(
            f"(f) Overload: offered {n(rate)}/s ({OVERLOAD:.0f}x sustained) open loop for "
            f"{plan.overload_seconds:.0f} s: accepted",
            f"{_share(result.share('200', '201'))}, p50 {ms(result.percentile(0.5, '200', '201'))}"
            f", p99 {ms(result.percentile(0.99, '200', '201'))}",
            f"sustained {n(sustained, 'cmd/s')} (c)",
            ratio(accepted_per_s, sustained),
            f"{result.accepted:,} of {result.due:,} commands, {n(accepted_per_s)}/s from the "
            f"first arrival to the last answer, {result.drained_s:.1f} s after the last arrival; "
            f"{cpu_details(result.cpu)}",
        )
    )
    others = ", ".join(f"HTTP {k} x{v}" for k, v in result.other_statuses().items())
    errors = ", ".join(f"{k} x{v}" for k, v in sorted(result.errors.items()))
    missing = ", ".join(f"{k} x{v}" for k, v in sorted(result.without_retry_after.items()))
    ctx.rows.append(
        Row(
            "(f) Overload: refused",
            f"503 {_share(result.share('503'))}, p50 {ms(result.percentile(0.5, '503'))}, p99 "
            f"{ms(result.percentile(0.99, '503'))}; 429 {_share(result.share('429'))}",
            "",
            "",
            f"other statuses {others or '0'}; no answer {errors or '0'}; unfinished "
            f"{result.unfinished:,}; without Retry-After {missing or '0'}; 429 p99 "
            f"{ms(result.percentile(0.99, '429'))}; {result.connections:,} connections (at most "
            f"{plan.overload_connections:,}); load generator late by p50 "
            f"{ms(overload.percentile(result.lateness, 0.5))}, p99 "
            f"{ms(overload.percentile(result.lateness, 0.99))}; rate limit "
            f"{rate_limit.describe()}; ORDERS_MAX_QUEUE_DELAY_MS {queue_limit}",
        )
    )


def _share(fraction: float) -> str:
    return "n/a" if fraction != fraction else f"{fraction:.1%}"
