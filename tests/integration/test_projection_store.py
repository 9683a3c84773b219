"""Writing a batch's rows: the binary COPY that replays use for append-only tables stores
exactly what the JSON-array insert of live batches stores, and refuses a second copy alike."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.models.history import OrderHistoryProjection
from projections.projection import Applied, Db, State, begin, store
from projections.versions import live_targets
from service.kernel import envelope
from service.kernel.domain import Order, decide, evolve
from tests.support.lifecycles import lifecycle
from tests.support.projection_harness import differences, oracle_contents, table_contents

HISTORY = OrderHistoryProjection()


def _events(orders: int) -> list[Applied]:
    """Every event of ``orders`` whole life cycles, as the projector decodes them."""
    applied: list[Applied] = []
    for n in range(orders):
        order_id = str(uuid.uuid4())
        state: Order | None = None
        for command in lifecycle(order_id, n):
            command_id = str(uuid.uuid4())
            for index, event in enumerate(decide(command, state)):
                state = evolve(state, event, order_id)
                sealed = envelope.seal(
                    event,
                    event_id=envelope.event_id_for(None, command_id, index),
                    order_id=order_id,
                    version=state.version,
                    occurred_at=command.at,
                    command_id=command_id,
                    correlation_id=command_id,
                )
                decoded = envelope.decode(envelope.encode(sealed))
                applied.append(Applied(*decoded, n % 4, len(applied)))
    return applied


async def _store(db: AsyncEngine, events: list[Applied], *, copy: bool) -> int:
    async with begin(db) as connection:
        (target,) = await live_targets(connection, [HISTORY])
        state = State(HISTORY.tables)
        for applied in events:
            HISTORY.fold(state, applied)
        return await store(Db(connection, target.schema), state, copy=copy)


@pytest.mark.parametrize("copy", [False, True], ids=["json-insert", "binary-copy"])
async def test_stored_history_rows_equal_the_oracle(db: AsyncEngine, copy: bool) -> None:
    events = _events(30)
    assert await _store(db, events, copy=copy) == len(events)
    expected = oracle_contents(HISTORY, events)
    assert len(expected["order_history"]) == len(events)
    assert differences(await table_contents(db, HISTORY), expected) == []


@pytest.mark.parametrize("copy", [False, True], ids=["json-insert", "binary-copy"])
async def test_a_second_copy_of_a_history_row_is_refused(db: AsyncEngine, copy: bool) -> None:
    events = _events(3)
    await _store(db, events[:5], copy=copy)
    with pytest.raises(asyncpg.UniqueViolationError):
        await _store(db, events[4:], copy=copy)  # event 4 again, then new ones
    stored = await table_contents(db, HISTORY)
    assert differences(stored, oracle_contents(HISTORY, events[:5])) == []  # all or nothing
