"""The ``order_history`` read model: every event of every order, in order (an audit trail)."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from projections.projection import Applied, Db, State
from projections.schema import order_history


class OrderHistoryProjection:
    name = "order_history"
    tables: tuple[sa.Table, ...] = (order_history,)

    async def load(self, db: Db, batch: Sequence[Applied]) -> State:
        # Append-only: a batch never needs existing rows; the primary key (order, version)
        # refuses a second copy of an event.
        return State(self.tables)

    def fold(self, state: State, applied: Applied) -> None:
        envelope = applied.envelope
        actor = envelope.actor
        state["order_history"].put(
            {
                "order_id": envelope.order_id,
                "version": envelope.version,
                "event_id": envelope.event_id,
                "type": envelope.type,
                "schema_version": envelope.schema_version,
                "occurred_at": envelope.occurred_at,
                "command_id": envelope.command_id,
                "correlation_id": envelope.correlation_id,
                # As written: the audit trail keeps the stored data, not an upcast copy
                # (msgspec.Raw: the JSON bytes as they are, copied to the row unparsed).
                "data": envelope.data,
                "partition": applied.partition,
                "offset": applied.offset,
                "actor_sub": actor.sub if actor is not None else None,
                "actor_client_id": actor.client_id if actor is not None else None,
            }
        )
