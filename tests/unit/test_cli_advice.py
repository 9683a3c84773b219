"""What the CLI says when a command fails: one line and an exit code for each family of the
error tree, advice for what the environment did, and a traceback for a bug."""

from __future__ import annotations

import pytest
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from projections.parking import ParkingRefused
from projections.projection import ProjectionBug
from projections.rebuild import RebuildAlreadyRunning
from projections.versions import NoLiveVersion, NotCaughtUp, VersionIsLive
from service.edge.cli.advice import EXIT_ENVIRONMENT, EXIT_REFUSED, Advice, advice_for
from service.infra.eventlog import TopicRepartitioned
from service.infra.topic import TopicMissing, TopicWouldLoseHistory
from service.kernel.domain import OrderNotFound
from service.kernel.envelope import UndecodableEvent
from service.kernel.errors import OrdersError
from service.kernel.settings import KafkaSecurity, Settings
from service.write.contract import IdempotencyKeyReused, VersionMismatch, WriterUnavailable
from service.write.recovery import OpenTransactionInLog

SETTINGS = Settings(
    kafka_bootstrap_servers="127.0.0.1:9092", database_url="postgresql://u@db.example:5433/orders"
)


@pytest.mark.parametrize(
    "error",
    [
        TopicRepartitioned("orders.events", "o-1", 1, 7, 12),
        OpenTransactionInLog("orders.events", {2: (10, 12)}),
    ],
)
def test_a_topic_the_writer_refuses_is_explained_in_one_line(error: Exception) -> None:
    advice = advice_for(error, SETTINGS)

    assert advice == Advice(str(error), EXIT_ENVIRONMENT)
    assert "\n" not in advice.message


@pytest.mark.parametrize(
    "error",
    [
        ParkingRefused("orders is not halted at 0/7"),
        VersionIsLive("orders v1 is live"),
        RebuildAlreadyRunning("a rebuild of orders is running"),
        NotCaughtUp("orders v2 is behind v1 in partitions [0]"),
    ],
    ids=type,
)
def test_an_operator_refusal_exits_1_with_its_message(error: Exception) -> None:
    assert advice_for(error, SETTINGS) == Advice(str(error), EXIT_REFUSED)


@pytest.mark.parametrize(
    "error",
    [
        NoLiveVersion("projection orders has no live version in the database"),
        TopicMissing("no topic orders.events at 127.0.0.1:9092"),
        TopicWouldLoseHistory("orders.events deletes events after 7 days"),
        WriterUnavailable("the event log cannot be reached"),
    ],
    ids=type,
)
def test_an_environment_problem_or_an_unavailable_part_exits_2_with_its_message(
    error: Exception,
) -> None:
    assert advice_for(error, SETTINGS) == Advice(str(error), EXIT_ENVIRONMENT)


@pytest.mark.parametrize(
    "error",
    [OrderNotFound("o-1"), VersionMismatch(3, 4), IdempotencyKeyReused("key k-1 reused")],
    ids=type,
)
def test_a_refused_command_or_a_conflict_exits_1_with_its_message(error: Exception) -> None:
    assert advice_for(error, SETTINGS) == Advice(str(error), EXIT_REFUSED)


@pytest.mark.parametrize(
    "error",
    [UndecodableEvent("not a valid envelope"), ProjectionBug("order o-1 created twice")],
    ids=type,
)
def test_a_bad_event_that_escaped_its_reader_keeps_its_traceback(error: Exception) -> None:
    assert advice_for(error, SETTINGS) is None


def test_an_error_of_the_tree_outside_every_family_keeps_its_traceback() -> None:
    assert advice_for(OrdersError("no family"), SETTINGS) is None


def test_a_server_that_hung_up_names_both_servers() -> None:
    advice = advice_for(ConnectionResetError("reset by peer"), SETTINGS)

    assert advice is not None
    assert advice.exit_code == EXIT_ENVIRONMENT
    assert "PostgreSQL at db.example:5433/orders (DATABASE_URL)" in advice.message
    assert "Kafka at 127.0.0.1:9092 (KAFKA_BOOTSTRAP_SERVERS)" in advice.message


def test_a_reader_leaving_the_pipe_is_no_lost_connection() -> None:
    assert advice_for(BrokenPipeError(), SETTINGS) is None


def _handle_a_lost_connection_with_a_bug() -> None:
    try:
        raise ConnectionRefusedError("the server went away")
    except ConnectionRefusedError:
        raise KeyError("a bug in the handler")  # noqa: B904 - the bug under test


def test_a_bug_raised_while_handling_a_lost_connection_keeps_its_traceback() -> None:
    """Advice follows what caused an error, not what was being handled when it came."""
    with pytest.raises(KeyError) as bug:
        _handle_a_lost_connection_with_a_bug()

    assert isinstance(bug.value.__context__, ConnectionRefusedError)
    assert advice_for(bug.value, SETTINGS) is None


SECURED = Settings(
    kafka_bootstrap_servers="kafka.example:9093",
    kafka_security=KafkaSecurity(
        protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="orders-projector",
        sasl_password="the-secret-itself",
    ),
    transactional_id="orders-writer-1",
    projection_group_prefix="orders-projection",
)


@pytest.mark.parametrize(
    ("error", "acl"),
    [
        (
            TopicAuthorizationFailedError("orders.events"),
            "on topic orders.events: Read and Write",
        ),
        (
            GroupAuthorizationFailedError("orders-projection.orders"),
            "prefixed ACL on orders-projection",
        ),
        (TransactionalIdAuthorizationFailed("orders-writer-1"), "TransactionalId orders-writer-1"),
        (ClusterAuthorizationFailedError(), "on the cluster: IdempotentWrite"),
    ],
)
def test_a_kafka_authorization_failure_names_the_principal_and_the_acl_to_grant(
    error: Exception, acl: str
) -> None:
    advice = advice_for(error, SECURED)

    assert advice is not None
    assert advice.exit_code == EXIT_ENVIRONMENT
    assert "refused User:orders-projector" in advice.message
    assert acl in advice.message
    assert "kafka.example:9093" in advice.message
    assert "the-secret-itself" not in advice.message
    assert "\n" not in advice.message
