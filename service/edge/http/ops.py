"""Operations over HTTP: how far behind each projection is, and the operator's actions on poison
events (park, retry, skip), with the same functions and the same refusals as the CLI's
``orders projections ...``."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import Example
from litestar.params import Body, PathParameter, QueryParameter, SkipValidation
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.bookkeeping.parked import ParkedEvent
from projections.models import catalog
from projections.parking import park, parked, retry, skip
from projections.status import TopicStatus, status
from service.edge.http.auth import requires
from service.edge.http.commands import IDENTIFIER_PATTERN, StrictJsonRequest
from service.edge.http.problems import QueryProblem, problem_responses
from service.infra.kafka_clients import KafkaTarget
from service.infra.topic import topic_partitions
from service.kernel.access import Caller, Scope
from service.kernel.values import NO_CONTROL_CHARACTERS_PATTERN

_log = logging.getLogger(__name__)

Engine = NamedDependency[AsyncEngine]
Text = NamedDependency[str]
Kafka = NamedDependency[SkipValidation[KafkaTarget]]  # ours: not validated per request

# What the columns of parked_events hold (integer, bigint): a larger number is a 400, never
# a value the database refuses.
Partition = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Offset = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Version = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
# An order id as parked: from the log's key, so anything readable (a NUL is stored as "\x00").
ParkedOrderId = Annotated[str, msgspec.Meta(min_length=1, pattern=NO_CONTROL_CHARACTERS_PATTERN)]
ProjectionName = Annotated[
    str, PathParameter(min_length=1, max_length=64, pattern=IDENTIFIER_PATTERN)
]

# -- wire schemas ------------------------------------------------------------------------------


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class PositionBody(_Body):
    """An event by its position; ``version``: of the projection (default: the live one)."""

    partition: Partition
    offset: Offset
    version: Version | None = None


class RetryBody(_Body):
    """``order_id``: only that order's parked events (default: every parked order)."""

    order_id: ParkedOrderId | None = None
    version: Version | None = None


class ParkedEventView(msgspec.Struct, frozen=True, kw_only=True):
    projection: str
    version: int
    partition: int
    offset: int
    order_id: str
    parked_at: datetime
    reason: str


class ParkedEvents(msgspec.Struct, frozen=True):
    events: list[ParkedEventView]


class Retried(msgspec.Struct, frozen=True, kw_only=True):
    """The parked events applied (in order, in one transaction) and the orders un-parked."""

    applied: list[ParkedEventView]
    order_ids: list[str]


def _view(event: ParkedEvent) -> ParkedEventView:
    return msgspec.convert(event, ParkedEventView, from_attributes=True)


def _position_example(summary: str) -> list[Example]:
    return [Example(summary=summary, value={"partition": 2, "offset": 1041})]


# -- checks before acting ----------------------------------------------------------------------


def _require_projection(name: str) -> None:
    if name not in catalog.PROJECTIONS:
        known = ", ".join(catalog.PROJECTIONS)
        raise QueryProblem(404, "projection-not-found", f"no projection {name!r}; known: {known}")


async def _require_partition(bootstrap: KafkaTarget, topic: str, partition: int) -> None:
    """A 400, at once, for a partition the topic lacks (reading a record there would wait for
    the broker's 40 s timeout); the CLI's check of ``--partition``."""
    partitions = await topic_partitions(bootstrap, topic)
    if partition not in partitions:
        raise QueryProblem(
            400,
            "unknown-partition",
            f"topic {topic} has no partition {partition} (it has {partitions[0]}-"
            f"{partitions[-1]}): check partition against GET /ops/projections",
        )


def _operator(request: Request[Caller, Any, Any]) -> str:
    sub = request.user.sub
    return sub if sub is not None else "(nobody: authentication is off)"


# -- routes ------------------------------------------------------------------------------------

_READ = requires(Scope.OPS_READ)
_WRITE = requires(Scope.OPS_WRITE)
_ACTION_PROBLEMS = problem_responses(400, 404, 409, 413, 415, 503)


class Operations(Controller):
    path = "/ops"
    tags = ["operations"]
    request_class = StrictJsonRequest

    @get(
        "/projections",
        operation_id="projectionStatus",
        **_READ,
        summary="Projections: checkpoint, last stable offset, lag and state per partition",
        description="The same data as `orders projections status --json`. States: `caught up`, "
        "`running` (events wait), `stopped` (events wait and no projector consumes them), "
        "`rebuilding` (a new version being built), `halted` (an event cannot be applied; see "
        "`reason`). `consumers`: the projector consumers Kafka counts for a live version. "
        "503 while Kafka or the database cannot be reached.",
        responses=problem_responses(503),
    )
    async def projections(
        self, engine: Engine, kafka_bootstrap: Kafka, topic: Text, group_prefix: Text
    ) -> TopicStatus:
        return await status(engine, kafka_bootstrap, topic, group_prefix=group_prefix)

    @get(
        "/projections/parked",
        operation_id="listParkedEvents",
        **_READ,
        summary="The parked events, by projection and position",
        description="The same as `orders projections parked`. Needs `ops:read`.",
        responses=problem_responses(400, 503),
    )
    async def list_parked(
        self,
        engine: Engine,
        topic: Text,
        projection: Annotated[
            str | None, QueryParameter(description="Only this projection's parked events")
        ] = None,
    ) -> ParkedEvents:
        if projection is not None and projection not in catalog.PROJECTIONS:
            known = ", ".join(catalog.PROJECTIONS)
            raise QueryProblem(
                400, "unknown-projection", f"no projection {projection!r}; known: {known}"
            )
        events = await parked(engine, topic, [projection] if projection else None)
        return ParkedEvents([_view(event) for event in events])

    @post(
        "/projections/{name:str}/park",
        operation_id="parkHaltedEvent",
        **_WRITE,
        status_code=200,
        summary="Park the event a projection is halted at; its order's later events follow it",
        description="The same as `orders projections park`. Only the event the projection is "
        "halted at (see GET /ops/projections) can be parked; any other is refused (409). The "
        "partition goes on; retry the order after a fix. Needs `ops:write`.",
        responses=_ACTION_PROBLEMS,
    )
    async def park_halted_event(
        self,
        request: Request[Caller, Any, Any],
        engine: Engine,
        kafka_bootstrap: Kafka,
        topic: Text,
        name: ProjectionName,
        data: Annotated[PositionBody, Body(examples=_position_example("The halted event"))],
    ) -> ParkedEventView:
        _require_projection(name)
        await _require_partition(kafka_bootstrap, topic, data.partition)
        event = await park(
            engine,
            kafka_bootstrap,
            topic,
            name,
            data.partition,
            data.offset,
            version=data.version,
        )
        _log.warning(
            "%s parked %s/%s of %s v%s with order %s (%s)",
            _operator(request),
            event.partition,
            event.offset,
            event.projection,
            event.version,
            event.order_id,
            event.reason,
        )
        return _view(event)

    @post(
        "/projections/{name:str}/retry",
        operation_id="retryParkedEvents",
        **_WRITE,
        status_code=200,
        summary="Apply parked events again (one order's, or all) and un-park their orders",
        description="The same as `orders projections retry`. One transaction: if any event "
        "still fails, nothing changes and the 409 says which and why. Needs `ops:write`.",
        responses=_ACTION_PROBLEMS,
    )
    async def retry_parked(
        self,
        request: Request[Caller, Any, Any],
        engine: Engine,
        topic: Text,
        name: ProjectionName,
        data: Annotated[
            RetryBody,
            Body(
                examples=[Example(summary="One order's parked events", value={"order_id": "o-42"})]
            ),
        ],
    ) -> Retried:
        _require_projection(name)
        events = await retry(engine, topic, name, order_id=data.order_id, version=data.version)
        order_ids = sorted({event.order_id for event in events})
        _log.warning(
            "%s applied %d parked event(s) of %d order(s) to %s: %s",
            _operator(request),
            len(events),
            len(order_ids),
            name,
            ", ".join(order_ids),
        )
        return Retried(applied=[_view(event) for event in events], order_ids=order_ids)

    @post(
        "/projections/{name:str}/skip",
        operation_id="skipParkedEvent",
        **_WRITE,
        status_code=200,
        summary="Discard one parked event for good; its order stays parked until retried",
        description="The same as `orders projections skip`. Only a parked event can be "
        "skipped; anything else is refused (409). Needs `ops:write`.",
        responses=_ACTION_PROBLEMS,
    )
    async def skip_parked(
        self,
        request: Request[Caller, Any, Any],
        engine: Engine,
        topic: Text,
        name: ProjectionName,
        data: Annotated[PositionBody, Body(examples=_position_example("A parked event"))],
    ) -> ParkedEventView:
        _require_projection(name)
        event = await skip(engine, topic, name, data.partition, data.offset, version=data.version)
        _log.warning(
            "%s discarded parked event %s/%s of order %s from %s v%s",
            _operator(request),
            event.partition,
            event.offset,
            event.order_id,
            event.projection,
            event.version,
        )
        return _view(event)
