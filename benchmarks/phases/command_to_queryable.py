"""(d) Command-to-queryable: API and projector in their own processes; a command, then its query.

Two such pairs run side by side, one with auth on, one with ``ORDERS_AUTH=off``, each with its
own topic and database, measured in turn (``benchmarks.auth_cost``); (d)'s own figures are the
runs with auth on, as the service is deployed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import dataclass
from subprocess import Popen

from benchmarks import httpload, projector, queryable
from benchmarks.auth_cost import Alternated, alternate, side
from benchmarks.callers import NEVER_BITES, NO_SHEDDING
from benchmarks.context import HOST, Context, empty_log_file
from benchmarks.loads import metering
from benchmarks.meters import CpuMeter, cpu_details
from benchmarks.report import Row, Target, ms, n, ratio

_log = logging.getLogger("benchmarks")


@dataclass(frozen=True)
class _Stack:
    api: httpload.ApiProcess
    projector: Popen[bytes]
    workload: httpload.Workload

    def died(self) -> bool:
        return self.projector.poll() is not None or self.api.process.poll() is not None


@dataclass(frozen=True)
class _Run:
    result: queryable.QueryableResult
    cpu: dict[str, float]
    gc_longest_s: float


async def command_to_queryable(ctx: Context) -> None:
    """(d) API and projector in their own processes; each command then its consistent query."""
    plan, infra = ctx.plan, ctx.infra
    topic = f"bench.visible.{uuid.uuid4().hex[:8]}"
    urls: dict[bool, str] = {}
    for auth in (True, False):
        async with projector.fresh_database(infra.database_url) as url:
            urls[auth] = url
    with contextlib.ExitStack() as stack:
        stacks: dict[bool, _Stack] = {}
        for auth in (True, False):
            suffix = "" if auth else "-auth-off"
            api = stack.enter_context(
                httpload.api_process(
                    bootstrap=infra.kafka_bootstrap_servers,
                    database_url=urls[auth],
                    topic=topic + suffix,
                    log_file=empty_log_file(f"api-queryable{suffix}"),
                    settings=ctx.callers.environment(auth=auth, rate_limit=NEVER_BITES)
                    | NO_SHEDDING,
                )
            )
            await httpload.wait_ready(api, timeout=90)  # the API creates the topic
            process = stack.enter_context(
                projector.projector_process(
                    bootstrap=infra.kafka_bootstrap_servers,
                    database_url=urls[auth],
                    topic=topic + suffix,
                    log_file=empty_log_file(f"projector-queryable{suffix}"),
                )
            )
            stacks[auth] = _Stack(api, process, httpload.Workload(ctx.callers.customers, seed=9))
        for auth, each in stacks.items():
            _log.info("command-to-queryable, auth %s: customers' first orders", side(auth))
            await httpload.introduce(
                HOST, each.api.port, each.workload, clients=max(plan.closed_clients), timeout=120
            )
            await queryable.warm_up(HOST, each.api.port, each.workload, timeout=60)

        async def measure(auth: bool) -> _Run:
            each, other = stacks[auth], stacks[not auth]
            meter = CpuMeter(
                ctx.infra_pids()
                | {
                    "api": each.api.process.pid,
                    "projector": each.projector.pid,
                    "idle api": other.api.process.pid,
                    "idle projector": other.projector.pid,
                    "loadgen": os.getpid(),
                }
            )
            with metering(meter) as metered:
                result = await queryable.open_loop(
                    HOST,
                    each.api.port,
                    each.workload,
                    rate=plan.queryable_rate,
                    duration=plan.queryable_seconds,
                    connections=plan.http_connections,
                )
            return _Run(result, metered.cpu, metered.gc_longest_s)

        _log.info(
            "command-to-queryable: %d commands/s for %.0f s, auth on and off in turn",
            plan.queryable_rate,
            plan.queryable_seconds,
        )
        runs = await alternate(measure, runs=plan.auth_runs)
        for auth, each in stacks.items():
            if each.died():
                raise RuntimeError(
                    f"the API or the projector (auth {side(auth)}) died; see bench-results/*.log"
                )
    _report(ctx, runs)


def _report(ctx: Context, runs: Alternated[_Run]) -> None:
    plan = ctx.plan
    on_runs = runs.of(True)
    result = queryable.QueryableResult.pooled([run.result for run in on_runs])
    off = queryable.QueryableResult.pooled([run.result for run in runs.of(False)])
    cpu = _mean_cpu(on_runs)
    gc_longest_s = max(run.gc_longest_s for run in on_runs)
    ctx.visible = result
    ctx.results["queryable"] = result.summary() | {
        "cpu_percent_of_one_core": cpu,
        "loadgen_gc_longest_ms": gc_longest_s * 1000,
        "runs_pooled": len(on_runs),
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
            f"{len(on_runs)} runs of {plan.queryable_seconds:.0f} s pooled (auth on); "
            f"{len(result.visible):,} queries answered 200, {result.retries} retried after 503, "
            f"failures {failures}; commands {commands.achieved_per_second:,.0f}/s, command "
            f"p99 {ms(commands.percentile(0.99))}; load generator's longest GC pause "
            f"{ms(gc_longest_s)}; {cpu_details(cpu)}",
        )
    )
    added = result.percentile(0.5) - off.percentile(0.5)
    ctx.results["auth_cost"] = ctx.results.get("auth_cost", {}) | {
        "command_to_queryable": {
            "order": [side(auth) for auth, _ in runs.runs],
            "runs": [run.result.summary() | {"cpu": run.cpu} for _, run in runs.runs],
            "on": result.summary(),
            "off": off.summary(),
            "commands_per_second_on_over_off": _over(
                commands.achieved_per_second, off.commands.achieved_per_second
            ),
            "queryable_p50_added_ms": added * 1000,
            "queryable_p99_added_ms": (p99 - off.percentile(0.99)) * 1000,
            "command_p50_added_ms": (commands.percentile(0.5) - off.commands.percentile(0.5))
            * 1000,
        }
    }
    in_order = ", ".join(
        f"{side(auth)} p50 {ms(run.result.percentile(0.5))} p99 {ms(run.result.percentile(0.99))}"
        for auth, run in runs.runs
    )
    ctx.rows.append(
        Row(
            f"(d) Auth on / off: command-to-queryable at {plan.queryable_rate} cmd/s offered",
            f"p50 {ms(result.percentile(0.5))} / {ms(off.percentile(0.5))} "
            f"({added * 1000:+.1f} ms), p99 {ms(p99)} / {ms(off.percentile(0.99))}",
            "auth off, same run",
            ratio(result.percentile(0.5), off.percentile(0.5)),
            f"commands {n(commands.achieved_per_second)} / "
            f"{n(off.commands.achieved_per_second)}/s, command p50 "
            f"{ms(commands.percentile(0.5))} / {ms(off.commands.percentile(0.5))}, p99 "
            f"{ms(commands.percentile(0.99))} / {ms(off.commands.percentile(0.99))}; runs in "
            f"order: {in_order}; API CPU {cpu.get('api', 0):.0f}% / "
            f"{_mean_cpu(runs.of(False)).get('api', 0):.0f}% of a core",
        )
    )
    ctx.targets += [
        Target(
            f"Command-to-queryable p99 at {plan.queryable_rate}/s",
            "<= 100 ms",
            ms(p99),
            p99 <= 0.100 and not result.failures and commands.error_count == 0,
        ),
        Target(
            f"Auth cost: command-to-queryable p50 added at {plan.queryable_rate}/s",
            "<= 2 ms",
            f"{added * 1000:+.1f} ms",
            None if added != added else added <= 0.002,
        ),
    ]


def _over(value: float, limit: float) -> float:
    return value / limit if limit > 0 else float("nan")


def _mean_cpu(runs: list[_Run]) -> dict[str, float]:
    names = sorted({name for run in runs for name in run.cpu})
    return {
        name: round(sum(run.cpu.get(name, 0.0) for run in runs) / len(runs), 1) for name in names
    }
