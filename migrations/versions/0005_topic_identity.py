"""Which topic each projection version was built from: the topic's id, as Kafka gives it.

A topic deleted and created again under the same name has a new id. Checkpoints stored for the
old one must not count for the new one: the projector refuses to go on from them, and queries
do not take them as proof that an event of the new topic was applied.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "projection_topics",
        sa.Column("projection", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("topic_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column(
            "recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint(
            "projection", "version", "topic", name=op.f("pk_projection_topics")
        ),
    )


def downgrade() -> None:
    op.drop_table("projection_topics")
