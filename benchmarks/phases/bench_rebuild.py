"""(b) A full blue/green rebuild of all projections, as an operator runs it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
import uuid

import psutil

from benchmarks import projector
from benchmarks.context import Context, empty_log_file
from benchmarks.meters import CpuMeter, cpu_details
from benchmarks.report import Row, Target, n, ratio
from projections.models.catalog import PROJECTIONS
from service.infra.database import create_engine
from service.infra.embedded import spawn, stop_process

_log = logging.getLogger("benchmarks")


async def bench_rebuild(ctx: Context) -> None:
    """(b) A full blue/green rebuild of all projections from the N events of run (a).

    ``orders projections rebuild all`` in a process of its own, as an operator runs it: new
    versions built from offset 0 with bulk settings, indexes after the load, then the switch;
    timed from the command's start until it exits, and checked to be at the end of the topic.
    """
    filled = ctx.require_topic()
    if not ctx.projector_database:
        raise RuntimeError("needs the read models of run (a)")
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": ctx.infra.kafka_bootstrap_servers,
        "DATABASE_URL": ctx.projector_database,
        "ORDERS_TOPIC": ctx.topic,
        "ORDERS_GROUP_PREFIX": f"bench-rebuild-{uuid.uuid4().hex[:8]}",
    }
    log_file = empty_log_file("rebuild")
    argv = [sys.executable, "-m", "service.edge.cli.main", "projections", "rebuild", "all"]
    _log.info("rebuild: %s", " ".join(argv[1:]))
    started = time.perf_counter()
    process = spawn(argv, log_file=log_file, env=env)
    try:
        meter = CpuMeter(ctx.infra_pids())
        meter.start()
        child = psutil.Process(process.pid)
        child_cpu = 0.0  # sampled while it runs: a reaped process has no CPU times to read
        deadline = time.monotonic() + ctx.plan.rebuild_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                child_cpu = times.user + times.system
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(process.wait, 0.2)
                break
        seconds = time.perf_counter() - started
        cpu = meter.stop() | {"rebuild": round(100 * child_cpu / seconds, 1)}
    finally:
        stop_process(process, grace_seconds=30)
    output = log_file.read_text(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"the rebuild exited with {process.returncode}: {output.strip()[-300:]}")
    live = [line for line in output.splitlines() if line.strip().startswith("now live:")]
    if not live or len(live[-1].split(",")) != len(PROJECTIONS):
        raise RuntimeError(f"the rebuild did not switch every projection: {live}")
    engine = create_engine(ctx.projector_database, pool_size=1)
    try:
        stored = await projector.read_checkpoints(engine, ctx.topic)
    finally:
        await engine.dispose()
    behind = [
        name
        for name in PROJECTIONS
        if projector.events_applied(stored, filled.offsets, name) < filled.events
    ]
    if behind:
        raise RuntimeError(f"rebuild returned but {behind} are not at the end of the topic")
    rate = filled.events / seconds
    consume_rate = ctx.limit("raw_consume")
    ctx.results["rebuild"] = {
        "events": filled.events,
        "seconds": seconds,
        "per_second": rate,
        "cpu_percent_of_one_core": cpu,
    }
    ctx.rows.append(
        Row(
            "(b) Full rebuild of all projections",
            n(seconds, "s"),
            n(consume_rate, "events/s (raw consume)"),
            ratio(rate, consume_rate),
            f"{filled.events:,} events, {rate:,.0f} events/s; `orders projections rebuild all` "
            f"in its own process, start to exit; {cpu_details(cpu)}",
        )
    )
    scaled = seconds * 1_000_000 / filled.events
    ctx.targets.append(
        Target(
            "Full rebuild from 1,000,000 events",
            "<= 30 s",
            f"{seconds:.1f} s"
            + ("" if filled.events == 1_000_000 else f" ({scaled:.0f} s per 1M)"),
            scaled <= 30,
        )
    )
