"""What the ``orders`` CLI says when a command fails: one line for the operator and an exit code.

Each family of the error tree (``service/kernel/errors.py``) is mapped here once. Errors from
outside the tree that an operator can act on (a database that is not migrated, a refused login,
a missing Kafka ACL, a broker that gives no answer, an unknown alembic revision, a server that
hung up) get advice of their own. Anything else is a bug: no advice, its traceback is the report.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaTimeoutError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from alembic.util import CommandError
from asyncpg import PostgresError
from sqlalchemy.engine import make_url

from service.infra.embedded.postgres import endpoints
from service.kernel.errors import (
    BadEvent,
    Conflict,
    DomainError,
    EnvironmentProblem,
    OperatorRefusal,
    OrdersError,
    Unavailable,
)
from service.kernel.settings import Settings

EXIT_REFUSED: Final = 1  # the command was refused; nothing was done
EXIT_ENVIRONMENT: Final = 2  # something around the service must change (or come back) first
EXIT_INTERRUPTED: Final = 130  # Ctrl-C, as a shell reports SIGINT


@dataclass(frozen=True)
class Advice:
    """The one line to print (after ``orders: ``) and the exit code."""

    message: str
    exit_code: int


# The exit code of a command that ends with an error of each family; None: report it with its
# traceback (a bad event that got past its reader is the reader's bug).
_FAMILY_EXIT_CODES: dict[type[OrdersError], int | None] = {
    OperatorRefusal: EXIT_REFUSED,
    Conflict: EXIT_REFUSED,
    DomainError: EXIT_REFUSED,
    EnvironmentProblem: EXIT_ENVIRONMENT,
    Unavailable: EXIT_ENVIRONMENT,
    BadEvent: None,
}


def advice_for(error: BaseException, settings: Settings | None = None) -> Advice | None:
    """What to tell the operator about ``error``, or None when it is not theirs to fix (a bug:
    its traceback is the report). ``settings`` name the servers (default: the environment's)."""
    if isinstance(error, OrdersError):
        family = next((c for c in type(error).__mro__ if c in _FAMILY_EXIT_CODES), None)
        exit_code = _FAMILY_EXIT_CODES[family] if family is not None else None
        return None if exit_code is None else Advice(str(error), exit_code)
    settings = settings or Settings.from_env()
    for advise in _FOREIGN_ADVICE:
        message = advise(error, settings)
        if message is not None:
            return Advice(message, EXIT_ENVIRONMENT)
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what caused it (SQLAlchemy wraps asyncpg's errors, for one). Causes only,
    not the errors being handled when it was raised: a bug raised while handling, say, a
    database error must keep its traceback, not get the database's advice."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _database_location(settings: Settings) -> str:
    """Where the driver looks for the server (``endpoints``: a host and port, or a socket),
    and the database; never the password."""
    if not settings.database_url:
        return "(DATABASE_URL is not set)"
    tried = endpoints(settings.database_url)
    where = tried[0] if len(tried) == 1 else "|".join(tried)
    return f"{where}/{make_url(settings.database_url).database or ''}"


def _kafka_location(settings: Settings) -> str:
    return settings.kafka_bootstrap_servers or "(KAFKA_BOOTSTRAP_SERVERS is not set)"


def _database_advice(error: BaseException, settings: Settings) -> str | None:
    failure = next((e for e in _chain(error) if isinstance(e, PostgresError)), None)
    if failure is None:
        return None
    where = _database_location(settings)
    state = failure.sqlstate or ""
    headline = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    if state == "42P01":  # undefined_table
        return (
            f"the database {where} is not migrated ({failure}): run `orders migrate` with the "
            "same DATABASE_URL, then run this again"
        )
    if state == "3D000":  # invalid_catalog_name
        return f"PostgreSQL at {where}: {failure}; create that database or fix DATABASE_URL"
    if state.startswith("28"):  # invalid authorization: unknown role, wrong password
        if "no encryption" in str(failure):  # pg_hba.conf has hostssl lines only
            return (
                f"PostgreSQL at {where} refused the login: {failure}; the server accepts TLS "
                "connections only: set sslmode=require, or verify-full with sslrootcert=<CA "
                "file>, in DATABASE_URL"
            )
        return f"PostgreSQL at {where} refused the login: {failure}; fix DATABASE_URL"
    if state == "42501":  # insufficient_privilege
        return (
            f"PostgreSQL at {where} refused it: {headline}; `orders migrate --create-roles` "
            "needs a superuser, migrations and operators' commands a login in the "
            "orders_migrator role (docs/security.md)"
        )
    if state.startswith("25"):  # read-only transaction: a standby, or read-only by default
        return (
            f"PostgreSQL at {where} is read-only here ({headline}): point DATABASE_URL at the "
            "primary, or turn default_transaction_read_only off"
        )
    if state.startswith(("08", "57P")):  # connection lost; server shut down
        return (
            f"lost the connection to PostgreSQL at {where} ({failure}): check that it is up "
            "and reachable, then run this again"
        )
    return None


def _tls_advice(error: BaseException, settings: Settings) -> str | None:
    failure = next((e for e in _chain(error) if isinstance(e, ssl.SSLCertVerificationError)), None)
    if failure is None:
        return None
    reason = failure.verify_message or failure.reason or str(failure)
    return (
        f"PostgreSQL at {_database_location(settings)} presented a TLS certificate that does "
        f"not verify ({reason}): point sslrootcert in DATABASE_URL at the CA that signed the "
        "server's certificate, and name the server as its certificate does"
    )


def _kafka_advice(error: BaseException, settings: Settings) -> str | None:
    failure = next(
        (e for e in _chain(error) if isinstance(e, KafkaTimeoutError | KafkaConnectionError)),
        None,
    )
    if failure is None:
        return None
    return (
        f"Kafka at {_kafka_location(settings)} (KAFKA_BOOTSTRAP_SERVERS) gave no answer about "
        f"topic {settings.topic} ({failure}): check that the broker is up and reachable from "
        "here and that ORDERS_TOPIC names an existing topic"
    )


def _kafka_principal(settings: Settings) -> str:
    security = settings.kafka_security
    if security.uses_sasl:
        return f"User:{security.sasl_username}"
    if security.ssl_certfile:
        return f"the principal of the certificate in KAFKA_SSL_CERTFILE={security.ssl_certfile}"
    return "User:ANONYMOUS (no KAFKA_SASL_USERNAME nor KAFKA_SSL_CERTFILE is set)"


def _denied_name(error: BaseException, default: str) -> str:
    """The resource aiokafka names in an authorization error (its one argument), if any."""
    return str(error.args[0]) if error.args and isinstance(error.args[0], str) else default


def _kafka_authorization_advice(error: BaseException, settings: Settings) -> str | None:
    """Kafka's ACLs refused something: which ACL to grant to whom (docs/operations.md)."""
    kinds = (
        TopicAuthorizationFailedError,
        GroupAuthorizationFailedError,
        TransactionalIdAuthorizationFailed,
        ClusterAuthorizationFailedError,
    )
    failure = next((e for e in _chain(error) if isinstance(e, kinds)), None)
    if failure is None:
        return None
    principal = _kafka_principal(settings)
    if isinstance(failure, TopicAuthorizationFailedError):
        topic = _denied_name(failure, settings.topic)
        grant = (
            f"on topic {topic}: Read and Write for the API (the writer), Read for projectors, "
            "`orders events tail` and `orders projections` commands"
        )
    elif isinstance(failure, GroupAuthorizationFailedError) and _denied_name(
        failure, ""
    ).startswith(f"{settings.writer_group}."):
        group = _denied_name(failure, "")
        grant = (
            f"on consumer group {group} (ORDERS_WRITER_GROUP.<topic>): Read, for the API: "
            "its instances share the partitions through it"
        )
    elif isinstance(failure, GroupAuthorizationFailedError):
        group = _denied_name(failure, f"{settings.projection_group_prefix}*")
        grant = (
            f"on consumer group {group}: Read (Describe for `orders projections status`), "
            f"best as one prefixed ACL on {settings.projection_group_prefix} "
            "(ORDERS_GROUP_PREFIX), which covers the rebuild's groups too"
        )
    elif isinstance(failure, TransactionalIdAuthorizationFailed):
        transactional_id = _denied_name(failure, settings.transactional_id)
        grant = (
            f"on TransactionalId {transactional_id}: Write (it implies Describe), best as "
            f"one prefixed ACL on {settings.transactional_id}-{settings.topic} "
            "(ORDERS_TRANSACTIONAL_ID-ORDERS_TOPIC: the API uses that id and one per partition "
            "under it); only the "
            "API's principal should have it"
        )
    else:
        grant = (
            "on the cluster: IdempotentWrite for the writer on brokers before 2.8, Create for "
            "`orders topic create` when it may not create the topic itself"
        )
    return (
        f"Kafka at {_kafka_location(settings)} refused {principal} "
        f"({type(failure).__name__}): grant it {grant} (docs/operations.md, Kafka ACLs)"
    )


def _migration_advice(error: BaseException, settings: Settings) -> str | None:
    if not isinstance(error, CommandError):
        return None
    return f"cannot migrate: {error}; a revision is `head`, `base` or an id from `alembic history`"


def _lost_connection(error: BaseException) -> bool:
    """A server went away (or never was one) after the reachability checks passed: refused,
    reset, or a plain ``ConnectionError`` (asyncpg's when a server hangs up while it asks for
    TLS). Not ``BrokenPipeError``: that is stdout's reader leaving (`| head`)."""
    if isinstance(error, BrokenPipeError):
        return False
    return isinstance(error, ConnectionError | socket.gaierror)


def _connection_advice(error: BaseException, settings: Settings) -> str | None:
    failure = next((e for e in _chain(error) if _lost_connection(e)), None)
    if failure is None:
        return None
    return (
        f"a server stopped answering ({failure}): check PostgreSQL at "
        f"{_database_location(settings)} (DATABASE_URL) and Kafka at "
        f"{_kafka_location(settings)} (KAFKA_BOOTSTRAP_SERVERS), then run this again"
    )


# In this order: the most specific advice first.
_FOREIGN_ADVICE: tuple[Callable[[BaseException, Settings], str | None], ...] = (
    _database_advice,
    _tls_advice,
    _kafka_authorization_advice,
    _kafka_advice,
    _migration_advice,
    _connection_advice,
)
