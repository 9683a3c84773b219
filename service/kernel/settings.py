"""Typed settings, read from the environment in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

DEFAULT_TOPIC = "orders.events"


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def sqlalchemy_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and select the asyncpg driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service can be told. ``None`` for Kafka or Postgres means: not configured."""

    kafka_bootstrap_servers: str | None = None
    database_url: str | None = None
    topic: str = DEFAULT_TOPIC
    partitions: int = 12
    allow_deleting_topic: bool = False
    transactional_id: str = "orders-writer"
    projection_group_prefix: str = "orders-projection"
    # Kafka static membership (KIP-345): a restarted projector with the same instance id takes
    # its partitions back at once, without a rebalance. Unset: dynamic membership.
    projector_instance_id: str | None = None
    group_commit_max_events: int = 500
    consistency_wait_ms: int = 5000
    # Queries waiting for a consistency token at once; past it a query is a 503 at once.
    max_waiting_queries: int = 1000
    max_body_bytes: int = 64 * 1024

    @classmethod
    def from_env(cls) -> Settings:
        database_url = os.environ.get("DATABASE_URL") or None
        return cls(
            kafka_bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            database_url=sqlalchemy_url(database_url) if database_url else None,
            topic=os.environ.get("ORDERS_TOPIC") or DEFAULT_TOPIC,
            partitions=_int("ORDERS_PARTITIONS", 12),
            allow_deleting_topic=_flag("ORDERS_ALLOW_DELETING_TOPIC"),
            transactional_id=os.environ.get("ORDERS_TRANSACTIONAL_ID") or "orders-writer",
            projection_group_prefix=os.environ.get("ORDERS_GROUP_PREFIX") or "orders-projection",
            projector_instance_id=os.environ.get("ORDERS_PROJECTOR_INSTANCE_ID") or None,
            group_commit_max_events=_int("ORDERS_GROUP_COMMIT_MAX_EVENTS", 500),
            consistency_wait_ms=_int("ORDERS_CONSISTENCY_WAIT_MS", 5000),
            max_waiting_queries=_int("ORDERS_MAX_WAITING_QUERIES", 1000),
            max_body_bytes=_int("ORDERS_MAX_BODY_BYTES", 64 * 1024),
        )

    def with_infrastructure(self, *, kafka: str, database_url: str) -> Settings:
        return replace(self, kafka_bootstrap_servers=kafka, database_url=database_url)

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap_servers:
            raise SystemExit(
                "KAFKA_BOOTSTRAP_SERVERS is not set: point it at a broker, or run `orders dev`, "
                "which starts one for you"
            )
        return self.kafka_bootstrap_servers

    def require_database(self) -> str:
        if not self.database_url:
            raise SystemExit(
                "DATABASE_URL is not set: point it at PostgreSQL, or run `orders dev`, "
                "which starts one for you"
            )
        return self.database_url
