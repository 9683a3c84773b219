"""How ``orders projections status`` counts projector consumers from Kafka's group descriptions."""

from __future__ import annotations

from projections.status import members_per_projection

PREFIX = "orders-projection."
ONE_MEMBER = [("member-1", "client", "/127.0.0.1", b"", b"")]


def test_members_are_summed_per_projection_over_the_groups_that_apply_it() -> None:
    described = [
        (0, f"{PREFIX}customer_summary+orders", "Stable", "consumer", "range", ONE_MEMBER * 2),
        (0, f"{PREFIX}orders", "Stable", "consumer", "range", ONE_MEMBER),
        (0, f"{PREFIX}daily_sales", "Empty", "consumer", "", []),
    ]
    assert members_per_projection(PREFIX, described) == {
        "customer_summary": 2,
        "orders": 3,
        "daily_sales": 0,  # a group whose projector stopped: no one consumes
    }


def test_a_group_that_could_not_be_described_makes_its_projections_unknown() -> None:
    coordinator_loading = 14  # COORDINATOR_LOAD_IN_PROGRESS
    described = [
        (coordinator_loading, f"{PREFIX}orders+order_history", "", "", "", []),
        (0, f"{PREFIX}orders", "Stable", "consumer", "range", ONE_MEMBER),
        (0, f"{PREFIX}daily_sales", "Stable", "consumer", "range", ONE_MEMBER),
    ]
    # Unknown, not 0: a projection is never reported "stopped" on a failed description.
    assert members_per_projection(PREFIX, described) == {
        "orders": None,
        "order_history": None,
        "daily_sales": 1,
    }
