"""Group-commit staging: a batch of commands decided in memory against the committed state.

The commands of a batch are decided strictly one after another, each against the state the
previous ones left, including earlier commands of the same batch whose events are not in the
log yet: two commands are never decided on the same version (design.md 3). What a batch decides
is staged beside the committed state, which takes it over (``Committed.commit``) only once the
batch's Kafka transaction has committed; a batch whose transaction failed is simply dropped.

Idempotency keys are each caller's own: a receipt is found by the caller's subject and the key
(``ReceiptKey``), and it lasts ``idempotency_ttl`` from the time of its command; after that the
same key is a new request. Expired receipts are pruned as batches commit, and skipped when the
state is rebuilt from the log, so the receipts kept grow with the traffic of one TTL, not with
the log's history.

No I/O and no clock here: the writer (``service.write.writer``) runs the queue and the
transaction; time comes with each command (``at``) or from the writer.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeAlias

from service.kernel import envelope
from service.kernel.access import Actor, order_seen_by, owns
from service.kernel.domain import Order, decide, evolve, settled
from service.kernel.errors import AccessDenied, DomainError
from service.kernel.events import DomainEvent
from service.write.contract import (
    DEFAULT_IDEMPOTENCY_TTL,
    Accepted,
    CommandRequest,
    IdempotencyKeyReused,
    VersionMismatch,
)

_log = logging.getLogger(__name__)

# Whose key it is (the actor's subject; None when authentication was off) and the key.
ReceiptKey: TypeAlias = tuple[str | None, str]


def receipt_key(actor: Actor | None, idempotency_key: str | None) -> ReceiptKey | None:
    """Where the receipt of a command with ``idempotency_key`` from ``actor`` is kept (None:
    a command without a key has none)."""
    if idempotency_key is None:
        return None
    return (actor.sub if actor is not None else None, idempotency_key)


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the log says a command with an idempotency key produced (rebuilt on start)."""

    request_hash: str | None
    order_id: str
    version: int
    partition: int
    offset: int
    occurred_at: datetime  # the command's time: the receipt's TTL runs from there

    @classmethod
    def of(cls, sealed: envelope.Envelope, partition: int, offset: int) -> Receipt:
        """The receipt of a command whose last event is ``sealed``, at ``partition``, ``offset``."""
        return cls(
            sealed.request_hash,
            sealed.order_id,
            sealed.version,
            partition,
            offset,
            sealed.occurred_at,
        )

    def expired(self, at: datetime, ttl: timedelta) -> bool:
        """Whether a command at ``at`` no longer finds this receipt: older than ``ttl`` then."""
        return at - self.occurred_at > ttl

    def replayed(self) -> Accepted:
        """The answer to the same request sent again."""
        return Accepted(self.order_id, self.version, self.partition, self.offset).as_replayed()


@dataclass(frozen=True, slots=True)
class Decided:
    """A command whose events (sealed, in order) go into the batch's transaction."""

    request: CommandRequest
    events: list[envelope.Envelope]


@dataclass(frozen=True, slots=True)
class SameAs:
    """A command repeating an earlier one of the same batch (same idempotency key and request):
    it gets that command's answer, whatever the transaction's outcome."""

    original: int  # index of the earlier command in the batch


# Per command: known at once (a replay from the log, or a refusal), or known once the
# transaction ends (``Decided``, ``SameAs``).
Decision: TypeAlias = Accepted | Exception | Decided | SameAs
Answer: TypeAlias = Accepted | Exception


@dataclass(slots=True)
class StagedBatch:
    """A batch of commands decided, and the order states they lead to, not yet committed."""

    decisions: list[Decision]  # one per command, in the order they came
    orders: dict[str, Order]  # the orders the batch changes, as they are after it
    appends: list[Decided]  # the commands with events to append, in the order decided

    def answers_after_commit(self, positions: Sequence[tuple[int, int]]) -> list[Answer]:
        """Every command's answer once the transaction committed (see ``Committed.commit``)."""
        if len(positions) != len(self.appends):
            raise ValueError(f"{len(positions)} positions for {len(self.appends)} appends")

        def accepted(index: int, decided: Decided) -> Accepted:
            partition, offset = positions[index]
            last = decided.events[-1]
            return Accepted(last.order_id, last.version, partition, offset)

        return self._answers(accepted)

    def answers_after_failure(self, error: Exception) -> list[Answer]:
        """Every command's answer when the transaction failed: ``error`` for those it carried."""
        return self._answers(lambda _index, _decided: error)

    def _answers(self, answer_for: Callable[[int, Decided], Answer]) -> list[Answer]:
        """The answers, with ``answer_for(n, decided)`` for the n-th command appended."""
        answers: list[Answer] = []
        appended = 0
        for decision in self.decisions:
            if isinstance(decision, Decided):
                answers.append(answer_for(appended, decision))
                appended += 1
            elif isinstance(decision, SameAs):
                original = answers[decision.original]
                answers.append(
                    original.as_replayed() if isinstance(original, Accepted) else original
                )
            else:
                answers.append(decision)
        return answers


@dataclass(slots=True)
class Committed:
    """The order states and idempotency receipts in the log, up to the last committed batch.

    A delivered or cancelled order is kept ``settled``: only what its remaining commands need.

    ``receipts`` is kept oldest first (by the time each was committed), so expired ones are
    pruned from its front.
    """

    orders: dict[str, Order] = field(default_factory=dict)
    receipts: OrderedDict[ReceiptKey, Receipt] = field(default_factory=OrderedDict)
    idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL
    # Receipts pruned since the writer's changelog last heard of it: (partition, key).
    forgotten: list[tuple[int, ReceiptKey]] = field(default_factory=list)

    def fold(
        self,
        sealed: envelope.Envelope,
        event: DomainEvent,
        partition: int,
        offset: int,
        *,
        now: datetime | None = None,
    ) -> None:
        """Take in one event read from the log (at ``partition`` and ``offset``). ``now``: the
        time of the reading, before which the receipts that have expired are not kept."""
        self.orders[sealed.order_id] = settled(
            evolve(self.orders.get(sealed.order_id), event, sealed.order_id)
        )
        key = receipt_key(sealed.actor, sealed.idempotency_key)
        if key is None:
            return
        receipt = Receipt.of(sealed, partition, offset)
        if now is not None and receipt.expired(now, self.idempotency_ttl):
            self.receipts.pop(key, None)  # an older receipt of the same key is older still
        else:
            self.keep(key, receipt)

    def stage(self, requests: Iterable[CommandRequest]) -> StagedBatch:
        """Decide each command on the state the ones before it left; change nothing here."""
        batch = StagedBatch(decisions=[], orders={}, appends=[])
        staged_keys: dict[ReceiptKey, int] = {}  # receipt key -> index of the command using it
        for request in requests:
            decision: Decision | _Sealed
            try:
                decision = self._decide(request, batch, staged_keys)
            except (DomainError, AccessDenied, VersionMismatch, IdempotencyKeyReused) as error:
                decision = error
            except Exception as error:
                # A bug with this command (a 500 for it alone): nothing of it is staged, and
                # the rest of the batch goes on.
                _log.exception(
                    "deciding command %s failed",
                    request.command_id,
                    extra={
                        "correlation_id": request.correlation_id or request.command_id,
                        "order_id": request.command.order_id,
                    },
                )
                decision = error
            if isinstance(decision, _Sealed):
                if decision.order_state is not None:
                    batch.orders[request.command.order_id] = decision.order_state
                if (key := receipt_key(request.actor, request.idempotency_key)) is not None:
                    staged_keys[key] = len(batch.decisions)
                decision = decision.decided
                batch.appends.append(decision)
            batch.decisions.append(decision)
        return batch

    def commit(self, batch: StagedBatch, positions: Sequence[tuple[int, int]]) -> list[Answer]:
        """Take over what ``batch`` staged, now that its transaction committed, and return every
        command's answer. ``positions``: the partition and offset of each appended command's
        last event, in the order of ``batch.appends``. Receipts that expired before the
        earliest command of the batch are pruned."""
        answers = batch.answers_after_commit(positions)
        self.orders.update((order_id, settled(order)) for order_id, order in batch.orders.items())
        for decided, (partition, offset) in zip(batch.appends, positions, strict=True):
            request = decided.request
            if (key := receipt_key(request.actor, request.idempotency_key)) is not None:
                self.keep(key, Receipt.of(decided.events[-1], partition, offset))
        if batch.appends:
            self.prune_receipts(min(decided.request.command.at for decided in batch.appends))
        return answers

    def prune_receipts(self, now: datetime) -> None:
        """Forget the receipts that have expired by ``now``, oldest first: cheap, since it stops
        at the first one still valid (one out of time order waits for those before it)."""
        while self.receipts:
            oldest = next(iter(self.receipts.values()))
            if not oldest.expired(now, self.idempotency_ttl):
                return
            key, _ = self.receipts.popitem(last=False)
            self.forgotten.append((oldest.partition, key))

    def keep(self, key: ReceiptKey, receipt: Receipt) -> None:
        self.receipts[key] = receipt
        self.receipts.move_to_end(key)  # a key used again is as new as its new receipt

    def _decide(
        self, request: CommandRequest, batch: StagedBatch, staged_keys: dict[ReceiptKey, int]
    ) -> Accepted | SameAs | _Sealed:
        command = request.command
        # Ownership first: another customer's order is as missing for every check that follows,
        # the If-Match comparison and a replayed answer included. Events still follow the real
        # version: only a CreateOrder is decided on a missing order, and it is never withheld.
        current = order_seen_by(request.owner, command, self._current(command.order_id, batch))
        key = receipt_key(request.actor, request.idempotency_key)
        if key is not None:
            receipt = self.receipts.get(key)
            if (
                receipt is not None
                and not receipt.expired(command.at, self.idempotency_ttl)
                and self._owned(request.owner, receipt.order_id, batch)
            ):
                _check_same_request(receipt.request_hash, request)
                return receipt.replayed()
            earlier = staged_keys.get(key)
            if earlier is not None:
                original = batch.decisions[earlier]
                assert isinstance(original, Decided)  # only decided commands are in staged_keys
                if self._owned(request.owner, original.request.command.order_id, batch):
                    _check_same_request(original.request.request_hash, request)
                    return SameAs(earlier)
        if request.expected_version is not None:
            actual = current.version if current else 0
            if actual != request.expected_version:
                raise VersionMismatch(request.expected_version, actual)
        return _seal(request, current, decide(command, current))

    def _current(self, order_id: str, batch: StagedBatch) -> Order | None:
        """The order as the batch left it so far, or as committed."""
        return batch.orders.get(order_id) or self.orders.get(order_id)

    def _owned(self, owner: str | None, order_id: str, batch: StagedBatch) -> bool:
        """Whether an earlier answer about ``order_id`` may be given to a caller limited to the
        customer ``owner``: never one about another customer's order."""
        order = self._current(order_id, batch)
        return order is None or owns(owner, order)


@dataclass(frozen=True, slots=True)
class _Sealed:
    """A command decided: its events in envelopes and its order's state after them."""

    decided: Decided
    order_state: Order | None


def _seal(request: CommandRequest, current: Order | None, events: list[DomainEvent]) -> _Sealed:
    order_id = request.command.order_id
    key = request.idempotency_key
    sealed = []
    state = current
    for index, event in enumerate(events):
        state = evolve(state, event, order_id)
        sealed.append(
            envelope.seal(
                event,
                event_id=_event_id(request, state.version, index),
                order_id=order_id,
                version=state.version,
                occurred_at=request.command.at,
                command_id=request.command_id,
                correlation_id=request.correlation_id or request.command_id,
                causation_id=request.command_id,
                idempotency_key=key,
                request_hash=request.request_hash,
                actor=request.actor,
            )
        )
    return _Sealed(Decided(request, sealed), state)


def _event_id(request: CommandRequest, version: int, index: int) -> str:
    key = request.idempotency_key
    if key is not None and request.actor is not None:
        return envelope.caller_event_id(request.actor.sub, key, request.command.order_id, version)
    return envelope.event_id_for(key, request.command_id, index)


def _check_same_request(recorded_hash: str | None, request: CommandRequest) -> None:
    if recorded_hash != request.request_hash:
        raise IdempotencyKeyReused("this Idempotency-Key was already used for a different request")
