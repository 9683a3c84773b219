"""Halt decisions without I/O: bisecting a refused batch down to the event at fault, and the
per-partition state that decides seeks, pauses and which halts to make, store, lift or clear."""

from __future__ import annotations

from datetime import UTC, datetime

from projections.batches import Group, Halt
from projections.halts import Bisection, halves
from projections.models.catalog import PROJECTIONS
from projections.partitions import Partitions
from projections.projection import Applied, Target
from service.kernel import envelope
from service.kernel.events import OrderCreated

ORDERS = Target(PROJECTIONS["orders"], 1)
HISTORY = Target(PROJECTIONS["order_history"], 1)


def _events(*offsets: int, partition: int = 0) -> list[Applied]:
    found = []
    for offset in offsets:
        sealed = envelope.seal(
            OrderCreated(customer_id="c-1", currency="EUR"),
            event_id=f"e-{offset}",
            order_id=f"order-{offset}",
            version=1,
            occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
            command_id="cmd",
            correlation_id="cmd",
        )
        decoded, event = envelope.decode(envelope.encode(sealed))
        found.append(Applied(decoded, event, partition, offset))
    return found


def _group(*offsets: int, expected: int | None = None, partition: int = 0) -> Group:
    start = offsets[0] if expected is None else expected
    return Group(ORDERS, partition, start, offsets[-1] + 1, _events(*offsets, partition=partition))


def _tried(bisection: Bisection) -> list[list[tuple[int, int, int]]]:
    """Every part the bisection offers until done, as if each committed."""
    parts = []
    while (part := bisection.next()) is not None:
        parts.append([(g.partition, g.expected, g.new) for g in part])
        bisection.succeeded(part)
    return parts


# -- bisection ---------------------------------------------------------------------------------


def test_a_batch_is_tried_whole_first() -> None:
    groups = [_group(0, 1, partition=0), _group(5, partition=1)]
    assert _tried(Bisection(groups, {})) == [[(0, 0, 2), (1, 5, 6)]]


def test_a_refused_batch_of_several_partitions_is_split_between_them() -> None:
    halted: dict[tuple[str, int], Halt] = {}
    bisection = Bisection([_group(0, 1, partition=0), _group(5, partition=1)], halted)
    part = bisection.next()
    assert part is not None
    assert bisection.refused(part, "refused") is None
    assert _tried(bisection) == [[(0, 0, 2)], [(1, 5, 6)]]


def test_a_refused_partition_is_split_in_halves_at_an_event() -> None:
    split = halves([_group(0, 1, 2, 3)])
    assert split is not None
    first, second = split
    assert [(g.expected, g.new, len(g.events)) for g in first + second] == [(0, 2, 2), (2, 4, 2)]


def test_a_poison_event_in_a_batch_of_one_halts_its_partition() -> None:
    halted: dict[tuple[str, int], Halt] = {}
    bisection = Bisection([_group(7)], halted)
    part = bisection.next()
    assert part is not None
    halt = bisection.refused(part, "the database refused it")
    assert halt == Halt("orders", 0, 7, "order-7", "the database refused it", "cmd")
    assert bisection.next() is None


def test_markers_before_a_refused_event_are_still_moved_past() -> None:
    halted: dict[tuple[str, int], Halt] = {}
    bisection = Bisection([_group(7, expected=5)], halted)
    part = bisection.next()
    assert part is not None
    halt = bisection.refused(part, "refused")
    assert halt is not None
    halted[(halt.projection, halt.partition)] = halt
    assert _tried(bisection) == [[(0, 5, 7)]]


def test_a_bare_checkpoint_move_refused_is_no_events_fault() -> None:
    assert not Bisection.blames_an_event([Group(ORDERS, 0, 5, 7)])
    assert Bisection.blames_an_event([_group(5)])


def test_after_a_fold_fails_the_events_before_it_are_tried_again_and_nothing_after() -> None:
    halted: dict[tuple[str, int], Halt] = {}
    group = _group(0, 1, 2, 3)
    bisection = Bisection([group], halted)
    part = bisection.next()
    assert part is not None
    halt = bisection.fold_failed(part, group.events[2], "ProjectionBug: no")
    assert (halt.offset, halt.reason) == (2, "ProjectionBug: no")
    halted[(halt.projection, halt.partition)] = halt
    assert _tried(bisection) == [[(0, 0, 2)]]
    assert [g.new for g in bisection.committed] == [2]


def test_halves_after_a_halt_are_dropped() -> None:
    halted: dict[tuple[str, int], Halt] = {}
    bisection = Bisection([_group(0, 1, 2, 3)], halted)
    part = bisection.next()
    assert part is not None
    assert bisection.refused(part, "refused") is None
    halted[("orders", 0)] = Halt("orders", 0, 1, None, "elsewhere")
    assert _tried(bisection) == []  # both halves end past the halt at 1


# -- partitions --------------------------------------------------------------------------------


def test_a_partition_seeks_to_the_lowest_checkpoint_not_halted() -> None:
    state = Partitions(positions={0: {"orders": 10, "order_history": 4}})
    assert state.reposition(0) == 4
    state.halt(Halt("order_history", 0, 4, None, "poison"), ["orders", "order_history"])
    assert state.reposition(0) == 10
    assert state.seeks[0] == 2


def test_a_partition_where_every_projection_halted_is_paused() -> None:
    state = Partitions(positions={0: {"orders": 10, "order_history": 4}})
    names = ["orders", "order_history"]
    assert not state.halt(Halt("orders", 0, 10, None, "poison"), names)
    assert state.halt(Halt("order_history", 0, 4, None, "poison"), names)
    assert state.reposition(0) is None


def test_a_revoked_partition_forgets_its_position_and_halts() -> None:
    state = Partitions(positions={0: {"orders": 1}, 1: {"orders": 2}}, unsought={0})
    state.halt(Halt("orders", 0, 1, None, "poison"), ["orders"])
    state.forget(0)
    assert state.positions == {1: {"orders": 2}}
    assert state.halted == {}
    assert state.unsought == set()


def test_seeking_again_retries_a_halt_and_remembers_the_stored_one() -> None:
    state = Partitions(positions={0: {"orders": 1}}, unsought={0})
    state.halt(Halt("orders", 0, 1, None, "poison"), ["orders"])
    state.sought({0: {"orders": 1}}, {("orders", 0): 1})
    assert state.halted == {}
    assert state.unsought == set()
    assert state.stored_halts == {("orders", 0): 1}


def test_unreadable_checkpoints_wait_for_a_retry() -> None:
    state = Partitions(positions={0: {"orders": 1}})
    state.unreadable([0])
    assert state.unsought == {0}
    assert 0 not in state.positions


def test_a_committed_group_moves_the_position_and_counts_its_events() -> None:
    state = Partitions(positions={0: {"orders": 0}})
    assert state.moved([_group(0, 1, 2)]) == 3
    assert state.positions[0]["orders"] == 3


def test_halts_a_failed_projection_made_are_undone_for_the_retry() -> None:
    state = Partitions(positions={0: {"orders": 0}, 1: {"order_history": 0}})
    before = dict(state.halted)
    state.halt(Halt("orders", 0, 3, None, "poison"), ["orders"])
    state.halt(Halt("order_history", 1, 3, None, "poison"), ["order_history"])
    assert state.undo_halts(before, failed={"orders"}) == [0]
    assert set(state.halted) == {("order_history", 1)}


def test_a_decode_halt_is_made_only_where_the_checkpoint_reached_it() -> None:
    state = Partitions(positions={0: {"orders": 5, "order_history": 3}})
    reached = Halt("orders", 0, 5, None, "undecodable")
    short = Halt("order_history", 0, 5, None, "undecodable")  # its transaction failed
    assert state.halts_to_make([reached, short]) == [reached]


def test_a_stored_halt_is_cleared_once_a_group_moves_past_it() -> None:
    state = Partitions(stored_halts={("orders", 0): 1})
    passed = state.passed_halts([_group(0), _group(1)])
    assert [g.new for g in passed] == [2]
    state.halts_cleared(passed)
    assert state.stored_halts == {}


def test_a_halt_an_operator_removed_is_lifted_and_a_new_one_stored() -> None:
    parked = Halt("orders", 0, 4, None, "poison")
    new = Halt("orders", 1, 9, None, "poison")
    state = Partitions(
        positions={0: {"orders": 4}, 1: {"orders": 9}},
        halted={("orders", 0): parked, ("orders", 1): new},
        stored_halts={("orders", 0): 4},
    )
    lift, store = state.halts_to_sync(stored={})
    assert (lift, store) == ([parked], [new])
    state.lifted(parked, checkpoint=5)
    state.halt_stored(new)
    assert state.positions[0]["orders"] == 5
    assert ("orders", 0) not in state.halted
    assert state.stored_halts == {("orders", 1): 9}


def test_checkpoints_move_past_markers_only_where_not_halted_and_behind() -> None:
    state = Partitions(positions={0: {"orders": 4, "order_history": 6}, 1: {"orders": 2}})
    state.halt(Halt("orders", 1, 2, None, "poison"), ["orders"])
    moves = state.marker_moves({0: 6, 1: 4}, [ORDERS, HISTORY])
    assert [(g.target.name, g.partition, g.expected, g.new) for g in moves] == [("orders", 0, 4, 6)]


def test_only_settled_partitions_are_looked_at_and_committed() -> None:
    state = Partitions(positions={0: {"orders": 4, "order_history": 2}, 1: {}}, unsought={2})
    assert state.settled([0, 1, 2, 3]) == [0, 1]
    assert state.committable([0, 1, 3]) == {0: 2}
