"""Order history records who did what: each event's actor (token subject and OAuth client).

Two nullable columns on the ``order_history`` table of every version of the projection that
still has its tables (the live one, and a building or retired one a rebuild left), so a rebuild
resumed after the upgrade writes the same columns as a new one (which copies the live table).
The view in ``public`` is made again: ``SELECT *`` was expanded when it was created.
Rows already stored keep NULL: their events were written before callers were recorded.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen names (never import code here).
_PROJECTION = "order_history"
_TABLE = "order_history"
_COLUMNS = ("actor_sub", "actor_client_id")


def _versions() -> tuple[list[str], str]:
    """The schemas of the projection's versions that have tables, and the live one's."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT version, state FROM projection_versions "
            "WHERE projection = :projection AND state <> 'dropped' ORDER BY version"
        ),
        {"projection": _PROJECTION},
    )
    schemas, live = [], f"proj_{_PROJECTION}_v1"
    for version, state in rows:
        schema = f"proj_{_PROJECTION}_v{version}"
        exists = op.get_bind().scalar(
            sa.text("SELECT to_regclass(:name) IS NOT NULL"), {"name": f'"{schema}"."{_TABLE}"'}
        )
        if exists:
            schemas.append(schema)
        if state == "live":
            live = schema
    return schemas, live


def upgrade() -> None:
    schemas, live = _versions()
    for schema in schemas:
        for column in _COLUMNS:
            op.execute(
                f'ALTER TABLE "{schema}"."{_TABLE}" ADD COLUMN IF NOT EXISTS "{column}" text'
            )
    # The new columns come last, so the view may be replaced in place (readers keep working).
    op.execute(f'CREATE OR REPLACE VIEW public."{_TABLE}" AS SELECT * FROM "{live}"."{_TABLE}"')


def downgrade() -> None:
    schemas, live = _versions()
    op.execute(f'DROP VIEW public."{_TABLE}"')  # it depends on the columns
    for schema in schemas:
        for column in _COLUMNS:
            op.execute(f'ALTER TABLE "{schema}"."{_TABLE}" DROP COLUMN IF EXISTS "{column}"')
    op.execute(f'CREATE VIEW public."{_TABLE}" AS SELECT * FROM "{live}"."{_TABLE}"')
