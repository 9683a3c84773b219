"""The order's domain events: what happened, as stored on the wire (the envelope's ``data``).

Each event type has an explicit, stable tag that never changes (its ``type`` on the wire and in
the Kafka headers). A change of an event's fields is a new schema version of it, with an upcaster
from the one before (``service/kernel/envelope.py``). Pure: only the standard library, msgspec
and the value rules.
"""

from typing import Annotated, TypeAlias, get_args

import msgspec

from service.kernel.values import (
    MAX_ADDRESS_LINES,
    MAX_ADDRESS_TEXT_LENGTH,
    MAX_POSTAL_CODE_LENGTH,
    NO_CONTROL_CHARACTERS_PATTERN,
    Country,
)

AddressText = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=MAX_ADDRESS_TEXT_LENGTH, pattern=NO_CONTROL_CHARACTERS_PATTERN
    ),
]
PostalCode = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=MAX_POSTAL_CODE_LENGTH, pattern=NO_CONTROL_CHARACTERS_PATTERN
    ),
]
AddressLines = Annotated[
    tuple[AddressText, ...], msgspec.Meta(min_length=1, max_length=MAX_ADDRESS_LINES)
]


# Where an order goes. ``region`` (state, province) only where the country uses one; ``country``
# is an ISO 3166-1 alpha-2 code. Strings only: never part of a cycle. (No docstrings on the
# types of event data: msgspec puts them in the published schemas, where an edit is a change.)
class ShippingAddress(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    name: AddressText
    lines: AddressLines
    city: AddressText
    postal_code: PostalCode
    region: AddressText | None = None
    country: Country


class Event(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True, gc=False
):
    """Base of all order events. Tags are part of the stored log: never rename one. A field
    left at its default (an absent shipping address) is left out of the stored data.

    Scalars and addresses only, so never part of a reference cycle: ``gc=False`` keeps the
    hundreds of thousands a projector batch holds out of the cyclic collector's work.
    """


class OrderCreated(Event, frozen=True, kw_only=True, tag="OrderCreated"):
    customer_id: str
    currency: str
    shipping_address: ShippingAddress | None = None  # since schema version 2


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
    # The address the order was shipped to (since schema version 2; None: it had none).
    shipping_address: ShippingAddress | None = None


# The order's shipping address, set or changed while it is a draft or placed.
class ShippingAddressSet(Event, frozen=True, kw_only=True, tag="ShippingAddressSet"):
    shipping_address: ShippingAddress


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
    | ShippingAddressSet
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
