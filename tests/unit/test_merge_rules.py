"""Upsert rules are typed: each value column of a table says how a batch's value meets the
stored one, and a rule naming no value column is refused when the table is defined."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from projections.schema import (
    Merge,
    customer_summaries,
    daily_sales,
    is_append_only,
    merge_rule,
    merging,
    order_history,
    orders,
)


def test_a_column_without_a_rule_is_replaced_by_the_batchs_value() -> None:
    assert merge_rule(orders, "status") is Merge.REPLACE


def test_the_aggregates_add_their_deltas_and_keep_the_latest_time() -> None:
    assert merge_rule(customer_summaries, "order_count") is Merge.ADD
    assert merge_rule(customer_summaries, "lifetime_value") is Merge.ADD_PER_KEY
    assert merge_rule(customer_summaries, "updated_at") is Merge.MAX
    value_columns = [c.name for c in daily_sales.columns if not c.primary_key]
    assert {merge_rule(daily_sales, name) for name in value_columns} == {Merge.ADD}


def test_only_the_history_is_append_only() -> None:
    assert is_append_only(order_history)
    assert not is_append_only(orders)
    assert not is_append_only(customer_summaries)


def test_a_rule_for_a_column_the_table_lacks_is_refused_at_definition() -> None:
    table = sa.Table(
        "totals",
        sa.MetaData(),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("amount", sa.Integer),
    )
    with pytest.raises(ValueError, match="amout"):
        merging(table, amout=Merge.ADD)


def test_a_rule_for_a_key_column_is_refused_at_definition() -> None:
    table = sa.Table(
        "totals",
        sa.MetaData(),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("amount", sa.Integer),
    )
    with pytest.raises(ValueError, match="key"):
        merging(table, key=Merge.MAX)
