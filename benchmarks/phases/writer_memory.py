"""(e) The writer's start-up in a fresh process on a topic of N orders: RSS per order; and the
bytes its state keeps per open and per closed order (``benchmarks.writer_state_size``)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import uuid
from typing import Any

from benchmarks import events
from benchmarks.context import ROOT, Context
from benchmarks.report import Row, Target, div, n, ratio

_log = logging.getLogger("benchmarks")


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
    measured = await in_a_fresh_process("benchmarks.writer_startup", bootstrap, topic)
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
    await _state_size(ctx)


async def _state_size(ctx: Context) -> None:
    """Bytes of writer state per open and per closed order, in a fresh process."""
    sizes = await in_a_fresh_process("benchmarks.writer_state_size", "20000")
    ctx.results["writer_state_size"] = sizes
    open_bytes, closed_bytes = sizes["bytes_per_open_order"], sizes["bytes_per_closed_order"]
    whole = sizes["bytes_per_closed_order_kept_whole"]
    ctx.rows += [
        Row(
            "Writer state per open order (placed, 2 items)",
            n(open_bytes, "B"),
            details=f"tracemalloc, {sizes['orders']:,.0f} orders",
        ),
        Row(
            "Writer state per closed order (delivered or cancelled)",
            n(closed_bytes, "B"),
            n(whole, "B kept whole"),
            ratio(closed_bytes, whole),
            "settled: version, status and customer only",
        ),
    ]


async def in_a_fresh_process(module: str, *args: str) -> dict[str, Any]:
    """What ``python -m module args`` measured: the JSON object on its last line."""
    completed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{completed.stderr[-3000:]}")
    measured: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return measured
