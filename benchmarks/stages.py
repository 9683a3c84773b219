"""Where the projector's time goes, stage by stage: a profiling aid, not one of the figures.

    .venv/bin/python -m benchmarks.stages [--events 200000] [--batch 20000]

Fills a topic with N events (as ``benchmarks.run`` does), reads them all into memory, then
applies them to every projection in batches against a fresh database, one stage at a time and
one projection after another (no overlap, unlike the runner): decode, load, fold, store. It
prints each stage's CPU time of this process per event, and for loads and stores the wall
time too (the difference is mostly Postgres). Uses ``KAFKA_BOOTSTRAP_SERVERS`` /
``DATABASE_URL`` when set, else starts its own broker and database.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import defaultdict
from itertools import islice

import uvloop
from aiokafka import AIOKafkaConsumer, TopicPartition

from benchmarks import events, projector
from projections.models.catalog import PROJECTIONS
from projections.projection import Applied, Db, begin, store
from projections.versions import live_targets
from service.infra.database import create_engine
from service.infra.embedded.stack import infrastructure
from service.infra.runtime import BATCH_YOUNG_GENERATION_THRESHOLD, tune_gc
from service.kernel import envelope

BASE_EVENTS = 25_000  # sealed through the domain; the rest are copies under new ids

Kept = tuple[int, int, bytes]  # partition, offset, value


async def _fill(bootstrap: str, topic: str, count: int) -> None:
    await events.create_topic(bootstrap, topic)
    base = list(
        islice(events.records(events.histories(orders=BASE_EVENTS // 4, mixed=True)), BASE_EVENTS)
    )
    built = list(events.replicate(base, count))
    await events.fill(bootstrap, topic, built, events.Filled(), timeout=600)


async def _read_all(bootstrap: str, topic: str, count: int) -> tuple[list[Kept], float]:
    """Every record of ``topic`` as (partition, offset, value); and the CPU ``getmany`` took."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(events.PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        kept: list[Kept] = []
        started = time.process_time()
        async with asyncio.timeout(300):
            while len(kept) < count:
                batch = await consumer.getmany(timeout_ms=500, max_records=20_000)
                for tp, records in batch.items():
                    kept.extend((tp.partition, r.offset, r.value or b"") for r in records)
        parse = time.process_time() - started
    finally:
        await consumer.stop()
    return kept[:count], parse


async def measure(bootstrap: str, server_url: str, count: int, batch: int) -> None:
    topic = f"stages.{uuid.uuid4().hex[:8]}"
    print(f"filling {topic} with {count:,} events")
    await _fill(bootstrap, topic, count)
    kept, parse = await _read_all(bootstrap, topic, count)
    async with projector.fresh_database(server_url) as url:
        pass
    engine = create_engine(url, autocommit=True)
    seconds: dict[str, float] = defaultdict(float)
    try:
        async with begin(engine) as connection:
            targets = await live_targets(connection, list(PROJECTIONS.values()))
        for start in range(0, len(kept), batch):
            began = time.process_time()
            chunk = [
                Applied(*envelope.decode(value), partition, offset)
                for partition, offset, value in kept[start : start + batch]
            ]
            seconds["decode (envelope + event)"] += time.process_time() - began
            async with begin(engine) as connection:
                for target in targets:
                    db = Db(connection, target.schema)
                    began, wall = time.process_time(), time.perf_counter()
                    state = await target.projection.load(db, chunk)
                    seconds[f"load {target.name}"] += time.process_time() - began
                    seconds[f"load {target.name} (wall)"] += time.perf_counter() - wall
                    began = time.process_time()
                    for applied in chunk:
                        target.projection.fold(state, applied)
                    seconds[f"fold {target.name}"] += time.process_time() - began
                    began, wall = time.process_time(), time.perf_counter()
                    await store(db, state)
                    seconds[f"store {target.name}"] += time.process_time() - began
                    seconds[f"store {target.name} (wall)"] += time.perf_counter() - wall
    finally:
        await engine.dispose()
    n = len(kept)
    print(f"\n{n:,} events, batches of {batch:,}; microseconds per event:")
    print(f"  {'getmany (aiokafka: fetch and parse records)':48s} {1e6 * parse / n:7.1f}")
    for name, spent in seconds.items():
        print(f"  {name:48s} {1e6 * spent / n:7.1f}")
    own = sum(spent for name, spent in seconds.items() if "(wall)" not in name)
    print(f"  {'this process, all stages but getmany':48s} {1e6 * own / n:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.stages", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=20_000)
    args = parser.parse_args()
    tune_gc(BATCH_YOUNG_GENERATION_THRESHOLD)  # as the projector runs
    with infrastructure() as infra:
        uvloop.run(
            measure(infra.kafka_bootstrap_servers, infra.database_url, args.events, args.batch)
        )


if __name__ == "__main__":
    main()
