"""Knowing how far the event log reaches: what is noted and read, and how Kafka is asked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import pytest
from aiokafka.errors import KafkaConnectionError

from projections.log_ends import LogEnds, LogEndUnknown
from service.kernel.log_ends import KnownLogEnds, refresh_delay

DEADLINE_S = 5.0

# -- the pure part -----------------------------------------------------------------------------


def test_a_noted_record_is_in_the_log_and_the_offset_after_it_is_not_known() -> None:
    known = KnownLogEnds()
    known.note(2, 7)

    assert known.reaches(2, 7)
    assert known.reaches(2, 0)
    assert not known.reaches(2, 8)
    assert not known.reaches(1, 0)  # a partition nothing was learned of


def test_a_high_watermark_is_the_offset_after_the_last_record() -> None:
    known = KnownLogEnds()
    known.learn({0: 5, 1: 0})

    assert known.reaches(0, 4)
    assert not known.reaches(0, 5)
    assert not known.reaches(1, 0)  # an empty partition holds no offset at all


def test_known_ends_never_go_down() -> None:
    known = KnownLogEnds()
    known.learn({0: 10})
    known.note(0, 3)
    known.learn({0: 4})

    assert known.ends == {0: 10}


@pytest.mark.parametrize(
    ("last", "now", "expected"),
    [(10.0, 10.0, 0.5), (10.0, 10.2, 0.3), (10.0, 10.5, 0.0), (10.0, 99.0, 0.0)],
)
def test_refreshes_are_spaced_by_the_minimum_interval(
    last: float, now: float, expected: float
) -> None:
    assert refresh_delay(last, now, 0.5) == pytest.approx(expected)


# -- asking Kafka --------------------------------------------------------------------------------


class FakeReader:
    """Kafka's high watermarks, answered when the test says (``gate``), counted."""

    def __init__(self, ends: dict[int, int]) -> None:
        self.ends = ends
        self.reads = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.asked = asyncio.Event()
        self.error: Exception | None = None
        self.closed = False

    async def read(self) -> Mapping[int, int]:
        self.reads += 1
        self.asked.set()
        ends = dict(self.ends)  # what the broker has when the request arrives
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return ends

    async def close(self) -> None:
        self.closed = True


async def asked(reader: FakeReader) -> None:
    """Until Kafka has been asked (at most DEADLINE_S)."""
    async with asyncio.timeout(DEADLINE_S):
        await reader.asked.wait()


async def test_what_is_noted_needs_no_request() -> None:
    reader = FakeReader({0: 100})
    ends = LogEnds(reader)
    ends.note(0, 7)

    assert await ends.reaches(0, 7) is True
    assert reader.reads == 0


async def test_a_token_beyond_what_is_known_is_judged_by_the_ends_kafka_reads() -> None:
    reader = FakeReader({0: 8, 1: 0})
    ends = LogEnds(reader, min_interval_s=0)

    assert await ends.reaches(0, 7) is True
    assert await ends.reaches(0, 8) is False
    assert await ends.reaches(1, 0) is False
    assert await ends.reaches(5, 0) is False  # a partition the topic does not have
    assert reader.reads == 4  # each beyond what was known asked again
    assert await ends.reaches(0, 6) is True
    assert reader.reads == 4  # learned by the first


async def test_without_kafka_a_token_beyond_what_is_noted_cannot_be_judged() -> None:
    ends = LogEnds(None)
    ends.note(0, 3)

    assert await ends.reaches(0, 3) is True
    assert await ends.reaches(0, 4) is None


async def test_queries_asking_together_share_one_request() -> None:
    reader = FakeReader({0: 50})
    reader.gate.clear()
    ends = LogEnds(reader, min_interval_s=0)

    queries = [asyncio.create_task(ends.reaches(0, offset)) for offset in range(10, 60, 5)]
    await asked(reader)
    reader.gate.set()
    answers = await asyncio.gather(*queries)

    assert answers == [True] * 8 + [False] * 2
    assert reader.reads == 1


async def test_a_request_sent_before_a_query_asked_does_not_answer_it() -> None:
    reader = FakeReader({0: 5})
    reader.gate.clear()
    ends = LogEnds(reader, min_interval_s=0)
    early = asyncio.create_task(ends.reaches(0, 9))
    await asked(reader)  # Kafka has been asked: the end is 5
    reader.ends[0] = 10  # then offset 9 is written, and its token is asked about
    late = asyncio.create_task(ends.reaches(0, 9))
    await asyncio.sleep(0)  # (lets it start: it must not join the request in flight)

    reader.gate.set()

    assert await early is False
    assert await late is True
    assert reader.reads == 2


async def test_requests_start_at_most_once_per_interval() -> None:
    reader = FakeReader({0: 1})
    ends = LogEnds(reader, min_interval_s=0.1)
    started = time.monotonic()

    for _ in range(4):
        assert await ends.reaches(0, 1) is False

    assert reader.reads == 4
    assert time.monotonic() - started >= 0.3  # three intervals between four requests


async def test_every_query_sharing_a_failed_request_hears_kafka_is_away() -> None:
    reader = FakeReader({0: 1})
    reader.gate.clear()
    reader.error = KafkaConnectionError("connection refused")
    ends = LogEnds(reader, min_interval_s=0)

    queries = [asyncio.create_task(ends.reaches(0, 5)) for _ in range(3)]
    await asked(reader)
    reader.gate.set()
    outcomes = await asyncio.gather(*queries, return_exceptions=True)

    assert all(isinstance(outcome, LogEndUnknown) for outcome in outcomes), outcomes
    assert reader.reads == 1
    reader.error = None
    assert await ends.reaches(0, 0) is True  # the next query asks again


async def test_kafka_not_answering_in_time_is_unknown_not_beyond() -> None:
    reader = FakeReader({0: 1})
    reader.gate.clear()  # never answers
    ends = LogEnds(reader, timeout_s=0.05)

    with pytest.raises(LogEndUnknown):
        async with asyncio.timeout(DEADLINE_S):  # (a TimeoutError here would fail the test)
            await ends.reaches(0, 5)


async def test_a_query_that_goes_away_leaves_the_request_to_the_others() -> None:
    reader = FakeReader({0: 10})
    reader.gate.clear()
    ends = LogEnds(reader, min_interval_s=0)
    gone = asyncio.create_task(ends.reaches(0, 5))
    staying = asyncio.create_task(ends.reaches(0, 5))
    await asked(reader)
    gone.cancel()
    reader.gate.set()

    assert await staying is True
    assert reader.reads == 1


async def test_closing_closes_the_reader() -> None:
    reader = FakeReader({0: 10})
    ends = LogEnds(reader)

    await ends.close()

    assert reader.closed
