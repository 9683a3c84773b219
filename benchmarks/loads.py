"""Loads measured with what they cost: the CPU of the processes taking part and the load
generator's longest garbage-collection pause; and the latency summary the table prints."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field

from benchmarks import httpload
from benchmarks.context import HOST, Plan
from benchmarks.meters import CpuMeter, GcPauses, cpu_details
from benchmarks.report import ms


@dataclass
class Metered:
    """What a load cost: CPU of the processes taking part (% of one core) and the load
    generator's longest garbage-collection pause."""

    cpu: dict[str, float] = field(default_factory=dict)
    gc_longest_s: float = 0.0


@contextlib.contextmanager
def metering(meter: CpuMeter) -> Iterator[Metered]:
    """Meter what runs inside the block; the figures are on the yielded ``Metered`` after it."""
    metered = Metered()
    meter.start()
    with GcPauses() as pauses:
        yield metered
    metered.cpu = meter.stop()
    metered.gc_longest_s = pauses.longest_s


async def measured(meter: CpuMeter, load: Awaitable[httpload.LoadResult]) -> httpload.LoadResult:
    """One load, with what it cost (``Metered``) recorded on its result."""
    with metering(meter) as metered:
        result = await load
    result.cpu = metered.cpu
    result.loadgen_gc_longest_s = metered.gc_longest_s
    return result


async def measured_open_loop(
    meter: CpuMeter, port: int, workload: httpload.Workload, rate: int, plan: Plan
) -> httpload.LoadResult:
    """One open-loop level of the plan's HTTP load, measured."""
    return await measured(
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


def latencies(load: httpload.LoadResult) -> str:
    """A load's latencies, stalls, errors and costs, as the table's details say them."""
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
