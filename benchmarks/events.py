"""Realistic event histories, sealed exactly as the writer seals them, and fast topic filling.

Histories come from the real ``decide``/``evolve`` of the domain, so every sequence is one the
writer could have produced (projections halt on anything else). Envelopes, keys and headers
are made by ``service.kernel.envelope`` with the same fields the writer passes.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from service.infra import topic as topics
from service.kernel import envelope
from service.kernel.domain import (
    AddItem,
    CancelOrder,
    ChangeItemQuantity,
    Command,
    CreateOrder,
    DeliverOrder,
    Order,
    PayOrder,
    PlaceOrder,
    ShipOrder,
    decide,
    evolve,
)

PARTITIONS = 12
TRANSACTION_RECORDS = 500
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
_CURRENCIES = ("EUR", "EUR", "EUR", "USD", "GBP")

Step = Callable[[Order | None], Command]


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record as the writer sends it: key = order id, envelope JSON, headers."""

    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def _uuid(rng: random.Random) -> str:
    """A random version-4 UUID string (as ``uuid.uuid4()`` gives), reproducible and cheap."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _plan(rng: random.Random, order_id: str, customers: int, mixed: bool) -> list[Step]:
    """The commands of one order's life; each step sees the state before it (for totals)."""
    customer = f"c-{rng.randrange(customers):07d}"
    currency = rng.choice(_CURRENCIES)
    items = [
        (f"SKU-{index}-{rng.randrange(5000):04d}", rng.randint(1, 5), rng.randrange(100, 20_000))
        for index in range(rng.randint(1, 3) if mixed else 1)
    ]

    def create(_state: Order | None) -> Command:
        return CreateOrder(order_id=order_id, at=_EPOCH, customer_id=customer, currency=currency)

    def add(sku: str, quantity: int, price: int) -> Step:
        return lambda _state: AddItem(
            order_id=order_id,
            at=_EPOCH,
            sku=sku,
            name=f"Article {sku}",
            quantity=quantity,
            unit_price=price,
        )

    def change(_state: Order | None) -> Command:
        sku, quantity, _price = items[0]
        return ChangeItemQuantity(order_id=order_id, at=_EPOCH, sku=sku, quantity=quantity + 1)

    def place(_state: Order | None) -> Command:
        return PlaceOrder(order_id=order_id, at=_EPOCH)

    def pay(state: Order | None) -> Command:
        assert state is not None
        return PayOrder(
            order_id=order_id,
            at=_EPOCH,
            amount=state.total,
            currency=state.currency,
            payment_reference=f"psp-{rng.randrange(10**9)}",
        )

    def ship(_state: Order | None) -> Command:
        tracking = f"JD{rng.randrange(10**10):010d}"
        return ShipOrder(order_id=order_id, at=_EPOCH, carrier="DHL", tracking_number=tracking)

    def deliver(_state: Order | None) -> Command:
        return DeliverOrder(order_id=order_id, at=_EPOCH)

    def cancel(_state: Order | None) -> Command:
        return CancelOrder(order_id=order_id, at=_EPOCH, reason="customer request")

    steps: list[Step] = [create, *(add(*item) for item in items)]
    if not mixed:
        return [*steps, place]
    if rng.random() < 0.1:
        steps.append(change)
    roll = rng.random()
    if roll < 0.08:
        return steps  # abandoned draft
    if roll < 0.13:
        return [*steps, cancel]
    steps.append(place)
    roll = rng.random()
    if roll < 0.05:
        return [*steps, cancel]
    if roll >= 0.90:
        return steps  # placed, never paid
    steps.append(pay)
    roll = rng.random()
    if roll < 0.05:
        return [*steps, cancel]  # refunded
    if roll >= 0.75:
        return steps  # paid, not shipped yet
    steps.append(ship)
    if rng.random() < 0.8:
        steps.append(deliver)
    return steps


def _order_events(
    rng: random.Random, start: datetime, customers: int, mixed: bool
) -> Iterator[envelope.Envelope]:
    """Seal one order's events lazily, with the fields the writer gives them."""
    order_id = _uuid(rng)
    state: Order | None = None
    at = start
    for step in _plan(rng, order_id, customers, mixed):
        at += timedelta(minutes=rng.randint(1, 240))
        command = step(state)
        command_id = _uuid(rng)
        for index, event in enumerate(decide(command, state)):
            state = evolve(state, event, order_id)
            yield envelope.seal(
                event,
                event_id=envelope.event_id_for(None, command_id, index),
                order_id=order_id,
                version=state.version,
                occurred_at=at,
                command_id=command_id,
                correlation_id=command_id,
                causation_id=command_id,
                idempotency_key=None,
                request_hash=None,
            )


def sealed(order_id: str, commands: Iterable[Command]) -> list[envelope.Envelope]:
    """The events ``commands`` decide for one order, one after another, each sealed as the
    writer seals it (at each command's time, with new ids)."""
    state: Order | None = None
    events = []
    for command in commands:
        command_id = str(uuid.uuid4())
        for index, event in enumerate(decide(command, state)):
            state = evolve(state, event, order_id)
            events.append(
                envelope.seal(
                    event,
                    event_id=envelope.event_id_for(None, command_id, index),
                    order_id=order_id,
                    version=state.version,
                    occurred_at=command.at,
                    command_id=command_id,
                    correlation_id=command_id,
                )
            )
    return events


def histories(
    *, orders: int, mixed: bool, seed: int = 7, window: int = 2000, days: int = 30
) -> Iterator[envelope.Envelope]:
    """Events of ``orders`` orders, interleaved like live traffic (per-order order kept).

    ``window`` orders are in flight at any time; each event is taken from a random one of them.
    """
    rng = random.Random(seed)
    customers = max(1, orders // 3)
    spacing = timedelta(days=days) / max(orders, 1)
    started = 0
    active: list[Iterator[envelope.Envelope]] = []
    while active or started < orders:
        while len(active) < window and started < orders:
            active.append(_order_events(rng, _EPOCH + spacing * started, customers, mixed))
            started += 1
        index = rng.randrange(len(active))
        item = next(active[index], None)
        if item is None:
            active[index] = active[-1]
            active.pop()
            continue
        yield item


def records(envelopes: Iterable[envelope.Envelope]) -> Iterator[Record]:
    for sealed in envelopes:
        yield Record(sealed.order_id.encode(), envelope.encode(sealed), envelope.headers(sealed))


# The first group of every UUID in an envelope (event ids are version 5, the others version 4),
# quoted in the JSON or alone as a key or header.
_UUID_HEAD = re.compile(rb"(?<![0-9a-f])[0-9a-f]{8}(?=-[0-9a-f]{4}-[1-8][0-9a-f]{3}-)")
_GOLDEN = 0x9E3779B1  # odd: k * _GOLDEN mod 2**32 differs for every copy k


class _Template:
    """A byte string with the first group of each UUID in it made a ``%08x`` placeholder."""

    __slots__ = ("form", "heads")

    def __init__(self, data: bytes) -> None:
        self.heads = tuple(int(match.group(), 16) for match in _UUID_HEAD.finditer(data))
        self.form = _UUID_HEAD.sub(b"%08x", data.replace(b"%", b"%%"))

    def shifted(self, shift: int) -> bytes:
        if not self.heads:
            return self.form.replace(b"%%", b"%")
        return self.form % tuple((head + shift) & 0xFFFFFFFF for head in self.heads)


def replicate(base: list[Record], count: int) -> Iterator[Record]:
    """``count`` records: ``base``, then copies of it whose every id is shifted to a new one.

    Sealing events through the real ``decide``/``evolve`` costs ~130 us each, too slow for a
    million; a copy keeps every order's life exactly as the domain produced it (same events,
    sizes and interleaving) under new order, event and command ids, so the copies are new
    orders as far as every projection is concerned.
    """
    templates: list[tuple[_Template, _Template, list[tuple[str, _Template]]]] = []
    for index in range(count):
        copy, position = divmod(index, len(base))
        record = base[position]
        if copy == 0:
            yield record
            continue
        if not templates:
            templates = [
                (_Template(r.key), _Template(r.value), [(n, _Template(v)) for n, v in r.headers])
                for r in base
            ]
        key, value, headers = templates[position]
        shift = copy * _GOLDEN
        yield Record(
            key.shifted(shift),
            value.shifted(shift),
            [(name, header.shifted(shift)) for name, header in headers],
        )


@dataclass
class Filled:
    """What a fill wrote: counts, timing, and the last record offset of each partition."""

    events: int = 0
    value_bytes: int = 0
    seconds: float = 0.0
    last_offsets: dict[int, int] = field(default_factory=dict)
    # Offsets of every record, per partition, ascending (transaction markers take offsets too).
    offsets: dict[int, list[int]] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_value_bytes(self) -> float:
        return self.value_bytes / self.events if self.events else 0.0


def transactional_producer(bootstrap: str, name: str) -> AIOKafkaProducer:
    """A producer configured like the writer's (idempotent, acks=all, transactional)."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"bench-{name}-{uuid.uuid4().hex[:8]}",
        enable_idempotence=True,
        acks="all",
        linger_ms=0,
        request_timeout_ms=30_000,
        max_batch_size=1024 * 1024,
    )


async def create_topic(bootstrap: str, topic: str, *, timeout: float = 30) -> None:
    """The events topic as the service creates it (infinite retention, 12 partitions).

    Returns once every partition has a leader, so the first timed send does not pay for the
    leader elections of a brand-new topic (NotLeaderForPartition and a retry back-off).
    """
    count = (await topics.create_topic(bootstrap, topic, partitions=PARTITIONS)).facts.partitions
    if count != PARTITIONS:
        raise RuntimeError(f"topic {topic} has {count} partitions, expected {PARTITIONS}")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        async with asyncio.timeout(timeout):
            while True:
                described = (await admin.describe_topics([topic]))[0]
                partitions = described["partitions"]
                if len(partitions) == PARTITIONS and all(
                    p["error_code"] == 0 and p["leader"] >= 0 for p in partitions
                ):
                    return
                await asyncio.sleep(0.05)  # poll until the leader elections are done
    finally:
        await admin.close()


async def produce(
    bootstrap: str,
    topic: str,
    source: Iterable[Record],
    *,
    name: str,
    timeout: float,
    per_transaction: int = TRANSACTION_RECORDS,
    keep_offsets: bool = False,
) -> Filled:
    """Produce ``source`` in transactions of ``per_transaction`` records; time the sends only.

    Producer start-up (``init_transactions``) is not timed; pulling records from ``source``
    is (pass a list to time the producer alone).
    """
    producer = transactional_producer(bootstrap, name)
    filled = Filled()
    async with asyncio.timeout(timeout):
        await producer.start()
        try:
            iterator = iter(source)
            started = time.perf_counter()
            while chunk := list(islice(iterator, per_transaction)):
                async with producer.transaction():
                    futures = [
                        await producer.send(
                            topic, value=record.value, key=record.key, headers=record.headers
                        )
                        for record in chunk
                    ]
                    for metadata in await asyncio.gather(*futures):
                        previous = filled.last_offsets.get(metadata.partition, -1)
                        filled.last_offsets[metadata.partition] = max(previous, metadata.offset)
                        if keep_offsets:
                            filled.offsets.setdefault(metadata.partition, []).append(
                                metadata.offset
                            )
                filled.events += len(chunk)
                filled.value_bytes += sum(len(record.value) for record in chunk)
            filled.seconds = time.perf_counter() - started
        finally:
            await producer.stop()
    return filled


async def _send_in_batches(
    producer: AIOKafkaProducer, topic: str, records: Sequence[Record]
) -> list[tuple[int, int, asyncio.Future[Any]]]:
    """Append ``records`` to per-partition batches and send each when full or at the end.

    Returns (partition, record count, future of the batch's metadata) per batch sent. The
    partition is the default partitioner's choice for the key, as with ``send``.
    """
    partitioner = DefaultPartitioner()
    partitions = list(range(PARTITIONS))
    sent: list[tuple[int, int, asyncio.Future[Any]]] = []
    open_batches: dict[int, tuple[Any, int]] = {}
    for record in records:
        partition = partitioner(record.key, partitions, partitions)
        batch, count = open_batches.get(partition) or (producer.create_batch(), 0)
        fields = {"timestamp": None, "key": record.key, "value": record.value}
        if batch.append(**fields, headers=record.headers) is None:  # full: send it
            sent.append(
                (partition, count, await producer.send_batch(batch, topic, partition=partition))
            )
            batch, count = producer.create_batch(), 0
            batch.append(**fields, headers=record.headers)
        open_batches[partition] = (batch, count + 1)
    for partition, (batch, count) in open_batches.items():
        sent.append(
            (partition, count, await producer.send_batch(batch, topic, partition=partition))
        )
    return sent


async def fill(
    bootstrap: str,
    topic: str,
    records: Sequence[Record],
    into: Filled,
    *,
    timeout: float,
    per_transaction: int = 5000,
) -> None:
    """Append ``records`` fast (not a measurement): whole batches per partition, big transactions.

    Every order's events still land in one partition, in order. Counts, bytes and the record
    offsets are added to ``into`` (a batch's records have consecutive offsets); time is not.
    """
    producer = transactional_producer(bootstrap, "fill")
    async with asyncio.timeout(timeout):
        await producer.start()
        try:
            for start in range(0, len(records), per_transaction):
                chunk = records[start : start + per_transaction]
                async with producer.transaction():
                    sent = await _send_in_batches(producer, topic, chunk)
                    for partition, count, future in sent:
                        base = (await future).offset
                        into.offsets.setdefault(partition, []).extend(range(base, base + count))
                        into.last_offsets[partition] = base + count - 1
                into.events += len(chunk)
                into.value_bytes += sum(len(record.value) for record in chunk)
        finally:
            await producer.stop()
