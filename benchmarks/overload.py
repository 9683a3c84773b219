"""An open loop past what the API sustains: what it accepts, what it refuses, how fast.

``httpload.open_loop`` keeps a fixed pool of connections, so past the API's capacity the
backlog builds up in the load generator, and the API never sees more than that many requests
at once. Here arrivals are independent, as from many clients: each command leaves when it is
due on an idle connection, or on a new one when none is idle (up to ``max_connections``; only
past that does a command wait in this process: how late commands left is reported). Latency
runs from the due time. Answers are sorted by status: accepted (200/201), refused as overloaded
(503, which must carry Retry-After), rate-limited (429), anything else, and transport errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from benchmarks.httpload import Connection, HttpError, Workload

_REQUEST_TIMEOUT_S = 30.0


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class OverloadResult:
    offered_per_second: float
    duration: float
    max_connections: int
    due: int = 0  # commands scheduled
    latencies: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)  # no HTTP answer at all
    without_retry_after: Counter[str] = field(default_factory=Counter)  # 503/429 lacking it
    lateness: list[float] = field(default_factory=list)  # due -> sent, in this process
    connections: int = 0  # senders (connections) in all; max_connections: some waited
    arrivals_s: float = 0.0  # first due to last due
    drained_s: float = 0.0  # last due to last answer
    cpu: dict[str, float] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return len(self.latencies.get(status, []))

    def share(self, *statuses: str) -> float:
        return sum(self.count(s) for s in statuses) / self.due if self.due else float("nan")

    def percentile(self, fraction: float, *statuses: str) -> float:
        return percentile([x for s in statuses for x in self.latencies.get(s, [])], fraction)

    @property
    def accepted(self) -> int:
        return self.count("200") + self.count("201")

    @property
    def accepted_per_second(self) -> float:
        """Accepted commands over the time from the first arrival to the last answer."""
        span = self.arrivals_s + self.drained_s
        return self.accepted / span if span > 0 else 0.0

    @property
    def unfinished(self) -> int:
        answered = sum(len(v) for v in self.latencies.values())
        return self.due - answered - sum(self.errors.values())

    def other_statuses(self) -> dict[str, int]:
        return {s: len(v) for s, v in sorted(self.latencies.items()) if s not in _NAMED_STATUSES}

    def summary(self) -> dict[str, object]:
        def part(*statuses: str) -> dict[str, float]:
            return {
                "count": sum(self.count(s) for s in statuses),
                "share": self.share(*statuses),
                "p50_ms": self.percentile(0.50, *statuses) * 1000,
                "p99_ms": self.percentile(0.99, *statuses) * 1000,
                "max_ms": max(
                    (x for s in statuses for x in self.latencies.get(s, [])),
                    default=float("nan"),
                )
                * 1000,
            }

        return {
            "offered_per_second": self.offered_per_second,
            "duration_s": self.duration,
            "due": self.due,
            "accepted": part("200", "201"),
            "accepted_per_second": self.accepted_per_second,
            "refused_503": part("503"),
            "rate_limited_429": part("429"),
            "other_statuses": self.other_statuses(),
            "errors": dict(self.errors),
            "unfinished": self.unfinished,
            "without_retry_after": dict(self.without_retry_after),
            "loadgen_lateness_p50_ms": percentile(self.lateness, 0.50) * 1000,
            "loadgen_lateness_p99_ms": percentile(self.lateness, 0.99) * 1000,
            "connections": self.connections,
            "max_connections": self.max_connections,
            "arrivals_s": self.arrivals_s,
            "drained_s": self.drained_s,
            "cpu_percent_of_one_core": self.cpu,
        }


_NAMED_STATUSES = frozenset({"200", "201", "503", "429"})


async def offer(
    host: str,
    port: int,
    workload: Workload,
    *,
    rate: float,
    duration: float,
    max_connections: int,
    drain_timeout: float = 30.0,
) -> OverloadResult:
    """Commands due at ``rate``/s for ``duration`` s, each sent when due whatever the answers.

    Requests unanswered ``drain_timeout`` s after the last one was due are abandoned and
    counted as unfinished.
    """
    result = OverloadResult(rate, duration, max_connections)
    due: asyncio.Queue[float] = asyncio.Queue()
    available = 0  # senders not yet started or waiting for a due command
    last_answer = 0.0

    async def sender() -> None:
        nonlocal available, last_answer
        connection = Connection(host, port)
        available -= 1
        try:
            while True:
                available += 1
                since = await due.get()
                available -= 1
                try:
                    await _send(connection, workload, result, since)
                    last_answer = max(last_answer, time.perf_counter())
                finally:
                    due.task_done()
        finally:
            connection.close()

    senders: list[asyncio.Task[None]] = []
    total = int(rate * duration)
    started = time.perf_counter()
    try:
        scheduled = 0
        while scheduled < total:
            ready = min(total, int((time.perf_counter() - started) * rate) + 1)
            for index in range(scheduled, ready):
                due.put_nowait(started + index / rate)
            scheduled = ready
            # A sender for each command that finds none available, as from independent clients.
            for _ in range(min(due.qsize() - available, max_connections - len(senders))):
                available += 1
                senders.append(asyncio.create_task(sender()))
            await asyncio.sleep(0.001)  # scheduler tick: commands are due every 1/rate s
        result.arrivals_s = (total - 1) / rate if total > 1 else 0.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(due.join(), drain_timeout)
    finally:
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
    result.due = total
    result.connections = len(senders)
    result.drained_s = max(0.0, last_answer - (started + result.arrivals_s))
    return result


async def _send(
    connection: Connection, workload: Workload, result: OverloadResult, since: float
) -> None:
    command = workload.next()
    result.lateness.append(time.perf_counter() - since)
    try:
        status, head, payload = await asyncio.wait_for(
            connection.exchange(command.method, command.path, command.body, command.headers),
            _REQUEST_TIMEOUT_S,
        )
    except (OSError, asyncio.IncompleteReadError, HttpError, TimeoutError) as error:
        result.errors[type(error).__name__] += 1
        return
    result.latencies[str(status)].append(time.perf_counter() - since)
    if status in (503, 429) and b"\r\nretry-after:" not in head:
        result.without_retry_after[str(status)] += 1
    workload.answered(command, status, payload)
