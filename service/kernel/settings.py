"""Typed settings, read from the environment in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

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


def _switch(name: str, default: bool) -> bool:
    """``on``/``off`` (or true/false, 1/0, yes/no); anything else is refused, not guessed."""
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise SystemExit(f"{name}={raw!r}: use on or off")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(raw: str) -> int:
    """Seconds in ``90``, ``90s``, ``15m``, ``24h`` or ``7d``."""
    text = raw.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:])
    number = text[:-1] if unit is not None else text
    if not number.isdigit():
        raise ValueError(f"{raw!r} is not a duration like 90s, 15m, 24h or 7d")
    return int(number) * (unit or 1)


def _duration(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse_duration(raw)
    except ValueError as error:
        raise SystemExit(f"{name}: {error}") from None


def _choice(name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first when unset); anything else is refused, not guessed."""
    raw = os.environ.get(name, "").strip().lower() or choices[0]
    if raw not in choices:
        raise SystemExit(f"{name}={raw!r}: use one of {', '.join(choices)}")
    return raw


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number") from None


def sqlalchemy_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and select the asyncpg driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True, kw_only=True)
class KafkaSecurity:
    """How every Kafka client of the service authenticates and encrypts, in the names Kafka's
    own clients use. The password never shows in a repr, a log line or an error."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.protocol.endswith("SSL")

    @classmethod
    def from_env(cls) -> KafkaSecurity:
        protocol = (os.environ.get("KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").strip().upper()
        if protocol not in SECURITY_PROTOCOLS:
            raise SystemExit(
                f"KAFKA_SECURITY_PROTOCOL={protocol!r}: use one of {', '.join(SECURITY_PROTOCOLS)}"
            )
        security = cls(
            protocol=protocol,
            sasl_mechanism=(os.environ.get("KAFKA_SASL_MECHANISM") or "").strip().upper() or None,
            sasl_username=os.environ.get("KAFKA_SASL_USERNAME") or None,
            sasl_password=_secret("KAFKA_SASL_PASSWORD"),
            ssl_cafile=_readable_file("KAFKA_SSL_CAFILE"),
            ssl_certfile=_readable_file("KAFKA_SSL_CERTFILE"),
            ssl_keyfile=_readable_file("KAFKA_SSL_KEYFILE"),
        )
        security.check()
        return security

    def check(self) -> None:
        """Refuse settings that cannot work together, saying what to set."""
        if self.uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise SystemExit(
                    f"KAFKA_SECURITY_PROTOCOL={self.protocol} needs KAFKA_SASL_MECHANISM, one "
                    f"of {', '.join(SASL_MECHANISMS)} (got {self.sasl_mechanism or 'nothing'})"
                )
            if not self.sasl_username or self.sasl_password is None:
                raise SystemExit(
                    f"KAFKA_SASL_MECHANISM={self.sasl_mechanism} needs KAFKA_SASL_USERNAME and "
                    "KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE)"
                )
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password is not None:
            raise SystemExit(
                "KAFKA_SASL_* is set but KAFKA_SECURITY_PROTOCOL is "
                f"{self.protocol}: set it to SASL_SSL (or SASL_PLAINTEXT), or unset KAFKA_SASL_*"
            )
        files = (self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile)
        if not self.uses_tls and any(files):
            raise SystemExit(
                f"KAFKA_SSL_* is set but KAFKA_SECURITY_PROTOCOL is {self.protocol}: set it to "
                "SSL or SASL_SSL, or unset KAFKA_SSL_*"
            )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise SystemExit(
                "a client certificate needs both KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE"
            )


@dataclass(frozen=True)
class KafkaConnection:
    """Where the brokers are and how to talk to them. Prints as the bootstrap servers only."""

    bootstrap_servers: str
    security: KafkaSecurity = KafkaSecurity()

    def __str__(self) -> str:
        return self.bootstrap_servers


def _secret(name: str) -> str | None:
    """``NAME``, or the secret in the file ``NAME_FILE`` names (``_secret_file``), never
    both."""
    value = os.environ.get(name)
    path = os.environ.get(f"{name}_FILE")
    if value and path:
        raise SystemExit(f"set {name} or {name}_FILE, not both")
    return _secret_file(f"{name}_FILE", path) if path else (value or None)


def _secret_file(name: str, path: str) -> str:
    """The secret in the file ``path`` (a Docker or Kubernetes secret; the setting ``name``
    points at it): its first line, without the line break."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(
            f"{name}={path}: cannot read it ({getattr(error, 'strerror', None) or error}); "
            "point it at a readable file that holds the secret"
        ) from None
    secret = text.splitlines()[0] if text.strip() else ""
    if not secret:
        raise SystemExit(f"{name}={path} is empty: put the secret in it")
    return secret


def _readable_file(name: str) -> str | None:
    path = os.environ.get(name) or None
    if path is not None and not os.access(path, os.R_OK):
        raise SystemExit(f"{name}={path}: no such file, or not readable by this process")
    return path


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service can be told. ``None`` for Kafka or Postgres means: not configured."""

    kafka_bootstrap_servers: str | None = None
    kafka_security: KafkaSecurity = KafkaSecurity()
    database_url: str | None = None
    topic: str = DEFAULT_TOPIC
    partitions: int = 12
    allow_deleting_topic: bool = False
    allow_undurable_topic: bool = False
    transactional_id: str = "orders-writer"
    # Several API instances share the topic's partitions through the consumer group
    # ``<writer_group>.<topic>``; each reaches the others at their advertised URL (unset:
    # http://<its host>:<its port>).
    writer_group: str = "orders-writers"
    advertised_url: str | None = None
    projection_group_prefix: str = "orders-projection"
    # Kafka static membership (KIP-345): a restarted projector with the same instance id takes
    # its partitions back at once, without a rebalance. Unset: dynamic membership.
    projector_instance_id: str | None = None
    group_commit_max_events: int = 500
    consistency_wait_ms: int = 5000
    # Queries waiting for a consistency token at once; past it a query is a 503 at once.
    max_waiting_queries: int = 1000
    max_body_bytes: int = 64 * 1024
    # Access control (docs/security.md). Off only for local work.
    auth: bool = True
    jwks_url: str | None = None
    jwks_file: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_s: int = 30
    jwks_min_refresh_s: float = 30.0  # a token with an unknown key id reads the JWKS again
    public_schema: bool = True  # /schema served without a token
    rate_limit_per_s: float = 100.0  # per caller; 0: no limit
    rate_limit_burst: int = 200
    idempotency_ttl_s: int = 24 * 3600
    max_queue_delay_ms: int = 300
    # Telemetry (docs/telemetry.md): Prometheus metrics on a port of their own (no token), and
    # the log format: json, text, or auto (text on a terminal, JSON lines otherwise).
    # off: no request metrics, no access log, no traces (the writer's and the projector's own
    # counters stay: a few per batch or command).
    telemetry: bool = True
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_format: str = "auto"
    # Each process its own Postgres login (docs/security.md); unset: DATABASE_URL. The password
    # of a URL that names none comes from ORDERS_DATABASE_PASSWORD_FILE, and never shows.
    api_database_url: str | None = None
    projector_database_url: str | None = None
    database_password: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> Settings:
        database_url = os.environ.get("DATABASE_URL") or None
        return cls(
            kafka_bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            kafka_security=KafkaSecurity.from_env(),
            database_url=sqlalchemy_url(database_url) if database_url else None,
            topic=os.environ.get("ORDERS_TOPIC") or DEFAULT_TOPIC,
            partitions=_int("ORDERS_PARTITIONS", 12),
            allow_deleting_topic=_flag("ORDERS_ALLOW_DELETING_TOPIC"),
            allow_undurable_topic=_flag("ORDERS_ALLOW_UNDURABLE_TOPIC"),
            transactional_id=os.environ.get("ORDERS_TRANSACTIONAL_ID") or "orders-writer",
            writer_group=os.environ.get("ORDERS_WRITER_GROUP") or "orders-writers",
            advertised_url=os.environ.get("ORDERS_ADVERTISED_URL") or None,
            projection_group_prefix=os.environ.get("ORDERS_GROUP_PREFIX") or "orders-projection",
            projector_instance_id=os.environ.get("ORDERS_PROJECTOR_INSTANCE_ID") or None,
            group_commit_max_events=_int("ORDERS_GROUP_COMMIT_MAX_EVENTS", 500),
            consistency_wait_ms=_int("ORDERS_CONSISTENCY_WAIT_MS", 5000),
            max_waiting_queries=_int("ORDERS_MAX_WAITING_QUERIES", 1000),
            max_body_bytes=_int("ORDERS_MAX_BODY_BYTES", 64 * 1024),
            auth=_switch("ORDERS_AUTH", True),
            jwks_url=os.environ.get("ORDERS_JWKS_URL") or None,
            jwks_file=os.environ.get("ORDERS_JWKS_FILE") or None,
            jwt_issuer=os.environ.get("ORDERS_JWT_ISSUER") or None,
            jwt_audience=os.environ.get("ORDERS_JWT_AUDIENCE") or None,
            jwt_leeway_s=_int("ORDERS_JWT_LEEWAY_S", 30),
            jwks_min_refresh_s=_float("ORDERS_JWKS_MIN_REFRESH_S", 30.0),
            public_schema=_switch("ORDERS_PUBLIC_SCHEMA", True),
            rate_limit_per_s=_float("ORDERS_RATE_LIMIT", 100.0),
            rate_limit_burst=_int("ORDERS_RATE_LIMIT_BURST", 200),
            idempotency_ttl_s=_duration("ORDERS_IDEMPOTENCY_TTL", 24 * 3600),
            max_queue_delay_ms=_int("ORDERS_MAX_QUEUE_DELAY_MS", 300),
            telemetry=_switch("ORDERS_TELEMETRY", True),
            metrics_port=_int("ORDERS_METRICS_PORT", 0) or None,
            metrics_host=os.environ.get("ORDERS_METRICS_HOST") or "127.0.0.1",
            log_format=_choice("ORDERS_LOG_FORMAT", ("auto", "json", "text")),
            api_database_url=_database_url("ORDERS_API_DATABASE_URL"),
            projector_database_url=_database_url("ORDERS_PROJECTOR_DATABASE_URL"),
            database_password=_database_password(),
        )

    def with_infrastructure(self, *, kafka: str, database_url: str) -> Settings:
        return replace(self, kafka_bootstrap_servers=kafka, database_url=database_url)

    def require_kafka(self) -> KafkaConnection:
        if not self.kafka_bootstrap_servers:
            raise SystemExit(
                "KAFKA_BOOTSTRAP_SERVERS is not set: point it at a broker, or run `orders dev`, "
                "which starts one for you"
            )
        return KafkaConnection(self.kafka_bootstrap_servers, self.kafka_security)

    def require_database(self, process: str | None = None) -> str:
        """The database URL of ``process`` (``"api"``, ``"projector"``; None: migrations and
        operators' commands), falling back to ``DATABASE_URL``."""
        own = {"api": self.api_database_url, "projector": self.projector_database_url}
        url = own.get(process or "") or self.database_url
        if not url:
            names = f"ORDERS_{process.upper()}_DATABASE_URL or " if process else ""
            raise SystemExit(
                f"{names}DATABASE_URL is not set: point it at PostgreSQL, or run `orders dev`, "
                "which starts one for you"
            )
        return url


def _database_url(name: str) -> str | None:
    raw = os.environ.get(name) or None
    return sqlalchemy_url(raw) if raw else None


def _database_password() -> str | None:
    path = os.environ.get("ORDERS_DATABASE_PASSWORD_FILE")
    return _secret_file("ORDERS_DATABASE_PASSWORD_FILE", path) if path else None
