"""REST commands: each request becomes one domain command, decided and appended by the writer."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, patch, post
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.openapi.spec import Example
from litestar.params import Body, HeaderParameter, PathParameter

from service import domain
from service.writer import Accepted, CommandRequest, Writer

# -- wire schemas (separate from domain commands and from tables) -------------------------------

Text = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$")
]
Identifier = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$", examples=["EUR"])]
Quantity = Annotated[int, msgspec.Meta(ge=1, le=domain.MAX_QUANTITY)]
MinorUnits = Annotated[int, msgspec.Meta(ge=0, le=domain.MAX_UNIT_PRICE)]
Amount = Annotated[
    int, msgspec.Meta(ge=0, le=domain.MAX_UNIT_PRICE * domain.MAX_QUANTITY * domain.MAX_ITEMS)
]


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class CreateOrderBody(_Body):
    customer_id: Identifier
    currency: Currency


class AddItemBody(_Body):
    sku: Identifier
    name: Text
    quantity: Quantity
    unit_price: MinorUnits


class ChangeQuantityBody(_Body):
    quantity: Quantity


class PayBody(_Body):
    amount: Amount
    currency: Currency
    payment_reference: Text


class ShipBody(_Body):
    carrier: Text
    tracking_number: Text


class CancelBody(_Body):
    reason: Text


class CommandResult(msgspec.Struct, frozen=True):
    order_id: str
    version: int
    consistency_token: str


def _example(summary: str, value: dict[str, Any]) -> list[Example]:
    return [Example(summary=summary, value=value)]


# -- headers ----------------------------------------------------------------------------------

IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match",
        required=False,
        description='Optimistic concurrency: the version the order must be at, e.g. "3"',
    ),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=False,
        max_length=128,
        description="Retries with the same key and body return the original response",
    ),
]
CorrelationId = Annotated[
    str | None, HeaderParameter(name="X-Correlation-Id", required=False, max_length=128)
]
OrderId = Annotated[str, PathParameter(min_length=1, max_length=64)]
Sku = Annotated[str, PathParameter(min_length=1, max_length=64)]
WriterDependency = NamedDependency[Writer]

_ETAG = re.compile(r'^\s*(?:W/)?"?(\d{1,18})"?\s*$')


def parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    match = _ETAG.match(value)
    if match is None:
        raise ValidationException(
            detail=f'If-Match must be a version in quotes, like "3"; got {value!r}'
        )
    return int(match.group(1))


def _request_hash(request: Request[Any, Any, Any], body: msgspec.Struct | None) -> str:
    digest = hashlib.sha256(f"{request.method} {request.scope['path']}\n".encode())
    if body is not None:
        digest.update(msgspec.json.encode(body))
    return digest.hexdigest()[:32]


def _respond(accepted: Accepted, *, status: int = 200, location: bool = False) -> Response[Any]:
    headers = {"ETag": f'"{accepted.version}"', "X-Consistency-Token": accepted.consistency_token}
    if location:
        headers["Location"] = f"/orders/{accepted.order_id}"
    if accepted.replayed:
        headers["Idempotent-Replayed"] = "true"
    body = CommandResult(accepted.order_id, accepted.version, accepted.consistency_token)
    return Response(body, status_code=status, headers=headers)


class OrderCommands(Controller):
    path = "/orders"
    tags = ["commands"]

    async def _submit(
        self,
        request: Request[Any, Any, Any],
        writer: WriterDependency,
        command: domain.Command,
        body: msgspec.Struct | None,
        if_match: str | None,
        idempotency_key: str | None,
        correlation_id: str | None,
    ) -> Accepted:
        return await writer.submit(
            CommandRequest(
                command=command,
                expected_version=parse_if_match(if_match),
                idempotency_key=idempotency_key,
                request_hash=_request_hash(request, body),
                correlation_id=correlation_id,
            )
        )

    @post("/", operation_id="createOrder", status_code=201, summary="Create a draft order")
    async def create_order(
        self,
        request: Request[Any, Any, Any],
        writer: WriterDependency,
        data: Annotated[
            CreateOrderBody,
            Body(
                examples=_example(
                    "A draft order in euros", {"customer_id": "c-42", "currency": "EUR"}
                )
            ),
        ],
        idempotency_key: IdempotencyKey = None,
        correlation_id: CorrelationId = None,
    ) -> Response[CommandResult]:
        command = domain.CreateOrder(
            order_id=str(uuid.uuid4()),
            at=datetime.now(UTC),
            customer_id=data.customer_id,
            currency=data.currency,
        )
        accepted = await self._submit(
            request, writer, command, data, None, idempotency_key, correlation_id
        )
        return _respond(accepted, status=201, location=True)

    @post(
        "/{order_id:str}/items",
        operation_id="addItem",
        status_code=200,
        summary="Add a line item to a draft order",
    )
    async def add_item(
        self,
        request: Request[Any, Any, Any],
        writer: WriterDependency,
        order_id: OrderId,
        data: Annotated[
            AddItemBody,
            Body(
                examples=_example(
                    "Two mugs at 12.50",
                    {"sku": "MUG-1", "name": "Mug", "quantity": 2, "unit_price": 1250},
                )
            ),
        ],
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
        correlation_id: CorrelationId = None,
    ) -> Response[CommandResult]:
        command = domain.AddItem(
            order_id=order_id,
            at=datetime.now(UTC),
            sku=data.sku,
            name=data.name,
            quantity=data.quantity,
            unit_price=data.unit_price,
        )
        return _respond(
            await self._submit(
                request, writer, command, data, if_match, idempotency_key, correlation_id
            )
        )

    @patch(
        "/{order_id:str}/items/{sku:str}",
        operation_id="changeItemQuantity",
        summary="Change the quantity of a line item",
    )
    async def change_quantity(
        self,
        request: Request[Any, Any, Any],
        writer: WriterDependency,
        order_id: OrderId,
        sku: Sku,
        data: Annotated[
            ChangeQuantityBody, Body(examples=_example("Three of them", {"quantity": 3}))
        ],
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
        correlation_id: CorrelationId = None,
    ) -> Response[CommandResult]:
        command = domain.ChangeItemQuantity(
            order_id=order_id, at=datetime.now(UTC), sku=sku, quantity=data.quantity
        )
        return _respond(
            await self._submit(
                request, writer, command, data, if_match, idempotency_key, correlation_id
            )
        )

    @delete(
        "/{order_id:str}/items/{sku:str}",
        operation_id="removeItem",
        status_code=200,
        summary="Remove a line item",
    )
    async def remove_item(
        self,
        request: Request[Any, Any, Any],
        writer: WriterDependency,
        order_id: OrderId,
        sku: Sku,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
        correlation_id: CorrelationId = None,
    ) -> Response[CommandResult]:
        command = domain.RemoveItem(order_id=order_id, at=datetime.now(UTC), sku=sku)
        return _respond(
            await self._submit(
                request, writer, command, None, if_match, idempotency_key, correlation_id
            )
        )

    @post(
        "/{order_id:str}/place",
        operation_id="placeOrder",
        status_code=200,
        summary="Place a draft order; its total is fixed",
    )
    async def place(
        self,
        request: Request[Any, Any, Any],
        writer: WriterDependency,
        order_id: OrderId,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
        correlation_id: CorrelationId = None,
    ) -> Response[CommandResult]:
        command = domain.PlaceOrder(order_id=order_id, at=datetime.now(UTC))
        return _respond(
            await self._submit(
                request, writer, command, None, if_match, idempotency_key, correlation_id
            )
        )

    @post(
        "/{order_id:str}/pay",
        operation_id="payOrder",
        status_code=200,
        summary="Pay a placed order: amount and currency must equal its total",
    )
    async def pay(
        self,
        request: Request[Any, Any, Any],
        writer: WriterDependency,
        order_id: OrderId,
        data: Annotated[
            PayBody,
            Body(
                examples=_example(
                    "Paying 25.00 EUR",
                    {"amount": 2500, "currency": "EUR", "payment_reference": "psp-8812"},
                )
            ),
        ],
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
        correlation_id: CorrelationId = None,
    ) -> Response[CommandResult]:
        command = domain.PayOrder(
            order_id=order_id,
            at=datetime.now(UTC),
            amount=data.amount,
            currency=data.currency,
            payment_reference=data.payment_reference,
        )
        return _respond(
            await self._submit(
                request, writer, command, data, if_match, idempotency_key, correlation_id
            )
        )

    @post(
        "/{order_id:str}/ship",
        operation_id="shipOrder",
        status_code=200,
        summary="Ship a paid order",
    )
    async def ship(
        self,
        request: Request[Any, Any, Any],
        writer: WriterDependency,
        order_id: OrderId,
        data: Annotated[
            ShipBody,
            Body(
                examples=_example(
                    "By parcel", {"carrier": "DHL", "tracking_number": "JD0146000032"}
                )
            ),
        ],
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
        correlation_id: CorrelationId = None,
    ) -> Response[CommandResult]:
        command = domain.ShipOrder(
            order_id=order_id,
            at=datetime.now(UTC),
            carrier=data.carrier,
            tracking_number=data.tracking_number,
        )
        return _respond(
            await self._submit(
                request, writer, command, data, if_match, idempotency_key, correlation_id
            )
        )

    @post(
        "/{order_id:str}/deliver",
        operation_id="deliverOrder",
        status_code=200,
        summary="Record the delivery of a shipped order",
    )
    async def deliver(
        self,
        request: Request[Any, Any, Any],
        writer: WriterDependency,
        order_id: OrderId,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
        correlation_id: CorrelationId = None,
    ) -> Response[CommandResult]:
        command = domain.DeliverOrder(order_id=order_id, at=datetime.now(UTC))
        return _respond(
            await self._submit(
                request, writer, command, None, if_match, idempotency_key, correlation_id
            )
        )

    @post(
        "/{order_id:str}/cancel",
        operation_id="cancelOrder",
        status_code=200,
        summary="Cancel an order that has not shipped; a paid order records its refund",
    )
    async def cancel(
        self,
        request: Request[Any, Any, Any],
        writer: WriterDependency,
        order_id: OrderId,
        data: Annotated[
            CancelBody,
            Body(examples=_example("Changed their mind", {"reason": "customer request"})),
        ],
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
        correlation_id: CorrelationId = None,
    ) -> Response[CommandResult]:
        command = domain.CancelOrder(order_id=order_id, at=datetime.now(UTC), reason=data.reason)
        return _respond(
            await self._submit(
                request, writer, command, data, if_match, idempotency_key, correlation_id
            )
        )
