"""Operations over HTTP: how far behind each projection is (the same data as the CLI's status)."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.status import TopicStatus, status
from service.edge.http.auth import requires
from service.edge.http.problems import problem_responses
from service.kernel.access import Scope

Engine = NamedDependency[AsyncEngine]
Text = NamedDependency[str]


class Operations(Controller):
    path = "/ops"
    tags = ["operations"]

    @get(
        "/projections",
        operation_id="projectionStatus",
        guards=requires(Scope.OPS_READ),
        summary="Projections: checkpoint, last stable offset, lag and state per partition",
        description="The same data as `orders projections status --json`. States: `caught up`, "
        "`running` (events wait), `stopped` (events wait and no projector consumes them), "
        "`rebuilding` (a new version being built), `halted` (an event cannot be applied; see "
        "`reason`). `consumers`: the projector consumers Kafka counts for a live version. "
        "503 while Kafka or the database cannot be reached.",
        responses=problem_responses(503),
    )
    async def projections(
        self, engine: Engine, kafka_bootstrap: Text, topic: Text, group_prefix: Text
    ) -> TopicStatus:
        return await status(engine, kafka_bootstrap, topic, group_prefix=group_prefix)
