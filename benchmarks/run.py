"""Benchmarks of the order service against this machine's own limits, in one command.

How to run (no Makefile needed), from the repository root with the project installed
(``python3 -m venv .venv && .venv/bin/pip install -e '.[test,bench]'``)::

    .venv/bin/python -m benchmarks.run            # full run: 1,000,000 events, <= ~18 minutes
    .venv/bin/python -m benchmarks.run --quick    # smaller sizes, <= ~5 minutes
    .venv/bin/python -m benchmarks.run --only projector_throughput --events 200000

It starts its own Kafka broker and PostgreSQL server (or uses ``KAFKA_BOOTSTRAP_SERVERS`` /
``DATABASE_URL`` when set); all traffic stays on 127.0.0.1. It measures the machine's limits
(raw produce, raw consume, raw COPY and upserts, a bare HTTP endpoint), then the service:
(a) projector throughput, (b) rebuild, (c) command API, (d) command-to-queryable latency,
(e) memory, (f) overload, (g) what telemetry costs (on and off, alternating), and a naive
tutorial-style projector as a peer; (c) and (d) also with authentication off, alternating,
for what access control costs. The HTTP loads act as
many customers, each with its own bearer token (``benchmarks.callers``). It prints a table
and writes, in ``bench-results/`` (git-ignored): ``latest.json``, ``latest.md``, ``throughput.png``,
``latency.png``, ``README-section.md`` (a ready-to-paste README section) and process logs.
Every phase is bounded in time, a failed phase is reported and the next one still runs, and
every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from benchmarks.callers import callers
from benchmarks.context import RESULTS, Context, Plan
from benchmarks.outputs import environment, write_plots
from benchmarks.phases.bench_rebuild import bench_rebuild
from benchmarks.phases.command_api import command_api
from benchmarks.phases.command_overload import command_overload
from benchmarks.phases.command_to_queryable import command_to_queryable
from benchmarks.phases.http_ceiling import http_ceiling
from benchmarks.phases.kafka_security_cost import kafka_security_cost
from benchmarks.phases.limits_kafka import limits_kafka
from benchmarks.phases.limits_postgres import limits_postgres
from benchmarks.phases.naive_peer import naive_peer
from benchmarks.phases.projector_scale_out import projector_scale_out
from benchmarks.phases.projector_throughput import projector_throughput
from benchmarks.phases.snapshot_cost import snapshot_cost
from benchmarks.phases.telemetry_cost import telemetry_cost
from benchmarks.phases.writer_memory import writer_memory
from benchmarks.phases.writer_scale_out import writer_scale_out
from benchmarks.phases.writer_takeover import writer_takeover
from benchmarks.report import Row, Target, markdown, readme_section
from service.infra.embedded.stack import infrastructure
from service.infra.runtime import tune_gc

OVERRUN_S = 90.0

_log = logging.getLogger("benchmarks")


# Limits first (the ratios need them), the long projector run early, then (d), and the
# overload (f) last: its backlog must not weigh on another phase.
PHASES: tuple[Callable[[Context], Awaitable[None]], ...] = (
    limits_kafka,
    limits_postgres,
    http_ceiling,
    projector_throughput,
    bench_rebuild,
    projector_scale_out,
    naive_peer,
    writer_memory,
    writer_takeover,
    command_api,
    command_to_queryable,
    telemetry_cost,
    kafka_security_cost,
    snapshot_cost,
    writer_scale_out,
    command_overload,
)


# What a phase needs from earlier ones: the N-event topic and the limits come from
# limits_kafka, the rebuild replays the read models of projector_throughput, the command
# API's ratios use the HTTP ceiling, and the overload offers twice the command API's
# sustained rate.
NEEDS: dict[str, tuple[str, ...]] = {
    "projector_throughput": ("limits_kafka",),
    "bench_rebuild": ("limits_kafka", "projector_throughput"),
    "naive_peer": ("limits_kafka",),
    "projector_scale_out": ("limits_kafka",),
    "command_api": ("http_ceiling",),
    "command_overload": ("http_ceiling", "command_api"),
    "telemetry_cost": ("limits_kafka",),
}


def select_phases(
    only: str | None, parser: argparse.ArgumentParser
) -> tuple[Callable[[Context], Awaitable[None]], ...]:
    """PHASES, or those named in ``--only`` plus what they need, in PHASES order."""
    if not only:
        return PHASES
    by_name = {phase.__name__: phase for phase in PHASES}
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    unknown = wanted - by_name.keys()
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(by_name)}")
    for name in list(wanted):
        wanted.update(NEEDS.get(name, ()))
    return tuple(phase for phase in PHASES if phase.__name__ in wanted)


async def run_all(
    ctx: Context,
    started: float,
    phases: tuple[Callable[[Context], Awaitable[None]], ...] = PHASES,
) -> None:
    """Each phase in turn; a failed phase is reported (row + JSON) and the next one still runs."""
    for phase in phases:
        name = phase.__name__
        elapsed = time.perf_counter() - started
        if elapsed > ctx.plan.budget_seconds:
            ctx.results.setdefault("skipped", []).append(name)
            ctx.rows.append(Row(f"{name} SKIPPED", "", details="the run's time budget is spent"))
            continue
        ctx.results.setdefault("load_average_by_phase", {})[name] = os.getloadavg()
        # This process is the load generator: what earlier phases left alive (a million filled
        # records) is frozen out of its collections, as the service does with its start-up.
        tune_gc()
        phase_started = time.perf_counter()
        # A phase may overrun the budget by OVERRUN_S at most, so the run stays bounded.
        allowed = ctx.plan.budget_seconds + OVERRUN_S - elapsed
        try:
            async with asyncio.timeout(allowed):
                await phase(ctx)
        except Exception as error:
            _log.exception("%s failed", name)
            ctx.results.setdefault("failures", {})[name] = repr(error)
            ctx.rows.append(Row(f"{name} FAILED", "", details=repr(error)[:300]))
        ctx.results.setdefault("phase_seconds", {})[name] = time.perf_counter() - phase_started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, <= ~5 minutes")
    parser.add_argument(
        "--only",
        metavar="PHASE,...",
        help="run only these phases (and the ones they need): "
        + ", ".join(phase.__name__ for phase in PHASES),
    )
    parser.add_argument(
        "--events",
        type=int,
        metavar="N",
        help="events in the projector's topic (default 1,000,000; 30,000 with --quick)",
    )
    parser.add_argument(
        "--auth-runs",
        type=int,
        metavar="N",
        help="counted runs of each auth on/off comparison, both sides together, an even "
        "number (default 8; 4 with --quick)",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: write latest.md and README-section.md again from latest.json",
    )
    args = parser.parse_args(argv)
    if args.render:
        render(json.loads((RESULTS / "latest.json").read_text()))
        return
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("kafka", "alembic", "projections", "service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Retries of a young topic's leader elections and coordinator look-ups are not news.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    plan = Plan.make(args.quick)
    if args.events:
        plan = replace(plan, events=args.events)
    if args.auth_runs is not None:
        if args.auth_runs < 2 or args.auth_runs % 2:
            parser.error("--auth-runs takes an even number, at least 2")
        plan = replace(plan, auth_runs=args.auth_runs)
    phases = select_phases(args.only, parser)
    results: dict[str, Any] = {"environment": environment(args.quick), "plan": plan.__dict__}
    started = time.perf_counter()
    _log.info("starting Kafka and PostgreSQL")
    with infrastructure() as infra, callers(plan.customers) as who:
        results["infrastructure_start_seconds"] = time.perf_counter() - started
        ctx = Context(infra, plan, results, who)
        _run(run_all(ctx, time.perf_counter(), phases))
    results["environment"]["load_average_at_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - started
    results["table"] = [row.__dict__ for row in ctx.rows]
    results["targets"] = [target.__dict__ for target in ctx.targets]
    RESULTS.mkdir(exist_ok=True)
    try:
        results["plots"] = write_plots(ctx)
    except ImportError:
        _log.warning("no plots: matplotlib is missing; pip install -e '.[bench]'")
        results["plots"] = "matplotlib is not installed"
    except Exception as error:  # a plot must not cost the figures
        _log.exception("plots failed")
        results["plots"] = repr(error)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    render(results)


def render(results: dict[str, Any]) -> None:
    """Write ``latest.md`` and ``README-section.md`` from a run's results; print the table."""
    rows = [Row(**row) for row in results["table"]]
    targets = [Target(**target) for target in results["targets"]]
    (RESULTS / "latest.md").write_text(markdown(results, rows, targets))
    (RESULTS / "README-section.md").write_text(readme_section(results, rows, targets))
    print()
    print(markdown(results, rows, targets))
    print(f"Written: {', '.join(str(p) for p in sorted(RESULTS.glob('*.*')))}")


def _run(coroutine: Awaitable[None]) -> None:
    async def main() -> None:
        await coroutine

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main())
        return
    uvloop.run(main())


if __name__ == "__main__":
    main()
