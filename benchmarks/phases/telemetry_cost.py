"""(g) What telemetry costs: the API's sustained commands/s and the projector's events/s with
telemetry on (request metrics scraped every second, JSON logs, the access log, traces sampled
at 1% and exported over OTLP to a local sink) beside the same with ``ORDERS_TELEMETRY=off``
and text logs, in one run, alternating (``benchmarks.auth_cost``: warm-up runs, then on, off,
off, on ...). The writer's and the projector's own counters run on both sides: they are not
switchable, and cost a few label look-ups per command or batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from subprocess import Popen

from benchmarks import httpload, projector
from benchmarks.auth_cost import PAUSE_S, Alternated, Compared, alternate, order, side
from benchmarks.callers import NEVER_BITES, NO_SHEDDING
from benchmarks.context import HOST, Context, empty_log_file
from benchmarks.loads import measured
from benchmarks.meters import CpuMeter
from benchmarks.otlp_sink import OtlpSink
from benchmarks.report import Row, Target, n, ratio
from service.infra.database import create_engine
from service.infra.embedded import free_port, spawn, stop_process

_log = logging.getLogger("benchmarks")

SCRAPE_EVERY_S = 1.0  # Prometheus scrapes every 15 s by default: this is 15 times harsher
GOAL = 0.95  # at most 5% slower


def _telemetry(on: bool, sink: OtlpSink, service: str) -> dict[str, str]:
    """The environment of a process with telemetry on (as shipped, traces at 1%) or off."""
    if not on:
        return {"ORDERS_TELEMETRY": "off", "ORDERS_LOG_FORMAT": "text"}
    return {
        "ORDERS_TELEMETRY": "on",
        "ORDERS_LOG_FORMAT": "json",
        "OTEL_SERVICE_NAME": service,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{sink.endpoint}/v1/traces",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.01",
    }


@contextlib.asynccontextmanager
async def _scraping(port: int | None, sizes: list[int]) -> AsyncIterator[None]:
    """GET /metrics on ``port`` every SCRAPE_EVERY_S while the block runs; each answer's size
    is appended to ``sizes``."""
    if port is None:
        yield
        return

    async def scrape() -> None:
        while True:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(5):
                    reader, writer = await asyncio.open_connection(HOST, port)
                    writer.write(
                        b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
                    )
                    answer = await reader.read()  # until the server closes
                    writer.close()
                    if answer.startswith(b"HTTP/1.1 200"):
                        sizes.append(len(answer))
            await asyncio.sleep(SCRAPE_EVERY_S)  # the scrape interval

    task = asyncio.create_task(scrape())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def telemetry_cost(ctx: Context) -> None:
    scrapes: list[int] = []
    with OtlpSink() as sink:
        api = await _api_on_and_off(ctx, sink, scrapes)
        events = await _projector_on_and_off(ctx, sink, scrapes)
        spans = sink.spans
    ctx.results["telemetry_cost"] = {
        "api": api.summary(),
        "projector_events_per_second": {
            "order": [side(on) for on, _ in events.runs],
            "on": events.of(True),
            "off": events.of(False),
        },
        "spans_exported": spans,
        "scrape_every_s": SCRAPE_EVERY_S,
        "scrapes": len(scrapes),
        "scrape_bytes_max": max(scrapes, default=0),
    }
    api_ratio = api.rate_ratio()
    on_rates, off_rates = events.of(True), events.of(False)
    on_rate = sum(on_rates) / len(on_rates) if on_rates else 0.0
    off_rate = sum(off_rates) / len(off_rates) if off_rates else 0.0
    projector_ratio = on_rate / off_rate if off_rate > 0 else float("nan")
    ctx.rows += [
        Row(
            "(g) Command API sustained, telemetry on / off (closed loop, alternating)",
            f"{n(api.on.achieved_per_second, 'cmd/s')} / {n(api.off.achieved_per_second)}",
            "the same run with ORDERS_TELEMETRY=off",
            ratio(api.on.achieved_per_second, api.off.achieved_per_second),
            api.details() + f"; {spans} spans exported (1% sampled)",
        ),
        Row(
            "(g) Projector sustained, telemetry on / off (alternating)",
            f"{n(on_rate, 'events/s')} / {n(off_rate)}",
            "the same run with ORDERS_TELEMETRY=off",
            ratio(on_rate, off_rate),
            "runs in order: " + ", ".join(f"{side(on)} {n(rate)}/s" for on, rate in events.runs),
        ),
    ]
    ctx.targets += [
        Target(
            "API with telemetry, over without",
            f">= {GOAL:.2f}",
            f"{api_ratio:.3f}",
            api_ratio >= GOAL,
        ),
        Target(
            "Projector with telemetry, over without",
            f">= {GOAL:.2f}",
            f"{projector_ratio:.3f}",
            projector_ratio >= GOAL,
        ),
    ]


async def _api_on_and_off(ctx: Context, sink: OtlpSink, scrapes: list[int]) -> Compared:
    """Two ``orders api`` processes, telemetry on and off, the same closed loop in turn."""
    plan, infra = ctx.plan, ctx.infra
    topic = f"bench.telemetry.{uuid.uuid4().hex[:8]}"
    clients = max(plan.closed_clients)
    metrics_port = free_port()
    with contextlib.ExitStack() as stack:
        apis = {
            on: stack.enter_context(
                httpload.api_process(
                    bootstrap=infra.kafka_bootstrap_servers,
                    database_url=infra.database_url,
                    topic=f"{topic}.{side(on)}",
                    log_file=empty_log_file(f"api-telemetry-{side(on)}"),
                    settings=ctx.callers.environment(auth=True, rate_limit=NEVER_BITES)
                    | NO_SHEDDING
                    | _telemetry(on, sink, "orders-api")
                    | ({"ORDERS_METRICS_PORT": str(metrics_port)} if on else {}),
                )
            )
            for on in (True, False)
        }
        for on, process in apis.items():
            ready = await httpload.wait_ready(process, timeout=90)
            _log.info("API (telemetry %s) ready after %.1f s", side(on), ready)
        pids = {on: process.process.pid for on, process in apis.items()}
        meters = {
            on: CpuMeter(ctx.infra_pids() | {"api": pids[on], "loadgen": os.getpid()})
            for on in (True, False)
        }
        workloads = {on: httpload.Workload(ctx.callers.customers) for on in (True, False)}
        for on in (True, False):
            await httpload.introduce(
                HOST, apis[on].port, workloads[on], clients=clients, timeout=120
            )

        async def measure(on: bool) -> httpload.LoadResult:
            async with _scraping(metrics_port if on else None, scrapes):
                return await measured(
                    meters[on],
                    httpload.closed_loop(
                        HOST,
                        apis[on].port,
                        workloads[on],
                        clients=clients,
                        duration=plan.auth_seconds,
                    ),
                )

        _log.info(
            "command API, telemetry on and off in turn: %d clients, %.0f s each",
            clients,
            plan.auth_seconds,
        )
        runs: Alternated[httpload.LoadResult] = await alternate(
            measure, runs=plan.auth_runs, what="telemetry"
        )
        for on, process in apis.items():
            if process.process.poll() is not None:
                raise RuntimeError(f"the API (telemetry {side(on)}) died; see {process.log_file}")
    return Compared(runs)


@contextlib.contextmanager
def _projector(
    env: Mapping[str, str], log_file: Path, metrics_port: int | None
) -> Iterator[Popen[bytes]]:
    """``orders projector`` (all projections) as a child process, stopped on the way out."""
    argv = [sys.executable, "-m", "service.edge.cli.main", "projector"]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port)]
    process = spawn(argv, log_file=log_file, env={**os.environ, **env})
    try:
        yield process
    finally:
        stop_process(process, grace_seconds=30)


async def _projector_on_and_off(
    ctx: Context, sink: OtlpSink, scrapes: list[int]
) -> Alternated[float]:
    """``orders projector`` over the N-event topic from offset 0 into a fresh database, with
    telemetry on and off in turn (on, off, off, on) after a run to warm up (off, not counted:
    the first run was the slowest, whichever side it was): events/s between 10% and 90%."""
    filled = ctx.require_topic()
    bootstrap = ctx.infra.kafka_bootstrap_servers
    counted: list[tuple[bool, float]] = []
    runs = order(4)
    for index, on in enumerate((False, *runs)):
        if index:
            await asyncio.sleep(PAUSE_S)
        async with projector.fresh_database(ctx.infra.database_url) as database_url:
            pass
        metrics_port = free_port() if on else None
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "DATABASE_URL": database_url,
            "ORDERS_TOPIC": ctx.topic,
            "ORDERS_GROUP_PREFIX": f"bench-telemetry-{uuid.uuid4().hex[:8]}",
            **_telemetry(on, sink, "orders-projector"),
        }
        log_file = empty_log_file(f"projector-telemetry-{side(on)}")
        engine = create_engine(database_url, pool_size=1)
        try:
            _log.info(
                "projector, telemetry %s, %s: %d events",
                side(on),
                f"run {index} of {len(runs)}" if index else "a run to warm up, not counted",
                filled.events,
            )
            with _projector(env, log_file, metrics_port) as process:
                async with _scraping(metrics_port, scrapes):
                    run = await projector.follow(
                        engine,
                        topic=ctx.topic,
                        offsets=filled.offsets,
                        process=process,
                        log_file=log_file,
                        timeout=ctx.plan.projector_timeout,
                    )
        finally:
            await engine.dispose()
        if index:
            counted.append((on, run.sustained_per_second()))
    return Alternated(counted)
