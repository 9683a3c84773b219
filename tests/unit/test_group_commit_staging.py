"""Group-commit staging: a batch of commands decided in memory, committed only with its
transaction (design.md 3 and 5: no lost updates, idempotency from the log)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from service.kernel import envelope
from service.kernel.domain import (
    AddItem,
    Command,
    CreateOrder,
    OrderAlreadyExists,
    OrderNotFound,
    OrderStatus,
    PlaceOrder,
)
from service.write import staging
from service.write.contract import (
    Accepted,
    CommandRequest,
    IdempotencyKeyReused,
    VersionMismatch,
    WriterUnavailable,
)
from service.write.staging import Committed, Decided, Receipt, SameAs, StagedBatch

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _create(order_id: str = "o-1") -> CreateOrder:
    return CreateOrder(order_id=order_id, at=AT, customer_id="c-1", currency="EUR")


def _add(order_id: str = "o-1", sku: str = "MUG-1") -> AddItem:
    return AddItem(order_id=order_id, at=AT, sku=sku, name="Mug", quantity=1, unit_price=1250)


def _request(command: Command, **fields: Any) -> CommandRequest:
    return CommandRequest(command=command, **fields)


def _committed_with(*commands: Command) -> Committed:
    """A committed state holding ``commands``, as if each were in the log already."""
    committed = Committed()
    batch = committed.stage(_request(command) for command in commands)
    committed.commit(batch, _positions(batch))
    return committed


def _positions(batch: StagedBatch, partition: int = 0, first: int = 10) -> list[tuple[int, int]]:
    """Where the log put each appended command's last event: one partition, one after another."""
    ends, offset = [], first - 1
    for decided in batch.appends:
        offset += len(decided.events)
        ends.append((partition, offset))
    return ends


def _versions(batch: StagedBatch) -> list[list[int]]:
    return [[event.version for event in decided.events] for decided in batch.appends]


def test_two_commands_on_one_order_in_one_batch_are_decided_on_successive_versions() -> None:
    batch = Committed().stage([_request(_create()), _request(_add())])

    assert _versions(batch) == [[1], [2]]
    assert batch.orders["o-1"].version == 2
    assert [item.sku for item in batch.orders["o-1"].items] == ["MUG-1"]


def test_a_batch_decides_on_the_committed_state_of_its_orders() -> None:
    committed = _committed_with(_create(), _add())

    batch = committed.stage([_request(PlaceOrder(order_id="o-1", at=AT))])

    assert _versions(batch) == [[3]]
    assert batch.orders["o-1"].status is OrderStatus.PLACED


def test_staging_changes_nothing_in_the_committed_state() -> None:
    committed = _committed_with(_create())
    before = dict(committed.orders), dict(committed.receipts)

    committed.stage([_request(_add(), idempotency_key="k-1", request_hash="h-1")])

    assert (committed.orders, committed.receipts) == before


def test_a_failed_transaction_leaves_the_state_untouched() -> None:
    committed = _committed_with(_create())
    before = dict(committed.orders), dict(committed.receipts)
    failed = committed.stage([_request(_add(), idempotency_key="k-1", request_hash="h-1")])
    outage = WriterUnavailable("the event log is unavailable")

    assert failed.answers_after_failure(outage) == [outage]
    assert (committed.orders, committed.receipts) == before
    again = committed.stage([_request(_add(), idempotency_key="k-1", request_hash="h-1")])
    assert _versions(again) == [[2]]  # the same version again: the failed batch left no trace
    assert isinstance(again.decisions[0], Decided)  # and its key is not taken


def test_a_committed_batch_moves_orders_and_receipts_forward() -> None:
    committed = _committed_with(_create())
    batch = committed.stage([_request(_add(), idempotency_key="k-1", request_hash="h-1")])

    answers = committed.commit(batch, [(3, 41)])

    assert answers == [Accepted("o-1", 2, 3, 41)]
    assert committed.orders["o-1"] == batch.orders["o-1"]
    assert committed.receipts == {"k-1": Receipt("h-1", "o-1", 2, 3, 41)}


def test_a_commit_needs_the_position_of_every_appended_command() -> None:
    committed = Committed()
    batch = committed.stage([_request(_create("o-1")), _request(_create("o-2"))])

    with pytest.raises(ValueError, match="1 positions for 2 appends"):
        committed.commit(batch, [(0, 1)])
    assert committed.orders == {}


def test_a_replayed_idempotency_key_returns_the_first_answer() -> None:
    committed = Committed()
    first = committed.stage([_request(_create(), idempotency_key="k-1", request_hash="h-1")])
    [accepted] = committed.commit(first, [(2, 7)])

    replay = committed.stage([_request(_create(), idempotency_key="k-1", request_hash="h-1")])

    assert replay.appends == []
    assert replay.decisions == [Accepted("o-1", 1, 2, 7, replayed=True)]
    assert accepted == Accepted("o-1", 1, 2, 7)


def test_a_reused_key_with_another_command_is_refused() -> None:
    committed = Committed()
    first = committed.stage([_request(_create(), idempotency_key="k-1", request_hash="h-1")])
    committed.commit(first, [(0, 0)])

    reused = committed.stage([_request(_add(), idempotency_key="k-1", request_hash="h-2")])

    [refusal] = reused.decisions
    assert isinstance(refusal, IdempotencyKeyReused)
    assert reused.appends == []
    assert reused.orders == {}


def test_a_key_repeated_in_one_batch_gets_the_answer_of_its_first_use() -> None:
    committed = Committed()
    batch = committed.stage(
        [
            _request(_create(), idempotency_key="k-1", request_hash="h-1"),
            _request(_create(), idempotency_key="k-1", request_hash="h-1"),
        ]
    )

    assert batch.decisions[1] == SameAs(0)
    assert _versions(batch) == [[1]]  # decided once
    assert committed.commit(batch, [(1, 5)]) == [
        Accepted("o-1", 1, 1, 5),
        Accepted("o-1", 1, 1, 5, replayed=True),
    ]


def test_a_key_repeated_in_one_batch_shares_the_failure_of_its_first_use() -> None:
    batch = Committed().stage(
        [
            _request(_create(), idempotency_key="k-1", request_hash="h-1"),
            _request(_create(), idempotency_key="k-1", request_hash="h-1"),
        ]
    )
    outage = WriterUnavailable("the event log is unavailable")

    assert batch.answers_after_failure(outage) == [outage, outage]


def test_a_key_reused_in_one_batch_with_another_command_is_refused() -> None:
    batch = Committed().stage(
        [
            _request(_create(), idempotency_key="k-1", request_hash="h-1"),
            _request(_add(), idempotency_key="k-1", request_hash="h-2"),
        ]
    )

    assert isinstance(batch.decisions[1], IdempotencyKeyReused)
    assert _versions(batch) == [[1]]


def test_if_match_on_the_current_version_is_decided() -> None:
    committed = _committed_with(_create())

    batch = committed.stage([_request(_add(), expected_version=1)])

    assert _versions(batch) == [[2]]


def test_if_match_on_another_version_is_refused_with_the_actual_one() -> None:
    committed = _committed_with(_create())

    batch = committed.stage([_request(_add(), expected_version=3)])

    [mismatch] = batch.decisions
    assert isinstance(mismatch, VersionMismatch)
    assert (mismatch.expected, mismatch.actual) == (3, 1)


def test_if_match_sees_the_version_an_earlier_command_of_the_batch_staged() -> None:
    batch = Committed().stage(
        [
            _request(_create()),
            _request(_add("o-1", "A"), expected_version=1),
            _request(_add("o-1", "B"), expected_version=1),  # a lost update: refused
        ]
    )

    assert _versions(batch) == [[1], [2]]
    mismatch = batch.decisions[2]
    assert isinstance(mismatch, VersionMismatch)
    assert mismatch.actual == 2


def test_if_match_zero_means_the_order_does_not_exist_yet() -> None:
    batch = Committed().stage([_request(_create(), expected_version=0)])

    assert _versions(batch) == [[1]]


def test_a_domain_error_fails_its_command_alone() -> None:
    batch = Committed().stage(
        [_request(_add("o-missing")), _request(_create()), _request(_create())]
    )

    missing, created, again = batch.decisions
    assert isinstance(missing, OrderNotFound)
    assert isinstance(created, Decided)
    assert isinstance(again, OrderAlreadyExists)  # decided on the state the batch staged
    assert _versions(batch) == [[1]]


def test_a_bug_in_deciding_one_command_fails_that_command_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decide = staging.decide

    def decide_with_a_bug(command: Command, state: Any) -> Any:
        if getattr(command, "sku", None) == "BUG-1":
            raise RuntimeError("a bug in decide")
        return decide(command, state)

    monkeypatch.setattr(staging, "decide", decide_with_a_bug)
    committed = _committed_with(_create())

    batch = committed.stage(
        [_request(_add("o-1", "BUG-1")), _request(_add("o-1", "MUG-1")), _request(_create("o-2"))]
    )

    bug, *others = batch.decisions
    assert isinstance(bug, RuntimeError)
    assert all(isinstance(other, Decided) for other in others)
    assert _versions(batch) == [[2], [1]]  # the bug staged nothing: the next add is version 2


def test_a_refused_command_answers_at_once_whatever_the_transaction_does() -> None:
    batch = Committed().stage([_request(_add("o-missing")), _request(_create())])
    outage = WriterUnavailable("the event log is unavailable")

    refused, failed = batch.answers_after_failure(outage)

    assert isinstance(refused, OrderNotFound)
    assert failed is outage


def test_events_are_sealed_with_the_commands_identity() -> None:
    request = _request(
        _create(), idempotency_key="k-1", request_hash="h-1", correlation_id="corr-1"
    )

    [decided] = Committed().stage([request]).appends

    [event] = decided.events
    assert event.event_id == envelope.event_id_for("k-1", request.command_id, 0)
    assert (event.order_id, event.version, event.type) == ("o-1", 1, "OrderCreated")
    assert (event.command_id, event.causation_id) == (request.command_id, request.command_id)
    assert event.correlation_id == "corr-1"
    assert (event.idempotency_key, event.request_hash) == ("k-1", "h-1")
    assert event.occurred_at == AT


def test_without_a_correlation_id_the_command_id_correlates() -> None:
    request = _request(_create())

    [decided] = Committed().stage([request]).appends

    assert decided.events[0].correlation_id == request.command_id


def test_folding_the_log_gives_the_state_committing_gave() -> None:
    """State from the log (design.md 5): the events a batch wrote, folded back, give the same
    orders and receipts as committing the batch did."""
    committed = Committed()
    batch = committed.stage(
        [
            _request(_create(), idempotency_key="k-1", request_hash="h-1"),
            _request(_add(), idempotency_key="k-2", request_hash="h-2"),
            _request(_create("o-2")),
        ]
    )
    positions = _positions(batch, partition=4, first=100)
    committed.commit(batch, positions)

    folded = Committed()
    offset = 100
    for decided in batch.appends:
        for event in decided.events:
            folded.fold(event, envelope.decode_data(event), 4, offset)
            offset += 1

    assert folded == committed
