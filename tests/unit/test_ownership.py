"""Ownership (design.md 9): a caller limited to one customer sees that customer's orders only,
and another customer's order as if it did not exist."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from service.kernel.access import Scope, order_seen_by, owns
from service.kernel.domain import AddItem, CreateOrder, Order, OrderStatus
from service.kernel.errors import AccessDenied

AT = datetime(2026, 1, 2, tzinfo=UTC)
ORDER = Order(
    order_id="o-1",
    version=3,
    status=OrderStatus.DRAFT,
    customer_id="c-1",
    currency="EUR",
    items=(),
    total=0,
    paid_amount=0,
)
ADD = AddItem(order_id="o-1", at=AT, sku="MUG", name="Mug", quantity=1, unit_price=100)


def _create(customer_id: str) -> CreateOrder:
    return CreateOrder(order_id="o-1", at=AT, customer_id=customer_id, currency="EUR")


def test_a_caller_without_owner_sees_every_order() -> None:
    assert owns(None, ORDER)
    assert order_seen_by(None, ADD, ORDER) is ORDER


def test_a_customer_sees_its_own_order() -> None:
    assert owns("c-1", ORDER)
    assert order_seen_by("c-1", ADD, ORDER) is ORDER


def test_another_customers_order_is_seen_as_missing() -> None:
    assert not owns("c-2", ORDER)
    assert order_seen_by("c-2", ADD, ORDER) is None
    assert order_seen_by("c-2", ADD, None) is None


def test_creating_for_another_customer_is_denied() -> None:
    with pytest.raises(AccessDenied) as denied:
        order_seen_by("c-2", _create("c-1"), None)
    assert denied.value.any_of == (Scope.ORDERS_WRITE_ANY,)


def test_creating_for_itself_sees_the_order_as_it_is() -> None:
    """Order ids are the service's to pick: finding one taken tells a client nothing."""
    assert order_seen_by("c-1", _create("c-1"), None) is None
    assert order_seen_by("c-1", _create("c-1"), ORDER) is ORDER
    assert order_seen_by(None, _create("c-9"), None) is None
