"""The Kafka limits: raw produce while filling the N-event topic, then raw consume of it."""

from __future__ import annotations

import logging
import time
import uuid
from itertools import islice

from benchmarks import events, raw
from benchmarks.context import Context
from benchmarks.report import Row, n

_log = logging.getLogger("benchmarks")


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
