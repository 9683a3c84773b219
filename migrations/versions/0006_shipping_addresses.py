"""Orders have a shipping address: one nullable ``shipping_address`` (jsonb) column on the
``orders`` table of every version of the projection that still has its tables (the live one,
and a building or retired one a rebuild left), so a rebuild resumed after the upgrade writes the
same columns as a new one (which copies the live table). The view in ``public`` is made again:
``SELECT *`` was expanded when it was created.

Rows already stored keep NULL, which is right for every order whose events were all written
before addresses existed (OrderCreated v1 is upcast to v2 without one). The documented path
(docs/events.md) is to migrate, then ``orders projections rebuild orders``: queries stay on the
live version while the new one is built from the whole log.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen names (never import code here; the same walk as 0004's, kept as it was then).
_PROJECTION = "orders"
_TABLE = "orders"
_COLUMN = "shipping_address"


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
        op.execute(f'ALTER TABLE "{schema}"."{_TABLE}" ADD COLUMN IF NOT EXISTS "{_COLUMN}" jsonb')
    # The new column comes last, so the view may be replaced in place (readers keep working).
    op.execute(f'CREATE OR REPLACE VIEW public."{_TABLE}" AS SELECT * FROM "{live}"."{_TABLE}"')


def downgrade() -> None:
    schemas, live = _versions()
    op.execute(f'DROP VIEW public."{_TABLE}"')  # it depends on the column
    for schema in schemas:
        op.execute(f'ALTER TABLE "{schema}"."{_TABLE}" DROP COLUMN IF EXISTS "{_COLUMN}"')
    op.execute(f'CREATE VIEW public."{_TABLE}" AS SELECT * FROM "{live}"."{_TABLE}"')
