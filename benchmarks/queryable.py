"""Command-to-queryable latency: from a command's acknowledgement to a query that shows it.

Open loop, like ``httpload.open_loop``: commands are due at a fixed rate. As soon as a command
is acknowledged, the same client asks ``GET /orders/{id}`` with the command's
``X-Consistency-Token``; the API waits (bounded, server side) until the ``orders`` projection
has applied that event and answers 200, or answers 503 and the client asks again. The latency
runs from the acknowledgement to that 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import msgspec

from benchmarks.callers import Customer
from benchmarks.httpload import (
    Connection,
    HttpError,
    LoadResult,
    Workload,
    open_connections,
    pooled,
)

_GIVE_UP_S = 30.0


class _Answer(msgspec.Struct):
    order_id: str
    consistency_token: str


# A command's answer, who sent it (the query goes with its token), when it was acknowledged.
_Sent = tuple[_Answer, Customer, float]


@dataclass
class QueryableResult:
    commands: LoadResult
    visible: list[float] = field(default_factory=list)  # acknowledged -> query answered 200
    retries: int = 0  # queries answered 503 (not yet consistent) and asked again
    failures: Counter[str] = field(default_factory=Counter)

    def percentile(self, fraction: float) -> float:
        if not self.visible:
            return float("nan")
        ordered = sorted(self.visible)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    @classmethod
    def pooled(cls, results: list[QueryableResult]) -> QueryableResult:
        """Runs of one load as one: commands pooled, every query's latency together."""
        result = cls(pooled([r.commands for r in results]))
        for r in results:
            result.visible.extend(r.visible)
            result.retries += r.retries
            result.failures.update(r.failures)
        return result

    def summary(self) -> dict[str, object]:
        return {
            "commands": self.commands.summary(),
            "queries_answered": len(self.visible),
            "queryable_p50_ms": self.percentile(0.50) * 1000,
            "queryable_p90_ms": self.percentile(0.90) * 1000,
            "queryable_p99_ms": self.percentile(0.99) * 1000,
            "queryable_max_ms": max(self.visible, default=float("nan")) * 1000,
            "retries_after_503": self.retries,
            "query_failures": dict(self.failures),
        }


async def _until_visible(
    connection: Connection,
    answer: _Answer,
    customer: Customer,
    acknowledged: float,
    result: QueryableResult,
) -> None:
    headers = (
        f"X-Consistency-Token: {answer.consistency_token}\r\n".encode() + customer.authorization
    )
    path = f"/orders/{answer.order_id}"
    while time.perf_counter() - acknowledged < _GIVE_UP_S:
        try:
            status, _ = await asyncio.wait_for(
                connection.request("GET", path, headers=headers), _GIVE_UP_S
            )
        except (OSError, asyncio.IncompleteReadError, HttpError, TimeoutError) as error:
            result.failures[type(error).__name__] += 1
            return
        if status == 200:
            result.visible.append(time.perf_counter() - acknowledged)
            return
        if status != 503:
            result.failures[f"HTTP {status}"] += 1
            return
        result.retries += 1
    result.failures["never visible"] += 1


async def _command(
    connection: Connection, workload: Workload, commands: LoadResult, due: float
) -> _Sent | None:
    """Send the next command; its answer, sender and acknowledgement time, or None if it
    failed."""
    command = workload.next()
    commands.sent += 1
    try:
        status, payload = await asyncio.wait_for(
            connection.request(command.method, command.path, command.body, command.headers), 30
        )
    except (OSError, asyncio.IncompleteReadError, HttpError, TimeoutError) as error:
        commands.errors[type(error).__name__] += 1
        return None
    acknowledged = time.perf_counter()
    if status not in (200, 201):
        commands.errors[f"HTTP {status}"] += 1
        return None
    commands.record(due, acknowledged)
    workload.answered(command, status, payload)
    return msgspec.json.decode(payload, type=_Answer), command.customer, acknowledged


async def warm_up(host: str, port: int, workload: Workload, *, timeout: float) -> int:
    """Commands one at a time until one is queryable at once: the projector has joined."""
    connection = Connection(host, port)
    deadline = time.perf_counter() + timeout
    scratch = QueryableResult(LoadResult("warm-up", None, 1, timeout))
    try:
        while time.perf_counter() < deadline:
            sent = await _command(connection, workload, scratch.commands, time.perf_counter())
            if sent is not None:
                await _until_visible(connection, *sent, scratch)
            if scratch.visible and scratch.visible[-1] < 0.5:
                return len(scratch.visible)
    finally:
        connection.close()
    raise TimeoutError(f"no command became queryable within {timeout:.0f}s: {scratch.summary()}")


async def open_loop(
    host: str, port: int, workload: Workload, *, rate: float, duration: float, connections: int
) -> QueryableResult:
    """Offer ``rate`` commands/s for ``duration`` s; query each as soon as it is acknowledged.

    Commands and queries have pools of ``connections`` each, so a slow query never holds back
    the next command: the command load stays open loop.
    """
    result = QueryableResult(LoadResult("open+query", rate, connections, duration))
    command_pool = await open_connections(host, port, connections)
    query_pool = await open_connections(host, port, connections)
    due: asyncio.Queue[float] = asyncio.Queue()
    acknowledged: asyncio.Queue[_Sent] = asyncio.Queue()
    last_command = 0.0

    async def commander(connection: Connection) -> None:
        nonlocal last_command
        while True:
            since = await due.get()
            try:
                sent = await _command(connection, workload, result.commands, since)
                last_command = max(last_command, time.perf_counter())
                if sent is not None:
                    acknowledged.put_nowait(sent)
            finally:
                due.task_done()

    async def querier(connection: Connection) -> None:
        while True:
            answer, customer, at = await acknowledged.get()
            try:
                await _until_visible(connection, answer, customer, at, result)
            finally:
                acknowledged.task_done()

    tasks = [asyncio.create_task(commander(c)) for c in command_pool]
    tasks += [asyncio.create_task(querier(c)) for c in query_pool]
    total = int(rate * duration)
    started = time.perf_counter()
    try:
        scheduled = 0
        while scheduled < total:
            ready = min(total, int((time.perf_counter() - started) * rate) + 1)
            for index in range(scheduled, ready):
                due.put_nowait(started + index / rate)
            scheduled = ready
            await asyncio.sleep(0.001)  # scheduler tick: requests are due every 1/rate s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(due.join(), _GIVE_UP_S + 10)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(acknowledged.join(), _GIVE_UP_S + 10)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connection in (*command_pool, *query_pool):
            connection.close()
    result.commands.elapsed = (last_command or time.perf_counter()) - started
    unanswered = result.commands.ok - len(result.visible) - sum(result.failures.values())
    if unanswered > 0:
        result.failures["unfinished"] += unanswered
    return result
