"""An operator's common mistakes, through the real ``orders`` CLI in a subprocess: one line on
stderr that says what to do next, exit code 2, no traceback.

The module's database is left unmigrated on purpose (no test here asks for the ``engine``
fixture, which migrates it); the ``topic`` fixture names a topic that nobody creates.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy.engine import make_url

from service.infra.embedded.stack import Infrastructure
from tests.support.cli import OrdersCli
from tests.support.database import admin
from tests.support.topics import new_topic


def the_one_error(result: tuple[int, str, str]) -> str:
    """The ``orders: ...`` line of a run that failed the way an operator's mistake should:
    exit code 2, that line last on stderr and the only one of its kind, no traceback."""
    code, _, err = result
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("orders: ")]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def with_database(url: str, *, database: str | None = None, username: str | None = None) -> str:
    """``url`` with another database name or user (None: unchanged)."""
    changed = make_url(url).set(database=database, username=username)
    return changed.render_as_string(hide_password=False)


def location(url: str) -> str:
    parsed = make_url(url)
    return f"{parsed.host}:{parsed.port}/{parsed.database}"


@pytest.fixture
def cli(bootstrap: str, database_url: str, topic: str) -> OrdersCli:
    """The CLI on the module's unmigrated database and a topic that does not exist."""
    return OrdersCli(bootstrap, database_url, topic)


@pytest.fixture
async def two_partitions(bootstrap: str, topic: str) -> AsyncIterator[str]:
    """The test's topic, created with partitions 0 and 1."""
    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await client.start()
    try:
        await client.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
        yield topic
        await client.delete_topics([topic])
    finally:
        await client.close()


@pytest.fixture
async def fresh_database(infra: Infrastructure) -> AsyncIterator[str]:
    """An empty database of this test's own, dropped afterwards."""
    name = f"t_cli_errors_{uuid.uuid4().hex[:8]}"
    await admin(infra.database_url, f'CREATE DATABASE "{name}"')
    yield with_database(infra.database_url, database=name)
    await admin(infra.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    "command",
    [
        ["projections", "status"],
        ["projections", "rebuild", "orders"],
        ["projections", "parked"],
        ["projections", "retry", "orders"],
        ["projector"],
    ],
    ids=" ".join,
)
async def test_a_command_on_an_unmigrated_database_says_to_run_migrate(
    cli: OrdersCli, bootstrap: str, topic: str, database_url: str, command: list[str]
) -> None:
    await new_topic(bootstrap, topic, 2)  # the projector checks it first
    message = the_one_error(await cli.run(*command))

    assert message.startswith(f"orders: the database {location(database_url)} is not migrated")
    assert "does not exist" in message  # PostgreSQL's words, naming the table
    assert message.endswith("run `orders migrate` with the same DATABASE_URL, then run this again")


async def test_following_the_advice_to_migrate_makes_the_command_work(
    bootstrap: str, topic: str, fresh_database: str
) -> None:
    cli = OrdersCli(bootstrap, fresh_database, topic)
    assert "run `orders migrate`" in the_one_error(await cli.run("projections", "parked"))

    code, _, err = await cli.run("migrate")
    assert code == 0, err

    code, out, err = await cli.run("projections", "parked")
    assert (code, out.strip()) == (0, "no parked events"), err


async def test_a_rebuild_from_a_missing_topic_names_the_topic_and_the_broker(
    bootstrap: str, topic: str, fresh_database: str
) -> None:
    cli = OrdersCli(bootstrap, fresh_database, topic)
    code, _, err = await cli.run("migrate")
    assert code == 0, err

    message = the_one_error(await cli.run("projections", "rebuild", "orders"))

    assert message == (
        f"orders: no topic {topic} at {bootstrap}: nothing to rebuild from (is ORDERS_TOPIC right?)"
    )


async def test_migrating_to_an_unknown_revision_gives_alembics_message(cli: OrdersCli) -> None:
    message = the_one_error(await cli.run("migrate", "--downgrade", "bogus"))

    assert message == (
        "orders: cannot migrate: Can't locate revision identified by 'bogus'; a revision is "
        "`head`, `base` or an id from `alembic history`"
    )


async def test_parking_on_a_missing_topic_names_the_topic_and_the_broker(
    cli: OrdersCli, bootstrap: str, topic: str
) -> None:
    message = the_one_error(
        await cli.run("projections", "park", "orders", "--partition", "0", "--offset", "0")
    )

    # Asked before reading: without that check the read waits 40 s for the broker's timeout.
    assert message == (
        f"orders: no topic {topic} at {bootstrap}: create it with `orders topic create` "
        f"(ORDERS_TOPIC={topic}), or fix ORDERS_TOPIC or KAFKA_BOOTSTRAP_SERVERS if it exists "
        "elsewhere"
    )


async def test_parking_in_a_partition_the_topic_lacks_names_the_partitions_it_has(
    cli: OrdersCli, bootstrap: str, two_partitions: str
) -> None:
    message = the_one_error(
        await cli.run("projections", "park", "orders", "--partition", "7", "--offset", "0")
    )

    assert message == (
        f"orders: topic {two_partitions} at {bootstrap} has no partition 7 (it has 0-1): "
        "check --partition against `orders projections status`"
    )


async def test_a_database_that_does_not_exist_is_named(cli: OrdersCli, database_url: str) -> None:
    cli.database_url = with_database(database_url, database="no_such_database")

    message = the_one_error(await cli.run("projections", "status"))

    assert message == (
        f'orders: PostgreSQL at {location(cli.database_url)}: database "no_such_database" '
        "does not exist; create that database or fix DATABASE_URL"
    )


async def test_a_refused_login_says_to_fix_the_url(cli: OrdersCli, database_url: str) -> None:
    cli.database_url = with_database(database_url, username="no_such_role")

    message = the_one_error(await cli.run("migrate"))

    assert message == (
        f"orders: PostgreSQL at {location(database_url)} refused the login: "
        'role "no_such_role" does not exist; fix DATABASE_URL'
    )


async def test_a_database_address_where_no_postgres_answers_says_what_to_check(
    cli: OrdersCli, bootstrap: str
) -> None:
    """Something accepts connections at DATABASE_URL's port (so the reachability check passes)
    and closes them at once, as a server going down does."""

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cli.database_url = f"postgresql+asyncpg://u@127.0.0.1:{port}/db"
    async with server:
        message = the_one_error(await cli.run("projections", "status"))

    assert message.startswith("orders: a server stopped answering (")
    assert message.endswith(
        f"check PostgreSQL at 127.0.0.1:{port}/db (DATABASE_URL) and Kafka at {bootstrap} "
        "(KAFKA_BOOTSTRAP_SERVERS), then run this again"
    )
