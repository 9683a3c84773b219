"""The record timestamps behind the projector's lag in seconds (``projections.metrics``)."""

from __future__ import annotations

from dataclasses import dataclass

from projections.metrics import RecordTimes
from service.edge.cli import main


@dataclass(frozen=True)
class Record:
    offset: int
    timestamp: int  # ms


def chunk(times: RecordTimes, partition: int, first: int, last: int) -> None:
    times.note(partition, Record(first, first * 1000), Record(last, last * 1000))


def test_the_oldest_waiting_record_is_the_first_fetched_at_or_after_the_checkpoint() -> None:
    times = RecordTimes()
    chunk(times, 0, 10, 19)
    chunk(times, 0, 22, 30)  # 20 and 21: transaction markers
    assert times.oldest_waiting(0, 10) == 10.0
    assert times.oldest_waiting(0, 20) == 22.0
    assert times.oldest_waiting(0, 15) == 22.0  # halted mid-chunk: the next chunk's first
    assert times.oldest_waiting(0, 31) is None, "everything fetched is applied"
    assert times.oldest_waiting(1, 0) is None, "nothing fetched there"


def test_behind_with_nothing_fetched_the_wait_counts_from_when_a_scrape_first_saw_it() -> None:
    """A runner stuck in a transaction fetches nothing more: its lag in seconds must still
    grow (it was reported as 0, and the lag alert never fired)."""
    times = RecordTimes()
    assert times.waited("orders", 0, 10, True, now=1000.0) == 0.0  # first seen behind
    assert times.waited("orders", 0, 10, True, now=1030.0) == 30.0
    chunk(times, 0, 10, 19)  # handed over: its own timestamp (10 s) counts from now on
    assert times.waited("orders", 0, 10, True, now=1040.0) == 1030.0
    assert times.waited("orders", 0, 20, False, now=1041.0) == 0.0  # caught up
    assert times.waited("orders", 0, 20, True, now=1050.0) == 0.0  # behind anew: from here
    assert times.waited("orders", 0, 20, True, now=1052.0) == 2.0
    # Keeping up under load: behind at every scrape, but the checkpoint moves: no wait grows.
    assert times.waited("orders", 0, 25, True, now=1053.0) == 0.0
    assert times.waited("orders", 0, 31, True, now=1054.0) == 0.0


def test_keeping_forgets_what_no_checkpoint_needs_and_the_partitions_let_go() -> None:
    times = RecordTimes()
    for first in range(0, 100, 10):
        chunk(times, 0, first, first + 9)
    chunk(times, 1, 0, 9)
    # One projection halted at 25, another at 60: 30 answers the first, 60 on stays.
    times.keep({0: {"halted": 25, "going": 60}})
    assert times.oldest_waiting(0, 25) == 30.0
    assert times.oldest_waiting(0, 60) == 60.0
    assert times.oldest_waiting(0, 80) == 80.0
    assert times.oldest_waiting(0, 40) == 60.0, "40 and 50 were forgotten"
    assert times.oldest_waiting(1, 0) is None, "partition 1 is no longer held"


def test_records_fetched_again_after_a_seek_add_nothing() -> None:
    times = RecordTimes()
    chunk(times, 0, 0, 9)
    chunk(times, 0, 10, 19)
    chunk(times, 0, 0, 19)
    chunk(times, 0, 10, 19)
    assert times.oldest_waiting(0, 5) == 10.0
    assert times.oldest_waiting(0, 0) == 0.0


def test_a_rebuild_serves_its_progress_on_the_metrics_port_it_is_given() -> None:
    args = main.build_parser().parse_args(
        ["projections", "rebuild", "all", "--metrics-port", "9187"]
    )
    assert args.metrics_port == 9187
    assert main.build_parser().parse_args(["projections", "rebuild", "all"]).metrics_port is None
