"""Least privilege in Postgres: who owns the read side, who writes it, who reads it.

Three group roles (NOLOGIN); an operator creates login users that are members of them
(docs/security.md):

* ``orders_migrator`` (``OWNER_ROLE``) owns every schema, table, view and function of the
  service. Migrations and operators' commands (``orders migrate``, ``orders projections
  rebuild``, which creates, fills and drops ``proj_<name>_v<N>`` schemas at run time) take this
  role (``SET ROLE``), so whatever they create has the same owner, and the grants below.
* ``orders_projector`` reads and writes the rows of the read models and of the bookkeeping
  (checkpoints, halts, parked events); it can neither create, alter, truncate nor drop.
* ``orders_api`` reads the views in ``public`` (the live versions), the checkpoints, halts,
  parked events and versions; it cannot reach the versions' schemas, nor write anything.

Tables a rebuild creates later get the projector's privileges from the owner's default
privileges; ``grant`` then puts every existing object back to exactly this layout, after
every migration.
"""

from __future__ import annotations

import asyncpg

from projections.schema import BOOKKEEPING, projection_versions
from service.infra.database import API_ROLE, OWNER_ROLE, PROJECTOR_ROLE

ROLES = (OWNER_ROLE, PROJECTOR_ROLE, API_ROLE)

# Where the service keeps its objects: public (views, bookkeeping, alembic's version table)
# and one schema per version of each projection.
_OURS = "(n.nspname = 'public' OR n.nspname LIKE 'proj\\_%')"


async def create_roles(connection: asyncpg.Connection) -> None:
    """Create the three roles if missing and set up this database for them, in the caller's
    transaction; running it again changes nothing. Needs a superuser (or a login with
    CREATEROLE that owns the database and is a member of the roles).

    Objects that exist already (a database migrated before the roles) are handed to the owner
    role, so the grants and default privileges apply to them too.
    """
    for role in ROLES:
        # A DO block: no CREATE ROLE IF NOT EXISTS, and two runs at once must both succeed.
        await connection.execute(
            f'DO $$ BEGIN CREATE ROLE "{role}" NOLOGIN; '
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
    if not await connection.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        # A login with CREATEROLE (a managed service's admin) must be a member of the owner role
        # to hand it objects and set its default privileges; a superuser is one already.
        await connection.execute(f'GRANT "{OWNER_ROLE}" TO CURRENT_USER')
    database = await connection.fetchval("SELECT quote_ident(current_database())")
    for statement in (
        # Nobody but the owner creates objects here (Postgres' default since 15).
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        f'GRANT CONNECT, CREATE, TEMPORARY ON DATABASE {database} TO "{OWNER_ROLE}"',
        f'GRANT CONNECT, TEMPORARY ON DATABASE {database} TO "{PROJECTOR_ROLE}"',
        f'GRANT CONNECT ON DATABASE {database} TO "{API_ROLE}"',
        f'GRANT USAGE, CREATE ON SCHEMA public TO "{OWNER_ROLE}"',
    ):
        await connection.execute(statement)
    await _hand_over(connection)
    for statement in (
        # What the owner creates later (a rebuild's schemas and tables, a migration's tables)
        # the projector may use and write; grant() narrows what lands in public.
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "{OWNER_ROLE}" '
        f'GRANT USAGE ON SCHEMAS TO "{PROJECTOR_ROLE}"',
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "{OWNER_ROLE}" '
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO "{PROJECTOR_ROLE}"',
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "{OWNER_ROLE}" IN SCHEMA public '
        f'GRANT SELECT ON TABLES TO "{API_ROLE}"',
    ):
        await connection.execute(statement)


async def _hand_over(connection: asyncpg.Connection) -> None:
    """Make the owner role own the service's schemas, relations and functions."""
    statements = await connection.fetch(
        "SELECT format('ALTER SCHEMA %I OWNER TO %I', n.nspname, $1::text) FROM pg_namespace n "
        f"WHERE n.nspname LIKE 'proj\\_%' AND pg_get_userbyid(n.nspowner) <> $1 "
        "UNION ALL "
        "SELECT format('ALTER %s %I.%I OWNER TO %I', CASE c.relkind WHEN 'v' THEN 'VIEW' "
        "  WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, "
        "  n.nspname, c.relname, $1::text) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE {_OURS} AND c.relkind IN ('r', 'p', 'v', 'm', 'S') "
        "AND pg_get_userbyid(c.relowner) <> $1 "
        # Not an extension's, nor a sequence that belongs to a column (it follows its table).
        "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass "
        "  AND d.objid = c.oid AND d.deptype IN ('e', 'a', 'i')) "
        "UNION ALL "
        "SELECT format('ALTER ROUTINE %s OWNER TO %I', p.oid::regprocedure, $1::text) "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        f"WHERE {_OURS} AND pg_get_userbyid(p.proowner) <> $1 "
        "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass "
        "  AND d.objid = p.oid AND d.deptype = 'e')",
        OWNER_ROLE,
    )
    for (statement,) in statements:
        await connection.execute(statement)


async def roles_in_use(connection: asyncpg.Connection) -> bool:
    """Whether this session acts as the owner role (``create_roles`` ran on this database and
    the login took the role): then ``grant`` applies."""
    return bool(await connection.fetchval("SELECT current_user = $1", OWNER_ROLE))


async def grant(connection: asyncpg.Connection) -> None:
    """Give each role exactly its privileges on every object that exists now, in the caller's
    transaction (as the owner role). Run after every migration: a migration that re-creates a
    view or adds a table leaves its grants as they should be."""
    bookkeeping = ", ".join(
        f'public."{table.name}"' for table in BOOKKEEPING if table is not projection_versions
    )
    statements = [
        f'GRANT USAGE ON SCHEMA public TO "{PROJECTOR_ROLE}", "{API_ROLE}"',
        # The API reads public (the views on the live versions, the bookkeeping), nothing else.
        f'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "{API_ROLE}"',
        f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{API_ROLE}"',
        # The projector writes the bookkeeping, and the read models in their own schemas.
        f'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "{PROJECTOR_ROLE}"',
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON {bookkeeping} TO "{PROJECTOR_ROLE}"',
        # Its batches lock their version's registry row (FOR SHARE), and a row lock needs
        # UPDATE on one column: the one that says nothing about which version is live.
        f'GRANT SELECT, UPDATE (switched_at) ON public."{projection_versions.name}" '
        f'TO "{PROJECTOR_ROLE}"',
    ]
    schemas = await connection.fetch(
        "SELECT quote_ident(nspname) FROM pg_namespace WHERE nspname LIKE 'proj\\_%'"
    )
    for (schema,) in schemas:
        statements += [
            f'REVOKE ALL ON SCHEMA {schema} FROM "{API_ROLE}"',
            f'REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM "{API_ROLE}"',
            f'GRANT USAGE ON SCHEMA {schema} TO "{PROJECTOR_ROLE}"',
            f'REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM "{PROJECTOR_ROLE}"',
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} "
            f'TO "{PROJECTOR_ROLE}"',
        ]
    for statement in statements:
        await connection.execute(statement)
