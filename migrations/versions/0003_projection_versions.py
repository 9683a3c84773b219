"""Versioned projections (tables per version, views for readers); stored halts; parking.

The read-model tables move into ``proj_<projection>_v1``; the names queries use become views
on the live version's tables, so a rebuild can fill a new version next to it and switch the
views over in one transaction. Checkpoints gain the version and the time of the last applied
event. Halts and parked events are stored, so an operator sees and handles them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)

# The projections and their tables as they stood at 0002 (frozen: never import code here).
_PROJECTIONS = {
    "orders": ("orders",),
    "order_history": ("order_history",),
    "customer_summary": ("customer_summaries", "customer_summary_orders"),
    "daily_sales": ("daily_sales", "daily_sales_orders"),
}


def _timestamp(name: str) -> sa.Column[object]:
    return sa.Column(name, _TS, nullable=False, server_default=sa.func.now())


def upgrade() -> None:
    op.create_table(
        "projection_versions",
        sa.Column("projection", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        _timestamp("created_at"),
        sa.Column("switched_at", _TS),
        sa.PrimaryKeyConstraint("projection", "version", name=op.f("pk_projection_versions")),
        sa.CheckConstraint(
            "state IN ('building', 'live', 'retired', 'dropped')",
            name=op.f("ck_projection_versions_state"),
        ),
    )
    # At most one live and one building version per projection.
    op.create_index(
        "uq_projection_versions_live",
        "projection_versions",
        ["projection"],
        unique=True,
        postgresql_where=sa.text("state = 'live'"),
    )
    op.create_index(
        "uq_projection_versions_building",
        "projection_versions",
        ["projection"],
        unique=True,
        postgresql_where=sa.text("state = 'building'"),
    )
    for projection, tables in _PROJECTIONS.items():
        schema = f"proj_{projection}_v1"
        op.execute(f'CREATE SCHEMA "{schema}"')
        for table in tables:
            op.execute(f'ALTER TABLE public."{table}" SET SCHEMA "{schema}"')
            op.execute(f'CREATE VIEW public."{table}" AS SELECT * FROM "{schema}"."{table}"')
        op.execute(
            "INSERT INTO projection_versions (projection, version, state, switched_at) "
            f"VALUES ('{projection}', 1, 'live', now())"
        )

    op.add_column(
        "projection_checkpoints",
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    )
    op.alter_column("projection_checkpoints", "version", server_default=None)
    op.add_column("projection_checkpoints", sa.Column("last_event_at", _TS))
    op.drop_constraint("pk_projection_checkpoints", "projection_checkpoints", type_="primary")
    op.create_primary_key(
        "pk_projection_checkpoints",
        "projection_checkpoints",
        ["projection", "version", "topic", "partition"],
    )

    op.create_table(
        "projection_halts",
        sa.Column("projection", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("order_id", sa.Text),
        sa.Column("reason", sa.Text, nullable=False),
        _timestamp("halted_at"),
        sa.PrimaryKeyConstraint(
            "projection", "version", "topic", "partition", name=op.f("pk_projection_halts")
        ),
    )
    op.create_table(
        "parked_orders",
        sa.Column("projection", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("order_id", sa.Text, nullable=False),
        _timestamp("parked_at"),
        sa.PrimaryKeyConstraint("projection", "version", "order_id", name=op.f("pk_parked_orders")),
    )
    op.create_table(
        "parked_events",
        sa.Column("projection", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("order_id", sa.Text, nullable=False),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        _timestamp("parked_at"),
        sa.PrimaryKeyConstraint(
            "projection", "version", "topic", "partition", "offset", name=op.f("pk_parked_events")
        ),
    )


def downgrade() -> None:
    op.drop_table("parked_events")
    op.drop_table("parked_orders")
    op.drop_table("projection_halts")
    # Only the live versions survive a downgrade: their tables move back to public.
    rows = op.get_bind().execute(
        sa.text("SELECT projection, version FROM projection_versions WHERE state = 'live'")
    )
    live = {row.projection: row.version for row in rows}
    op.execute(
        "DELETE FROM projection_checkpoints WHERE (projection, version) NOT IN "
        "(SELECT projection, version FROM projection_versions WHERE state = 'live')"
    )
    op.drop_constraint("pk_projection_checkpoints", "projection_checkpoints", type_="primary")
    op.create_primary_key(
        "pk_projection_checkpoints", "projection_checkpoints", ["projection", "topic", "partition"]
    )
    op.drop_column("projection_checkpoints", "last_event_at")
    op.drop_column("projection_checkpoints", "version")
    schemas = op.get_bind().execute(
        sa.text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'proj\\_%'")
    )
    for (schema,) in list(schemas):
        for projection, tables in _PROJECTIONS.items():
            if schema != f"proj_{projection}_v{live.get(projection, 1)}":
                continue
            for table in tables:
                op.execute(f'DROP VIEW public."{table}"')
                op.execute(f'ALTER TABLE "{schema}"."{table}" SET SCHEMA public')
        op.execute(f'DROP SCHEMA "{schema}" CASCADE')
    op.drop_table("projection_versions")
