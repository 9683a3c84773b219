"""Postgres tables of the read side (SQLAlchemy Core). Migrations in ``migrations/`` create them."""

from __future__ import annotations

import enum

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

# Stable constraint names, so migrations can refer to them.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Every version of every projection. A version's tables live in their own Postgres schema
# (``schema_for``); the views in ``public`` that queries read point at the LIVE version's
# tables. A rebuild fills a BUILDING version while the live one keeps serving, then one
# transaction makes it live and repoints the views (projections/versions.py).
projection_versions = sa.Table(
    "projection_versions",
    metadata,
    sa.Column("projection", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),  # building | live | retired | dropped
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("switched_at", sa.DateTime(timezone=True)),
)

# Where each projection version stands in each partition: the offset of the next event to
# apply, and the time of the last applied event (for lag in seconds). Written in the same
# transaction as the version's rows, with a compare-and-set on next_offset, so a batch takes
# effect exactly once.
projection_checkpoints = sa.Table(
    "projection_checkpoints",
    metadata,
    sa.Column("projection", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("topic", sa.Text, primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
    sa.Column("last_event_at", sa.DateTime(timezone=True)),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

# A partition a projection version stopped at, because the event there cannot be applied.
# Deleting the row (``orders projections park``, or a restart) lets the runner try again.
projection_halts = sa.Table(
    "projection_halts",
    metadata,
    sa.Column("projection", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("topic", sa.Text, primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("offset", sa.BigInteger, nullable=False),
    sa.Column("order_id", sa.Text),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column(
        "halted_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

# Events an operator set aside (invariant 7): the poison event and every later event of the
# same order, so that order's read model never shows a state that skipped an event.
parked_orders = sa.Table(
    "parked_orders",
    metadata,
    sa.Column("projection", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("order_id", sa.Text, primary_key=True),
    sa.Column(
        "parked_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)
parked_events = sa.Table(
    "parked_events",
    metadata,
    sa.Column("projection", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("topic", sa.Text, primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("offset", sa.BigInteger, primary_key=True),
    sa.Column("order_id", sa.Text, nullable=False),
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column(
        "parked_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

# The topic each version was built from, by the id Kafka gave it: one deleted and created again
# under the same name is another topic, and checkpoints of the old one mean nothing there.
projection_topics = sa.Table(
    "projection_topics",
    metadata,
    sa.Column("projection", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("topic", sa.Text, primary_key=True),
    sa.Column("topic_id", sa.Uuid, nullable=False),
    sa.Column(
        "recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

BOOKKEEPING = (
    projection_versions,
    projection_topics,
    projection_checkpoints,
    projection_halts,
    parked_orders,
    parked_events,
)


class Merge(enum.Enum):
    """How an upsert combines a row's stored value with the value a batch wrote."""

    REPLACE = "replace"  # the batch's value (every column without a rule)
    ADD = "add"  # stored + batch: the batch folded a delta from zero
    MAX = "max"  # the greater of the two
    ADD_PER_KEY = "add_per_key"  # jsonb objects of numbers: stored + batch, key by key


_MERGE = "merge"
_APPEND_ONLY = "append_only"


def merging(table: sa.Table, **rules: Merge) -> sa.Table:
    """``table``, whose upserts combine the named columns by ``rules`` (the others: REPLACE).

    A name that is not one of the table's non-key columns is refused here, at import."""
    columns = {str(column.name) for column in table.columns if not column.primary_key}
    unknown = sorted(set(rules) - columns)
    if unknown:
        raise ValueError(f"merge rules for {table.name} name no value column: {unknown}")
    table.info[_MERGE] = dict(rules)
    return table


def append_only(table: sa.Table) -> sa.Table:
    """``table``, whose rows are only ever added: no upsert, and a second copy is refused."""
    table.info[_APPEND_ONLY] = True
    return table


def merge_rule(table: sa.Table, column: str) -> Merge:
    """How an upsert of ``table`` combines the stored and the new value of ``column``."""
    rules: dict[str, Merge] = table.info.get(_MERGE, {})
    return rules.get(column, Merge.REPLACE)


def is_append_only(table: sa.Table) -> bool:
    """Whether ``table`` is only ever appended to (see ``append_only``)."""
    return bool(table.info.get(_APPEND_ONLY, False))


def schema_for(projection: str, version: int) -> str:
    """The Postgres schema holding the tables of one version of a projection."""
    return f"proj_{projection}_v{version}"


# -- the "orders" projection: one row per order, its line items as a JSON array -----------------
orders = sa.Table(
    "orders",
    metadata,
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
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("placed_at", sa.DateTime(timezone=True)),
    sa.Column("paid_at", sa.DateTime(timezone=True)),
    sa.Column("shipped_at", sa.DateTime(timezone=True)),
    sa.Column("delivered_at", sa.DateTime(timezone=True)),
    sa.Column("cancelled_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # {"name", "lines", "city", "postal_code", "region"?, "country"}; NULL: none set (migration
    # 0006: last, so that the view in ``public`` could be replaced in place).
    sa.Column("shipping_address", JSONB),
    sa.Index("ix_orders_customer_created", "customer_id", "created_at", "order_id"),
    sa.Index("ix_orders_status_created", "status", "created_at", "order_id"),
    sa.Index("ix_orders_created", "created_at", "order_id"),
)

# -- the "order_history" projection: every event of an order, in order -------------------------
# Rows are only ever added (COPY): a second copy of an event is refused by the key.
order_history = append_only(
    sa.Table(
        "order_history",
        metadata,
        sa.Column("order_id", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("command_id", sa.Text, nullable=False),
        sa.Column("correlation_id", sa.Text, nullable=False),
        sa.Column("data", JSONB, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        # Who sent the command (the envelope's actor): NULL when the event names nobody
        # (authentication off, or written before callers were recorded). Last, as migration
        # 0004 added them to the tables of every version.
        sa.Column("actor_sub", sa.Text),
        sa.Column("actor_client_id", sa.Text),
    )
)

# -- the "customer_summary" projection ---------------------------------------------------------
# Aggregate rows (a customer's orders, a day's sales) are fed by events of MANY partitions, which
# different projector instances may apply at the same time. Their batches therefore never read
# and overwrite such rows: a batch folds its events into deltas from zero, and the upsert adds
# the deltas to the stored row (``merging``), under the row lock, in key order.
customer_summaries = merging(
    sa.Table(
        "customer_summaries",
        metadata,
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("order_count", sa.Integer, nullable=False),
        sa.Column("open_orders", sa.Integer, nullable=False),
        # currency -> net amount paid (payments minus refunds), in minor units
        sa.Column("lifetime_value", JSONB, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ),
    order_count=Merge.ADD,
    open_orders=Merge.ADD,
    lifetime_value=Merge.ADD_PER_KEY,
    updated_at=Merge.MAX,
)
# Which customer (and currency) each order belongs to, and whether it is still open: later
# events of an order do not repeat the customer.
customer_summary_orders = sa.Table(
    "customer_summary_orders",
    metadata,
    sa.Column("order_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("open", sa.Boolean, nullable=False),
)

# -- the "daily_sales" projection: per UTC day and currency -------------------------------------
daily_sales = merging(
    sa.Table(
        "daily_sales",
        metadata,
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("currency", sa.Text, primary_key=True),
        sa.Column("orders_placed", sa.Integer, nullable=False),
        sa.Column("orders_paid", sa.Integer, nullable=False),
        sa.Column("orders_cancelled", sa.Integer, nullable=False),
        sa.Column("revenue", sa.BigInteger, nullable=False),
        sa.Column("refunded", sa.BigInteger, nullable=False),
    ),
    orders_placed=Merge.ADD,
    orders_paid=Merge.ADD,
    orders_cancelled=Merge.ADD,
    revenue=Merge.ADD,
    refunded=Merge.ADD,
)
daily_sales_orders = sa.Table(
    "daily_sales_orders",
    metadata,
    sa.Column("order_id", sa.Text, primary_key=True),
    sa.Column("currency", sa.Text, nullable=False),
)
