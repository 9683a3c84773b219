"""(e2) Writer start-up against the length of the history, for the same live orders.

Two topics hold the same 10,000 open (placed) orders; the rest of each history is orders
already delivered: 100,000 events in all, and 1,000,000. Each topic has its writer's changelog;
a writer starts on it twice, each time in a fresh process (``benchmarks.writer_startup``): the
first reads the whole log (it was written without a writer) and writes every order to the
changelog; the second reads the changelog and the log's tail (empty). The goal (issue 22): the
second start on the longer history costs at most 1.5x the one on the shorter.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from benchmarks import events
from benchmarks.context import Context
from benchmarks.phases.writer_memory import in_a_fresh_process
from benchmarks.report import Row, Target, n
from service.infra.topic import create_state_topic, state_topic_for
from service.kernel import domain, envelope

_log = logging.getLogger("benchmarks")

LIVE_ORDERS = 10_000
HISTORIES = (100_000, 1_000_000)
_AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
_BASE_ORDERS = 1_000  # sealed for real; the rest are copies with new ids (events.replicate)


def _order(n: int, *, delivered: bool) -> list[envelope.Envelope]:
    """One order's events: placed with two items, then paid, shipped and delivered."""
    order_id = str(uuid.uuid4())
    commands: list[domain.Command] = [
        domain.CreateOrder(order_id=order_id, at=_AT, customer_id=f"c-{n % 500}", currency="EUR"),
        domain.AddItem(order_id=order_id, at=_AT, sku="A", name="a", quantity=2, unit_price=500),
        domain.AddItem(order_id=order_id, at=_AT, sku="B", name="b", quantity=1, unit_price=900),
        domain.PlaceOrder(order_id=order_id, at=_AT),
    ]
    if delivered:
        commands += [
            domain.PayOrder(
                order_id=order_id, at=_AT, amount=1900, currency="EUR", payment_reference="p"
            ),
            domain.ShipOrder(order_id=order_id, at=_AT, carrier="DHL", tracking_number=f"T{n}"),
            domain.DeliverOrder(order_id=order_id, at=_AT),
        ]
    return events.sealed(order_id, commands)


def _history(total_events: int) -> list[events.Record]:
    """The live orders' events, then delivered orders' up to ``total_events`` in all."""
    live = [e for n in range(_BASE_ORDERS) for e in _order(n, delivered=False)]
    done = [e for n in range(_BASE_ORDERS) for e in _order(n, delivered=True)]
    live_events = LIVE_ORDERS * len(live) // _BASE_ORDERS
    return [
        *events.replicate(list(events.records(live)), live_events),
        *events.replicate(list(events.records(done)), total_events - live_events),
    ]


async def writer_takeover(ctx: Context) -> None:
    """(e2) writer start-up on 100k and on 1M events of the same 10,000 live orders."""
    bootstrap = ctx.infra.kafka_bootstrap_servers
    first, again = {}, {}
    for total in HISTORIES:
        topic = f"bench.takeover.{total}.{uuid.uuid4().hex[:8]}"
        await events.create_topic(bootstrap, topic)
        state = state_topic_for(topic)
        await create_state_topic(bootstrap, state, partitions=events.PARTITIONS)
        _log.info("filling %d events (%d live orders)", total, LIVE_ORDERS)
        filled = events.Filled()
        await events.fill(bootstrap, topic, _history(total), filled, timeout=900)
        start = ("benchmarks.writer_startup", bootstrap, topic, "--state-topic", state)
        first[total] = await in_a_fresh_process(*start)
        again[total] = await in_a_fresh_process(*start)
        if first[total]["events"] != total or again[total]["events"] != 0:
            raise RuntimeError(f"the writer loaded {first[total]}, then {again[total]}")
    short, long = (again[total]["start_seconds"] for total in HISTORIES)
    ctx.results["writer_takeover"] = {
        str(total): {"first": first[total], "again": again[total]} for total in HISTORIES
    }
    ctx.rows += [
        Row(
            "(e2) Writer start-up from its snapshots, same 10,000 live orders",
            n(long, "s at 1M events"),
            n(short, "s at 100k events"),
            f"{long / short:.2f}x",
            f"{again[HISTORIES[1]]['state_records']:,} and "
            f"{again[HISTORIES[0]]['state_records']:,} changelog records, no event read",
        ),
        Row(
            "(e2) First start on a log written without snapshots",
            n(first[HISTORIES[1]]["start_seconds"], "s at 1M events"),
            n(first[HISTORIES[0]]["start_seconds"], "s at 100k events"),
            "",
            "reads the whole log, then writes every order to the changelog (once)",
        ),
    ]
    ctx.targets.append(
        Target(
            "Writer start-up vs history",
            "1M events <= 1.5x 100k events",
            f"{long / short:.2f}x",
            long <= 1.5 * short,
        )
    )
