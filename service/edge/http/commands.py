"""REST commands: each request becomes one domain command, decided and appended by the writer."""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, patch, post, put
from litestar.di import NamedDependency, Provide
from litestar.exceptions import ClientException, HTTPException, ValidationException
from litestar.openapi.spec import Example
from litestar.params import Body, HeaderParameter, PathParameter, SkipValidation
from litestar.types import Receive

from projections.log_ends import LogEnds
from service.edge.http.auth import requires
from service.edge.http.forwarding import Forwarded, Forwarder, forwarded
from service.edge.http.problems import ClientGone, problem_responses
from service.edge.logs import CORRELATION_ID
from service.infra import tracing
from service.infra.eventlog import new_order_id
from service.kernel import domain
from service.kernel.access import Caller, Scope
from service.kernel.errors import AccessDenied
from service.kernel.events import AddressLines, AddressText, PostalCode, ShippingAddress
from service.kernel.values import NO_CONTROL_CHARACTERS_PATTERN, Country, Currency
from service.write.contract import Accepted, CommandRequest, WriteSide
from service.write.ownership import OwnedElsewhere, PartitionMoving

# -- wire schemas (separate from domain commands and from tables) -------------------------------

# Ids of orders, customers and items: what a URL path can carry unescaped, nothing Postgres or a
# log line could choke on. "(?!\n)": Python's "$" also matches before a final newline.
IDENTIFIER_PATTERN = r"^[A-Za-z0-9._:-]+(?!\n)$"
# Idempotency keys and correlation ids: visible ASCII, no spaces, nothing empty.
HEADER_TOKEN_PATTERN = r"^[!-~]+$"

Text = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_CONTROL_CHARACTERS_PATTERN)
]
Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=IDENTIFIER_PATTERN)]
Quantity = Annotated[int, msgspec.Meta(ge=1, le=domain.MAX_QUANTITY)]
MinorUnits = Annotated[int, msgspec.Meta(ge=0, le=domain.MAX_UNIT_PRICE)]
Amount = Annotated[
    int, msgspec.Meta(ge=0, le=domain.MAX_UNIT_PRICE * domain.MAX_QUANTITY * domain.MAX_ITEMS)
]


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ShippingAddressBody(_Body, kw_only=True):
    name: AddressText
    lines: AddressLines
    city: AddressText
    postal_code: PostalCode
    region: AddressText | None = None
    country: Country

    def address(self) -> ShippingAddress:
        return ShippingAddress(
            name=self.name,
            lines=self.lines,
            city=self.city,
            postal_code=self.postal_code,
            region=self.region,
            country=self.country,
        )


class CreateOrderBody(_Body):
    customer_id: Identifier
    currency: Currency
    shipping_address: ShippingAddressBody | None = None


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


_ADDRESS = {
    "name": "Erika Mustermann",
    "lines": ["Heidestraße 17"],
    "city": "Berlin",
    "postal_code": "10557",
    "country": "DE",
}


# -- headers ----------------------------------------------------------------------------------

# A version, quoted as an entity tag (quotes on both sides or on neither); a bare or weak one
# ("W/") is read the same way. (The server strips the whitespace around a header value.)
_ETAG_PATTERN = r'^(?:W/)?("?)(\d{1,18})\1$'
_ETAG = re.compile(_ETAG_PATTERN)

IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match",
        required=False,
        description='Optimistic concurrency: the version the order must be at, e.g. "3"',
        # Documented, not enforced here: parse_if_match answers a mismatch with a clearer 400.
        schema_extra={"pattern": _ETAG_PATTERN},
    ),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=False,
        min_length=1,
        max_length=128,
        pattern=HEADER_TOKEN_PATTERN,
        description="Retries with the same key and body return the original response",
    ),
]
CreationIdempotencyKey = Annotated[
    str,
    HeaderParameter(
        name="Idempotency-Key",
        required=True,
        min_length=1,
        max_length=128,
        pattern=HEADER_TOKEN_PATTERN,
        description="Required to create an order: a create retried after a timeout with the "
        "same key and body returns the original order instead of making a second one",
    ),
]
CorrelationId = Annotated[
    str | None,
    HeaderParameter(
        name="X-Correlation-Id",
        required=False,
        min_length=1,
        max_length=128,
        pattern=HEADER_TOKEN_PATTERN,
        description="Carried by the command's events and every log line about it, and echoed "
        "in the response; without it, the trace id of a W3C traceparent, or a new id",
    ),
]
OrderId = Annotated[str, PathParameter(min_length=1, max_length=64, pattern=IDENTIFIER_PATTERN)]
Sku = Annotated[str, PathParameter(min_length=1, max_length=64, pattern=IDENTIFIER_PATTERN)]
# Handed in by the composition root: Litestar need not validate it on every request.
SinkDependency = NamedDependency[SkipValidation["CommandSink"]]


@dataclass(frozen=True, slots=True)
class CommandSink:
    """Where the command handlers send commands: the writer, and what queries must learn
    of each accepted one (where its last event sits, so that a consistency token up to there
    is known to be in the log)."""

    writer: WriteSide
    log_ends: LogEnds | None = None
    # Sends a command on to its partition's owner when another instance owns it.
    forwarder: Forwarder | None = None

    async def submit(self, request: CommandRequest) -> Accepted:
        accepted = await self.writer.submit(request)
        if self.log_ends is not None:
            self.log_ends.note(accepted.partition, accepted.offset)
        return accepted


_JSON_MEDIA_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")


class StrictJsonRequest(Request[Any, Any, Any]):
    """A request whose body must be declared JSON (else 415) and is decoded as strictly as the
    OpenAPI schema states it.

    Only the commands that take a body read it, and they read it before anything else is
    checked, so a body of another media type is a 415 whatever else is wrong with the request.
    Litestar converts a body leniently (``"2"`` or ``2.0`` pass for an integer) and answers 500
    to two kinds of broken JSON that msgspec does not report as a DecodeError: bytes in a string
    that are not UTF-8, and nesting too deep for the decoder. Each of these is a 400 here. The
    body is decoded once, straight into the handler's body type.
    """

    async def body(self) -> bytes:
        media_type = self.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if _JSON_MEDIA_TYPE.match(media_type) is None:
            raise HTTPException(
                status_code=415,
                detail=f"the body must be application/json; got {media_type or 'no Content-Type'}",
            )
        return await super().body()

    async def json(self) -> Any:
        data = self.route_handler.parsed_fn_signature.parameters.get("data")
        body = await self.body()
        if data is None:
            return await super().json()
        try:
            return msgspec.json.decode(body, type=data.annotation)  # strict, unlike Litestar's
        except msgspec.ValidationError as error:
            raise ValidationException(
                detail=f"Validation failed for {self.method} {self.url.path}",
                extra=[{"message": str(error), "source": "body"}],
            ) from error
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as error:
            raise ClientException(detail=f"the body is not valid JSON: {error}") from error


_WRITE = requires(Scope.ORDERS_WRITE, Scope.ORDERS_WRITE_ANY)
_PAY = requires(Scope.PAYMENTS_WRITE)
_FULFIL = requires(Scope.FULFILMENT_WRITE)
_BODY_PROBLEMS = problem_responses(400, 404, 409, 412, 413, 415, 422, 503)
_PROBLEMS = problem_responses(400, 404, 409, 412, 422, 503)


def parse_if_match(value: str | None) -> int | None:
    """``"3"`` -> 3; no header -> None; anything else is a 400."""
    if value is None:
        return None
    match = _ETAG.match(value.strip())
    if match is None:
        raise ValidationException(
            detail=f'If-Match must be a version in quotes, like "3"; got {value!r}'
        )
    return int(match.group(2))


def _request_hash(
    request: Request[Any, Any, Any], expected_version: int | None, body: msgspec.Struct | None
) -> str:
    """What a retry with the same Idempotency-Key must repeat: method, path, If-Match, body."""
    digest = hashlib.sha256(
        f"{request.method} {request.scope['path']} {expected_version}\n".encode()
    )
    if body is not None:
        digest.update(msgspec.json.encode(body))
    return digest.hexdigest()[:32]


async def _cancel_when_gone(receive: Receive, waiting: asyncio.Task[Any]) -> None:
    """Cancel ``waiting`` once the client disconnects: the writer then drops its command if
    it is still queued. Runs while the command waits; the body has been read by then."""
    while (await receive())["type"] != "http.disconnect":
        pass
    waiting.cancel()


@dataclass(frozen=True, slots=True)
class CommandContext:
    """What a command request brings besides its body, read once for every handler: the
    caller, where commands go, the time the command happens at, and the headers of every
    command."""

    request: Request[Caller, Any, Any]
    sink: CommandSink
    at: datetime
    idempotency_key: str | None
    correlation_id: str | None
    expected_version: int | None = None  # If-Match; never sent with a new order

    @property
    def caller(self) -> Caller:
        return self.request.user

    def new_order_id(self) -> str:
        """The id of the order a create makes: in the partition its caller and Idempotency-Key
        pick (a create always has a key), whichever instance the request reached."""
        assert self.idempotency_key is not None, "a create always has an Idempotency-Key"
        actor = self.caller.actor
        # 0 until the writer has started (it refuses the command then: any id does).
        partitions = self.sink.writer.partition_count or 1
        return new_order_id(
            actor.sub if actor is not None else None, self.idempotency_key, partitions
        )

    def customer(self) -> str | None:
        """The one customer an ``orders:write`` caller may act for; None with ``:any``."""
        return self.caller.customer_limit(Scope.ORDERS_WRITE, Scope.ORDERS_WRITE_ANY)

    async def submit(
        self,
        command: domain.Command,
        body: msgspec.Struct | None = None,
        *,
        owner: str | None = None,
    ) -> Accepted:
        """Have the writer decide and append ``command``; ``body`` is what a retry with the
        same Idempotency-Key must repeat; ``owner``: the customer the order must belong to."""
        request = CommandRequest(
            command=command,
            expected_version=self.expected_version,
            idempotency_key=self.idempotency_key,
            # Only compared between requests with the same Idempotency-Key.
            request_hash=None
            if self.idempotency_key is None
            else _request_hash(self.request, self.expected_version, body),
            correlation_id=self.correlation_id,
            actor=self.caller.actor,
            owner=owner,
            trace=tracing.sampled_context(),  # the request's span, when it is traced
        )
        waiting = asyncio.current_task()
        assert waiting is not None
        watcher = asyncio.ensure_future(_cancel_when_gone(self.request.receive, waiting))
        try:
            return await self.sink.submit(request)
        except OwnedElsewhere as elsewhere:
            forwarder = self.sink.forwarder
            if forwarder is None or forwarded(self.request):
                raise PartitionMoving(elsewhere.partition) from elsewhere
            # The handler read the body of a command that has one (a command without one
            # ignores whatever came, as the owner will).
            sent = await self.request.body() if body is not None else b""
            response = await forwarder.forward(
                self.request, sent, elsewhere.owner, self.correlation_id
            )
            raise Forwarded(response) from None
        except asyncio.CancelledError:
            # Ours alone (the watcher's) means: the client left. Any other is passed on.
            if watcher.done() and not watcher.cancelled() and waiting.uncancel() == 0:
                raise ClientGone("the client disconnected before its command was decided") from None
            raise
        finally:
            watcher.cancel()


# Handed in by the dependencies below: built here, so Litestar need not validate it again.
Context = NamedDependency[SkipValidation[CommandContext]]


async def provide_creation(
    request: Request[Caller, Any, Any],
    writer: SinkDependency,
    idempotency_key: CreationIdempotencyKey,
    correlation_id: CorrelationId = None,
) -> CommandContext:
    """The context of a command that creates an order: it can have no If-Match, and needs an
    Idempotency-Key (a create retried after a timeout must not make a second order)."""
    correlation_id = correlation_id or CORRELATION_ID.get()
    return CommandContext(request, writer, datetime.now(UTC), idempotency_key, correlation_id)


async def provide_context(
    request: Request[Caller, Any, Any],
    writer: SinkDependency,
    idempotency_key: IdempotencyKey = None,
    correlation_id: CorrelationId = None,
    if_match: IfMatch = None,
) -> CommandContext:
    """The context of a command on an existing order: a creation's, plus If-Match. (Built
    here rather than on ``provide_creation``: each dependency Litestar resolves, and each
    ``dataclasses.replace``, costs microseconds on every request.)"""
    expected_version = parse_if_match(if_match)
    at = datetime.now(UTC)
    correlation_id = correlation_id or CORRELATION_ID.get()
    return CommandContext(request, writer, at, idempotency_key, correlation_id, expected_version)


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
    request_class = StrictJsonRequest
    dependencies = {
        "creation": Provide(provide_creation),
        "context": Provide(provide_context),
    }

    @post(
        "/",
        operation_id="createOrder",
        **_WRITE,
        status_code=201,
        summary="Create a draft order",
        responses=problem_responses(400, 413, 415, 422, 503),
    )
    async def create_order(
        self,
        creation: Context,
        data: Annotated[
            CreateOrderBody,
            Body(
                examples=_example(
                    "A draft order in euros", {"customer_id": "c-42", "currency": "EUR"}
                )
            ),
        ],
    ) -> Response[CommandResult]:
        customer = creation.customer()
        if customer is not None and data.customer_id != customer:
            raise AccessDenied((Scope.ORDERS_WRITE_ANY,))  # orders:write creates only its own
        address = data.shipping_address
        command = domain.CreateOrder(
            order_id=creation.new_order_id(),
            at=creation.at,
            customer_id=data.customer_id,
            currency=data.currency,
            shipping_address=address.address() if address is not None else None,
        )
        return _respond(
            await creation.submit(command, data, owner=customer), status=201, location=True
        )

    @post(
        "/{order_id:str}/items",
        operation_id="addItem",
        **_WRITE,
        status_code=200,
        summary="Add a line item to a draft order",
        responses=_BODY_PROBLEMS,
    )
    async def add_item(
        self,
        context: Context,
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
    ) -> Response[CommandResult]:
        command = domain.AddItem(
            order_id=order_id,
            at=context.at,
            sku=data.sku,
            name=data.name,
            quantity=data.quantity,
            unit_price=data.unit_price,
        )
        return _respond(await context.submit(command, data, owner=context.customer()))

    @patch(
        "/{order_id:str}/items/{sku:str}",
        operation_id="changeItemQuantity",
        **_WRITE,
        summary="Change the quantity of a line item",
        responses=_BODY_PROBLEMS,
    )
    async def change_quantity(
        self,
        context: Context,
        order_id: OrderId,
        sku: Sku,
        data: Annotated[
            ChangeQuantityBody, Body(examples=_example("Three of them", {"quantity": 3}))
        ],
    ) -> Response[CommandResult]:
        command = domain.ChangeItemQuantity(
            order_id=order_id, at=context.at, sku=sku, quantity=data.quantity
        )
        return _respond(await context.submit(command, data, owner=context.customer()))

    @delete(
        "/{order_id:str}/items/{sku:str}",
        operation_id="removeItem",
        **_WRITE,
        status_code=200,
        summary="Remove a line item",
        responses=_PROBLEMS,
    )
    async def remove_item(
        self, context: Context, order_id: OrderId, sku: Sku
    ) -> Response[CommandResult]:
        command = domain.RemoveItem(order_id=order_id, at=context.at, sku=sku)
        return _respond(await context.submit(command, owner=context.customer()))

    @put(
        "/{order_id:str}/shipping-address",
        operation_id="setShippingAddress",
        **_WRITE,
        status_code=200,
        summary="Set or change where a draft or placed order is to be shipped",
        responses=_BODY_PROBLEMS,
    )
    async def set_shipping_address(
        self,
        context: Context,
        order_id: OrderId,
        data: Annotated[ShippingAddressBody, Body(examples=_example("In Berlin", _ADDRESS))],
    ) -> Response[CommandResult]:
        command = domain.SetShippingAddress(
            order_id=order_id, at=context.at, shipping_address=data.address()
        )
        return _respond(await context.submit(command, data, owner=context.customer()))

    @post(
        "/{order_id:str}/place",
        operation_id="placeOrder",
        **_WRITE,
        status_code=200,
        summary="Place a draft order; its total is fixed",
        responses=_PROBLEMS,
    )
    async def place(self, context: Context, order_id: OrderId) -> Response[CommandResult]:
        command = domain.PlaceOrder(order_id=order_id, at=context.at)
        return _respond(await context.submit(command, owner=context.customer()))

    @post(
        "/{order_id:str}/pay",
        operation_id="payOrder",
        **_PAY,
        status_code=200,
        summary="Pay a placed order: amount and currency must equal its total",
        responses=_BODY_PROBLEMS,
    )
    async def pay(
        self,
        context: Context,
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
    ) -> Response[CommandResult]:
        command = domain.PayOrder(
            order_id=order_id,
            at=context.at,
            amount=data.amount,
            currency=data.currency,
            payment_reference=data.payment_reference,
        )
        return _respond(await context.submit(command, data))

    @post(
        "/{order_id:str}/ship",
        operation_id="shipOrder",
        **_FULFIL,
        status_code=200,
        summary="Ship a paid order",
        responses=_BODY_PROBLEMS,
    )
    async def ship(
        self,
        context: Context,
        order_id: OrderId,
        data: Annotated[
            ShipBody,
            Body(
                examples=_example(
                    "By parcel", {"carrier": "DHL", "tracking_number": "JD0146000032"}
                )
            ),
        ],
    ) -> Response[CommandResult]:
        command = domain.ShipOrder(
            order_id=order_id,
            at=context.at,
            carrier=data.carrier,
            tracking_number=data.tracking_number,
        )
        return _respond(await context.submit(command, data))

    @post(
        "/{order_id:str}/deliver",
        operation_id="deliverOrder",
        **_FULFIL,
        status_code=200,
        summary="Record the delivery of a shipped order",
        responses=_PROBLEMS,
    )
    async def deliver(self, context: Context, order_id: OrderId) -> Response[CommandResult]:
        command = domain.DeliverOrder(order_id=order_id, at=context.at)
        return _respond(await context.submit(command))

    @post(
        "/{order_id:str}/cancel",
        operation_id="cancelOrder",
        **_WRITE,
        status_code=200,
        summary="Cancel an order that has not shipped; a paid order records its refund",
        responses=_BODY_PROBLEMS,
    )
    async def cancel(
        self,
        context: Context,
        order_id: OrderId,
        data: Annotated[
            CancelBody,
            Body(examples=_example("Changed their mind", {"reason": "customer request"})),
        ],
    ) -> Response[CommandResult]:
        command = domain.CancelOrder(order_id=order_id, at=context.at, reason=data.reason)
        return _respond(await context.submit(command, data, owner=context.customer()))
