"""How far each partition of the event log is known to reach: whether a consistency token
names an offset that was ever written. Pure: what is known is fed in by the caller.

A partition's end is its high watermark: the offset the next record will take. Every offset
below it was written and replicated: a record, a transaction's commit or abort marker (markers
take offsets too), or a record of a transaction still open. A token at or past it names an
offset no writer was ever acknowledged for. The last stable offset (where read_committed
readers stop) is the stricter bound, but it trails the high watermark while a transaction's
markers are on their way, so a token whose transaction has just committed could be refused;
a token between the two is waited for, as any token the projections have not applied yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class KnownLogEnds:
    """A lower bound on each partition's end, raised by what this process learns; it never
    goes down (a log is only appended to)."""

    ends: dict[int, int] = field(default_factory=dict)  # partition -> offset after the last

    def note(self, partition: int, offset: int) -> None:
        """The record at ``offset`` of ``partition`` is in the log."""
        self.learn({partition: offset + 1})

    def learn(self, ends: Mapping[int, int]) -> None:
        """``ends`` (partition -> end) were read from the log."""
        for partition, end in ends.items():
            if end > self.ends.get(partition, 0):
                self.ends[partition] = end

    def reaches(self, partition: int, offset: int) -> bool:
        """The log of ``partition`` is known to hold a record at ``offset``."""
        return offset < self.ends.get(partition, 0)


def refresh_delay(last_started_at: float, now: float, min_interval_s: float) -> float:
    """How long a refresh must wait so that refreshes start at most once per interval."""
    return max(0.0, last_started_at + min_interval_s - now)
