"""(i) What the writer's snapshots cost: commands/s through ``Writer.submit`` (no HTTP) with its
changelog (each transaction also writes the states it changed and the new positions, before it
commits) and without, runs alternating in the same run, so drift weighs on both sides alike."""

from __future__ import annotations

import logging
import statistics
import uuid

from benchmarks import events, writer_direct
from benchmarks.context import Context
from benchmarks.report import Row, n, ratio
from service.infra.topic import create_state_topic, state_topic_for

_log = logging.getLogger("benchmarks")

RUNS_PER_SIDE = 4
RUN_SECONDS = 8.0
CLIENTS = 64
# ABBA BAAB: each side runs as often first as second.
ORDER = ("without", "with", "with", "without") * (RUNS_PER_SIDE // 2)


async def snapshot_cost(ctx: Context) -> None:
    """(i) the writer's commands/s with its changelog against without."""
    bootstrap = ctx.infra.kafka_bootstrap_servers
    topics = {}
    for side in ("without", "with"):
        topics[side] = f"bench.snapshots.{side}.{uuid.uuid4().hex[:8]}"
        await events.create_topic(bootstrap, topics[side])
    state_topic = state_topic_for(topics["with"])
    await create_state_topic(bootstrap, state_topic, partitions=events.PARTITIONS)
    rates: dict[str, list[float]] = {side: [] for side in topics}
    for side in ORDER:
        [result] = await writer_direct.closed_loop(
            bootstrap,
            topics[side],
            clients=[CLIENTS],
            duration=RUN_SECONDS,
            warm_up=2.0,
            timeout=120,
            state_topic=state_topic if side == "with" else None,
        )
        rates[side].append(result.achieved_per_second)
        _log.info("writer %s snapshots: %.0f commands/s", side, result.achieved_per_second)
    without = statistics.median(rates["without"])
    with_ = statistics.median(rates["with"])
    ctx.results["snapshot_cost"] = {
        "clients": CLIENTS,
        "run_seconds": RUN_SECONDS,
        "without_commands_per_second": rates["without"],
        "with_commands_per_second": rates["with"],
        "ratio_with_to_without": with_ / without if without > 0 else None,
    }
    ctx.rows.append(
        Row(
            "Writer with its snapshots (changelog) vs without",
            n(with_, "commands/s"),
            n(without, "commands/s"),
            ratio(with_, without),
            details=f"Writer.submit, {CLIENTS} closed-loop clients, median of {RUNS_PER_SIDE} "
            f"runs of {RUN_SECONDS:.0f} s a side, alternating",
        )
    )
