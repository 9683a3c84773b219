"""The real broker and database the project stands on, and how bad environments are reported."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import text
from sqlalchemy.engine import make_url

from service.infra.database import create_engine
from service.infra.embedded import ensure_port_free
from service.infra.embedded.kafka import (
    LocalKafka,
    broker_classpath,
    java_executable,
    wait_until_usable,
)
from service.infra.embedded.postgres import LocalPostgres, check_reachable
from service.infra.embedded.stack import Infrastructure
from service.kernel.errors import EnvironmentProblem
from service.kernel.settings import sqlalchemy_url


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def test_an_aborted_transaction_is_invisible_to_read_committed_consumers(
    bootstrap: str,
    topic: str,
) -> None:
    await _create_topic(bootstrap, topic)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"tx-{topic}",
        enable_idempotence=True,
        acks="all",
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, b"committed-1", key=b"k")
            await producer.send(topic, b"committed-2", key=b"k")
        await producer.begin_transaction()
        await producer.send(topic, b"aborted", key=b"k")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, b"committed-3", key=b"k")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        values = []
        while await consumer.position(partition) < end:
            batch = await consumer.getmany(partition, timeout_ms=1000)
            values += [record.value for record in batch.get(partition, [])]
    finally:
        await consumer.stop()
    assert values == [b"committed-1", b"committed-2", b"committed-3"]


async def test_postgres_round_trip(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE notes (id int PRIMARY KEY, body text)"))
            await connection.execute(text("INSERT INTO notes VALUES (1, 'hello')"))
        async with engine.connect() as connection:
            body = await connection.scalar(text("SELECT body FROM notes WHERE id = 1"))
            version = await connection.scalar(text("SHOW server_version_num"))
    finally:
        await engine.dispose()
    assert body == "hello"
    assert int(str(version)) >= 150000


async def _admin_until(bootstrap: str, topics: list[str], *, create: bool) -> None:
    """Create (or delete) ``topics``, polling until the controller has done it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            if create:
                await admin.create_topics([NewTopic(name, 1, 1) for name in topics])
            else:
                await admin.delete_topics(topics)
            present = set(await admin.list_topics())
            if all((name in present) == create for name in topics):
                return
            assert time.monotonic() < deadline, f"topics {topics} not {create=} in time"
            await asyncio.sleep(0.1)  # pacing between attempts, not synchronisation
    finally:
        await admin.close()


async def test_an_external_kafka_that_refuses_the_probe_topic_still_answers(
    bootstrap: str,
) -> None:
    # A cluster may refuse to create a topic for a probe (ACLs, a creation policy, a minimum
    # replication factor). Here it refuses because a colliding name exists: Kafka treats
    # "." and "_" alike in topic names. Checking an external cluster must not need that topic.
    await _admin_until(bootstrap, ["__orders_probe"], create=False)
    await _admin_until(bootstrap, ["__orders.probe"], create=True)
    try:
        await asyncio.to_thread(
            wait_until_usable,
            bootstrap,
            deadline=time.monotonic() + 10,
            process=None,
            log_file=None,
        )
    finally:
        await _admin_until(bootstrap, ["__orders.probe"], create=False)


def test_a_port_in_use_is_reported_with_what_to_do() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(EnvironmentProblem, match=rf"port {port}.*--kafka-port"):
            ensure_port_free(port, "Kafka", "--kafka-port")


def test_a_missing_java_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-such-jdk"))
    with pytest.raises(EnvironmentProblem, match="Java 17"):
        java_executable()


def test_an_old_java_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "jdk" / "bin" / "java"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'openjdk version \"11.0.2\" 2019-01-15' >&2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    with pytest.raises(EnvironmentProblem, match=r"Java 11.*17 or newer"):
        java_executable()


def test_a_missing_maven_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KAFKA_HOME", raising=False)
    monkeypatch.setenv("ORDERS_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvironmentProblem, match="mvn not found"):
        broker_classpath()


_RECORDING_MVN = """#!{python}
import pathlib, sys
pom = pathlib.Path(sys.argv[sys.argv.index("-f") + 1]).read_text()
with open({calls!r}, "a") as calls:
    calls.write(pom.replace("\\n", " ") + "\\n")
out = next(a for a in sys.argv if a.startswith("-DoutputDirectory="))
lib = pathlib.Path(out.partition("=")[2])
lib.mkdir(parents=True, exist_ok=True)
(lib / "broker.jar").write_bytes(b"")
"""


def test_the_broker_jars_are_fetched_again_when_the_pom_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A stand-in for Maven that records each POM it resolves: this checks the cache, not Maven.
    calls = tmp_path / "mvn-calls"
    mvn = tmp_path / "bin" / "mvn"
    mvn.parent.mkdir()
    mvn.write_text(_RECORDING_MVN.format(python=sys.executable, calls=str(calls)))
    mvn.chmod(0o755)
    monkeypatch.delenv("KAFKA_HOME", raising=False)
    monkeypatch.setenv("ORDERS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(mvn.parent))

    first = broker_classpath()
    assert broker_classpath() == first  # cached: Maven is not asked twice
    monkeypatch.setattr("service.infra.embedded.kafka.LOG4J_VERSION", "2.99.0")
    second = broker_classpath()

    resolved = calls.read_text().splitlines()
    assert len(resolved) == 2
    assert "2.99.0" not in resolved[0]
    assert "2.99.0" in resolved[1]
    assert [jar.name for jar in second] == ["broker.jar"]
    assert second != first


def test_a_slow_first_fetch_of_the_broker_jars_does_not_eat_the_start_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The broker's own clock is moved on by the whole timeout while its jars are "fetched",
    # as by a first Maven download that slow: the broker (real) must still get its time.
    timeout = 60.0
    skipped = 0.0

    def clock() -> float:
        return time.monotonic() + skipped

    def slow_classpath() -> list[Path]:
        nonlocal skipped
        jars = broker_classpath()
        skipped += timeout
        return jars

    monkeypatch.setattr(
        "service.infra.embedded.kafka.time",
        types.SimpleNamespace(monotonic=clock, sleep=time.sleep),
    )
    monkeypatch.setattr("service.infra.embedded.kafka.broker_classpath", slow_classpath)
    kafka = LocalKafka(data_dir=tmp_path / "kafka")
    try:
        kafka.start(timeout=timeout)
    finally:
        kafka.stop()


def test_an_unreachable_database_is_reported() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(EnvironmentProblem, match=f"cannot reach PostgreSQL at 127.0.0.1:{port}"):
        check_reachable(f"postgresql+asyncpg://u@127.0.0.1:{port}/db", timeout=2)


def test_postgres_starts_when_the_locale_in_the_environment_does_not_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # initdb takes its locale from the environment unless told otherwise, and refuses one the
    # machine lacks ("invalid locale settings"), as on a fresh machine with LANG=en_US.UTF-8.
    monkeypatch.setenv("LANG", "xx_NOWHERE.UTF-8")
    monkeypatch.setenv("LC_ALL", "xx_NOWHERE.UTF-8")
    postgres = LocalPostgres(data_dir=tmp_path / "pg")
    try:
        postgres.start()
        check_reachable(postgres.url(), timeout=2)
    finally:
        postgres.stop()


def _orders(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.edge.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_cli_says_in_one_line_when_kafka_does_not_answer(database_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
        "DATABASE_URL": database_url,
    }
    result = _orders("api", "--port", "0", env=env)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"orders: Kafka at KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port} does not answer")
    )
    assert "Traceback" not in result.stderr


def test_the_cli_says_in_one_line_when_the_database_does_not_answer() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": f"postgresql://u@127.0.0.1:{port}/db"}
    result = _orders("migrate", env=env)
    assert result.returncode == 2
    assert "cannot reach PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_database_fixture_gives_each_module_its_own_database(
    database_url: str,
) -> None:
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        name = await connection.fetchval("SELECT current_database()")
    finally:
        await connection.close()
    assert name.startswith("t_test_infrastructure_")


@pytest.fixture(scope="module")
def on_a_socket(infra: Infrastructure, database_url: str) -> Iterator[tuple[LocalPostgres, str]]:
    """A server listening on a Unix socket, and a database of this module there: the embedded
    one, or (containers, whose sockets this process cannot reach) one started for the module."""
    if infra.postgres is not None:
        yield infra.postgres, str(make_url(database_url).database)
        return
    own = LocalPostgres()
    own.start()
    try:
        yield own, "postgres"
    finally:
        own.stop()


def test_a_unix_socket_database_url_migrates_and_connects(
    on_a_socket: tuple[LocalPostgres, str],
) -> None:
    # The libpq form local servers and cloud SQL proxies use: the socket directory in host=.
    postgres, database = on_a_socket
    url = f"postgresql://postgres@/{database}?host={postgres.data_dir}&port={postgres.port}"
    check_reachable(url, timeout=5)
    migrated = _orders("migrate", env={**os.environ, "DATABASE_URL": url})
    assert migrated.returncode == 0, migrated.stderr

    async def views() -> int:
        engine = create_engine(sqlalchemy_url(url))
        try:
            async with engine.connect() as connection:
                found = await connection.scalar(
                    text("SELECT count(*) FROM pg_views WHERE schemaname = 'public'")
                )
                return int(found or 0)
        finally:
            await engine.dispose()

    assert asyncio.run(views()) > 0


def test_a_database_url_without_a_host_uses_pghost(
    on_a_socket: tuple[LocalPostgres, str],
) -> None:
    postgres, database = on_a_socket
    env = {
        **os.environ,
        "DATABASE_URL": f"postgresql:///{database}",
        "PGHOST": str(postgres.data_dir),
        "PGPORT": str(postgres.port),
        "PGUSER": "postgres",
    }
    migrated = _orders("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr


def test_asking_for_containers_without_a_docker_engine_stops_the_run_saying_so() -> None:
    env = {
        **os.environ,
        "ORDERS_TEST_DOCKER": "1",
        "DOCKER_HOST": "unix:///nonexistent/docker.sock",  # no engine, whatever the machine
    }
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{__file__}::test_the_cli_says_in_one_line_when_kafka_does_not_answer",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stdout[-2000:]
    assert "ORDERS_TEST_DOCKER=1 but no Docker engine answers" in result.stdout + result.stderr
    assert "passed" not in result.stdout
