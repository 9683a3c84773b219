"""How the writers' group shares partitions (service.write.ownership.assign_partitions)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.write.ownership import assign_partitions, group_for, transactional_id_for


def _check_shares(partitions: int, shares: dict[str, list[int]]) -> None:
    assigned = [p for share in shares.values() for p in share]
    assert sorted(assigned) == list(range(partitions)), "each partition exactly once"
    sizes = [len(share) for share in shares.values()]
    assert max(sizes) - min(sizes) <= 1, f"uneven shares: {shares}"


def test_new_members_get_even_shares() -> None:
    shares = assign_partitions(12, {"a": [], "b": [], "c": []})
    _check_shares(12, shares)
    assert {len(share) for share in shares.values()} == {4}


def test_a_joining_member_moves_only_its_share() -> None:
    before = {"a": list(range(6)), "b": list(range(6, 12))}
    shares = assign_partitions(12, {**before, "c": []})
    _check_shares(12, shares)
    assert set(shares["a"]) <= set(before["a"])
    assert set(shares["b"]) <= set(before["b"])
    moved = sum(1 for m in ("a", "b") for p in before[m] if p not in shares[m])
    assert moved == len(shares["c"]) == 4


def test_a_leaving_members_partitions_go_to_the_others_and_nothing_else_moves() -> None:
    shares = assign_partitions(12, {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]})
    _check_shares(12, shares)
    assert set(shares["a"]) >= {0, 1, 2, 3}
    assert set(shares["b"]) >= {4, 5, 6, 7}


def test_a_partition_claimed_twice_goes_to_one_member() -> None:
    # Possible for a moment after a member lost the group and kept its writers.
    shares = assign_partitions(4, {"a": [0, 1], "b": [1, 2]})
    _check_shares(4, shares)


def test_more_members_than_partitions_leaves_some_without_any() -> None:
    shares = assign_partitions(2, {"a": [], "b": [], "c": []})
    assert sorted(p for share in shares.values() for p in share) == [0, 1]
    assert sorted(len(share) for share in shares.values()) == [0, 1, 1]


@given(
    st.integers(1, 24),
    st.dictionaries(
        st.text("abcdef", min_size=1, max_size=3), st.lists(st.integers(0, 30)), min_size=1
    ),
)
def test_any_claims_give_each_partition_once_in_even_shares_keeping_what_they_can(
    partitions: int, claims: dict[str, list[int]]
) -> None:
    shares = assign_partitions(partitions, claims)
    assert shares == assign_partitions(partitions, claims), "deterministic"
    _check_shares(partitions, shares)
    # A partition moves away from a member that owns it only to another that owns it too, or
    # when the member's share is already full (at least the smaller even share).
    smaller_share = partitions // len(claims)
    for member, owned in claims.items():
        for partition in set(owned) & set(range(partitions)):
            holder = next(m for m, share in shares.items() if partition in share)
            if holder != member and partition not in claims[holder]:
                assert len(shares[member]) >= smaller_share, (partition, member, shares)


def test_each_partition_has_its_own_transactional_id_and_the_group_is_the_topics() -> None:
    assert transactional_id_for("orders-writer", "orders.events", 3) == (
        "orders-writer-orders.events-3"
    )
    assert group_for("orders-writers", "orders.events") == "orders-writers.orders.events"
