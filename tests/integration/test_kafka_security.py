"""The service on a secured Kafka: SASL_SSL with SCRAM-SHA-512, a CA of the run's own, and the
StandardAuthorizer granting each principal only the ACLs docs/operations.md lists.

One secured broker (``LocalKafka(secured=True)``) serves the module, with the users ``admin``
(the super user), ``orders-writer``, ``orders-projector`` and ``intruder``; the database is the
session's PostgreSQL. ``orders topic create`` runs as admin, ``orders api`` as the writer and
``orders projector`` as the projector, as real processes that read their password from
KAFKA_SASL_PASSWORD_FILE. Each principal may do its own job and nothing else, a refused login
or an untrusted certificate is one line, and no password shows in any log or status output.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import TopicAuthorizationFailedError, TransactionalIdAuthorizationFailed

from service.infra.database import create_engine, migrate
from service.infra.embedded import free_port
from service.infra.embedded.certificates import server_certificate
from service.infra.embedded.kafka import LocalKafka, run_coroutine
from service.infra.embedded.stack import infrastructure
from service.infra.eventlog import committed_reader
from service.infra.kafka_clients import client_options
from service.infra.topic import topic_partitions
from service.kernel.errors import EnvironmentProblem
from service.kernel.settings import KafkaConnection
from tests.support import identity
from tests.support.acls import Acl, Operation, Pattern, Resource, grant
from tests.support.cli import OrdersCli
from tests.support.processes import ApiProcess, ServiceProcess, projector_process

WRITER = "orders-writer"
PROJECTOR = "orders-projector"
INTRUDER = "intruder"
TOPIC = "orders.secured"
TRANSACTIONAL_ID = "orders-writer-secured"
GROUP_PREFIX = "orders-projection-secured"
PARTITIONS = 2

# Exactly the ACLs of docs/operations.md ("Kafka ACLs"), for this module's names: Describe is
# implied by Read and Write.
ACLS = [
    Acl(WRITER, Operation.READ, Resource.TOPIC, TOPIC),
    Acl(WRITER, Operation.WRITE, Resource.TOPIC, TOPIC),
    Acl(WRITER, Operation.DESCRIBE_CONFIGS, Resource.TOPIC, TOPIC),
    Acl(WRITER, Operation.READ, Resource.TOPIC, f"{TOPIC}.writer-state"),
    Acl(WRITER, Operation.WRITE, Resource.TOPIC, f"{TOPIC}.writer-state"),
    Acl(
        WRITER,
        Operation.WRITE,
        Resource.TRANSACTIONAL_ID,
        f"{TRANSACTIONAL_ID}-{TOPIC}",
        Pattern.PREFIXED,
    ),
    Acl(WRITER, Operation.READ, Resource.GROUP, f"orders-writers.{TOPIC}"),
    Acl(PROJECTOR, Operation.READ, Resource.TOPIC, TOPIC),
    Acl(PROJECTOR, Operation.DESCRIBE_CONFIGS, Resource.TOPIC, TOPIC),
    Acl(PROJECTOR, Operation.READ, Resource.GROUP, GROUP_PREFIX, Pattern.PREFIXED),
]


@dataclass(frozen=True)
class SecuredCluster:
    kafka: LocalKafka
    secrets_dir: Path
    database_url: str
    topic_created: tuple[int, str, str]  # `orders topic create` as admin

    def connection(self, user: str) -> KafkaConnection:
        return self.kafka.connection_as(user)

    def password(self, user: str) -> str:
        password = self.connection(user).security.sasl_password
        assert password is not None
        return password

    def environment(self, user: str, *, password_file: Path | None = None) -> dict[str, str]:
        """What an ``orders`` process of ``user`` is told: its login, with the password in a
        file (``password_file``, else ``user``'s own), and this module's names."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": user,
            "KAFKA_SASL_PASSWORD_FILE": str(password_file or self.secrets_dir / user),
            "KAFKA_SSL_CAFILE": str(self.kafka.certificate.ca_file),
            "DATABASE_URL": self.database_url,
            "ORDERS_TOPIC": TOPIC,
            "ORDERS_PARTITIONS": str(PARTITIONS),
            "ORDERS_TRANSACTIONAL_ID": TRANSACTIONAL_ID,
            "ORDERS_GROUP_PREFIX": GROUP_PREFIX,
            **identity.environment(),
        }

    def cli(self, user: str, **overrides: str) -> OrdersCli:
        environment = {**self.environment(user), **overrides}
        return OrdersCli(self.kafka.bootstrap_servers, self.database_url, TOPIC, None, environment)


def _write_secret(path: Path, content: str) -> Path:
    path.touch(mode=0o600)
    path.write_text(content + "\n")
    return path


@pytest.fixture(scope="module")
def cluster(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecuredCluster]:
    """The secured broker with its users and ACLs, the events topic created by admin through
    the CLI, and the module's database migrated."""
    users = {user: secrets.token_urlsafe(24) for user in (WRITER, PROJECTOR, INTRUDER)}
    kafka = LocalKafka(secured=True, users=users)
    kafka.start()
    try:
        secrets_dir = tmp_path_factory.mktemp("kafka-secrets")
        for user, password in {
            "admin": kafka.connection_as().security.sasl_password,
            **users,
        }.items():
            assert password is not None
            _write_secret(secrets_dir / user, password)
        run_coroutine(grant(kafka.connection_as(), ACLS))
        run_coroutine(_migrated(database_url))
        partial = SecuredCluster(kafka, secrets_dir, database_url, (0, "", ""))
        created = run_coroutine(partial.cli("admin").run("topic", "create"))
        yield SecuredCluster(kafka, secrets_dir, database_url, created)
    finally:
        kafka.stop()


async def _migrated(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()


@dataclass
class Service:
    api: ApiProcess
    projector: ServiceProcess

    def logs(self) -> str:
        return self.api.log.read_text() + self.projector.log.read_text()


@pytest.fixture(scope="module")
def service(cluster: SecuredCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``orders api`` logged in as the writer and ``orders projector`` as the projector, both
    logging at debug level (aiokafka's connection and SASL logs included)."""
    logs = tmp_path_factory.mktemp("secured-service")
    api = ApiProcess.create(cluster.environment(WRITER), logs / "api.log")
    api.argv = ["--verbose", *api.argv]
    projector = projector_process(cluster.environment(PROJECTOR), logs / "projector.log")
    projector.argv = ["--verbose", *projector.argv]
    try:
        api.start()
        projector.start()
        run_coroutine(api.wait_ready())
        yield Service(api, projector)
    finally:
        for process in (api, projector):
            if process.alive:
                process.terminate(grace_seconds=30)


async def _create_order(api: ApiProcess, customer: str) -> tuple[str, str]:
    """A new order's id and consistency token."""
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30.0) as client:
        response = await client.post(
            "/orders",
            json={"customer_id": customer, "currency": "EUR"},
            headers={
                **identity.bearer(identity.BACK_OFFICE),
                "Idempotency-Key": str(uuid.uuid4()),
            },
        )
    assert response.status_code == 201, response.text
    body = response.json()
    return body["order_id"], body["consistency_token"]


async def _read_order(api: ApiProcess, order_id: str, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30.0) as client:
        return await client.get(
            f"/orders/{order_id}",
            headers={**identity.bearer(identity.BACK_OFFICE), "X-Consistency-Token": token},
        )


async def _queryable(api: ApiProcess, order_id: str, token: str, *, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = await _read_order(api, order_id, token)
        if response.status_code == 200:
            order: dict = response.json()
            return order
        assert time.monotonic() < deadline, f"order never queryable: {response.text}"
        await asyncio.sleep(0.1)  # polling interval


def the_one_error(result: tuple[int, str, str]) -> str:
    """The ``orders: ...`` line of a run that failed as an operator's mistake should: exit
    code 2, that line last on stderr, no traceback."""
    code, _, err = result
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("orders: "), err
    return err.strip().splitlines()[-1]


def test_orders_topic_create_as_admin_creates_the_topic(cluster: SecuredCluster) -> None:
    code, out, err = cluster.topic_created

    assert code == 0, err
    assert out.startswith(f"created topic {TOPIC}: {PARTITIONS} partitions"), out


async def test_an_order_written_by_the_writer_is_projected_by_the_projector(
    cluster: SecuredCluster, service: Service
) -> None:
    order_id, token = await _create_order(service.api, "c-secured-1")

    order = await _queryable(service.api, order_id, token)

    assert order["order_id"] == order_id
    assert order["customer_id"] == "c-secured-1"


async def test_no_password_shows_in_the_logs_or_the_status(
    cluster: SecuredCluster, service: Service
) -> None:
    order_id, token = await _create_order(service.api, "c-secured-2")
    await _queryable(service.api, order_id, token)

    code, status, err = await cluster.cli(PROJECTOR).run("projections", "status", "--json")

    assert code == 0, err
    assert TOPIC in status
    everything = service.logs() + status + err
    assert "Authenticated as orders-writer via SCRAM-SHA-512" in everything  # aiokafka, debug
    for user in ("admin", WRITER, PROJECTOR, INTRUDER):
        assert cluster.password(user) not in everything, f"{user}'s password leaked"


async def _assert_refused_a_write(cluster: SecuredCluster, user: str) -> None:
    producer = AIOKafkaProducer(**client_options(cluster.connection(user)))
    await producer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait(TOPIC, b"forged", key=b"o-1")
    finally:
        await producer.stop()


async def test_the_projector_principal_cannot_write_to_the_topic(cluster: SecuredCluster) -> None:
    await _assert_refused_a_write(cluster, PROJECTOR)


async def _records_read_as(
    cluster: SecuredCluster, user: str, partition: int, *, timeout: float
) -> tuple[int, bool]:
    """How many records ``user`` reads from ``partition`` within ``timeout`` (stopping at the
    first batch), and whether its metadata says the topic is not authorized for it."""
    reader = committed_reader(cluster.connection(user))
    await reader.start()
    try:
        reader.assign([TopicPartition(TOPIC, partition)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = await reader.getmany(timeout_ms=500)
            if batches:
                return sum(map(len, batches.values())), False
        return 0, TOPIC in reader._client.cluster.unauthorized_topics
    finally:
        await reader.stop()


async def test_the_intruder_can_neither_read_nor_write_the_topic(
    cluster: SecuredCluster, service: Service
) -> None:
    _, token = await _create_order(service.api, "c-not-for-the-intruder")
    partition = int(token.split(":")[0])

    assert (await _records_read_as(cluster, PROJECTOR, partition, timeout=30))[0] >= 1
    assert await _records_read_as(cluster, INTRUDER, partition, timeout=5) == (0, True)
    # Read (or Write) on a topic implies Describe: the broker refusing Describe refuses both.
    with pytest.raises(EnvironmentProblem, match=f"not allowed to describe topic {TOPIC}"):
        await topic_partitions(cluster.connection(INTRUDER), TOPIC)
    await _assert_refused_a_write(cluster, INTRUDER)


async def test_the_intruder_cannot_take_the_writers_transactional_id_to_fence_it(
    cluster: SecuredCluster, service: Service
) -> None:
    squatter = AIOKafkaProducer(
        **client_options(cluster.connection(INTRUDER)),
        transactional_id=f"{TRANSACTIONAL_ID}-{TOPIC}-0",  # the writer of partition 0's
    )
    with pytest.raises(TransactionalIdAuthorizationFailed):
        await squatter.start()
    await squatter.stop()

    order_id, token = await _create_order(service.api, "c-after-the-intruder")

    assert (await _queryable(service.api, order_id, token))["order_id"] == order_id


async def test_a_wrong_password_is_one_line_naming_the_user(
    cluster: SecuredCluster, tmp_path: Path
) -> None:
    wrong = _write_secret(tmp_path / "wrong", secrets.token_urlsafe(24))
    cli = cluster.cli(WRITER, KAFKA_SASL_PASSWORD_FILE=str(wrong))

    result = await cli.run("events", "tail", "--limit", "1")

    assert the_one_error(result) == (
        f"orders: Kafka at {cluster.kafka.bootstrap_servers} refused the login of user "
        f"{WRITER} (SASL SCRAM-SHA-512): check KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD "
        "(or KAFKA_SASL_PASSWORD_FILE)"
    )
    assert wrong.read_text().strip() not in result[1] + result[2]


async def test_a_broker_certificate_of_another_ca_is_one_line(
    cluster: SecuredCluster, tmp_path: Path
) -> None:
    stranger = server_certificate(tmp_path, "stranger")
    cli = cluster.cli(WRITER, KAFKA_SSL_CAFILE=str(stranger.ca_file))

    message = the_one_error(await cli.run("events", "tail", "--limit", "1"))

    assert message.startswith(
        f"orders: Kafka at {cluster.kafka.bootstrap_servers} presented a TLS certificate this "
        "client does not trust"
    ), message
    assert "KAFKA_SSL_CAFILE" in message


async def test_a_plaintext_client_of_the_secured_listener_is_one_line(
    cluster: SecuredCluster,
) -> None:
    unset = dict.fromkeys(("KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SSL_CAFILE"), "")
    cli = cluster.cli(
        WRITER, KAFKA_SECURITY_PROTOCOL="PLAINTEXT", KAFKA_SASL_PASSWORD_FILE="", **unset
    )

    message = the_one_error(await cli.run("events", "tail", "--limit", "1"))

    assert message.startswith(
        f"orders: Kafka at {cluster.kafka.bootstrap_servers} hung up on a PLAINTEXT client"
    ), message
    assert "set KAFKA_SECURITY_PROTOCOL" in message


async def test_a_tls_client_of_a_plaintext_listener_is_one_line(
    bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    """The session's broker speaks PLAINTEXT."""
    authority = server_certificate(tmp_path, "any").ca_file
    environment = {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": str(authority)}
    cli = OrdersCli(bootstrap, database_url, TOPIC, None, environment)

    message = the_one_error(await cli.run("events", "tail", "--limit", "1"))

    assert message.startswith(
        f"orders: Kafka at {bootstrap} hung up on a SSL client (ConnectionResetError): its "
        "listener probably expects another protocol"
    ), message


async def test_an_api_whose_principal_may_not_write_the_topic_stops_with_one_line(
    cluster: SecuredCluster,
) -> None:
    api = cluster.cli(PROJECTOR).run("api", "--port", str(free_port()))

    message = the_one_error(await api)

    assert message == (
        f"orders: Kafka at {cluster.kafka.bootstrap_servers} does not allow "
        f"User:{PROJECTOR} to Write topic {TOPIC}: grant it Write on that topic "
        "(docs/operations.md, Kafka ACLs)"
    )


async def test_an_api_without_its_transactional_id_acl_stops_with_one_line(
    cluster: SecuredCluster,
) -> None:
    cli = cluster.cli(WRITER, ORDERS_TRANSACTIONAL_ID="not-granted")

    message = the_one_error(await cli.run("api", "--port", str(free_port())))

    assert f"refused User:{WRITER} (TransactionalIdAuthorizationFailed)" in message, message
    assert f"prefixed ACL on not-granted-{TOPIC} (ORDERS_TRANSACTIONAL_ID-ORDERS_TOPIC:" in (
        message
    ), message


async def test_a_projector_without_its_group_acl_stops_with_one_line(
    cluster: SecuredCluster,
) -> None:
    cli = cluster.cli(PROJECTOR, ORDERS_GROUP_PREFIX="not-granted")

    message = the_one_error(await cli.run("projector", "orders"))

    assert f"refused User:{PROJECTOR} (GroupAuthorizationFailedError)" in message, message
    assert "grant it on consumer group not-granted.orders: Read" in message, message


@pytest.mark.parametrize(
    "command",
    [["projections", "status"], ["projections", "rebuild", "orders"]],
    ids=["status", "rebuild"],
)
async def test_a_command_the_topic_is_hidden_from_says_so_in_one_line(
    cluster: SecuredCluster, command: list[str]
) -> None:
    """Not "caught up" for an empty topic, not a rebuild waiting for the topic to appear."""
    message = the_one_error(await cluster.cli(INTRUDER).run(*command))

    assert message == (
        f"orders: not allowed to describe topic {TOPIC}: grant this client's principal "
        "Describe on it, or the Read that implies it (docs/operations.md, Kafka ACLs)"
    )


async def test_a_rebuild_runs_with_the_security_settings_its_workers_inherit(
    cluster: SecuredCluster, service: Service
) -> None:
    order_id, token = await _create_order(service.api, "c-rebuilt")
    await _queryable(service.api, order_id, token)

    code, out, err = await cluster.cli(PROJECTOR).run(
        "projections", "rebuild", "orders", "--workers", "2"
    )

    assert code == 0, err
    assert "rebuilt orders" in out, out
    assert (await _read_order(service.api, order_id, token)).json()["order_id"] == order_id
    for user in ("admin", WRITER, PROJECTOR, INTRUDER):
        assert cluster.password(user) not in out + err


def test_an_external_secured_cluster_is_used_with_the_security_settings(
    cluster: SecuredCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `orders dev` and the test fixtures do with KAFKA_BOOTSTRAP_SERVERS set."""
    for name, value in cluster.environment(PROJECTOR).items():
        monkeypatch.setenv(name, value)

    with infrastructure() as found:
        assert found.kafka is None
        assert found.kafka_bootstrap_servers == cluster.kafka.bootstrap_servers
