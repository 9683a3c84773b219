"""Is the topic under our name the one the checkpoints were taken on? (without I/O)

A topic deleted and created again, or truncated, starts its offsets anew: checkpoints of the
old one would skip the new one's events, and queries would count its events as applied. Two
signs, either enough: the topic's id (Kafka gives each topic its own) differs from the one
recorded when the version began, or a checkpoint lies beyond the end of its partition.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from projections.projection import Target
from service.kernel.errors import EnvironmentProblem


class TopicReplaced(EnvironmentProblem):
    """The checkpoints were taken on another topic of the same name, or a longer one."""


def replaced(
    topic: str,
    topic_id: uuid.UUID,
    recorded: Mapping[Target, uuid.UUID],
    reach: Mapping[int, int],
    ends: Mapping[int, int],
) -> TopicReplaced | None:
    """What refuses to go on, if anything: ``recorded`` topic ids per version, the highest
    checkpoint per partition (``reach``) and each partition's end (``ends``)."""
    others = sorted(str(t) for t, recorded_id in recorded.items() if recorded_id != topic_id)
    beyond = sorted(p for p, offset in reach.items() if offset > ends.get(p, 0))
    if not others and not beyond:
        return None
    if others:
        sign = f"{', '.join(others)} began on another topic of that name (id {topic_id} now)"
    else:
        sign = "checkpoints lie beyond the end of partition(s) " + ", ".join(map(str, beyond))
    return TopicReplaced(
        f"topic {topic}: {sign}. The topic was deleted and recreated, or truncated: rebuild "
        "the projections (`orders projections rebuild all`); until then the projector does "
        "not apply events and queries do not count the old checkpoints"
    )
