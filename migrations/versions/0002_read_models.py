"""Read models: orders, order history, customer summaries, daily sales.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


# Adds two {currency: amount} maps key by key; used to merge lifetime values (see schema.py).
_JSONB_ADD = """
CREATE FUNCTION jsonb_add_per_key(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT COALESCE(jsonb_object_agg(key, total), '{}'::jsonb)
  FROM (SELECT key, SUM(value::bigint) AS total
        FROM (SELECT * FROM jsonb_each_text(a) UNION ALL SELECT * FROM jsonb_each_text(b)) AS e
        GROUP BY key) AS sums
$$
"""


def upgrade() -> None:
    op.execute(_JSONB_ADD)
    op.create_table(
        "orders",
        sa.Column("order_id", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("total", sa.BigInteger, nullable=False),
        sa.Column("item_count", sa.Integer, nullable=False),
        sa.Column("items", JSONB, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("paid_amount", sa.BigInteger, nullable=False),
        sa.Column("refunded_amount", sa.BigInteger, nullable=False),
        sa.Column("payment_reference", sa.Text),
        sa.Column("carrier", sa.Text),
        sa.Column("tracking_number", sa.Text),
        sa.Column("cancel_reason", sa.Text),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("placed_at", _TS),
        sa.Column("paid_at", _TS),
        sa.Column("shipped_at", _TS),
        sa.Column("delivered_at", _TS),
        sa.Column("cancelled_at", _TS),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_index(
        "ix_orders_customer_created", "orders", ["customer_id", "created_at", "order_id"]
    )
    op.create_index("ix_orders_status_created", "orders", ["status", "created_at", "order_id"])
    op.create_index("ix_orders_created", "orders", ["created_at", "order_id"])
    op.create_table(
        "order_history",
        sa.Column("order_id", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("occurred_at", _TS, nullable=False),
        sa.Column("command_id", sa.Text, nullable=False),
        sa.Column("correlation_id", sa.Text, nullable=False),
        sa.Column("data", JSONB, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "customer_summaries",
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("order_count", sa.Integer, nullable=False),
        sa.Column("open_orders", sa.Integer, nullable=False),
        sa.Column("lifetime_value", JSONB, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_table(
        "customer_summary_orders",
        sa.Column("order_id", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("open", sa.Boolean, nullable=False),
    )
    op.create_table(
        "daily_sales",
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("currency", sa.Text, primary_key=True),
        sa.Column("orders_placed", sa.Integer, nullable=False),
        sa.Column("orders_paid", sa.Integer, nullable=False),
        sa.Column("orders_cancelled", sa.Integer, nullable=False),
        sa.Column("revenue", sa.BigInteger, nullable=False),
        sa.Column("refunded", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "daily_sales_orders",
        sa.Column("order_id", sa.Text, primary_key=True),
        sa.Column("currency", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "daily_sales_orders",
        "daily_sales",
        "customer_summary_orders",
        "customer_summaries",
        "order_history",
        "orders",
    ):
        op.drop_table(table)
    op.execute("DROP FUNCTION jsonb_add_per_key(jsonb, jsonb)")
