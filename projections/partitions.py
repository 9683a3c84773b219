"""Where a runner stands in each partition it is assigned, and the decisions that follow from
it, without I/O: where to seek, when to pause, which halts to make, store, lift or clear, and
which checkpoints to move past transaction markers.

The positions are the stored checkpoints (design.md, invariant 6): they move only after the
transaction that moved the checkpoint committed. A halted projection in a partition takes no
events there (invariant 7); a partition where every projection halted is paused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from projections.batches import Group, Halt, HaltKey
from projections.projection import Target


@dataclass
class Partitions:
    """The per-partition state of one runner."""

    # partition -> projection name -> next offset to apply (the stored checkpoint)
    positions: dict[int, dict[str, int]] = field(default_factory=dict)
    halted: dict[HaltKey, Halt] = field(default_factory=dict)
    # Halts stored in the database (key -> offset), to clear once their partition moves past.
    stored_halts: dict[HaltKey, int] = field(default_factory=dict)
    # Bumped by every seek: records fetched before a seek of their partition are stale.
    seeks: dict[int, int] = field(default_factory=dict)
    # Assigned partitions whose checkpoint could not be read yet (the run loop retries).
    unsought: set[int] = field(default_factory=set)

    def forget(self, partition: int) -> None:
        """``partition`` is no longer this runner's (revoked, or the consumer is gone)."""
        self.positions.pop(partition, None)
        self.unsought.discard(partition)
        self._clear_halted(partition)

    def _clear_halted(self, partition: int) -> None:
        for key in [k for k in self.halted if k[1] == partition]:
            del self.halted[key]

    def reposition(self, partition: int) -> int | None:
        """A seek of ``partition``: the lowest checkpoint of the projections not halted there,
        or None when all are (pause it). Records fetched before it are stale from now on."""
        self.seeks[partition] = self.seeks.get(partition, 0) + 1
        going = [
            offset
            for name, offset in self.positions.get(partition, {}).items()
            if (name, partition) not in self.halted
        ]
        return min(going) if going else None

    def sought(
        self, checkpoints: Mapping[int, Mapping[str, int]], stored_halts: Mapping[HaltKey, int]
    ) -> None:
        """The stored checkpoints (partition -> projection -> offset) and halts of some
        partitions were read: go on from there. A halt found before is tried again (the cause
        may be fixed); a stored one is cleared once passed. Reposition each partition next."""
        for partition, found in checkpoints.items():
            self._clear_halted(partition)
            self.positions[partition] = dict(found)
            self.unsought.discard(partition)
        self.stored_halts.update(stored_halts)

    def unreadable(self, partitions: Iterable[int]) -> None:
        """The checkpoints of ``partitions`` could not be read: wait (paused) for a retry."""
        for partition in partitions:
            self.unsought.add(partition)
            self.positions.pop(partition, None)

    def halt(self, halt: Halt, names: Iterable[str]) -> bool:
        """Record ``halt``; True when every projection of ``names`` is now halted in its
        partition (pause it)."""
        self.halted[(halt.projection, halt.partition)] = halt
        return all((name, halt.partition) in self.halted for name in names)

    def moved(self, committed: Iterable[Group]) -> int:
        """Groups that committed: their checkpoints moved. Returns how many events they held."""
        events = 0
        for group in committed:
            self.positions[group.partition][group.target.name] = group.new
            events += len(group.events)
        return events

    def undo_halts(self, before: Mapping[HaltKey, Halt], failed: set[str]) -> list[int]:
        """Put back the halts of the ``failed`` projections as they were ``before`` the batch
        (a retry finds them again); returns the partitions to seek again."""
        partitions = []
        for key in self.halted.keys() ^ before.keys():
            if key[0] in failed:
                if key in before:
                    self.halted[key] = before[key]
                else:
                    del self.halted[key]
                partitions.append(key[1])
        return partitions

    def halts_to_make(self, halts: Iterable[Halt]) -> list[Halt]:
        """The halts at undecodable records that a committed batch reached: those whose
        projection's checkpoint now stands at them (and not halted there already)."""
        return [
            halt
            for halt in halts
            if (halt.projection, halt.partition) not in self.halted
            and self.positions[halt.partition][halt.projection] == halt.offset
        ]

    def passed_halts(self, groups: Iterable[Group]) -> list[Group]:
        """The groups that move their projection past a halt stored for it."""
        return [
            g
            for g in groups
            if (offset := self.stored_halts.get((g.target.name, g.partition))) is not None
            and g.new > offset
        ]

    def halts_cleared(self, groups: Iterable[Group]) -> None:
        """The stored halts these groups passed were deleted."""
        for group in groups:
            self.stored_halts.pop((group.target.name, group.partition), None)

    def halts_to_sync(self, stored: Mapping[HaltKey, int]) -> tuple[list[Halt], list[Halt]]:
        """Given the halts stored now: (those an operator removed, e.g. by parking, to lift;
        those to store, new or moved)."""
        lift, store = [], []
        for key, halt in self.halted.items():
            if key in self.stored_halts and key not in stored:
                lift.append(halt)
            elif stored.get(key) != halt.offset:
                store.append(halt)
        return lift, store

    def halt_stored(self, halt: Halt) -> None:
        self.stored_halts[(halt.projection, halt.partition)] = halt.offset

    def lifted(self, halt: Halt, checkpoint: int) -> None:
        """An operator removed ``halt``: its projection goes on from ``checkpoint``."""
        key = (halt.projection, halt.partition)
        del self.halted[key]
        self.stored_halts.pop(key, None)
        self.positions[halt.partition][halt.projection] = checkpoint

    def settled(self, assigned: Iterable[int]) -> list[int]:
        """The ``assigned`` partitions whose checkpoints are known."""
        return [p for p in assigned if p in self.positions and p not in self.unsought]

    def marker_moves(self, consumed: Mapping[int, int], targets: Sequence[Target]) -> list[Group]:
        """Checkpoint moves over offsets only transaction markers fill, given the consumer's
        position in each partition once everything before it was applied (``consumed``)."""
        moves = []
        for partition, position in consumed.items():
            checkpoints = self.positions[partition]
            for target in targets:
                expected = checkpoints.get(target.name)
                if (
                    expected is not None
                    and (target.name, partition) not in self.halted
                    and expected < position
                ):
                    moves.append(Group(target, partition, expected, position))
        return moves

    def committable(self, assigned: Iterable[int]) -> dict[int, int]:
        """partition -> the lowest checkpoint there: the offsets worth showing Kafka's tools."""
        return {
            p: min(offsets.values())
            for p in assigned
            if (offsets := self.positions.get(p)) is not None and offsets
        }
