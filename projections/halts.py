"""Finding the event at fault, without I/O: the order in which a projection's batch is tried
when the fold or the database refuses it (invariant 7: nothing silently skipped).

All of one projection's groups go in one transaction first. An event its fold refuses halts
that projection's partition there; what came before it is tried again. When the database
refuses the transaction (a value it cannot store, or asyncpg cannot encode), the groups are
split in halves, and halves of halves, until the refused part is one event: its partition
halts at it, and the checkpoint moves up to it (past transaction markers only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from projections.batches import Group, Halt, HaltKey
from projections.projection import Applied, Target


def advice(halt: Halt, target: Target) -> str:
    """What the log says of ``halt`` of ``target``: where, why, and the two ways on."""
    return (
        f"{target}: HALTED partition {halt.partition} at offset {halt.offset} (order "
        f"{halt.order_id or '?'}): {halt.reason}. Fix the cause and restart the projector, or "
        f"set the order aside: orders projections park {target.name} --partition "
        f"{halt.partition} --offset {halt.offset}"
    )


def halves(part: Sequence[Group]) -> list[list[Group]] | None:
    """Split a refused transaction in two, in order; None when it is down to one event."""
    if len(part) > 1:
        middle = len(part) // 2
        return [list(part[:middle]), list(part[middle:])]
    group = part[0]
    if len(group.events) <= 1:
        return None
    middle = len(group.events) // 2
    split_at = group.events[middle].offset
    first = Group(group.target, group.partition, group.expected, split_at, group.events[:middle])
    second = Group(group.target, group.partition, split_at, group.new, group.events[middle:])
    return [[first], [second]]


def cut_at(part: Sequence[Group], projection: str, partition: int, offset: int) -> list[Group]:
    """``part`` with ``projection``'s group of ``partition`` ending before ``offset``."""
    kept = []
    for group in part:
        if group.target.name == projection and group.partition == partition:
            before = [a for a in group.events if a.offset < offset]
            group = Group(group.target, group.partition, group.expected, offset, before)
        kept.append(group)
    return kept


class Bisection:
    """The parts of one projection's groups to try, one transaction each, in log order.

    ``halted`` is read at each ``next``: a halt made meanwhile (the caller records each halt
    this returns before asking for the next part) drops what lies past it.
    """

    def __init__(self, groups: Sequence[Group], halted: Mapping[HaltKey, Halt]) -> None:
        self._pending: list[list[Group]] = [list(groups)]
        self._halted = halted
        self.committed: list[Group] = []

    def next(self) -> list[Group] | None:
        """The next part to try in one transaction; None when all is done."""
        while self._pending:
            part = [g for g in self._pending.pop(0) if g.new > g.expected and self._before(g)]
            if part:
                return part
        return None

    def _before(self, group: Group) -> bool:
        """Whether ``group`` ends at or before where its projection halted (if it did)."""
        halt = self._halted.get((group.target.name, group.partition))
        return halt is None or group.new <= halt.offset

    def succeeded(self, part: Sequence[Group]) -> None:
        """``part`` committed."""
        self.committed.extend(part)

    def fold_failed(self, part: Sequence[Group], applied: Applied, reason: str) -> Halt:
        """The fold refused ``applied`` (of ``part``'s projection): the halt to make there; what
        came before it is tried again."""
        projection = part[0].target.name
        self._pending.insert(0, cut_at(part, projection, applied.partition, applied.offset))
        sealed = applied.envelope
        return Halt(
            projection,
            applied.partition,
            applied.offset,
            sealed.order_id,
            reason,
            sealed.correlation_id,
        )

    @staticmethod
    def blames_an_event(part: Sequence[Group]) -> bool:
        """Whether a refusal of ``part`` can be an event's fault (not a bare checkpoint move)."""
        return len(part) > 1 or bool(part[0].events)

    def refused(self, part: Sequence[Group], reason: str) -> Halt | None:
        """The database refused ``part`` (which ``blames_an_event``): None when it is split in
        halves to try each; down to one event, the halt to make at it."""
        split = halves(part)
        if split is not None:
            self._pending[0:0] = split
            return None
        bad = part[0]
        first = bad.events[0]
        if first.offset > bad.expected:  # only markers before it: move up to it
            self._pending.insert(0, [Group(bad.target, bad.partition, bad.expected, first.offset)])
        sealed = first.envelope
        return Halt(
            bad.target.name,
            bad.partition,
            first.offset,
            sealed.order_id,
            reason,
            sealed.correlation_id,
        )
