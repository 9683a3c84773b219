"""The daily_sales fold counts each event on the UTC day it happened, whatever its offset."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

from projections.models.daily_sales import DailySalesProjection
from projections.projection import Applied, oracle
from service.kernel import envelope
from service.kernel.events import DomainEvent, OrderCreated, OrderPaid, OrderPlaced

ORDER_ID = "order-1"


def _applied(event: DomainEvent, version: int, at: datetime) -> Applied:
    """``event`` as the projector sees it: sealed, written and decoded again."""
    sealed = envelope.seal(
        event,
        event_id=f"event-{version}",
        order_id=ORDER_ID,
        version=version,
        occurred_at=at,
        command_id=f"cmd-{version}",
        correlation_id=f"cmd-{version}",
    )
    decoded, event = envelope.decode(envelope.encode(sealed))
    return Applied(decoded, event, partition=0, offset=version - 1)


def _days(paid_at: datetime) -> dict[date, int]:
    """Orders paid per day after folding one order created, placed, then paid at ``paid_at``."""
    created = datetime(2026, 11, 27, 12, tzinfo=UTC)
    events = [
        _applied(OrderCreated(customer_id="c-1", currency="EUR"), 1, created),
        _applied(OrderPlaced(total=3750, item_count=1), 2, created),
        _applied(OrderPaid(amount=3750, currency="EUR", payment_reference="p"), 3, paid_at),
    ]
    rows = oracle(DailySalesProjection(), events).snapshot()["daily_sales"]
    return {row["day"]: row["orders_paid"] for row in rows if row["orders_paid"]}


def test_an_event_late_in_the_evening_west_of_utc_counts_on_the_next_utc_day() -> None:
    brasilia = timezone(timedelta(hours=-2))
    assert _days(datetime(2026, 11, 28, 23, 30, tzinfo=brasilia)) == {date(2026, 11, 29): 1}


def test_an_event_just_after_midnight_east_of_utc_counts_on_the_previous_utc_day() -> None:
    berlin_winter = timezone(timedelta(hours=1))
    assert _days(datetime(2026, 11, 29, 0, 30, tzinfo=berlin_winter)) == {date(2026, 11, 28): 1}


def test_events_in_utc_count_on_their_own_day() -> None:
    assert _days(datetime(2026, 11, 28, 0, 0, tzinfo=UTC)) == {date(2026, 11, 28): 1}
    assert _days(datetime(2026, 11, 28, 23, 59, 59, tzinfo=UTC)) == {date(2026, 11, 28): 1}
