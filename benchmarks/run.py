"""Benchmarks of the order service against this machine's own limits, in one command.

How to run (no Makefile needed), from the repository root with the project installed
(``python3 -m venv .venv && .venv/bin/pip install -e '.[test,bench]'``)::

    .venv/bin/python -m benchmarks.run            # full run: 1,000,000 events, <= ~15 minutes
    .venv/bin/python -m benchmarks.run --quick    # smaller sizes, <= ~3 minutes
    .venv/bin/python -m benchmarks.run --only projector_throughput --events 200000

It starts its own Kafka broker and PostgreSQL server (or uses ``KAFKA_BOOTSTRAP_SERVERS`` /
``DATABASE_URL`` when set); all traffic stays on 127.0.0.1. It measures the machine's limits
(raw produce, raw consume, raw COPY and upserts, a bare HTTP endpoint), then the service:
(a) projector throughput, (b) rebuild, (c) command API, (d) command-to-queryable latency,
(e) memory, and a naive tutorial-style projector as a peer. It prints a table and writes, in
``bench-results/`` (git-ignored): ``latest.json``, ``latest.md``, ``throughput.png``,
``latency.png``, ``README-section.md`` (a ready-to-paste README section) and process logs.
Every phase is bounded in time, a failed phase is reported and the next one still runs, and
every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import psutil

from benchmarks import (
    events,
    httpload,
    naive_projector,
    plots,
    projector,
    queryable,
    raw,
    writer_direct,
)
from benchmarks.meters import CpuMeter, GcPauses, cpu_details, rss
from benchmarks.report import Row, Target, div, markdown, ms, n, ratio, readme_section, times
from projections.models.catalog import PROJECTIONS
from service.infra.database import create_engine
from service.infra.embedded import spawn, stop_process
from service.infra.embedded.stack import Infrastructure, infrastructure
from service.infra.runtime import tune_gc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
HOST = "127.0.0.1"
OVERRUN_S = 90.0

_log = logging.getLogger("benchmarks")


@dataclass(frozen=True)
class Plan:
    quick: bool
    events: int  # the projector's topic; raw produce/consume are measured while filling it
    base_events: int  # sealed through the domain; the rest are copies under new ids
    produce_events: int  # the first ones, sent as the writer sends (the limit); the rest batched
    consume_passes: int
    consume_events: int  # per pass: the first ones of the topic
    pg_rows: int  # raw COPY and raw upsert
    projector_timeout: float
    rebuild_timeout: float
    naive_events: int
    naive_seconds: float
    writer_orders: int
    http_rates: tuple[int, ...]
    http_seconds: float
    http_connections: int
    closed_clients: tuple[int, ...]
    queryable_rate: int
    queryable_seconds: float
    # Phases that would start later than this after the broker and database are up are
    # skipped (reported as such), and none may run past it by more than OVERRUN_S: a run on
    # a busy machine stays bounded.
    budget_seconds: float

    @classmethod
    def make(cls, quick: bool) -> Plan:
        return cls(
            quick=quick,
            events=30_000 if quick else 1_000_000,
            base_events=10_000 if quick else 25_000,
            produce_events=30_000 if quick else 100_000,
            consume_passes=3,
            consume_events=30_000 if quick else 300_000,
            pg_rows=10_000 if quick else 100_000,
            projector_timeout=45 if quick else 240,
            rebuild_timeout=45 if quick else 120,
            naive_events=3_000 if quick else 20_000,
            naive_seconds=5 if quick else 20,
            writer_orders=20_000 if quick else 100_000,
            http_rates=(250, 500, 1000, 2000),
            http_seconds=2.0 if quick else 6.0,
            http_connections=256,
            closed_clients=(64,) if quick else (16, 64, 256),
            queryable_rate=500,
            queryable_seconds=3.0 if quick else 10.0,
            budget_seconds=200 if quick else 780,
        )


@dataclass
class Context:
    """What the phases share: the infrastructure, the plan, results so far, and the table."""

    infra: Infrastructure
    plan: Plan
    results: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    topic: str = ""  # the N-event topic
    filled: events.Filled | None = None
    projector_database: str = ""  # the read models of run (a), for the rebuild
    projector_run: projector.ProjectorRun | None = None
    naive_run: naive_projector.NaiveRun | None = None
    ceiling: dict[float, httpload.LoadResult] = field(default_factory=dict)  # by offered rate
    ceiling_closed: httpload.LoadResult | None = None
    api_open: dict[float, httpload.LoadResult] = field(default_factory=dict)
    visible: queryable.QueryableResult | None = None

    def limit(self, name: str) -> float:
        """A limit measured earlier in this run (0 when that phase failed)."""
        value: float = self.results.get(name, {}).get("per_second", 0.0)
        return value

    def require_topic(self) -> events.Filled:
        if self.filled is None:
            raise RuntimeError("needs the events topic, whose fill failed")
        return self.filled

    def infra_pids(self) -> dict[str, int | None]:
        kafka = self.infra.kafka
        postgres = self.infra.postgres
        return {
            "kafka": kafka.process.pid if kafka and kafka.process else None,
            "postgres*": postgres.process.pid if postgres and postgres.process else None,
        }


def _log_file(name: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.log"
    path.write_bytes(b"")
    return path


# -- limits: Kafka ------------------------------------------------------------------------------


async def limits_kafka(ctx: Context) -> None:
    """Raw produce while filling the N-event topic, then raw consume of it."""
    plan, bootstrap = ctx.plan, ctx.infra.kafka_bootstrap_servers
    ctx.topic = f"bench.events.{uuid.uuid4().hex[:8]}"
    await events.create_topic(bootstrap, ctx.topic)
    _log.info("building %d events (%d sealed by the domain)", plan.events, plan.base_events)
    started = time.perf_counter()
    base_size = min(plan.base_events, plan.events)
    base = list(
        islice(events.records(events.histories(orders=base_size // 4, mixed=True)), base_size)
    )
    if len(base) != base_size:
        raise RuntimeError(f"built {len(base)} events, wanted {base_size}")
    built = list(events.replicate(base, plan.events))
    del base
    ctx.results["build_seconds"] = time.perf_counter() - started
    measured = built[: plan.produce_events]
    _log.info("raw produce: %d events", len(measured))
    filled = await events.produce(
        bootstrap, ctx.topic, measured, name="raw", timeout=300, keep_offsets=True
    )
    produced = {
        "events": filled.events,
        "seconds": filled.seconds,
        "per_second": filled.events_per_second,
        "mean_event_bytes": filled.mean_value_bytes,
        "records_per_transaction": events.TRANSACTION_RECORDS,
    }
    rest = built[plan.produce_events :]
    del built, measured
    if rest:
        _log.info("filling the other %d events (batches, not timed)", len(rest))
        started = time.perf_counter()
        await events.fill(bootstrap, ctx.topic, rest, filled, timeout=600)
        ctx.results["fill_seconds"] = time.perf_counter() - started
    del rest
    ctx.filled = filled
    ctx.results["raw_produce"] = produced
    ctx.rows.append(
        Row(
            "Raw produce (aiokafka, idempotent, acks=all, tx of 500)",
            n(produced["per_second"], "events/s"),
            "(a limit)",
            details=f"{produced['events']:,} events of {produced['mean_event_bytes']:.0f} B "
            f"(mean), {events.PARTITIONS} partitions, send() per record as the writer does",
        )
    )
    _log.info("raw consume (best of %d passes)", plan.consume_passes)
    passes = [
        await raw.consume(
            bootstrap,
            ctx.topic,
            partitions=events.PARTITIONS,
            expected=filled.events,
            stop_after=plan.consume_events,
            timeout=300,
        )
        for _ in range(plan.consume_passes)
    ]
    best = max(rate.per_second for rate in passes)
    ctx.results["raw_consume"] = {
        "events": filled.events,
        "passes_per_second": [rate.per_second for rate in passes],
        "per_second": best,
    }
    ctx.rows.append(
        Row(
            "Raw consume (getmany + msgspec envelope decode)",
            n(best, "events/s"),
            "(a limit)",
            details=f"best of {len(passes)} passes ("
            + ", ".join(f"{rate.per_second:,.0f}" for rate in passes)
            + f"); {min(plan.consume_events, filled.events):,} events per pass, read_committed, "
            "no group, the projector's fetch sizes",
        )
    )


# -- limits: PostgreSQL -------------------------------------------------------------------------


async def limits_postgres(ctx: Context) -> None:
    """asyncpg COPY and batched unnest upserts of orders-shaped rows."""
    rows = ctx.plan.pg_rows
    async with projector.fresh_database(ctx.infra.database_url) as database_url:
        dsn = projector.asyncpg_dsn(database_url)
        _log.info("raw COPY: %d rows", rows)
        copied = await raw.copy_rows(dsn, count=rows, batch=5000, timeout=300)
        _log.info("raw upsert: %d rows, twice", rows)
        upserted = await raw.upsert_rows(dsn, count=rows, batch=5000, timeout=300)
    ctx.results["raw_copy"] = {
        "rows": copied.count,
        "seconds": copied.seconds,
        "per_second": copied.per_second,
    }
    ctx.results["raw_upsert"] = {
        "rows": rows,
        "insert_per_second": upserted.inserted.per_second,
        "update_per_second": upserted.updated.per_second,
        "per_second": upserted.per_second,
    }
    ctx.rows += [
        Row(
            "Raw COPY (asyncpg copy_records_to_table)",
            n(copied.per_second, "rows/s"),
            "(a limit)",
            details=f"{rows:,} orders rows into a copy of the table with its indexes, "
            "5,000 rows per transaction",
        ),
        Row(
            "Raw upsert (INSERT ... SELECT * FROM unnest(...) ON CONFLICT DO UPDATE)",
            n(upserted.per_second, "rows/s"),
            n(copied.per_second, "rows/s (COPY)"),
            ratio(upserted.per_second, copied.per_second),
            f"one statement per 5,000 rows; new keys {upserted.inserted.per_second:,.0f}/s, "
            f"existing keys (conflict path) {upserted.updated.per_second:,.0f}/s",
        ),
    ]


# -- (a) the projector, and (e) its memory -------------------------------------------------------


async def projector_throughput(ctx: Context) -> None:
    """(a) all projections in their own process over the N events; (e) that process's RSS."""
    filled = ctx.require_topic()
    bootstrap = ctx.infra.kafka_bootstrap_servers
    consume_rate = ctx.limit("raw_consume")
    async with projector.fresh_database(ctx.infra.database_url) as database_url:
        ctx.projector_database = database_url
    await projector.warm_group_coordinator(bootstrap, ctx.topic)
    log_file = _log_file("projector")
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


async def projector_scale_out(ctx: Context) -> None:
    """(a) again, with TWO projector processes in one consumer group (the partitions split
    between them), into a fresh database: what scaling out on the same machine gives."""
    filled = ctx.require_topic()
    bootstrap = ctx.infra.kafka_bootstrap_servers
    consume_rate = ctx.limit("raw_consume")
    async with projector.fresh_database(ctx.infra.database_url) as database_url:
        pass
    group_prefix = f"bench-{uuid.uuid4().hex[:8]}"
    logs = [_log_file("projector-1"), _log_file("projector-2")]
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


# -- (b) rebuild ------------------------------------------------------------------------------


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
    log_file = _log_file("rebuild")
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


# -- the peer -----------------------------------------------------------------------------------


async def naive_peer(ctx: Context) -> None:
    """A tutorial-style projector on the same topic; ours as a multiple of it."""
    ctx.require_topic()
    plan = ctx.plan
    async with projector.fresh_database(ctx.infra.database_url) as database_url:
        _log.info(
            "naive projector: up to %d events or %.0f s", plan.naive_events, plan.naive_seconds
        )
        meter = CpuMeter(ctx.infra_pids() | {"bench (naive)": os.getpid()})
        meter.start()
        run = await naive_projector.run(
            ctx.infra.kafka_bootstrap_servers,
            projector.asyncpg_dsn(database_url),
            ctx.topic,
            max_events=plan.naive_events,
            max_seconds=plan.naive_seconds,
        )
        cpu = meter.stop()
        equal = different = 0
        if ctx.projector_database:  # the same orders, as our projector wrote them in (a)
            equal, different = await naive_projector.compare_with(
                projector.asyncpg_dsn(database_url), projector.asyncpg_dsn(ctx.projector_database)
            )
    ctx.naive_run = run
    ours = ctx.limit("projector")
    consume_rate = ctx.limit("raw_consume")
    ctx.results["naive_peer"] = {
        "events": run.events,
        "seconds": run.seconds,
        "join_seconds": run.join_seconds,
        "per_second": run.per_second,
        "ours_multiple": div(ours, run.per_second),
        "cpu_percent_of_one_core": cpu,
        "samples": run.samples,
        "orders_equal_to_ours": equal,
        "orders_different_from_ours": different,
    }
    check = f"its orders rows equal ours for {equal:,} orders" + (
        f", DIFFER for {different:,}" if different else ""
    )
    ctx.rows += [
        Row(
            "Peer: naive projector (1 tx + 1 offset commit per event, orders table only)",
            n(run.per_second, "events/s"),
            n(consume_rate, "events/s (raw consume)"),
            ratio(run.per_second, consume_rate),
            f"{run.events:,} events in {run.seconds:.1f} s; {check}; {cpu_details(cpu)}",
        ),
        Row(
            "Ours (a) as a multiple of the peer",
            times(ours, run.per_second),
            details="ours maintains 4 read models exactly-once, the peer 1",
        ),
    ]


# -- (e) writer memory ----------------------------------------------------------------------------


async def writer_memory(ctx: Context) -> None:
    """(e) writer start-up in a fresh process on a topic of N orders: RSS per order."""
    bootstrap = ctx.infra.kafka_bootstrap_servers
    orders = ctx.plan.writer_orders
    topic = f"bench.writer.{uuid.uuid4().hex[:8]}"
    await events.create_topic(bootstrap, topic)
    _log.info("filling %d orders (3 events each)", orders)
    base = list(events.records(events.histories(orders=min(orders, 10_000), mixed=False)))
    filled = events.Filled()
    await events.fill(
        bootstrap, topic, list(events.replicate(base, orders * 3)), filled, timeout=600
    )
    _log.info("writer start-up in a fresh process")
    completed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "benchmarks.writer_startup", bootstrap, topic],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"writer start-up failed:\n{completed.stderr[-3000:]}")
    measured: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    if measured["orders"] != orders or measured["events"] != filled.events:
        raise RuntimeError(f"writer loaded {measured}, expected {orders} orders")
    consume_rate = ctx.limit("raw_consume")
    rebuild_rate = measured["events"] / measured["load_seconds"]
    growth = measured["rss_after_start"] - measured["rss_before"]
    retained = measured["rss_after_trim"] - measured["rss_before"]
    ctx.results["writer_startup"] = measured | {
        "rebuild_events_per_second": rebuild_rate,
        "ratio_to_raw_consume": div(rebuild_rate, consume_rate),
        "rss_growth_bytes": growth,
        "bytes_per_order": growth / orders,
        "retained_bytes_per_order": retained / orders,
        "rss_mib_per_100k_orders": growth / orders * 100_000 / 2**20,
    }
    ctx.rows += [
        Row(
            "(e) Writer memory per 100,000 orders",
            n(growth / orders * 100_000 / 2**20, "MiB RSS"),
            details=f"{growth / orders:,.0f} B/order measured on {orders:,} orders; after "
            f"gc+malloc_trim {retained / orders:,.0f} B/order",
        ),
        Row(
            "Writer rebuild of its state from the log",
            n(rebuild_rate, "events/s"),
            n(consume_rate, "events/s (raw consume)"),
            ratio(rebuild_rate, consume_rate),
            f"{measured['events']:,} events; start() {measured['start_seconds']:.2f} s in all",
        ),
    ]
    ctx.targets.append(
        Target(
            "Writer memory",
            "<= 1.5 KB per order",
            n(growth / orders, "B/order"),
            growth / orders <= 1536,
        )
    )


# -- the HTTP ceiling ---------------------------------------------------------------------------


async def http_ceiling(ctx: Context) -> None:
    """A bare Litestar endpoint, same server settings, same load generator and levels."""
    plan = ctx.plan
    with httpload.bare_process(log_file=_log_file("bare-http")) as bare:
        await httpload.wait_ready(bare, timeout=60)
        workload = httpload.Workload()
        meter = CpuMeter({"bare http": bare.process.pid, "loadgen": os.getpid()})
        await httpload.open_loop(HOST, bare.port, workload, rate=200, duration=1.0, connections=32)
        runs = []
        for rate in plan.http_rates:
            _log.info("HTTP ceiling, open loop: %d requests/s", rate)
            load = await _open_loop(meter, bare.port, workload, rate, plan)
            ctx.ceiling[rate] = load
            runs.append(load.summary())
        clients = max(plan.closed_clients)
        closed = await _measured(
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


# -- (c) the command API ------------------------------------------------------------------------


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
                _latencies(run),
            )
        )
    runs: list[dict[str, Any]] = []
    ctx.results["http"] = runs
    with httpload.api_process(
        bootstrap=infra.kafka_bootstrap_servers,
        database_url=infra.database_url,
        topic=topic,
        log_file=_log_file("api"),
    ) as api:
        ready = await httpload.wait_ready(api, timeout=90)
        _log.info("API ready after %.1f s on port %d", ready, api.port)
        workload = httpload.Workload()
        meter = CpuMeter(ctx.infra_pids() | {"api": api.process.pid, "loadgen": os.getpid()})
        await httpload.open_loop(HOST, api.port, workload, rate=200, duration=1.0, connections=32)
        for rate in plan.http_rates:
            _log.info("command API, open loop: %d commands/s for %.0f s", rate, plan.http_seconds)
            load = await _open_loop(meter, api.port, workload, rate, plan)
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
                    _latencies(load),
                )
            )
            await asyncio.sleep(1.0)  # let the writer's queue drain between levels
        closed: list[tuple[int, httpload.LoadResult]] = []
        for clients in plan.closed_clients:
            _log.info("command API, closed loop: %d clients for %.0f s", clients, plan.http_seconds)
            load = await _measured(
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
                _latencies(load) + f"; raw produce {produce_rate:,.0f} events/s",
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


@dataclass
class _Metered:
    """What a load cost: CPU of the processes taking part (% of one core) and the load
    generator's longest garbage-collection pause."""

    cpu: dict[str, float] = field(default_factory=dict)
    gc_longest_s: float = 0.0


@contextlib.contextmanager
def _metering(meter: CpuMeter) -> Iterator[_Metered]:
    metered = _Metered()
    meter.start()
    with GcPauses() as pauses:
        yield metered
    metered.cpu = meter.stop()
    metered.gc_longest_s = pauses.longest_s


async def _measured(meter: CpuMeter, load: Awaitable[httpload.LoadResult]) -> httpload.LoadResult:
    """One load, with what it cost (``_Metered``) recorded on its result."""
    with _metering(meter) as metered:
        result = await load
    result.cpu = metered.cpu
    result.loadgen_gc_longest_s = metered.gc_longest_s
    return result


async def _open_loop(
    meter: CpuMeter, port: int, workload: httpload.Workload, rate: int, plan: Plan
) -> httpload.LoadResult:
    """One open-loop level of the plan's HTTP load, measured."""
    return await _measured(
        meter,
        httpload.open_loop(
            HOST,
            port,
            workload,
            rate=rate,
            duration=plan.http_seconds,
            connections=plan.http_connections,
        ),
    )


def _latencies(load: httpload.LoadResult) -> str:
    errors = ", ".join(f"{k} x{v}" for k, v in sorted(load.errors.items())) or "0"
    longest_gap, _ = load.stalls()
    text = (
        f"p50 {ms(load.percentile(0.5))}, p99 {ms(load.percentile(0.99))}, max "
        f"{ms(max(load.latencies, default=float('nan')))}; longest gap without answers "
        f"{ms(longest_gap)}; errors {errors}"
    )
    if load.loadgen_gc_longest_s is not None:
        text += f"; load generator's longest GC pause {ms(load.loadgen_gc_longest_s)}"
    return text + (f"; {cpu_details(load.cpu)}" if load.cpu else "")


# -- (d) command-to-queryable -------------------------------------------------------------------


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
        log_file=_log_file("api-queryable"),
    ) as api:
        await httpload.wait_ready(api, timeout=90)  # the API creates the topic
        with projector.projector_process(
            bootstrap=infra.kafka_bootstrap_servers,
            database_url=database_url,
            topic=topic,
            log_file=_log_file("projector-queryable"),
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
            with _metering(meter) as metered:
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


# -- outputs ------------------------------------------------------------------------------------


def _plots(ctx: Context) -> list[str]:
    written = []
    lines = []
    if ctx.projector_run is not None:
        lines.append(
            plots.Series("ours: exactly-once, mean of the projections", ctx.projector_run.rates())
        )
    if ctx.naive_run is not None:
        lines.append(
            plots.Series(
                "peer: naive projector (orders only)", projector.rates(ctx.naive_run.samples, 2.0)
            )
        )
    if lines:
        path = RESULTS / "throughput.png"
        plots.throughput(
            path,
            lines,
            {"raw consume": ctx.limit("raw_consume")},
            title="Projector throughput over time",
        )
        written.append(str(path))
    curves = {
        "command API": [
            (rate, load.percentile(0.5) * 1000, load.percentile(0.99) * 1000)
            for rate, load in ctx.api_open.items()
        ],
        "HTTP ceiling (bare Litestar)": [
            (rate, load.percentile(0.5) * 1000, load.percentile(0.99) * 1000)
            for rate, load in ctx.ceiling.items()
        ],
    }
    points = {}
    if ctx.visible is not None and ctx.visible.visible:
        points["command-to-queryable"] = (
            float(ctx.plan.queryable_rate),
            ctx.visible.percentile(0.5) * 1000,
            ctx.visible.percentile(0.99) * 1000,
        )
    if any(curves.values()) or points:
        path = RESULTS / "latency.png"
        plots.latency(path, curves, points, title="Latency against offered load (open loop)")
        written.append(str(path))
    return written


def _environment(quick: bool) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    ).stdout.strip()
    import psutil

    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "git_commit": commit,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "memory_bytes": psutil.virtual_memory().total,
    }


# Limits first (the ratios need them), the long projector run early, (d) last.
PHASES: tuple[Callable[[Context], Awaitable[None]], ...] = (
    limits_kafka,
    limits_postgres,
    http_ceiling,
    projector_throughput,
    bench_rebuild,
    projector_scale_out,
    naive_peer,
    writer_memory,
    command_api,
    command_to_queryable,
)


# What a phase needs from earlier ones: the N-event topic and the limits come from
# limits_kafka, the rebuild replays the read models of projector_throughput, and the
# command API's ratios use the HTTP ceiling.
NEEDS: dict[str, tuple[str, ...]] = {
    "projector_throughput": ("limits_kafka",),
    "bench_rebuild": ("limits_kafka", "projector_throughput"),
    "naive_peer": ("limits_kafka",),
    "projector_scale_out": ("limits_kafka",),
    "command_api": ("http_ceiling",),
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
    parser.add_argument("--quick", action="store_true", help="smaller sizes, <= ~3 minutes")
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
    phases = select_phases(args.only, parser)
    results: dict[str, Any] = {"environment": _environment(args.quick), "plan": plan.__dict__}
    started = time.perf_counter()
    _log.info("starting Kafka and PostgreSQL")
    with infrastructure() as infra:
        results["infrastructure_start_seconds"] = time.perf_counter() - started
        ctx = Context(infra, plan, results)
        _run(run_all(ctx, time.perf_counter(), phases))
    results["environment"]["load_average_at_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - started
    results["table"] = [row.__dict__ for row in ctx.rows]
    results["targets"] = [target.__dict__ for target in ctx.targets]
    RESULTS.mkdir(exist_ok=True)
    try:
        results["plots"] = _plots(ctx)
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
