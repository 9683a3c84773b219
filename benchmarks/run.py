"""Run every benchmark against a real broker and database started here; print and save results.

    .venv/bin/python -m benchmarks.run [--quick]

Results go to ``bench-results/latest.json`` (git-ignored) and a markdown table on stdout.
Every phase is bounded in time; every process started here is stopped on the way out.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import psutil

from benchmarks import events, httpload, projector, raw, writer_direct
from service.embedded.stack import Infrastructure, infrastructure

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"

_log = logging.getLogger("benchmarks")
PHASE_TIMEOUT_S = 600.0
CONSUME_PASSES = 3


@dataclass(frozen=True)
class Plan:
    quick: bool
    raw_events: int  # raw produce/consume; the same topic then feeds the projector
    copy_rows: int
    writer_orders: int
    http_rates: tuple[int, ...]
    http_seconds: float
    http_connections: int
    closed_clients: tuple[int, ...]

    @classmethod
    def make(cls, quick: bool) -> Plan:
        return cls(
            quick=quick,
            raw_events=20_000 if quick else 100_000,
            copy_rows=20_000 if quick else 100_000,
            writer_orders=20_000 if quick else 100_000,
            http_rates=(250, 500, 1000, 2000),
            http_seconds=3.0 if quick else 8.0,
            http_connections=256,
            closed_clients=(64,) if quick else (16, 64),
        )


# -- table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    measurement: str
    value: str
    limit: str = ""
    ratio: str = ""
    details: str = ""


def _n(value: float, unit: str = "") -> str:
    text = f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def _div(value: float, limit: float) -> float | None:
    return value / limit if limit > 0 else None


def _limit(results: dict[str, Any], name: str) -> float:
    """A raw limit measured earlier in this run (0 when that phase failed)."""
    rate: float = results.get(name, {}).get("events_per_second", 0.0)
    return rate


def _ratio(value: float, limit: float) -> str:
    return f"{value / limit:.2f}" if limit > 0 else ""


def table(rows: list[Row]) -> str:
    lines = [
        "| Measurement | Value | Limit (same run) | Ratio | Details |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r.measurement} | {r.value} | {r.limit} | {r.ratio} | {r.details} |")
    return "\n".join(lines)


# -- CPU accounting -------------------------------------------------------------------------


class CpuMeter:
    """CPU time of named processes over an interval, as % of one core.

    A name ending in ``*`` counts the process tree: live descendants plus the children it has
    reaped (PostgreSQL's backends come and go with connections). Other names count the process
    alone (the benchmark process is the parent of the broker, the database and the API).
    """

    def __init__(self, processes: dict[str, int | None]) -> None:
        self._processes = {
            name: psutil.Process(pid) for name, pid in processes.items() if pid is not None
        }
        self._start: dict[str, float] = {}
        self._started = 0.0

    @staticmethod
    def _cpu(process: psutil.Process, tree: bool) -> float:
        try:
            times = process.cpu_times()
            total: float = times.user + times.system
            if tree:
                total += times.children_user + times.children_system
                for child in process.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child_times = child.cpu_times()
                        total += child_times.user + child_times.system
        except psutil.Error:
            return 0.0
        return total

    def start(self) -> None:
        psutil.cpu_percent()  # resets the machine-wide counter
        self._started = time.perf_counter()
        self._start = {
            name: self._cpu(p, name.endswith("*")) for name, p in self._processes.items()
        }

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._started
        used = {
            name.rstrip("*"): round(
                100 * (self._cpu(p, name.endswith("*")) - self._start[name]) / wall, 1
            )
            for name, p in self._processes.items()
        }
        machine = psutil.cpu_percent() * (psutil.cpu_count() or 1)
        return used | {f"all {psutil.cpu_count()} cores": round(machine, 1)}


def _cpu_details(cpu: dict[str, float]) -> str:
    """CPU used, in % of one core."""
    return "CPU " + ", ".join(f"{name} {value:.0f}%" for name, value in cpu.items())


# -- phases ---------------------------------------------------------------------------------


async def bench_raw_and_projector(
    infra: Infrastructure, plan: Plan, results: dict[str, Any], rows: list[Row]
) -> None:
    bootstrap = infra.kafka_bootstrap_servers
    topic = f"bench.raw.{uuid.uuid4().hex[:8]}"
    await events.create_topic(bootstrap, topic)
    _log.info("building %d events", plan.raw_events)
    history = events.histories(orders=plan.raw_events // 4, mixed=True)
    built = list(islice(events.records(history), plan.raw_events))
    if len(built) != plan.raw_events:
        raise RuntimeError(f"built {len(built)} events, wanted {plan.raw_events}")
    _log.info("raw produce: %d events", len(built))
    filled = await events.produce(bootstrap, topic, built, name="raw", timeout=300)
    produce_rate = filled.events_per_second
    results["raw_produce"] = {
        "events": filled.events,
        "seconds": filled.seconds,
        "events_per_second": produce_rate,
        "mean_event_bytes": filled.mean_value_bytes,
        "records_per_transaction": events.TRANSACTION_RECORDS,
    }
    rows.append(
        Row(
            "Raw produce (aiokafka, idempotent, acks=all, tx of 500)",
            _n(produce_rate, "events/s"),
            details=f"{filled.events:,} events of {filled.mean_value_bytes:.0f} B, 12 partitions",
        )
    )
    del built

    _log.info("raw consume (best of %d passes)", CONSUME_PASSES)
    passes = [
        await raw.consume(
            bootstrap, topic, partitions=events.PARTITIONS, expected=filled.events, timeout=300
        )
        for _ in range(CONSUME_PASSES)
    ]
    consume_rate = max(rate.per_second for rate in passes)
    results["raw_consume"] = {
        "events": filled.events,
        "passes_events_per_second": [rate.per_second for rate in passes],
        "events_per_second": consume_rate,
    }
    rows.append(
        Row(
            "Raw consume (getmany + envelope.decode)",
            _n(consume_rate, "events/s"),
            details=f"best of {CONSUME_PASSES} passes ("
            + ", ".join(f"{rate.per_second:,.0f}" for rate in passes)
            + "); read_committed, no group, runner's fetch sizes",
        )
    )

    async with projector.fresh_database(infra.database_url) as database_url:
        _log.info("raw COPY: %d rows", plan.copy_rows)
        copied = await raw.copy_rows(
            projector.asyncpg_dsn(database_url), count=plan.copy_rows, batch=5000, timeout=300
        )
        results["raw_copy"] = {
            "rows": copied.count,
            "seconds": copied.seconds,
            "rows_per_second": copied.per_second,
        }
        rows.append(
            Row(
                "Raw COPY (asyncpg copy_records_to_table)",
                _n(copied.per_second, "rows/s"),
                details="orders-shaped table with its indexes, 5,000 rows per transaction",
            )
        )

        _log.info("projector: %d events, all projections", filled.events)
        await projector.warm_group_coordinator(bootstrap, topic)
        meter = CpuMeter(_infra_pids(infra) | {"bench (projector)": os.getpid()})
        meter.start()
        outcome = await projector.run_projections(
            bootstrap,
            database_url,
            topic,
            events=filled.events,
            last_offsets=filled.last_offsets,
            timeout=300,
        )
        cpu = meter.stop()
    results["projector"] = {
        "events": outcome.events,
        "seconds": outcome.seconds,
        "events_per_second": outcome.events_per_second,
        "ratio_to_raw_consume": _div(outcome.events_per_second, consume_rate),
        "first_checkpoint_seconds": outcome.first_checkpoint_seconds,
        "after_first_checkpoint_events_per_second": outcome.after_first_checkpoint_per_second,
        "per_projection_seconds": outcome.per_projection_seconds,
        "rows_written": outcome.rows_written,
        "batches": outcome.batches,
        "cpu_percent_of_one_core": cpu,
    }
    slowest = max(outcome.per_projection_seconds, key=outcome.per_projection_seconds.__getitem__)
    rows.append(
        Row(
            f"Projector: {len(outcome.per_projection_seconds)} projections together",
            _n(outcome.events_per_second, "events/s"),
            _n(consume_rate, "events/s"),
            _ratio(outcome.events_per_second, consume_rate),
            f"{outcome.events:,} events in {outcome.seconds:.1f}s; first checkpoint after "
            f"{outcome.first_checkpoint_seconds:.1f}s "
            f"({outcome.after_first_checkpoint_per_second:,.0f} events/s from there); "
            f"slowest {slowest}; each projection reads and decodes every event itself; "
            f"{_cpu_details(cpu)}",
        )
    )


async def bench_writer_startup(
    infra: Infrastructure, plan: Plan, results: dict[str, Any], rows: list[Row]
) -> None:
    bootstrap = infra.kafka_bootstrap_servers
    topic = f"bench.writer.{uuid.uuid4().hex[:8]}"
    await events.create_topic(bootstrap, topic)
    _log.info("filling %d orders (3 events each)", plan.writer_orders)
    filled = await events.produce(
        bootstrap,
        topic,
        events.records(events.histories(orders=plan.writer_orders, mixed=False)),
        name="writer-fill",
        timeout=600,
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
    orders = measured["orders"]
    if orders != plan.writer_orders or measured["events"] != filled.events:
        raise RuntimeError(f"writer loaded {measured}, expected {plan.writer_orders} orders")
    consume_rate = _limit(results, "raw_consume")
    rebuild_rate = measured["events"] / measured["load_seconds"]
    growth = measured["rss_after_start"] - measured["rss_before"]
    retained = measured["rss_after_trim"] - measured["rss_before"]
    results["writer_startup"] = measured | {
        "fill_events_per_second": filled.events_per_second,
        "rebuild_events_per_second": rebuild_rate,
        "ratio_to_raw_consume": _div(rebuild_rate, consume_rate),
        "rss_growth_bytes": growth,
        "rss_retained_bytes": retained,
        "bytes_per_order": growth / orders,
        "retained_bytes_per_order": retained / orders,
    }
    rows += [
        Row(
            f"Writer start() on {orders:,} orders",
            _n(measured["start_seconds"], "s"),
            details=f"{measured['events']:,} events; rebuild alone {measured['load_seconds']:.2f}s",
        ),
        Row(
            "Writer rebuild from the log",
            _n(rebuild_rate, "events/s"),
            _n(consume_rate, "events/s"),
            _ratio(rebuild_rate, consume_rate),
            "read_to_end + decode + evolve, fresh process, uvloop",
        ),
        Row(
            "Writer memory per order",
            _n(growth / orders, "B/order"),
            details=f"RSS +{growth / 2**20:.0f} MiB; after gc+malloc_trim "
            f"+{retained / 2**20:.0f} MiB = {retained / orders:,.0f} B/order",
        ),
    ]


async def bench_http(
    infra: Infrastructure, plan: Plan, results: dict[str, Any], rows: list[Row]
) -> None:
    topic = f"bench.api.{uuid.uuid4().hex[:8]}"
    RESULTS.mkdir(exist_ok=True)
    log_file = RESULTS / "api.log"
    log_file.write_bytes(b"")
    produce_rate = _limit(results, "raw_produce")
    runs: list[dict[str, Any]] = []
    results["http"] = runs
    counts = (1, max(plan.closed_clients))
    _log.info("writer.submit in-process: %s clients, %.0fs each", counts, plan.http_seconds)
    await events.create_topic(infra.kafka_bootstrap_servers, f"{topic}.direct")
    meter = CpuMeter(_infra_pids(infra) | {"bench (writer)": os.getpid()})
    meter.start()
    direct = await writer_direct.closed_loop(
        infra.kafka_bootstrap_servers,
        f"{topic}.direct",
        clients=counts,
        duration=plan.http_seconds,
        warm_up=1.0 if plan.quick else 2.0,
        timeout=len(counts) * plan.http_seconds + 120,
    )
    cpu = meter.stop()  # over both runs
    results["writer_direct"] = [run.summary() | {"cpu_over_all_runs": cpu} for run in direct]
    for run in direct:
        rows.append(
            _http_row(
                f"Writer.submit in-process (no HTTP), {run.connections} client"
                + ("s" * (run.connections > 1)),
                run,
                produce_rate,
                "raw produce",
                cpu=run is direct[-1],
            )
        )
    with httpload.api_process(
        bootstrap=infra.kafka_bootstrap_servers,
        database_url=infra.database_url,
        topic=topic,
        log_file=log_file,
    ) as api:
        ready = await httpload.wait_ready(api, timeout=90)
        _log.info("API ready after %.1fs on port %d", ready, api.port)
        workload = httpload.Workload()
        host = "127.0.0.1"
        meter = CpuMeter(_infra_pids(infra) | {"api": api.process.pid, "loadgen": os.getpid()})
        await httpload.open_loop(  # warm-up, not reported
            host,
            api.port,
            workload,
            rate=200,
            duration=1.0 if plan.quick else 2.0,
            connections=32,
        )
        for rate in plan.http_rates:
            _log.info("open loop: %d commands/s for %.0fs", rate, plan.http_seconds)
            meter.start()
            load = await httpload.open_loop(
                host,
                api.port,
                workload,
                rate=rate,
                duration=plan.http_seconds,
                connections=plan.http_connections,
            )
            load.cpu = meter.stop()
            runs.append(load.summary())
            rows.append(_http_row(f"HTTP open loop, offered {rate}/s", load, rate, "offered"))
            await asyncio.sleep(1.0)  # let the writer's queue drain between levels
        for clients in plan.closed_clients:
            _log.info("closed loop: %d clients for %.0fs", clients, plan.http_seconds)
            meter.start()
            load = await httpload.closed_loop(
                host, api.port, workload, clients=clients, duration=plan.http_seconds
            )
            load.cpu = meter.stop()
            runs.append(load.summary())
            rows.append(
                _http_row(f"HTTP closed loop, {clients} clients", load, produce_rate, "raw produce")
            )
            await asyncio.sleep(1.0)  # same pause as between the open-loop levels
        if api.process.poll() is not None:
            raise RuntimeError(f"the API died during the run; see {log_file}")


def _http_row(
    name: str, load: httpload.LoadResult, limit: float, limit_name: str, *, cpu: bool = True
) -> Row:
    errors = ", ".join(f"{k} x{v}" for k, v in sorted(load.errors.items())) or "0"
    longest_gap, _ = load.stalls()
    details = (
        f"p50 {load.percentile(0.5) * 1000:.1f} ms, p99 {load.percentile(0.99) * 1000:.1f} ms, "
        f"max {max(load.latencies, default=0) * 1000:.0f} ms; longest gap without answers "
        f"{longest_gap * 1000:.0f} ms; errors {errors}"
    )
    if cpu and load.cpu:
        details += f"; {_cpu_details(load.cpu)}"
    return Row(
        name,
        _n(load.achieved_per_second, "cmd/s"),
        f"{_n(limit, '/s')} ({limit_name})",
        _ratio(load.achieved_per_second, limit),
        details,
    )


def _infra_pids(infra: Infrastructure) -> dict[str, int | None]:
    kafka = infra.kafka.process.pid if infra.kafka and infra.kafka.process else None
    postgres = infra.postgres.process.pid if infra.postgres and infra.postgres.process else None
    return {"kafka": kafka, "postgres*": postgres}


# -- main -----------------------------------------------------------------------------------


def _environment(quick: bool) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    ).stdout.strip()
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "git_commit": commit,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "memory_bytes": psutil.virtual_memory().total,
    }


async def run_all(infra: Infrastructure, plan: Plan, results: dict[str, Any]) -> list[Row]:
    """Each phase in turn; a failed phase is reported (row + JSON) and the next one still runs."""
    rows: list[Row] = []
    phases = (bench_raw_and_projector, bench_writer_startup, bench_http)
    async with asyncio.timeout(PHASE_TIMEOUT_S * len(phases)):
        for phase in phases:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(PHASE_TIMEOUT_S):
                    await phase(infra, plan, results, rows)
            except Exception as error:
                _log.exception("%s failed", phase.__name__)
                results.setdefault("failures", {})[phase.__name__] = repr(error)
                rows.append(Row(f"{phase.__name__} FAILED", "", details=repr(error)[:300]))
            results.setdefault("phase_seconds", {})[phase.__name__] = time.perf_counter() - started
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 3 s per HTTP level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("aiokafka", "kafka", "alembic", "projections", "service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    plan = Plan.make(args.quick)
    results: dict[str, Any] = {"environment": _environment(args.quick)}
    started = time.perf_counter()
    _log.info("starting Kafka and PostgreSQL")
    with infrastructure() as infra:
        results["infrastructure_start_seconds"] = time.perf_counter() - started
        _log.info("infrastructure up: %s", infra.kafka_bootstrap_servers)
        rows = _run(run_all(infra, plan, results))
    results["environment"]["load_average_at_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - started
    results["table"] = [row.__dict__ for row in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    load = results["environment"]
    print()
    print(
        f"Benchmarks ({'quick' if args.quick else 'full'}), {load['cpus']} CPUs, load average "
        f"{load['load_average_at_start'][0]:.1f} at start / {load['load_average_at_end'][0]:.1f} "
        f"at end, {results['total_seconds']:.0f}s in all"
    )
    print()
    print(table(rows))
    print()
    print(f"JSON: {RESULTS / 'latest.json'}")


def _run(coroutine: Any) -> list[Row]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        rows: list[Row] = asyncio.run(coroutine)
        return rows
    rows = uvloop.run(coroutine)
    return rows


if __name__ == "__main__":
    main()
