"""The writer's estimate of a new command's wait for its batch (design.md 9: overload is
refused fast), learned from the batches the decision loop ran."""

from __future__ import annotations

import pytest

from service.write.pacing import Pace


def _paced(*batches: tuple[int, float]) -> Pace:
    pace = Pace()
    for commands, seconds in batches:
        pace.observe(commands, seconds)
    return pace


def _cost(commands: int) -> float:
    """A loop whose batch costs 10 ms plus 0.2 ms a command."""
    return 0.010 + 0.0002 * commands


def test_before_any_batch_nothing_is_expected_to_wait() -> None:
    pace = Pace()

    assert pace.batch_seconds(500) == 0.0
    assert pace.expected_wait(queued=10_000, max_batch=500, in_flight=0, in_flight_for=0) == 0.0


def test_batches_of_one_size_charge_each_command_their_average() -> None:
    pace = _paced(*[(10, 0.020)] * 5)

    assert pace.batch_seconds(10) == pytest.approx(0.020)
    assert pace.batch_seconds(500) == pytest.approx(1.0)


def test_batches_of_several_sizes_tell_the_fixed_cost_from_the_cost_per_command() -> None:
    pace = _paced(*[(n, _cost(n)) for n in (1, 100, 3, 250, 1, 40)])

    assert pace.batch_seconds(1) == pytest.approx(_cost(1))
    assert pace.batch_seconds(500) == pytest.approx(_cost(500))  # not 500 x the cost of one


def test_recent_batches_weigh_most() -> None:
    pace = _paced(*[(10, 1.0)] * 5, *[(10, 0.010)] * 50)  # a slow spell, then 50 fast batches

    assert 0.010 < pace.batch_seconds(10) < 0.020


def test_a_command_queued_behind_less_than_a_batch_waits_for_the_batch_in_flight_only() -> None:
    pace = _paced(*[(n, _cost(n)) for n in (1, 100, 3, 250)])

    wait = pace.expected_wait(queued=499, max_batch=500, in_flight=100, in_flight_for=0.010)

    assert wait == pytest.approx(_cost(100) - 0.010)


def test_each_full_batch_queued_ahead_adds_a_batch_time() -> None:
    pace = _paced(*[(n, _cost(n)) for n in (1, 100, 3, 250)])

    wait = pace.expected_wait(queued=1_200, max_batch=500, in_flight=0, in_flight_for=0)

    assert wait == pytest.approx(2 * _cost(500))


def test_a_batch_in_flight_longer_than_expected_is_expected_to_end_now() -> None:
    pace = _paced((10, 0.020))

    assert pace.expected_wait(queued=0, max_batch=500, in_flight=10, in_flight_for=5.0) == 0.0
