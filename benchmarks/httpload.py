"""A minimal HTTP/1.1 keep-alive load generator for the command API (open and closed loop).

httpx costs more CPU per request than the server under test, so requests are written and
parsed by hand: one request at a time per persistent connection, status line plus
Content-Length. Open loop: requests are due at a fixed rate whatever the answers do, and
latency counts from the time a request was due, so queueing (in the client, the kernel or the
server) shows up in the figures instead of silently lowering the offered load.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import msgspec

from benchmarks.callers import Customer
from service.infra.embedded import free_port, spawn, stop_process
from service.infra.embedded.kafka import run_coroutine
from service.infra.topic import create_topic

_log = logging.getLogger(__name__)

_REQUEST_TIMEOUT_S = 30.0
_MAX_ITEMS_PER_ORDER = 50


class HttpError(Exception):
    """The response could not be read as HTTP/1.1 with a Content-Length."""


class Connection:
    """One persistent HTTP/1.1 connection; reconnects after a failure."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._prefix = f"Host: {host}:{port}\r\n".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), 10
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: bytes = b""
    ) -> tuple[int, bytes]:
        """One request; ``headers`` are extra header lines, each ending in CRLF."""
        status, _, payload = await self.exchange(method, path, body, headers)
        return status, payload

    async def exchange(
        self, method: str, path: str, body: bytes | None = None, headers: bytes = b""
    ) -> tuple[int, bytes, bytes]:
        """One request: status, the response head (lower case) and the body."""
        if self._writer is None or self._reader is None:
            await self.open()
        assert self._writer is not None
        assert self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self._prefix + headers
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        self._writer.write(head + b"\r\n" + (body or b""))
        try:
            raw = await self._reader.readuntil(b"\r\n\r\n")
            if not raw.startswith(b"HTTP/1.1 "):
                raise HttpError(f"not an HTTP/1.1 response: {raw[:40]!r}")
            status = int(raw[9:12])
            answer = raw.lower()
            start = answer.find(b"\r\ncontent-length:")
            if start < 0:
                raise HttpError("response without Content-Length")
            end = answer.index(b"\r\n", start + 2)
            payload = await self._reader.readexactly(int(answer[start + 17 : end]))
            if b"\r\nconnection: close" in answer:
                self.close()
            return status, answer, payload
        except BaseException:
            self.close()  # the stream is in an unknown state
            raise


@dataclass(frozen=True, slots=True)
class Command:
    """One request of the workload, as its customer sends it."""

    kind: str  # "create" or "add"
    method: str
    path: str
    body: bytes
    headers: bytes  # the customer's Authorization line; a create's Idempotency-Key too
    customer: Customer


class Workload:
    """Commands of the benchmark: one ``POST /orders`` to two ``POST /orders/{id}/items``.

    Each command is sent by a customer with its own token: a create by a customer picked at
    random, for itself, with an Idempotency-Key never used before; an item by the customer
    whose order it goes to (ids from the API's answers).
    """

    def __init__(self, customers: Sequence[Customer], seed: int = 5) -> None:
        if not customers:
            raise ValueError("a workload needs customers")
        self._rng = random.Random(seed)
        self._customers = customers
        self._orders: list[tuple[str, Customer]] = []
        self._items: dict[str, int] = {}
        self._sku = 0
        self._keys = itertools.count()
        # Keys are the caller's: unique per workload, so no two workloads ever share one.
        self._key_prefix = uuid.uuid4().hex[:16].encode()

    def create(self, customer: Customer) -> Command:
        """``customer`` creates an order for itself."""
        key = b"Idempotency-Key: %s-%d\r\n" % (self._key_prefix, next(self._keys))
        body = b'{"customer_id":"%s","currency":"EUR"}' % customer.customer_id.encode()
        return Command("create", "POST", "/orders", body, customer.authorization + key, customer)

    def introductions(self) -> list[Command]:
        """Each customer's first order, in turn: a warm-up after which every token has been
        seen (and verified) once, as in a steady state where one token serves many requests."""
        return [self.create(customer) for customer in self._customers]

    def next(self) -> Command:
        """The next command."""
        rng = self._rng
        if not self._orders or rng.random() < 1 / 3:
            return self.create(self._customers[rng.randrange(len(self._customers))])
        index = rng.randrange(len(self._orders))
        order_id, customer = self._orders[index]
        self._items[order_id] += 1
        if self._items[order_id] >= _MAX_ITEMS_PER_ORDER:  # stay below the domain's 100 items
            self._orders[index] = self._orders[-1]
            self._orders.pop()
        self._sku += 1
        body = b'{"sku":"SKU-%d","name":"Mug","quantity":2,"unit_price":1250}' % self._sku
        path = f"/orders/{order_id}/items"
        return Command("add", "POST", path, body, customer.authorization, customer)

    def answered(self, command: Command, status: int, payload: bytes) -> None:
        if command.kind == "create" and status == 201:
            order_id = msgspec.json.decode(payload)["order_id"]
            self._orders.append((order_id, command.customer))
            self._items[order_id] = 0


@dataclass
class LoadResult:
    mode: str
    offered_per_second: float | None
    connections: int
    duration: float
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    loadgen_gc_longest_s: float | None = None  # the load generator's longest GC pause
    retried: int = 0  # 503s sent again after their Retry-After (introductions only)

    def record(self, since: float, done: float) -> None:
        """A successful command, from ``since`` (sent or due) to ``done``."""
        self.ok += 1
        self.latencies.append(done - since)
        self.completions.append(done)

    def stalls(self, threshold: float = 0.1) -> tuple[float, int]:
        """The longest time without any answer, and how many such gaps exceeded ``threshold``.

        A p99 close to the longest gap means the tail is a pause of the whole pipeline (every
        client waiting on the same batch), not a few unlucky requests.
        """
        ordered = sorted(self.completions)
        gaps = [b - a for a, b in pairwise(ordered)]
        return max(gaps, default=0.0), sum(1 for gap in gaps if gap > threshold)

    @property
    def achieved_per_second(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def summary(self) -> dict[str, object]:
        longest_gap, long_gaps = self.stalls()
        return {
            "mode": self.mode,
            "offered_per_second": self.offered_per_second,
            "connections": self.connections,
            "duration_s": self.duration,
            "sent": self.sent,
            "ok": self.ok,
            "achieved_per_second": self.achieved_per_second,
            "errors": dict(self.errors),
            "p50_ms": self.percentile(0.50) * 1000,
            "p90_ms": self.percentile(0.90) * 1000,
            "p99_ms": self.percentile(0.99) * 1000,
            "max_ms": max(self.latencies, default=float("nan")) * 1000,
            "elapsed_s": self.elapsed,
            "longest_gap_between_answers_ms": longest_gap * 1000,
            "gaps_over_100ms": long_gaps,
            "cpu_percent_of_one_core": self.cpu,
            "loadgen_gc_longest_ms": (
                None if self.loadgen_gc_longest_s is None else self.loadgen_gc_longest_s * 1000
            ),
        }


def pooled(loads: Sequence[LoadResult]) -> LoadResult:
    """Runs of one load as one: counts, errors and latencies together, durations summed, CPU
    weighted by duration (no completions: gaps between runs are not stalls)."""
    first = loads[0]
    result = LoadResult(first.mode, first.offered_per_second, first.connections, 0.0)
    for load in loads:
        result.duration += load.duration
        result.sent += load.sent
        result.ok += load.ok
        result.errors.update(load.errors)
        result.latencies.extend(load.latencies)
        result.elapsed += load.elapsed
    if result.elapsed > 0:
        names = {name for load in loads for name in load.cpu}
        result.cpu = {
            name: round(
                sum(load.cpu.get(name, 0.0) * load.elapsed for load in loads) / result.elapsed, 1
            )
            for name in sorted(names)
        }
    pauses = [load.loadgen_gc_longest_s for load in loads if load.loadgen_gc_longest_s is not None]
    result.loadgen_gc_longest_s = max(pauses, default=None)
    return result


async def _one(
    connection: Connection,
    workload: Workload,
    result: LoadResult,
    since: float,
    command: Command | None = None,
) -> float:
    """Send ``command`` (else the workload's next) and record its answer; returns when."""
    command = command or workload.next()
    result.sent += 1
    try:
        status, payload = await asyncio.wait_for(
            connection.request(command.method, command.path, command.body, command.headers),
            _REQUEST_TIMEOUT_S,
        )
    except (OSError, asyncio.IncompleteReadError, HttpError, TimeoutError) as error:
        result.errors[type(error).__name__] += 1
        return time.perf_counter()
    done = time.perf_counter()
    if status in (200, 201):
        result.record(since, done)
        workload.answered(command, status, payload)
    else:
        result.errors[f"HTTP {status}"] += 1
    return done


async def open_connections(host: str, port: int, count: int) -> list[Connection]:
    connections = [Connection(host, port) for _ in range(count)]
    async with asyncio.timeout(30):
        await asyncio.gather(*(c.open() for c in connections))
    return connections


async def open_loop(
    host: str,
    port: int,
    workload: Workload,
    *,
    rate: float,
    duration: float,
    connections: int,
    drain_timeout: float = 30.0,
) -> LoadResult:
    """Offer ``rate`` commands/s for ``duration`` s; latency counts from each due time.

    Requests still queued or in flight ``drain_timeout`` s after the last one was due are
    abandoned and counted as ``unfinished`` errors.
    """
    result = LoadResult("open", rate, connections, duration)
    pool = await open_connections(host, port, connections)
    due: asyncio.Queue[float] = asyncio.Queue()
    last_done = 0.0

    async def worker(connection: Connection) -> None:
        nonlocal last_done
        while True:
            since = await due.get()
            try:
                last_done = max(last_done, await _one(connection, workload, result, since))
            finally:
                due.task_done()

    workers = [asyncio.create_task(worker(c)) for c in pool]
    total = int(rate * duration)
    started = time.perf_counter()
    try:
        scheduled = 0
        while scheduled < total:
            now = time.perf_counter()
            ready = min(total, int((now - started) * rate) + 1)
            for index in range(scheduled, ready):
                due.put_nowait(started + index / rate)
            scheduled = ready
            await asyncio.sleep(0.001)  # scheduler tick: requests are due every 1/rate s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(due.join(), drain_timeout)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for connection in pool:
            connection.close()
    unfinished = total - result.ok - result.error_count
    if unfinished:
        result.errors["unfinished"] += unfinished
    result.elapsed = (last_done or time.perf_counter()) - started
    return result


async def closed_loop(
    host: str, port: int, workload: Workload, *, clients: int, duration: float
) -> LoadResult:
    """``clients`` connections, each sending its next command as soon as the last returned."""
    result = LoadResult("closed", None, clients, duration)
    pool = await open_connections(host, port, clients)
    started = time.perf_counter()
    stop_at = started + duration
    last_done = started

    async def client(connection: Connection) -> None:
        nonlocal last_done
        while time.perf_counter() < stop_at:
            last_done = max(
                last_done, await _one(connection, workload, result, time.perf_counter())
            )

    try:
        async with asyncio.timeout(duration + _REQUEST_TIMEOUT_S + 5):
            await asyncio.gather(*(client(c) for c in pool))
    finally:
        for connection in pool:
            connection.close()
    result.elapsed = last_done - started
    return result


_INTRODUCTION_ATTEMPTS = 5


async def introduce(
    host: str, port: int, workload: Workload, *, clients: int, timeout: float
) -> LoadResult:
    """Every customer's first order (``Workload.introductions``), ``clients`` at a time.

    A 503 (a cold writer refusing what would wait too long) is retried after its Retry-After,
    as a well-behaved client does, a few times. Raises when one is still refused: a load whose
    commands all fail measures nothing.
    """
    commands = workload.introductions()
    result = LoadResult("introductions", None, clients, timeout)
    pool = await open_connections(host, port, clients)
    started = time.perf_counter()
    last_done = started

    async def client(connection: Connection) -> None:
        nonlocal last_done
        while commands:
            command = commands.pop()
            for _attempt in range(_INTRODUCTION_ATTEMPTS):
                refused = result.errors["HTTP 503"]
                done = await _one(connection, workload, result, time.perf_counter(), command)
                last_done = max(last_done, done)
                if result.errors["HTTP 503"] == refused:
                    break
                result.errors["HTTP 503"] -= 1  # retried, not failed (yet)
                result.retried += 1
                await asyncio.sleep(1.0)  # the Retry-After the writer answers with
            else:
                result.errors["HTTP 503"] += 1

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(client(c) for c in pool))
    finally:
        for connection in pool:
            connection.close()
    result.elapsed = last_done - started
    result.errors = +result.errors  # without the 503s that a retry answered
    if result.errors:
        raise RuntimeError(f"customers' first orders refused or failed: {dict(result.errors)}")
    if result.retried:
        _log.info("%d first orders were refused with 503 once and retried", result.retried)
    return result


# -- the API as a subprocess --------------------------------------------------------------------


@dataclass
class ApiProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_file: Path


@contextlib.contextmanager
def bare_process(*, log_file: Path) -> Iterator[ApiProcess]:
    """The bare Litestar app of ``benchmarks.bare_http`` on a free port; stopped on exit."""
    port = free_port()
    process = spawn(
        [sys.executable, "-m", "benchmarks.bare_http", "--port", str(port)], log_file=log_file
    )
    try:
        yield ApiProcess(process, port, log_file)
    finally:
        stop_process(process, grace_seconds=30)


@contextlib.contextmanager
def api_process(
    *,
    bootstrap: str,
    database_url: str,
    topic: str,
    log_file: Path,
    settings: Mapping[str, str],
) -> Iterator[ApiProcess]:
    """``orders api`` on a free port against the given infrastructure, with ``settings``
    (environment variables: its identity provider, auth on or off, rate limits) on top of
    this process's environment; stopped on exit. Creates the topic first if it is new, as
    an operator does (``orders topic create``)."""
    run_coroutine(create_topic(bootstrap, topic, partitions=12))
    port = free_port()
    env = {
        **os.environ,
        **settings,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "ORDERS_TOPIC": topic,
        "ORDERS_TRANSACTIONAL_ID": f"bench-api-{topic}",
    }
    # spawn: the API gets SIGTERM should this process die without cleaning up.
    process = spawn(
        [sys.executable, "-m", "service.edge.cli.main", "api", "--port", str(port)],
        log_file=log_file,
        env=env,
    )
    try:
        yield ApiProcess(process, port, log_file)
    finally:
        stop_process(process, grace_seconds=30)


async def wait_ready(api: ApiProcess, *, timeout: float) -> float:
    """Poll ``GET /health/ready`` until 200; returns the seconds it took."""
    started = time.perf_counter()
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if api.process.poll() is not None:
            raise RuntimeError(f"the API exited with {api.process.returncode}; see {api.log_file}")
        connection = Connection("127.0.0.1", api.port)
        try:
            status, _ = await asyncio.wait_for(connection.request("GET", "/health/ready"), 5)
            if status == 200:
                return time.perf_counter() - started
        except (OSError, asyncio.IncompleteReadError, HttpError, TimeoutError):
            pass
        finally:
            connection.close()
        await asyncio.sleep(0.2)  # readiness poll interval
    raise TimeoutError(f"the API was not ready within {timeout:.0f}s; see {api.log_file}")
