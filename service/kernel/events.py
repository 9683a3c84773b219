"""The order's domain events: what happened, as stored on the wire (the envelope's ``data``).

Each event type has an explicit, stable tag that never changes (its ``type`` on the wire and in
the Kafka headers). Pure: only the standard library and msgspec.
"""

from typing import TypeAlias, get_args

import msgspec


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Base of all order events. Tags are part of the stored log: never rename one.

    Scalars only, so never part of a reference cycle: ``gc=False`` keeps the hundreds of
    thousands a projector batch holds out of the cyclic collector's work.
    """


class OrderCreated(Event, frozen=True, kw_only=True, tag="OrderCreated"):
    customer_id: str
    currency: str


class ItemAdded(Event, frozen=True, kw_only=True, tag="ItemAdded"):
    sku: str
    name: str
    quantity: int
    unit_price: int


class ItemQuantityChanged(Event, frozen=True, kw_only=True, tag="ItemQuantityChanged"):
    sku: str
    quantity: int


class ItemRemoved(Event, frozen=True, kw_only=True, tag="ItemRemoved"):
    sku: str


class OrderPlaced(Event, frozen=True, kw_only=True, tag="OrderPlaced"):
    total: int
    item_count: int  # number of line items (distinct skus), not the sum of quantities


class OrderPaid(Event, frozen=True, kw_only=True, tag="OrderPaid"):
    amount: int
    currency: str
    payment_reference: str


class OrderShipped(Event, frozen=True, kw_only=True, tag="OrderShipped"):
    carrier: str
    tracking_number: str


class OrderDelivered(Event, frozen=True, kw_only=True, tag="OrderDelivered"):
    pass


class OrderCancelled(Event, frozen=True, kw_only=True, tag="OrderCancelled"):
    reason: str
    refunded_amount: int


DomainEvent: TypeAlias = (
    OrderCreated
    | ItemAdded
    | ItemQuantityChanged
    | ItemRemoved
    | OrderPlaced
    | OrderPaid
    | OrderShipped
    | OrderDelivered
    | OrderCancelled
)


def _tag_of(cls: type[Event]) -> str:
    tag = cls.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{cls.__name__} has no string tag")
    return tag


EVENT_TYPES: dict[str, type[Event]] = {_tag_of(cls): cls for cls in get_args(DomainEvent)}
_TAG_BY_CLASS: dict[type[Event], str] = {cls: tag for tag, cls in EVENT_TYPES.items()}


def event_type(event: DomainEvent) -> str:
    """The stable tag of an event (its `type` on the wire and in Kafka headers)."""
    return _TAG_BY_CLASS[type(event)]
