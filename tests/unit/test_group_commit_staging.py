"""Group-commit staging: a batch of commands decided in memory, committed only with its
transaction (design.md 3 and 5: no lost updates, idempotency from the log)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from msgspec.structs import replace

from service.kernel import envelope
from service.kernel.access import Actor, Scope
from service.kernel.domain import (
    AddItem,
    Command,
    CreateOrder,
    OrderAlreadyExists,
    OrderNotFound,
    OrderStatus,
    PlaceOrder,
)
from service.kernel.errors import AccessDenied
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
TTL = timedelta(hours=24)
ALICE = Actor(sub="alice", client_id="shop-web")
BOB = Actor(sub="bob")


def _create(order_id: str = "o-1", customer_id: str = "c-1") -> CreateOrder:
    return CreateOrder(order_id=order_id, at=AT, customer_id=customer_id, currency="EUR")


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
    assert committed.receipts == {(None, "k-1"): Receipt("h-1", "o-1", 2, 3, 41, AT)}


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
    orders and receipts (each caller's own) as committing the batch did."""
    committed = Committed()
    batch = committed.stage(
        [
            _request(_create(), idempotency_key="k-1", request_hash="h-1"),
            _request(_add(), idempotency_key="k-2", request_hash="h-2", actor=ALICE),
            _request(_create("o-2"), idempotency_key="k-2", request_hash="h-3", actor=BOB),
            _request(_create("o-3")),
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
    assert set(folded.receipts) == {(None, "k-1"), ("alice", "k-2"), ("bob", "k-2")}


# -- who sent it ------------------------------------------------------------------------------


def test_every_event_of_a_command_carries_its_actor() -> None:
    batch = Committed().stage(
        [_request(_create(), actor=ALICE), _request(_add(), idempotency_key="k", actor=BOB)]
    )

    assert [[event.actor for event in decided.events] for decided in batch.appends] == [
        [ALICE],
        [BOB],
    ]


def test_the_actor_survives_the_round_trip_through_the_log() -> None:
    [decided] = Committed().stage([_request(_create(), actor=ALICE)]).appends

    decoded, _ = envelope.decode(envelope.encode(decided.events[0]))

    assert decoded.actor == ALICE
    assert decoded == decided.events[0]


def test_without_authentication_events_have_no_actor() -> None:
    [decided] = Committed().stage([_request(_create())]).appends

    assert decided.events[0].actor is None


# -- ownership: a customer acts on its own orders only ----------------------------------------


def _customer(customer_id: str, command: Command, **fields: Any) -> CommandRequest:
    """A request from a caller that may act only for ``customer_id`` (its subject)."""
    actor = Actor(sub=customer_id)
    return _request(command, actor=actor, owner=customer_id, **fields)


def _answer(committed: Committed, request: CommandRequest) -> object:
    [decision] = committed.stage([request]).decisions
    return decision


def _as_compared(answer: object) -> tuple[type, str]:
    return type(answer), str(answer)


def test_a_customer_acts_on_its_own_order() -> None:
    committed = _committed_with(_create(customer_id="c-1"))

    assert isinstance(_answer(committed, _customer("c-1", _add())), Decided)


def test_another_customers_order_is_refused_exactly_like_a_missing_one() -> None:
    committed = _committed_with(_create("o-1", customer_id="c-1"), _add("o-1"))
    missing = Committed()

    refusal = _answer(committed, _customer("c-2", _add("o-1", "TEA")))

    assert isinstance(refusal, OrderNotFound)
    assert _as_compared(refusal) == _as_compared(_answer(missing, _customer("c-2", _add())))
    assert committed.orders["o-1"].version == 2  # it exists, at version 2


@pytest.mark.parametrize("if_match", [0, 1, 2, 3])
def test_an_if_match_on_another_customers_order_answers_as_on_a_missing_one(
    if_match: int,
) -> None:
    """Never a 412 carrying the order's real version (2): ownership comes first."""
    committed = _committed_with(_create("o-1", customer_id="c-1"), _add("o-1"))
    request = _customer("c-2", _add("o-1", "TEA"), expected_version=if_match)

    refusal = _answer(committed, request)

    assert _as_compared(refusal) == _as_compared(_answer(Committed(), request))
    if isinstance(refusal, VersionMismatch):
        assert refusal.actual == 0


def test_creating_an_order_for_another_customer_is_refused() -> None:
    refusal = _answer(Committed(), _customer("c-2", _create(customer_id="c-1")))

    assert isinstance(refusal, AccessDenied)
    assert refusal.any_of == (Scope.ORDERS_WRITE_ANY,)


def test_a_customer_creates_its_own_orders_and_a_caller_without_owner_any() -> None:
    own = _answer(Committed(), _customer("c-1", _create(customer_id="c-1")))
    back_office = _answer(Committed(), _request(_create(customer_id="c-9"), actor=ALICE))

    assert isinstance(own, Decided)
    assert isinstance(back_office, Decided)


def test_another_customers_order_staged_in_the_same_batch_is_missing_too() -> None:
    batch = Committed().stage(
        [_customer("c-1", _create(customer_id="c-1")), _customer("c-2", _add())]
    )

    assert isinstance(batch.decisions[1], OrderNotFound)
    assert _versions(batch) == [[1]]


def test_a_replayed_answer_about_another_customers_order_is_never_given() -> None:
    """A caller that used a key on another customer's order while it could act for any
    customer, and sends the same request again now limited to its own: the receipt is not an
    answer it may have, and the order is as missing."""
    committed = _committed_with(_create("o-1", customer_id="c-1"))
    sent = _request(_add("o-1"), actor=ALICE, idempotency_key="k", request_hash="h")
    first = committed.stage([sent])
    committed.commit(first, _positions(first))

    again = _answer(committed, dataclasses.replace(sent, owner="alice"))
    # The same within one batch: the first use of a key decided for any customer.
    tea = dataclasses.replace(sent, command=_add("o-1", "TEA"), idempotency_key="k-2")
    in_one_batch = committed.stage([tea, dataclasses.replace(tea, owner="alice")])

    assert isinstance(again, OrderNotFound)
    assert isinstance(in_one_batch.decisions[0], Decided)
    assert isinstance(in_one_batch.decisions[1], OrderNotFound)


# -- idempotency keys: each caller's own, for a while -----------------------------------------


def test_two_callers_may_use_the_same_key_each_for_its_own_command() -> None:
    committed = Committed()
    alices = _request(_create("o-1"), actor=ALICE, idempotency_key="k", request_hash="h-a")
    bobs = _request(_create("o-2"), actor=BOB, idempotency_key="k", request_hash="h-b")

    first = committed.stage([alices])
    committed.commit(first, _positions(first))
    second = committed.stage([bobs])

    [decided] = second.appends  # not refused as a reused key, not alice's answer
    assert decided.events[0].order_id == "o-2"
    assert decided.events[0].event_id != first.appends[0].events[0].event_id
    committed.commit(second, _positions(second, first=20))
    assert set(committed.receipts) == {("alice", "k"), ("bob", "k")}
    assert committed.stage([alices]).decisions == [Accepted("o-1", 1, 0, 10, replayed=True)]


def test_two_callers_same_key_in_one_batch_are_two_commands() -> None:
    batch = Committed().stage(
        [
            _request(_create("o-1"), actor=ALICE, idempotency_key="k", request_hash="h"),
            _request(_create("o-2"), actor=BOB, idempotency_key="k", request_hash="h"),
            _request(_create("o-3"), actor=BOB, idempotency_key="k", request_hash="h"),
        ]
    )

    assert _versions(batch) == [[1], [1]]
    assert batch.decisions[2] == SameAs(1)


def test_a_key_without_a_known_caller_is_not_a_known_callers_key() -> None:
    committed = _committed_with()
    first = committed.stage([_request(_create("o-1"), idempotency_key="k", request_hash="h")])
    committed.commit(first, _positions(first))

    again = committed.stage(
        [_request(_create("o-2"), actor=ALICE, idempotency_key="k", request_hash="h")]
    )

    assert _versions(again) == [[1]]


def _keyed(at: datetime, *, order_id: str = "o-1", request_hash: str = "h") -> CommandRequest:
    command = replace(_create(order_id), at=at)
    return _request(command, actor=ALICE, idempotency_key="k", request_hash=request_hash)


def _committed_keyed() -> tuple[Committed, StagedBatch]:
    """A state holding alice's keyed creation of o-1 at AT, and the batch that wrote it."""
    committed = Committed(idempotency_ttl=TTL)
    batch = committed.stage([_keyed(AT)])
    committed.commit(batch, _positions(batch))
    return committed, batch


def test_a_receipt_answers_a_retry_until_its_ttl_has_passed() -> None:
    committed, _ = _committed_keyed()

    retry = committed.stage([_keyed(AT + TTL, order_id="o-2")])

    assert retry.decisions == [Accepted("o-1", 1, 0, 10, replayed=True)]


def test_after_its_ttl_the_same_key_is_a_new_request_with_new_event_ids() -> None:
    committed, first = _committed_keyed()

    later = committed.stage([_keyed(AT + TTL + timedelta(microseconds=1), order_id="o-2")])

    [decided] = later.appends
    assert decided.events[0].order_id == "o-2"
    assert decided.events[0].event_id != first.appends[0].events[0].event_id


def test_after_its_ttl_a_key_may_come_with_another_request() -> None:
    committed, _ = _committed_keyed()

    later = committed.stage(
        [_keyed(AT + TTL + timedelta(seconds=1), order_id="o-2", request_hash="other")]
    )

    assert isinstance(later.decisions[0], Decided)  # not IdempotencyKeyReused


def test_a_commit_prunes_the_receipts_expired_before_its_commands() -> None:
    committed, _ = _committed_keyed()
    middle = committed.stage(
        [
            _request(
                replace(_create("o-2"), at=AT + TTL / 2),
                actor=BOB,
                idempotency_key="k",
                request_hash="h",
            )
        ]
    )
    committed.commit(middle, _positions(middle, first=20))
    assert set(committed.receipts) == {("alice", "k"), ("bob", "k")}

    later = committed.stage([_request(replace(_create("o-3"), at=AT + TTL + timedelta(hours=1)))])
    committed.commit(later, _positions(later, first=30))

    assert set(committed.receipts) == {("bob", "k")}  # alice's expired, bob's still valid
    assert committed.orders.keys() == {"o-1", "o-2", "o-3"}  # orders are never pruned


def _commit_keyed(committed: Committed, actor: Actor, at: datetime, order_id: str) -> None:
    command = replace(_create(order_id), at=at)
    batch = committed.stage([_request(command, actor=actor, idempotency_key="k", request_hash="h")])
    committed.commit(batch, _positions(batch))


def test_a_key_used_again_moves_its_receipt_to_the_back() -> None:
    committed, _ = _committed_keyed()  # alice's at AT
    _commit_keyed(committed, BOB, AT + timedelta(hours=1), "o-2")

    _commit_keyed(committed, ALICE, AT + TTL + timedelta(minutes=30), "o-3")  # hers expired

    assert list(committed.receipts) == [("bob", "k"), ("alice", "k")]
    assert committed.receipts["alice", "k"].order_id == "o-3"


def test_pruning_stops_at_the_first_receipt_still_valid() -> None:
    """Receipts are pruned from the oldest committed on; one committed out of time order waits
    for those before it, so pruning costs only what it removes."""
    committed = Committed(idempotency_ttl=TTL)
    _commit_keyed(committed, BOB, AT + timedelta(hours=1), "o-1")
    _commit_keyed(committed, ALICE, AT, "o-2")  # an earlier time, committed later

    committed.prune_receipts(AT + TTL + timedelta(minutes=30))
    assert list(committed.receipts) == [("bob", "k"), ("alice", "k")]  # alice's waits

    committed.prune_receipts(AT + TTL + timedelta(hours=2))
    assert list(committed.receipts) == []


def test_a_state_folded_from_the_log_skips_the_receipts_already_expired() -> None:
    old = Committed().stage([_keyed(AT)]).appends[0].events[0]
    recent = (
        Committed()
        .stage(
            [
                _request(
                    replace(_create("o-2"), at=AT + TTL),
                    actor=BOB,
                    idempotency_key="k",
                    request_hash="h",
                )
            ]
        )
        .appends[0]
        .events[0]
    )
    folded = Committed(idempotency_ttl=TTL)
    for offset, event in enumerate([old, recent]):
        folded.fold(event, envelope.decode_data(event), 0, offset, now=AT + TTL + timedelta(1))

    assert set(folded.receipts) == {("bob", "k")}
    assert folded.orders.keys() == {"o-1", "o-2"}
