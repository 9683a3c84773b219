"""Kafka + Postgres for ``orders dev`` and the tests: external if configured, else started here."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.infra.embedded.kafka import LocalKafka, external_bootstrap, wait_until_usable
from service.infra.embedded.postgres import LocalPostgres, check_reachable
from service.infra.kafka_clients import KafkaAccessRefused
from service.kernel.errors import EnvironmentProblem
from service.kernel.settings import KafkaConnection, KafkaSecurity, sqlalchemy_url


@dataclass
class Infrastructure:
    """Where the broker and the database are, and the local servers we own (if any)."""

    kafka_bootstrap_servers: str
    database_url: str
    kafka: LocalKafka | None = None
    postgres: LocalPostgres | None = None

    @property
    def server_logs(self) -> list[tuple[str, Path]]:
        """The files the servers started here write their own logs to (nothing of theirs
        reaches this process's output)."""
        logs = []
        if self.kafka is not None:
            logs.append(("Kafka", self.kafka.log_file))
        if self.postgres is not None:
            logs.append(("PostgreSQL", self.postgres.log_file))
        return logs


@contextlib.contextmanager
def infrastructure(
    *,
    kafka_port: int = 0,
    postgres_port: int = 0,
    data_dir: Path | None = None,
) -> Iterator[Infrastructure]:
    """Yield a usable broker and database; stop whatever was started here on exit.

    ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL``, when set, are used as they are (checked
    to answer) and nothing is started for them.
    """
    kafka: LocalKafka | None = None
    postgres: LocalPostgres | None = None
    try:
        database_url = os.environ.get("DATABASE_URL")
        if database_url:
            database_url = sqlalchemy_url(database_url)
            check_reachable(database_url)
        else:
            postgres = LocalPostgres(
                port=postgres_port, data_dir=data_dir / "postgres" if data_dir else None
            )
            database_url = postgres.start()
        bootstrap = external_bootstrap()
        if bootstrap:
            try:
                wait_until_usable(
                    KafkaConnection(bootstrap, KafkaSecurity.from_env()),
                    deadline=time.monotonic() + 30,
                    process=None,
                    log_file=None,
                )
            except KafkaAccessRefused:
                raise  # it answers, and says why it refuses us
            except EnvironmentProblem:
                raise EnvironmentProblem(
                    f"KAFKA_BOOTSTRAP_SERVERS={bootstrap} does not answer: start that broker, "
                    "fix the variable, or unset it to start a local broker"
                ) from None
        else:
            kafka = LocalKafka(port=kafka_port, data_dir=data_dir / "kafka" if data_dir else None)
            bootstrap = kafka.start()
        yield Infrastructure(bootstrap, database_url, kafka, postgres)
    finally:
        if kafka is not None:
            kafka.stop()
        if postgres is not None:
            postgres.stop()
