"""Least privilege in Postgres (docs/security.md): ``orders migrate --create-roles`` makes an
owner, a projector and an API role; login users that are members of them can do their jobs and
nothing more; a projector the database refuses (a privilege missing, a read-only database)
retries and says so, never halts or parks, and applies the events once the database lets it.

Against the real Postgres and broker; waiting is polling with a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.models import catalog
from projections.projection import Target, begin
from projections.roles import ROLES
from projections.versions import create_building, drop, live_targets, switch
from service.edge.bootstrap import DatabaseUse, database, migrate_database
from service.edge.http.app import Resources, create_app
from service.infra.database import (
    API_ROLE,
    OWNER_ROLE,
    PROJECTOR_ROLE,
    create_engine,
    driver_dsn,
)
from service.infra.embedded.kafka import run_coroutine
from service.infra.embedded.postgres import LocalPostgres, postgres_bin_dir
from service.write.writer import Writer
from tests.support.database import admin
from tests.support.http import serve
from tests.support.identity import BACK_OFFICE, access, bearer
from tests.support.processes import ApiProcess, projector_process, service_env
from tests.support.projection_harness import Api, eventually, running

DENIED = asyncpg.InsufficientPrivilegeError  # SQLSTATE 42501
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def logins(database_url: str) -> Iterator[dict[str, str]]:
    """A login user in each role (trust authentication: no passwords), by role; the database
    migrated with ``--create-roles``, twice (the second run must change nothing)."""
    run_coroutine(migrate_database(database_url, create_roles=True))
    run_coroutine(migrate_database(database_url, create_roles=True))
    database = make_url(database_url).database
    urls = {}
    for role in ROLES:
        login = f"t_{role}"
        run_coroutine(
            admin(
                database_url,
                f'DO $$ BEGIN CREATE ROLE "{login}" LOGIN IN ROLE "{role}"; '
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$",
            )
        )
        urls[role] = make_url(database_url).set(username=login).render_as_string(False)
    yield urls
    for role in ROLES:  # settings a test left behind on a login
        run_coroutine(
            admin(database_url, f'ALTER ROLE "t_{role}" IN DATABASE "{database}" RESET ALL')
        )


def test_creating_roles_without_the_privilege_to_ends_with_one_line(
    logins: dict[str, str],
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.edge.cli.main", "migrate", "--create-roles"],
        cwd=PROJECT,
        env={**os.environ, "DATABASE_URL": logins[API_ROLE]},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )

    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "permission denied" in line
    assert "needs a superuser" in line


async def _connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(driver_dsn(url))


async def _refused(connection: asyncpg.Connection, statement: str) -> bool:
    """Whether ``statement`` is refused for a missing privilege (rolled back either way)."""
    transaction = connection.transaction()
    await transaction.start()
    try:
        await connection.execute(statement)
    except DENIED:
        return True
    finally:
        await transaction.rollback()
    return False


async def _live_schema(engine: AsyncEngine, name: str) -> str:
    async with begin(engine) as connection:
        (live,) = await live_targets(connection, [catalog.PROJECTIONS[name]])
    return live.schema


async def test_the_api_role_reads_views_checkpoints_and_parking_but_changes_nothing(
    logins: dict[str, str], db: AsyncEngine
) -> None:
    schema = await _live_schema(db, "orders")
    connection = await _connect(logins[API_ROLE])
    try:
        for table in (
            "orders",
            "order_history",
            "projection_checkpoints",
            "projection_versions",
            "projection_halts",
            "parked_events",
            "parked_orders",
        ):
            assert await connection.fetchval(f"SELECT count(*) FROM {table}") is not None
        refused = {
            statement: await _refused(connection, statement)
            for statement in (
                "INSERT INTO projection_checkpoints (projection, version, topic, partition, "
                "next_offset) VALUES ('orders', 1, 't', 0, 0)",
                "UPDATE orders SET status = 'paid'",
                "DELETE FROM parked_events",
                "UPDATE projection_versions SET state = 'retired'",
                "TRUNCATE projection_checkpoints",
                "DROP VIEW orders",
                "CREATE TABLE public.intruder (a int)",
                f"SELECT * FROM {schema}.orders",  # only through the views
            )
        }
    finally:
        await connection.close()
    assert all(refused.values()), [s for s, was in refused.items() if not was]


async def test_the_projector_role_writes_rows_and_checkpoints_but_cannot_alter_or_drop(
    logins: dict[str, str], db: AsyncEngine
) -> None:
    schema = await _live_schema(db, "daily_sales")
    connection = await _connect(logins[PROJECTOR_ROLE])
    try:
        allowed = {
            statement: not await _refused(connection, statement)
            for statement in (
                f"INSERT INTO {schema}.daily_sales_orders (order_id, currency) VALUES ('o', 'EUR')",
                f"DELETE FROM {schema}.daily_sales_orders",
                "INSERT INTO projection_checkpoints (projection, version, topic, partition, "
                "next_offset) VALUES ('daily_sales', 1, 't', 0, 0)",
                "SELECT * FROM projection_versions FOR SHARE",
            )
        }
        refused = {
            statement: await _refused(connection, statement)
            for statement in (
                f"DROP TABLE {schema}.daily_sales",
                f"ALTER TABLE {schema}.daily_sales ADD COLUMN intruder int",
                f"TRUNCATE {schema}.daily_sales",
                f"CREATE TABLE {schema}.intruder (a int)",
                "CREATE SCHEMA intruder",
                "UPDATE projection_versions SET state = 'retired'",
                "DROP VIEW daily_sales",
            )
        }
    finally:
        await connection.close()
    assert all(allowed.values()), [s for s, was in allowed.items() if not was]
    assert all(refused.values()), [s for s, was in refused.items() if not was]


async def test_a_rebuild_creates_versions_the_owner_owns_the_projector_writes_and_the_api_reads(
    logins: dict[str, str], db: AsyncEngine
) -> None:
    """A blue/green rebuild runs as an operator (DATABASE_URL: a member of the owner role): its
    new schema and tables are the owner's, and its default privileges give them to the
    projector; the API reads the new version through the views only."""
    projection = catalog.PROJECTIONS["daily_sales"]
    async with database(logins[OWNER_ROLE], DatabaseUse.OPERATOR) as operator:
        async with begin(operator) as connection:
            (live,) = await live_targets(connection, [projection])
            new = await create_building(connection, live)
        async with begin(operator) as connection:
            await switch(connection, live, new, f"t-{uuid.uuid4().hex[:6]}")
            await drop(connection, live)
    checks = await admin(
        logins[OWNER_ROLE],
        "SELECT array[pg_get_userbyid(n.nspowner)::text, pg_get_userbyid(c.relowner)::text, "
        "has_schema_privilege($2, n.oid, 'USAGE')::text, "
        "has_table_privilege($2, c.oid, 'INSERT,UPDATE,DELETE')::text, "
        "has_table_privilege($2, c.oid, 'TRUNCATE')::text, "
        "has_schema_privilege($3, n.oid, 'USAGE')::text] "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = 'daily_sales'",
        new.schema,
        f"t_{PROJECTOR_ROLE}",
        f"t_{API_ROLE}",
    )
    assert checks == [OWNER_ROLE, OWNER_ROLE, "true", "true", "false", "false"]
    api = await _connect(logins[API_ROLE])
    try:
        assert await api.fetchval("SELECT count(*) FROM daily_sales") == 0
    finally:
        await api.close()
    assert await _live_schema(db, "daily_sales") == Target(projection, new.version).schema


async def test_an_operators_write_through_the_api_on_its_read_only_login_is_a_clear_503(
    logins: dict[str, str], writer: Writer, bootstrap: str, topic: str
) -> None:
    engine = create_engine(logins[API_ROLE], pool_size=2, autocommit=True)
    resources = Resources(writer=writer, engine=engine, topic=topic, kafka_bootstrap=bootstrap)
    app = create_app(resources, access=access())
    try:
        async with serve(app) as client:
            listed = await client.get("/ops/projections/parked")
            refused = await client.post("/ops/projections/orders/retry", json={})
    finally:
        await engine.dispose()

    assert listed.status_code == 200, listed.text  # reading is its job
    assert refused.status_code == 503, refused.text
    problem = refused.json()
    assert problem["type"].endswith("/database-refused")
    assert "SQLSTATE 42501" in problem["detail"]
    assert "orders projections" in problem["detail"]
    assert "retry-after" not in refused.headers


def _refusals(state: str) -> float:
    found = REGISTRY.get_sample_value(
        "orders_projection_database_refusals_total", {"sqlstate": state}
    )
    return found or 0.0


@pytest.mark.parametrize("refusal", ["privilege", "read-only"])
async def test_a_refused_projector_retries_and_reports_and_applies_once_allowed(
    refusal: str,
    logins: dict[str, str],
    database_url: str,
    db: AsyncEngine,
    api: Api,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    schema = await _live_schema(db, "orders")
    login = f"t_{PROJECTOR_ROLE}"
    database = make_url(database_url).database
    state, refuse, allow = {
        "privilege": (
            "42501",
            f'REVOKE INSERT ON {schema}.orders FROM "{PROJECTOR_ROLE}"',
            f'GRANT INSERT ON {schema}.orders TO "{PROJECTOR_ROLE}"',
        ),
        "read-only": (
            "25006",
            f'ALTER ROLE "{login}" IN DATABASE "{database}" SET default_transaction_read_only = on',
            f'ALTER ROLE "{login}" IN DATABASE "{database}" RESET default_transaction_read_only',
        ),
    }[refusal]
    order = await api.create(f"c-{uuid.uuid4().hex[:6]}")
    before = _refusals(state)
    await admin(database_url, refuse)
    projector = create_engine(logins[PROJECTOR_ROLE], pool_size=2, autocommit=True)
    caplog.set_level(logging.ERROR, logger="projections.runner")
    try:
        async with running(projector, bootstrap, topic, group_prefix, ["orders"]) as run:

            async def reported() -> tuple[bool, object]:
                lines = [r.getMessage() for r in caplog.records if "refuses" in r.getMessage()]
                return _refusals(state) >= before + 2 and bool(lines), lines[-1:]

            lines = await eventually(
                reported, f"the refusal ({state}) retried and logged", alive=run
            )
            assert f"SQLSTATE {state}" in lines[0]
            assert not run.runner.halted, "a refusal is no event's fault: nothing halts"
            async with begin(db) as connection:
                assert await connection.fetchval("SELECT count(*) FROM projection_halts") == 0
                assert await connection.fetchval("SELECT count(*) FROM parked_events") == 0
                assert await connection.fetchval("SELECT count(*) FROM orders") == 0

            await admin(database_url, allow)

            async def applied() -> tuple[bool, object]:
                async with begin(db) as connection:
                    found = await connection.fetchval(
                        "SELECT count(*) FROM orders WHERE order_id = $1", order.order_id
                    )
                return found == 1, found

            await eventually(applied, "the order applied once the database allows it", alive=run)
            assert not run.runner.halted
    finally:
        await admin(database_url, allow)
        await projector.dispose()


async def test_the_api_and_the_projector_each_run_on_their_own_database_url(
    logins: dict[str, str],
    database_url: str,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    tmp_path: Path,
) -> None:
    """DATABASE_URL points nowhere: each process must use its own URL (and login)."""
    env = service_env(
        bootstrap=bootstrap,
        database_url="postgresql://nobody@127.0.0.1:1/nowhere",
        topic=topic,
        partitions=2,
        name=uuid.uuid4().hex[:8],
        extra={
            "ORDERS_API_DATABASE_URL": logins[API_ROLE],
            "ORDERS_PROJECTOR_DATABASE_URL": logins[PROJECTOR_ROLE],
        },
    )
    api = ApiProcess.create(env, tmp_path / "api.log")
    projector = projector_process(env, tmp_path / "projector.log")
    api.start()
    projector.start()
    try:
        await api.wait_ready()
        async with httpx.AsyncClient(
            base_url=api.base_url, headers=bearer(BACK_OFFICE), timeout=30
        ) as client:
            created = await client.post(
                "/orders",
                json={"customer_id": "c-roles", "currency": "EUR"},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            assert created.status_code == 201, created.text
            body = created.json()

            async def queryable() -> tuple[bool, object]:
                # The token waits for the projector (503 while it is still joining its group).
                found = await client.get(
                    f"/orders/{body['order_id']}",
                    headers={"X-Consistency-Token": body["consistency_token"]},
                )
                return found.status_code == 200, (found.status_code, found.text[:300])

            await eventually(queryable, "the order to be queryable", timeout=90)
        users = await admin(
            database_url,
            "SELECT array_agg(DISTINCT usename::text ORDER BY usename::text) "
            "FROM pg_stat_activity WHERE datname = current_database() AND usename LIKE 't\\_%'",
        )
        assert users == [f"t_{API_ROLE}", f"t_{PROJECTOR_ROLE}"]
    finally:
        for process in (api, projector):
            if process.alive:
                process.terminate()


def test_the_compose_init_script_makes_a_login_in_each_role_that_migrate_then_equips(
    database_url: str, tmp_path: Path
) -> None:
    """deploy/postgres/initdb, run as the postgres image runs it (bash, psql, the secrets'
    files), then ``orders migrate --create-roles``: the api's login reads, the projector's
    writes its rows, neither can drop a table."""
    parsed = make_url(database_url)
    secrets = {}
    for name in ("api", "projector"):
        secrets[name] = tmp_path / f"orders_{name}_password"
        secrets[name].write_text(f"pw-{uuid.uuid4().hex}\n")
    env = {
        **os.environ,
        "PATH": f"{postgres_bin_dir()}{os.pathsep}{os.environ['PATH']}",
        "PGHOST": parsed.host or "127.0.0.1",
        "PGPORT": str(parsed.port),
        "POSTGRES_USER": parsed.username or "postgres",
        "POSTGRES_DB": parsed.database or "",
        "ORDERS_API_PASSWORD_FILE": str(secrets["api"]),
        "ORDERS_PROJECTOR_PASSWORD_FILE": str(secrets["projector"]),
    }
    script = PROJECT / "deploy" / "postgres" / "initdb" / "10-orders-logins.sh"
    try:
        done = subprocess.run(
            ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        run_coroutine(migrate_database(database_url, create_roles=True))

        async def check() -> tuple[int, bool, bool]:
            api = await _connect(parsed.set(username="orders_api_login").render_as_string(False))
            projector = await _connect(
                parsed.set(username="orders_projector_login").render_as_string(False)
            )
            try:
                return (
                    await api.fetchval("SELECT count(*) FROM projection_checkpoints"),
                    await _refused(api, "DELETE FROM projection_checkpoints"),
                    await _refused(projector, "DROP TABLE projection_checkpoints"),
                )
            finally:
                await api.close()
                await projector.close()

        counted, api_refused, projector_refused = run_coroutine(check())
        assert counted >= 0, "the api's login reads"
        assert api_refused, "the api's login writes nothing"
        assert projector_refused, "the projector's login drops nothing"
    finally:
        for login in ("orders_api_login", "orders_projector_login"):
            run_coroutine(admin(database_url, f'DROP ROLE IF EXISTS "{login}"'))


_PRIVILEGES = (
    "SELECT array_agg(x ORDER BY x) FROM ("
    "  SELECT n.nspname || '.' || c.relname || ' ' || pg_get_userbyid(c.relowner) || ' '"
    "    || coalesce(c.relacl::text, '') AS x"
    "  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    "  WHERE (n.nspname = 'public' OR n.nspname LIKE 'proj\\_%') AND c.relkind IN ('r', 'v')"
    "  UNION ALL SELECT nspname || ' ' || pg_get_userbyid(nspowner) || ' ' || nspacl::text"
    "  FROM pg_namespace WHERE nspname = 'public' OR nspname LIKE 'proj\\_%'"
    "  UNION ALL SELECT defaclobjtype::text || ' '"
    "    || coalesce(defaclnamespace::regnamespace::text, '') || ' ' || defaclacl::text"
    "  FROM pg_default_acl) AS privileges"
)


async def test_a_database_owner_with_createrole_sets_the_roles_up_and_again_changes_nothing(
    tmp_path: Path,
) -> None:
    """Not a superuser: a managed service's admin login (CREATEROLE, owner of the database),
    on a server of its own where the roles do not exist yet."""
    server = LocalPostgres(data_dir=tmp_path / "postgres")
    await asyncio.to_thread(server.start)
    try:
        await admin(server.url(), "CREATE ROLE t_admin LOGIN CREATEROLE")
        await admin(server.url(), "CREATE DATABASE orders OWNER t_admin")
        url = f"postgresql://t_admin@127.0.0.1:{server.port}/orders"

        await migrate_database(url, create_roles=True)
        first = await admin(url, _PRIVILEGES)
        await migrate_database(url, create_roles=True)
        again = await admin(url, _PRIVILEGES)
    finally:
        await asyncio.to_thread(server.stop)

    assert again == first
    owners = {line.split(" ")[1] for line in first if line.startswith(("public.", "proj_"))}
    assert owners == {OWNER_ROLE}, first
