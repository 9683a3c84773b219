"""Writer start-up in a fresh process: time of ``Writer.start()`` and the RSS it adds.

Run by ``benchmarks.run`` as ``python -m benchmarks.writer_startup BOOTSTRAP TOPIC``; prints one
JSON object on stdout. Everything is imported and a first RSS taken before the writer exists,
so the growth is the writer's state (plus what the consumer and allocator keep around; the
second figure is after ``gc.collect()`` and ``malloc_trim``, i.e. what the state retains).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import time
import uuid

import psutil

from service.write.contract import WriterConfig
from service.write.writer import Writer


def _trim() -> None:
    """Return freed heap pages to the OS (glibc), so RSS shows what is still held."""
    gc.collect()
    # Not glibc: RSS keeps freed pages, and the figures are upper bounds.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def measure(
    bootstrap: str, topic: str, state_topic: str | None = None
) -> dict[str, float | int]:
    process = psutil.Process(os.getpid())
    _trim()
    before = process.memory_info().rss
    writer = Writer(
        WriterConfig(
            kafka=bootstrap,
            topic=topic,
            transactional_id=f"bench-writer-startup-{uuid.uuid4().hex[:8]}",
            state_topic=state_topic,
        )
    )
    started = time.perf_counter()
    await writer.start()
    start_seconds = time.perf_counter() - started
    try:
        after = process.memory_info().rss
        _trim()
        retained = process.memory_info().rss
        return {
            "start_seconds": start_seconds,
            "load_seconds": writer.load_seconds,
            "events": writer.loaded_events,
            "state_records": writer.loaded_state_records,
            "orders": len(writer.orders),
            "rss_before": before,
            "rss_after_start": after,
            "rss_after_trim": retained,
        }
    finally:
        await writer.stop(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bootstrap")
    parser.add_argument("topic")
    parser.add_argument("--state-topic", help="the writer's changelog (snapshots)")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the API runs on uvloop where it exists
        result = asyncio.run(measure(args.bootstrap, args.topic, args.state_topic))
    else:
        result = uvloop.run(measure(args.bootstrap, args.topic, args.state_topic))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
