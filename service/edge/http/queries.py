"""REST queries: read the Postgres projections, optionally after waiting for a consistency token."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Annotated, Any

import asyncpg
import msgspec
import sqlalchemy as sa
from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.params import HeaderParameter, PathParameter, QueryParameter, SkipValidation
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.checkpoints import CheckpointWatcher
from projections.log_ends import LogEnds
from projections.schema import customer_summaries, daily_sales, order_history, orders
from service.edge.http.auth import requires
from service.edge.http.commands import IDENTIFIER_PATTERN
from service.edge.http.problems import NotYetConsistent, QueryProblem, problem_responses
from service.infra import tracing
from service.infra.database import driver_of, reading
from service.kernel.access import Caller, Scope
from service.kernel.domain import OrderStatus
from service.kernel.errors import AccessDenied

MAX_PAGE_SIZE = 200
DEFAULT_PAGE_SIZE = 50
MAX_REPORT_DAYS = 366

# -- wire schemas (separate from tables) ---------------------------------------------------------


class ItemView(msgspec.Struct, frozen=True):
    sku: str
    name: str
    quantity: int
    unit_price: int


class AddressView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    lines: list[str]
    city: str
    postal_code: str
    region: str | None = None
    country: str


class OrderView(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    customer_id: str
    status: str
    currency: str
    total: int
    item_count: int
    items: list[ItemView]
    version: int
    paid_amount: int
    refunded_amount: int
    payment_reference: str | None
    carrier: str | None
    tracking_number: str | None
    cancel_reason: str | None
    created_at: datetime
    placed_at: datetime | None
    paid_at: datetime | None
    shipped_at: datetime | None
    delivered_at: datetime | None
    cancelled_at: datetime | None
    updated_at: datetime
    # Where it goes (None: not set yet); once shipped, where it went.
    shipping_address: AddressView | None


class OrderSummaryView(msgspec.Struct, frozen=True, kw_only=True):
    """An order in a list: its header without line items."""

    order_id: str
    customer_id: str
    status: str
    currency: str
    total: int
    item_count: int
    version: int
    created_at: datetime
    updated_at: datetime


class OrderPage(msgspec.Struct, frozen=True):
    items: list[OrderSummaryView]
    next_cursor: str | None


class ActorView(msgspec.Struct, frozen=True, kw_only=True):
    """Who sent the command an event came from: the access token's subject and OAuth client."""

    sub: str
    client_id: str | None


class HistoryEntry(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    event_id: str
    type: str
    schema_version: int
    occurred_at: datetime
    command_id: str
    correlation_id: str
    data: dict[str, Any]
    # None: the event names nobody (authentication off, or written before callers were recorded)
    actor: ActorView | None


class HistoryPage(msgspec.Struct, frozen=True):
    items: list[HistoryEntry]
    next_cursor: str | None


class CustomerSummaryView(msgspec.Struct, frozen=True, kw_only=True):
    customer_id: str
    order_count: int
    open_orders: int
    lifetime_value: dict[str, int]  # currency -> net paid, minor units


class DailySalesRow(msgspec.Struct, frozen=True, kw_only=True):
    day: date
    currency: str
    orders_placed: int
    orders_paid: int
    orders_cancelled: int
    revenue: int
    refunded: int


class DailySalesReport(msgspec.Struct, frozen=True):
    from_: date = msgspec.field(name="from")
    to: date
    rows: list[DailySalesRow]


# -- read-your-writes -------------------------------------------------------------------------


class OrderReader:
    """Reads orders by id for every request of the process, coalesced: the ids asked for while
    a read is in flight go together in the next one, one statement on one connection.

    Read-your-writes comes in bursts: a Kafka transaction acknowledges dozens of commands at
    once, their clients' queries wait for the same checkpoint, and the watcher releases them
    together. Each one checking out a connection and sending its own statement made the burst
    drain one query at a time. A read starts after every request it serves arrived (and after
    their tokens were applied), so each sees what it would have seen alone, or newer.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.reads = 0  # statements sent
        self._wanted: dict[str, list[asyncio.Future[asyncpg.Record | None]]] = {}
        self._in_flight: asyncio.Task[None] | None = None

    async def get(self, order_id: str) -> asyncpg.Record | None:
        future: asyncio.Future[asyncpg.Record | None] = asyncio.get_running_loop().create_future()
        self._wanted.setdefault(order_id, []).append(future)
        if self._in_flight is None or self._in_flight.done():
            # Reads for many requests: outside the context (correlation id) of the one starting it.
            self._in_flight = asyncio.create_task(
                self._read(), name="order-reader", context=contextvars.Context()
            )
        return await future

    async def _read(self) -> None:
        while self._wanted:
            wanted, self._wanted = self._wanted, {}
            try:
                async with reading(self.engine) as connection:
                    driver = await driver_of(connection)
                    records = await driver.fetch(_ORDERS_BY_ID, list(wanted))
                    self.reads += 1
            except Exception as error:  # each request hears it (a 503 when Postgres is away)
                for futures in wanted.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(error)
                continue
            found = {record["order_id"]: record for record in records}
            for order_id, futures in wanted.items():
                for future in futures:
                    if not future.done():  # its client may have gone
                        future.set_result(found.get(order_id))


@dataclass(frozen=True)
class ReadSide:
    """What queries read (the projections' database), who watches the checkpoints (of the
    topic the watcher was made for) and how long a query may wait for one. ONE dependency for
    every query: Litestar resolves two or more in a task group, which cost more than some
    queries do."""

    engine: AsyncEngine
    timeout_s: float
    watcher: CheckpointWatcher  # one poller for every waiting query
    orders: OrderReader  # one reader for every GET /orders/{id}
    # The topic's partition count as the composition root found it at start-up (what
    # ensure_topic answers); None when it did not ask, and then tokens are not checked against it.
    partitions: int | None = None
    # How far each partition's log reaches: a token beyond it is a 400. The command handlers
    # ``note`` every record the in-process writer committed; without Kafka to ask, a token
    # beyond what was noted is waited for.
    log_ends: LogEnds = field(default_factory=lambda: LogEnds(None))


_TOKEN_PATTERN = r"^(\d{1,9}):(\d{1,18})$"
_TOKEN = re.compile(_TOKEN_PATTERN)
ConsistencyToken = Annotated[
    str | None,
    HeaderParameter(
        name="X-Consistency-Token",
        required=False,
        max_length=40,
        # Documented, not enforced here: parse_consistency_token answers with its own problem.
        schema_extra={"pattern": _TOKEN_PATTERN},
        description='Read your writes: a command\'s token ("<partition>:<offset>"); the query '
        "waits (bounded) until the read model has applied that event, else 503 (also when too "
        "many queries wait already). A token that is malformed, names a partition the topic "
        "does not have or an offset beyond the end of its partition's log is a 400",
    ),
]


def parse_consistency_token(value: str) -> tuple[int, int]:
    """``"<partition>:<offset>"`` -> (partition, offset); a malformed token is a 400."""
    match = _TOKEN.match(value.strip())
    if match is None:
        raise QueryProblem(
            400,
            "invalid-consistency-token",
            f'X-Consistency-Token must look like "<partition>:<offset>"; got {value!r}',
        )
    return int(match.group(1)), int(match.group(2))


async def _await_consistency(reads: ReadSide, projection: str, token: str | None) -> None:
    """Wait until ``projection`` has applied the event ``token`` names; in a span of its own
    while tracing is on (a malformed token is refused before it)."""
    tracer = tracing.tracer()
    if token is None or tracer is None:
        return await _reach_consistency(reads, projection, token)
    partition, offset = parse_consistency_token(token)
    attributes: dict[str, str | int] = {
        "orders.projection": projection,
        tracing.MESSAGING_PARTITION: str(partition),
        tracing.MESSAGING_OFFSET: offset,
    }
    with tracer.start_as_current_span("wait for consistency", attributes=attributes) as span:
        outcome = "refused"  # by the waiter limit, or a token that is no position in the log
        try:
            await _reach_consistency(reads, projection, token)
            outcome = "reached"
        except NotYetConsistent:
            outcome = "timed_out"
            raise
        finally:
            span.set_attribute("orders.consistency.outcome", outcome)


async def _reach_consistency(reads: ReadSide, projection: str, token: str | None) -> None:
    if token is None:
        return
    partition, offset = parse_consistency_token(token)
    if reads.partitions is not None and partition >= reads.partitions:
        # No checkpoint will ever pass it: a 503 would have its client retry forever.
        raise QueryProblem(
            400,
            "invalid-consistency-token",
            f"X-Consistency-Token {token!r} names partition {partition}, but the topic has "
            f"partitions 0-{reads.partitions - 1}; send the token a command of this service "
            "answered with, or none",
        )
    # What the projection applied is in the log: only a token past both the checkpoint and the
    # log end this process knows (every record its writer committed) is checked against Kafka.
    if reads.watcher.applied(projection, partition, offset):
        return
    if reads.log_ends.reader is not None and not reads.log_ends.knows(partition, offset):
        if await reads.watcher.wait(projection, partition, offset, 0):  # one poll, no wait
            reads.log_ends.note(partition, offset)
            return
        if await reads.log_ends.reaches(partition, offset) is False:
            # Waiting would end in a 503, and its client would retry forever.
            raise QueryProblem(
                400,
                "invalid-consistency-token",
                f"X-Consistency-Token {token!r} names offset {offset}, beyond the end of "
                f"partition {partition}'s log: it was not issued by this service's event log; "
                "send the token a command of this service answered with, or none",
            )
    if not await reads.watcher.wait(projection, partition, offset, reads.timeout_s):
        raise NotYetConsistent(
            f"the {projection} read model has not yet applied the event at {token}; retry"
        )
    reads.log_ends.note(partition, offset)  # applied, so in the log: the next one is free


# -- list cursors -----------------------------------------------------------------------------

_AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
_CursorOrderId = Annotated[str, msgspec.Meta(max_length=64, pattern=IDENTIFIER_PATTERN)]
_CursorKey = tuple[_AwareDatetime, _CursorOrderId]


# An event's version, as order_history keeps it (int4): a larger one was never issued.
_CursorVersion = tuple[Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]]


def _encode_position(key: tuple[Any, ...]) -> str:
    """An opaque cursor: base64url (unpadded) of the JSON array ``key``."""
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).rstrip(b"=").decode("ascii")


def _not_issued() -> QueryProblem:
    return QueryProblem(400, "invalid-cursor", "cursor is not one this API issued")


def _position(cursor: str) -> bytes:
    """The JSON ``_encode_position`` wrapped, if ``cursor`` is base64url; else a 400."""
    try:
        return base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as error:
        raise _not_issued() from error


def encode_cursor(created_at: datetime, order_id: str) -> str:
    """The opaque position after an order: ``[created_at, order_id]``."""
    return _encode_position((created_at, order_id))


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position ``encode_cursor`` made, its instant in UTC; anything else is a 400."""
    try:
        created_at, order_id = msgspec.json.decode(_position(cursor), type=_CursorKey)
        # OverflowError: an instant whose UTC falls outside years 1-9999 (never one we issued).
        return created_at.astimezone(UTC), order_id
    except (OverflowError, msgspec.DecodeError) as error:
        raise _not_issued() from error


def encode_history_cursor(version: int) -> str:
    """The opaque position after an event of an order's history: ``[version]``."""
    return _encode_position((version,))


def decode_history_cursor(cursor: str) -> int:
    """The version ``encode_history_cursor`` made; anything else is a 400."""
    try:
        key: tuple[int] = msgspec.json.decode(_position(cursor), type=_CursorVersion)
    except msgspec.DecodeError as error:
        raise _not_issued() from error
    return key[0]


# -- parameters -------------------------------------------------------------------------------

OrderId = Annotated[str, PathParameter(min_length=1, max_length=64, pattern=IDENTIFIER_PATTERN)]
CustomerId = Annotated[str, PathParameter(min_length=1, max_length=64, pattern=IDENTIFIER_PATTERN)]
_READ = requires(Scope.ORDERS_READ, Scope.ORDERS_READ_ANY)
_ONE_PROBLEMS = problem_responses(400, 404, 503)  # one resource: it may not exist
_MANY_PROBLEMS = problem_responses(400, 503)  # a list or report: empty rather than missing
Reads = NamedDependency[SkipValidation[ReadSide]]  # ours: not validated per request


def _in_utc(name: str, value: datetime | None) -> datetime | None:
    """A filter's instant in UTC, which is how the database is asked (and what it can hold)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise QueryProblem(
            400, "invalid-filter", f"{name} needs a UTC offset, like 2025-01-31T00:00:00Z"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError as error:  # valid with its offset, but year 0 or 10000 in UTC
        raise QueryProblem(
            400,
            "invalid-filter",
            f"{name} is outside years 1-9999 once in UTC; give an instant from "
            "0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z",
        ) from error


# -- controllers ------------------------------------------------------------------------------

_SUMMARY_COLUMNS = [orders.c[name] for name in OrderSummaryView.__struct_fields__]
# The hottest query (read-your-writes after every command) in asyncpg's own terms, prepared
# once per connection: SQLAlchemy building, caching and processing it cost more than the query.
_ORDER_NAMES = ", ".join(f'"{name}"' for name in OrderView.__struct_fields__)
_ORDERS_BY_ID = f'SELECT {_ORDER_NAMES} FROM "{orders.name}" WHERE order_id = ANY($1::text[])'
_HISTORY_FIELDS = [name for name in HistoryEntry.__struct_fields__ if name != "actor"]
_HISTORY_COLUMNS = [
    *(order_history.c[name] for name in _HISTORY_FIELDS),
    order_history.c.actor_sub,
    order_history.c.actor_client_id,
]
_DAILY_COLUMNS = [daily_sales.c[name] for name in DailySalesRow.__struct_fields__]


def _history_entry(row: sa.Row[Any]) -> HistoryEntry:
    values = row._mapping
    sub = values["actor_sub"]
    actor = None if sub is None else ActorView(sub=sub, client_id=values["actor_client_id"])
    return HistoryEntry(**{name: values[name] for name in _HISTORY_FIELDS}, actor=actor)


# Not in OrderQueries: in Litestar 2 two controllers that share a path (OrderCommands answers
# POST /orders) each bring an automatic OPTIONS handler, and registering the second one fails.
# A plain handler registered after OrderCommands merges into its route instead.
@get(
    "/orders",
    operation_id="listOrders",
    **_READ,
    tags=["queries"],
    summary="List orders, oldest first, a page at a time",
    responses=_MANY_PROBLEMS,
)
async def list_orders(
    request: Request[Caller, Any, Any],
    reads: Reads,
    customer_id: Annotated[
        str | None, QueryParameter(min_length=1, max_length=64, pattern=IDENTIFIER_PATTERN)
    ] = None,
    status: Annotated[OrderStatus | None, QueryParameter()] = None,
    created_from: Annotated[
        datetime | None, QueryParameter(description="Inclusive lower bound on created_at")
    ] = None,
    created_to: Annotated[
        datetime | None, QueryParameter(description="Exclusive upper bound on created_at")
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[
        str | None,
        QueryParameter(max_length=256, description="next_cursor of the previous page"),
    ] = None,
    consistency_token: ConsistencyToken = None,
) -> OrderPage:
    own = request.user.customer_limit(Scope.ORDERS_READ, Scope.ORDERS_READ_ANY)
    if own is not None and customer_id != own:
        # orders:read lists only the caller's own orders, and says so rather than filter.
        raise AccessDenied((Scope.ORDERS_READ_ANY,))
    created_from = _in_utc("created_from", created_from)
    created_to = _in_utc("created_to", created_to)
    if created_from is not None and created_to is not None and created_from > created_to:
        raise QueryProblem(400, "invalid-filter", "created_from is after created_to")
    after = decode_cursor(cursor) if cursor is not None else None
    await _await_consistency(reads, "orders", consistency_token)

    query = sa.select(*_SUMMARY_COLUMNS)
    if customer_id is not None:
        query = query.where(orders.c.customer_id == customer_id)
    if status is not None:
        query = query.where(orders.c.status == status.value)
    if created_from is not None:
        query = query.where(orders.c.created_at >= created_from)
    if created_to is not None:
        query = query.where(orders.c.created_at < created_to)
    if after is not None:
        # Keyset pagination: a row-value comparison that the (.., created_at, order_id)
        # indexes serve, stable however many rows are inserted before the cursor.
        query = query.where(sa.tuple_(orders.c.created_at, orders.c.order_id) > after)
    query = query.order_by(orders.c.created_at, orders.c.order_id).limit(limit + 1)
    async with reading(reads.engine) as connection:
        rows = (await connection.execute(query)).all()

    page = [msgspec.convert(row, OrderSummaryView, from_attributes=True) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = encode_cursor(last.created_at, last.order_id)
    return OrderPage(page, next_cursor)


class OrderQueries(Controller):
    path = "/orders"
    tags = ["queries"]

    @get(
        "/{order_id:str}",
        operation_id="getOrder",
        **_READ,
        summary="One order; its version is the ETag",
        responses=_ONE_PROBLEMS,
    )
    async def get_order(
        self,
        request: Request[Caller, Any, Any],
        reads: Reads,
        order_id: OrderId,
        consistency_token: ConsistencyToken = None,
    ) -> Response[OrderView]:
        await _await_consistency(reads, "orders", consistency_token)
        record = await reads.orders.get(order_id)
        own = request.user.customer_limit(Scope.ORDERS_READ, Scope.ORDERS_READ_ANY)
        if record is None or (own is not None and record["customer_id"] != own):
            # Another customer's order is answered exactly like a missing one.
            raise QueryProblem(404, "order-not-found", f"no order {order_id!r}")
        view = msgspec.convert(dict(record), OrderView)  # jsonb decoded by the pool's codec
        return Response(view, headers={"ETag": f'"{view.version}"'})

    @get(
        "/{order_id:str}/history",
        operation_id="getOrderHistory",
        **_READ,
        summary="Every event of an order, in version order, a page at a time",
        responses=_ONE_PROBLEMS,
    )
    async def get_history(
        self,
        request: Request[Caller, Any, Any],
        reads: Reads,
        order_id: OrderId,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
        cursor: Annotated[
            str | None,
            QueryParameter(max_length=256, description="next_cursor of the previous page"),
        ] = None,
        consistency_token: ConsistencyToken = None,
    ) -> HistoryPage:
        after = decode_history_cursor(cursor) if cursor is not None else None
        await _await_consistency(reads, "order_history", consistency_token)
        query = sa.select(*_HISTORY_COLUMNS).where(order_history.c.order_id == order_id)
        own = request.user.customer_limit(Scope.ORDERS_READ, Scope.ORDERS_READ_ANY)
        if own is not None:
            # Only the caller's own order: its first event (in this same projection, so as
            # consistent as the rows) names its customer. Another's looks missing: a 404.
            query = query.where(sa.exists().where(_created_for(order_id, own)))
        if after is not None:
            query = query.where(order_history.c.version > after)  # keyset: the primary key
        query = query.order_by(order_history.c.version).limit(limit + 1)
        async with reading(reads.engine) as connection:
            rows = (await connection.execute(query)).all()
        if not rows and after is None:
            raise QueryProblem(404, "order-not-found", f"no history for order {order_id!r}")
        page = [_history_entry(row) for row in rows[:limit]]
        next_cursor = encode_history_cursor(page[-1].version) if len(rows) > limit else None
        return HistoryPage(page, next_cursor)


def _created_for(order_id: str, customer_id: str) -> sa.ColumnElement[bool]:
    """The order's creation event names ``customer_id``."""
    created = order_history.alias("created")
    return sa.and_(
        created.c.order_id == order_id,
        created.c.version == 1,
        created.c.data["customer_id"].astext == customer_id,
    )


class CustomerQueries(Controller):
    path = "/customers"
    tags = ["queries"]

    @get(
        "/{customer_id:str}/summary",
        operation_id="getCustomerSummary",
        **_READ,
        summary="A customer's order counts and lifetime value per currency",
        responses=_ONE_PROBLEMS,
    )
    async def get_summary(
        self,
        request: Request[Caller, Any, Any],
        reads: Reads,
        customer_id: CustomerId,
        consistency_token: ConsistencyToken = None,
    ) -> CustomerSummaryView:
        own = request.user.customer_limit(Scope.ORDERS_READ, Scope.ORDERS_READ_ANY)
        if own is not None and customer_id != own:
            raise QueryProblem(404, "customer-not-found", f"no customer {customer_id!r}")
        await _await_consistency(reads, "customer_summary", consistency_token)
        query = sa.select(
            customer_summaries.c.customer_id,
            customer_summaries.c.order_count,
            customer_summaries.c.open_orders,
            customer_summaries.c.lifetime_value,
        ).where(customer_summaries.c.customer_id == customer_id)
        async with reading(reads.engine) as connection:
            row = (await connection.execute(query)).one_or_none()
        if row is None:
            raise QueryProblem(404, "customer-not-found", f"no customer {customer_id!r}")
        return msgspec.convert(row, CustomerSummaryView, from_attributes=True)


class ReportQueries(Controller):
    path = "/reports"
    tags = ["queries"]

    @get(
        "/daily-sales",
        operation_id="getDailySales",
        **requires(Scope.REPORTS_READ),
        summary="Sales per UTC day and currency over an inclusive range of at most 366 days",
        responses=_MANY_PROBLEMS,
    )
    async def daily_sales_report(
        self,
        reads: Reads,
        from_: Annotated[date, QueryParameter(name="from", description="First day, inclusive")],
        to: Annotated[date, QueryParameter(description="Last day, inclusive")],
        consistency_token: ConsistencyToken = None,
    ) -> DailySalesReport:
        if from_ > to:
            raise QueryProblem(400, "invalid-filter", "from is after to")
        if (to - from_).days + 1 > MAX_REPORT_DAYS:
            raise QueryProblem(
                400, "invalid-filter", f"a report spans at most {MAX_REPORT_DAYS} days"
            )
        await _await_consistency(reads, "daily_sales", consistency_token)
        query = (
            sa.select(*_DAILY_COLUMNS)
            .where(daily_sales.c.day.between(from_, to))
            .order_by(daily_sales.c.day, daily_sales.c.currency)
        )
        async with reading(reads.engine) as connection:
            rows = (await connection.execute(query)).all()
        return DailySalesReport(
            from_, to, [msgspec.convert(row, DailySalesRow, from_attributes=True) for row in rows]
        )


# Register after OrderCommands (see list_orders).
QUERY_HANDLERS = [list_orders, OrderQueries, CustomerQueries, ReportQueries]
