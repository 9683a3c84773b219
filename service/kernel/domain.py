"""The order aggregate as a Decider: commands, state, `decide`, `evolve`, `fold`.

The events it decides and folds are in `service.kernel.events` (the wire contract's payloads).

Pure: only the standard library and msgspec, no I/O and no clock. The time comes
in with each command (`at`) and belongs to the event envelope, not to the events.
Money is always integer minor units plus an ISO 4217 currency code.
"""

import enum
import sys
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Final, TypeAlias, assert_never

import msgspec
from msgspec.structs import replace

from service.kernel.errors import BadEvent, DomainError
from service.kernel.events import (
    DomainEvent,
    ItemAdded,
    ItemQuantityChanged,
    ItemRemoved,
    OrderCancelled,
    OrderCreated,
    OrderDelivered,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    ShippingAddress,
    ShippingAddressSet,
    event_type,
)
from service.kernel.values import (
    MAX_ADDRESS_LINES,
    MAX_ADDRESS_TEXT_LENGTH,
    MAX_POSTAL_CODE_LENGTH,
    has_control_characters,
    is_country,
    is_currency,
)

MAX_QUANTITY: Final = 10_000
MAX_UNIT_PRICE: Final = 90_000_000_00
MAX_ITEMS: Final = 100
MAX_TEXT_LENGTH: Final = 500
# The largest total an order can reach (9e15) stays below 2**53, so totals survive JSON
# consumers that read numbers as doubles (JavaScript) and Postgres BIGINT columns unchanged.
MAX_ORDER_TOTAL: Final = MAX_ITEMS * MAX_QUANTITY * MAX_UNIT_PRICE
# Changes of items and of the address stop at this version; the lifecycle commands still run,
# so an order never has more than MAX_ORDER_EVENTS + 4 events (placed, paid, shipped,
# delivered) and the writer's cost of keeping one, and a reader's of folding it, stays bounded.
MAX_ORDER_EVENTS: Final = 1_000


# --- Errors -------------------------------------------------------------------------


class OrderNotFound(DomainError):
    code = "order-not-found"

    def __init__(self, order_id: str) -> None:
        super().__init__(f"order {order_id!r} does not exist")
        self.order_id = order_id


class OrderAlreadyExists(DomainError):
    code = "order-already-exists"

    def __init__(self, order_id: str) -> None:
        super().__init__(f"order {order_id!r} already exists")
        self.order_id = order_id


class InvalidTransition(DomainError):
    code = "invalid-transition"

    def __init__(self, status: "OrderStatus", command: str) -> None:
        super().__init__(f"{command} is not allowed when the order is {status}")
        self.status = status
        self.command = command


class ItemNotFound(DomainError):
    code = "item-not-found"

    def __init__(self, sku: str) -> None:
        super().__init__(f"the order has no item with sku {sku!r}")
        self.sku = sku


class DuplicateItem(DomainError):
    code = "duplicate-item"

    def __init__(self, sku: str) -> None:
        super().__init__(f"the order already has an item with sku {sku!r}")
        self.sku = sku


class EmptyOrder(DomainError):
    code = "empty-order"

    def __init__(self, order_id: str) -> None:
        super().__init__(f"order {order_id!r} has no items")
        self.order_id = order_id


class PaymentMismatch(DomainError):
    code = "payment-mismatch"

    def __init__(
        self, *, expected_amount: int, expected_currency: str, amount: int, currency: str
    ) -> None:
        super().__init__(
            f"payment of {amount} {currency} does not match the order total of "
            f"{expected_amount} {expected_currency}"
        )
        self.expected_amount = expected_amount
        self.expected_currency = expected_currency
        self.amount = amount
        self.currency = currency


class InvalidCommand(DomainError):
    code = "invalid-command"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


class TooManyItems(DomainError):
    code = "too-many-items"

    def __init__(self, limit: int) -> None:
        super().__init__(f"an order holds at most {limit} items")
        self.limit = limit


class TooManyEvents(DomainError):
    code = "order-event-limit"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"an order takes at most {limit} events of changes: place it, pay it or cancel it"
        )
        self.limit = limit


class InvalidEventSequence(BadEvent):
    """Events that cannot follow each other: a corrupt history, never a rejected command."""


# --- Commands -----------------------------------------------------------------------


class _CommandBase(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    at: datetime


class CreateOrder(_CommandBase, frozen=True, kw_only=True):
    customer_id: str
    currency: str
    shipping_address: ShippingAddress | None = None


class SetShippingAddress(_CommandBase, frozen=True, kw_only=True):
    shipping_address: ShippingAddress


class AddItem(_CommandBase, frozen=True, kw_only=True):
    sku: str
    name: str
    quantity: int
    unit_price: int


class ChangeItemQuantity(_CommandBase, frozen=True, kw_only=True):
    sku: str
    quantity: int


class RemoveItem(_CommandBase, frozen=True, kw_only=True):
    sku: str


class PlaceOrder(_CommandBase, frozen=True, kw_only=True):
    pass


class PayOrder(_CommandBase, frozen=True, kw_only=True):
    amount: int
    currency: str
    payment_reference: str


class ShipOrder(_CommandBase, frozen=True, kw_only=True):
    carrier: str
    tracking_number: str


class DeliverOrder(_CommandBase, frozen=True, kw_only=True):
    pass


class CancelOrder(_CommandBase, frozen=True, kw_only=True):
    reason: str


Command: TypeAlias = (
    CreateOrder
    | AddItem
    | ChangeItemQuantity
    | RemoveItem
    | PlaceOrder
    | PayOrder
    | ShipOrder
    | DeliverOrder
    | CancelOrder
    | SetShippingAddress
)


# --- State --------------------------------------------------------------------------


class OrderStatus(enum.StrEnum):
    DRAFT = "draft"
    PLACED = "placed"
    PAID = "paid"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


# gc=False: these structs can never be part of a reference cycle, and untracked
# instances are smaller; the writer keeps one Order per order in memory.
class LineItem(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    sku: str
    name: str
    quantity: int
    unit_price: int


class Order(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The state of one order, as far as decisions need it.

    `version` is the number of events applied. `total` is the running sum of
    quantity * unit_price while draft and the amount fixed by OrderPlaced after.
    `paid_amount` is what OrderPaid received (a cancellation's refund lives in its event).
    `shipping_address` is where it goes (None: not known yet); shipping records it.
    """

    order_id: str
    version: int
    status: OrderStatus
    customer_id: str
    currency: str
    items: tuple[LineItem, ...]
    total: int
    paid_amount: int
    shipping_address: ShippingAddress | None = None


# --- decide ---------------------------------------------------------------------------


def decide(command: Command, state: Order | None) -> list[DomainEvent]:
    """Decide the events a command produces against the order's current state.

    `state` is None for an order that does not exist yet. Every accepted command
    yields exactly one event; a rejected one raises a DomainError. Checks run in
    a fixed order: the command's own values (InvalidCommand), the order's
    existence, its status (InvalidTransition), then the remaining rules.
    """
    _require_text("order_id", command.order_id)
    _require_utc("at", command.at)
    match command:
        case CreateOrder():
            return _create_order(command, state)
        case AddItem():
            return _add_item(command, state)
        case ChangeItemQuantity():
            return _change_item_quantity(command, state)
        case RemoveItem():
            return _remove_item(command, state)
        case PlaceOrder():
            return _place_order(command, state)
        case PayOrder():
            return _pay_order(command, state)
        case ShipOrder():
            return _ship_order(command, state)
        case DeliverOrder():
            return _deliver_order(command, state)
        case CancelOrder():
            return _cancel_order(command, state)
        case SetShippingAddress():
            return _set_shipping_address(command, state)
        case _:
            assert_never(command)


def _create_order(command: CreateOrder, state: Order | None) -> list[DomainEvent]:
    _require_text("customer_id", command.customer_id)
    _require_currency("currency", command.currency)
    if command.shipping_address is not None:
        _require_address("shipping_address", command.shipping_address)
    if state is not None:
        raise OrderAlreadyExists(command.order_id)
    return [
        OrderCreated(
            customer_id=command.customer_id,
            currency=command.currency,
            shipping_address=command.shipping_address,
        )
    ]


def _add_item(command: AddItem, state: Order | None) -> list[DomainEvent]:
    _require_text("sku", command.sku)
    _require_text("name", command.name)
    _require_int("quantity", command.quantity, 1, MAX_QUANTITY)
    _require_int("unit_price", command.unit_price, 0, MAX_UNIT_PRICE)
    order = _require_draft_change(command, state)
    if _index_of(order.items, command.sku) is not None:
        raise DuplicateItem(command.sku)
    if len(order.items) >= MAX_ITEMS:
        raise TooManyItems(MAX_ITEMS)
    return [
        ItemAdded(
            sku=command.sku,
            name=command.name,
            quantity=command.quantity,
            unit_price=command.unit_price,
        )
    ]


def _change_item_quantity(command: ChangeItemQuantity, state: Order | None) -> list[DomainEvent]:
    _require_text("sku", command.sku)
    _require_int("quantity", command.quantity, 1, MAX_QUANTITY)
    order = _require_draft_change(command, state)
    if _index_of(order.items, command.sku) is None:
        raise ItemNotFound(command.sku)
    return [ItemQuantityChanged(sku=command.sku, quantity=command.quantity)]


def _remove_item(command: RemoveItem, state: Order | None) -> list[DomainEvent]:
    _require_text("sku", command.sku)
    order = _require_draft_change(command, state)
    if _index_of(order.items, command.sku) is None:
        raise ItemNotFound(command.sku)
    return [ItemRemoved(sku=command.sku)]


def _place_order(command: PlaceOrder, state: Order | None) -> list[DomainEvent]:
    order = _require_status(command, state, OrderStatus.DRAFT)
    if not order.items:
        raise EmptyOrder(order.order_id)
    return [OrderPlaced(total=order.total, item_count=len(order.items))]


def _pay_order(command: PayOrder, state: Order | None) -> list[DomainEvent]:
    _require_int("amount", command.amount, 0, MAX_ORDER_TOTAL)
    _require_currency("currency", command.currency)
    _require_text("payment_reference", command.payment_reference)
    order = _require_status(command, state, OrderStatus.PLACED)
    if command.amount != order.total or command.currency != order.currency:
        raise PaymentMismatch(
            expected_amount=order.total,
            expected_currency=order.currency,
            amount=command.amount,
            currency=command.currency,
        )
    return [
        OrderPaid(
            amount=command.amount,
            currency=command.currency,
            payment_reference=command.payment_reference,
        )
    ]


def _ship_order(command: ShipOrder, state: Order | None) -> list[DomainEvent]:
    _require_text("carrier", command.carrier)
    _require_text("tracking_number", command.tracking_number)
    order = _require_status(command, state, OrderStatus.PAID)
    return [
        OrderShipped(
            carrier=command.carrier,
            tracking_number=command.tracking_number,
            shipping_address=order.shipping_address,
        )
    ]


def _deliver_order(command: DeliverOrder, state: Order | None) -> list[DomainEvent]:
    _require_status(command, state, OrderStatus.SHIPPED)
    return [OrderDelivered()]


def _cancel_order(command: CancelOrder, state: Order | None) -> list[DomainEvent]:
    _require_text("reason", command.reason)
    order = _require_status(command, state, OrderStatus.DRAFT, OrderStatus.PLACED, OrderStatus.PAID)
    refund = order.paid_amount if order.status is OrderStatus.PAID else 0
    return [OrderCancelled(reason=command.reason, refunded_amount=refund)]


def _set_shipping_address(command: SetShippingAddress, state: Order | None) -> list[DomainEvent]:
    _require_address("shipping_address", command.shipping_address)
    order = _require_status(command, state, OrderStatus.DRAFT, OrderStatus.PLACED)
    if order.version >= MAX_ORDER_EVENTS:
        raise TooManyEvents(MAX_ORDER_EVENTS)
    return [ShippingAddressSet(shipping_address=command.shipping_address)]


def _require_status(command: Command, state: Order | None, *allowed: OrderStatus) -> Order:
    if state is None:
        raise OrderNotFound(command.order_id)
    if state.status not in allowed:
        raise InvalidTransition(state.status, type(command).__name__)
    return state


def _require_draft_change(command: Command, state: Order | None) -> Order:
    """A draft that can take one more change of its items."""
    order = _require_status(command, state, OrderStatus.DRAFT)
    if order.version >= MAX_ORDER_EVENTS:
        raise TooManyEvents(MAX_ORDER_EVENTS)
    return order


def _require_text(field: str, value: str, limit: int = MAX_TEXT_LENGTH) -> None:
    if not value.strip():
        raise InvalidCommand(field, "must not be blank")
    if has_control_characters(value):
        raise InvalidCommand(field, "must not contain control characters")
    if len(value) > limit:
        raise InvalidCommand(field, f"must be at most {limit} characters")


def _require_address(field: str, address: ShippingAddress) -> None:
    _require_text(f"{field}.name", address.name, MAX_ADDRESS_TEXT_LENGTH)
    if not 1 <= len(address.lines) <= MAX_ADDRESS_LINES:
        raise InvalidCommand(f"{field}.lines", f"must hold 1 to {MAX_ADDRESS_LINES} lines")
    for index, line in enumerate(address.lines):
        _require_text(f"{field}.lines[{index}]", line, MAX_ADDRESS_TEXT_LENGTH)
    _require_text(f"{field}.city", address.city, MAX_ADDRESS_TEXT_LENGTH)
    _require_text(f"{field}.postal_code", address.postal_code, MAX_POSTAL_CODE_LENGTH)
    if address.region is not None:
        _require_text(f"{field}.region", address.region, MAX_ADDRESS_TEXT_LENGTH)
    if not is_country(address.country):
        raise InvalidCommand(f"{field}.country", "must be an ISO 3166-1 alpha-2 country code")


def _require_int(field: str, value: int, low: int, high: int) -> None:
    # bool is a subclass of int: True must not pass for a quantity of 1.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidCommand(field, f"must be an integer from {low} to {high}")


def _require_currency(field: str, value: str) -> None:
    if not is_currency(value):
        raise InvalidCommand(field, "must be the ISO 4217 code of a currency in circulation")


def _require_utc(field: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() != timedelta(0):
        raise InvalidCommand(field, "must be a timezone-aware UTC datetime")


def _index_of(items: tuple[LineItem, ...], sku: str) -> int | None:
    for index, item in enumerate(items):
        if item.sku == sku:
            return index
    return None


# --- evolve / fold ------------------------------------------------------------------


def evolve(state: Order | None, event: DomainEvent, order_id: str) -> Order:
    """Apply one event of order `order_id` to its state; the version grows by one.

    Events are facts, so only sequences that cannot exist (an event before
    OrderCreated, a second OrderCreated, an unknown sku, another order's
    state) are refused, with InvalidEventSequence.
    """
    if state is None:
        if isinstance(event, OrderCreated):
            return Order(
                order_id=order_id,
                version=1,
                status=OrderStatus.DRAFT,
                # One copy of each customer id and currency, however many orders share it.
                customer_id=sys.intern(event.customer_id),
                currency=sys.intern(event.currency),
                items=(),
                total=0,
                paid_amount=0,
                shipping_address=event.shipping_address,
            )
        raise InvalidEventSequence(f"{event_type(event)} before OrderCreated in {order_id!r}")
    if state.order_id != order_id:
        raise InvalidEventSequence(f"event of {order_id!r} applied to {state.order_id!r}")
    version = state.version + 1
    match event:
        case OrderCreated():
            raise InvalidEventSequence(f"{order_id!r} created twice")
        case ItemAdded():
            item = LineItem(
                sku=event.sku,
                name=event.name,
                quantity=event.quantity,
                unit_price=event.unit_price,
            )
            return replace(
                state,
                version=version,
                items=(*state.items, item),
                total=state.total + item.quantity * item.unit_price,
            )
        case ItemQuantityChanged():
            index = _existing_index(state, event.sku)
            old = state.items[index]
            new = replace(old, quantity=event.quantity)
            return replace(
                state,
                version=version,
                items=(*state.items[:index], new, *state.items[index + 1 :]),
                total=state.total + (new.quantity - old.quantity) * old.unit_price,
            )
        case ItemRemoved():
            index = _existing_index(state, event.sku)
            old = state.items[index]
            return replace(
                state,
                version=version,
                items=(*state.items[:index], *state.items[index + 1 :]),
                total=state.total - old.quantity * old.unit_price,
            )
        case OrderPlaced():
            return replace(state, version=version, status=OrderStatus.PLACED, total=event.total)
        case OrderPaid():
            return replace(
                state, version=version, status=OrderStatus.PAID, paid_amount=event.amount
            )
        case OrderShipped():
            return replace(state, version=version, status=OrderStatus.SHIPPED)
        case OrderDelivered():
            return replace(state, version=version, status=OrderStatus.DELIVERED)
        case OrderCancelled():
            return replace(state, version=version, status=OrderStatus.CANCELLED)
        case ShippingAddressSet():
            return replace(state, version=version, shipping_address=event.shipping_address)
        case _:
            assert_never(event)


def _existing_index(state: Order, sku: str) -> int:
    index = _index_of(state.items, sku)
    if index is None:
        raise InvalidEventSequence(f"no item {sku!r} in {state.order_id!r}")
    return index


FINAL_STATUSES: Final = frozenset({OrderStatus.DELIVERED, OrderStatus.CANCELLED})


def settled(order: Order) -> Order:
    """What an order keeps once it is delivered or cancelled (``FINAL_STATUSES``; any other is
    returned as it is): its id, version, status and customer. Every command on it is then
    refused by its status alone (a CreateOrder by its existence, an If-Match by its version,
    another customer's caller by its customer), so its items, money and address never decide
    anything again, and the writer need not hold them."""
    if order.status not in FINAL_STATUSES:
        return order
    return closed_order(
        order.order_id, order.version, order.status, order.customer_id, order.currency
    )


def closed_order(
    order_id: str, version: int, status: OrderStatus, customer_id: str, currency: str
) -> Order:
    """A delivered or cancelled order as ``settled`` keeps it, from the fields it keeps."""
    return Order(
        order_id=order_id,
        version=version,
        status=status,
        customer_id=customer_id,
        currency=currency,
        items=(),
        total=0,
        paid_amount=0,
    )


def fold(order_id: str, events: Iterable[DomainEvent]) -> Order | None:
    """The state of order `order_id` after all its events, in order; None if there are none."""
    state: Order | None = None
    for event in events:
        state = evolve(state, event, order_id)
    return state
