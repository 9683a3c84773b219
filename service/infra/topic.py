"""The events topic on Kafka: created only when an operator asks (``orders topic create``),
checked by every process before it uses it.

Nothing here asks the broker for metadata in a way that lets it create the topic: a stock
broker (``auto.create.topics.enable=true``) creates any topic a metadata request names, with
its own defaults (7-day retention), and aiokafka's metadata requests always allow that. The
topic is described with a Metadata request of our own (version 12) that says
``allow_auto_topic_creation=false`` and also answers the topic's id, which tells a topic from
another one of the same name created after it was deleted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from io import BytesIO

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import IncompatibleBrokerVersion
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    AbstractType,
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from service.infra.kafka_clients import KafkaTarget, admin_client, connection
from service.kernel.errors import EnvironmentProblem

_log = logging.getLogger(__name__)

# The log is the truth: it must never delete or compact history.
HISTORY_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}
# On a cluster of at least this many brokers, a topic must keep this many copies of each
# event, and acknowledge one only when MIN_IN_SYNC of them have it.
DURABLE_BROKERS = 3
MIN_IN_SYNC = 2

_NONE = 0
_UNKNOWN_TOPIC = 3
_TOPIC_AUTHORIZATION_FAILED = 29
_TOPIC_ALREADY_EXISTS = 36


class TopicMissing(EnvironmentProblem):
    """The events topic does not exist on the broker."""


class TopicWouldLoseHistory(EnvironmentProblem):
    """The events topic is configured to delete or compact events."""


class TopicNotDurable(EnvironmentProblem):
    """The events topic keeps too few copies of each event for the cluster it is on."""


# -- the Metadata request, version 12 ---------------------------------------------------------


class _Uuid(AbstractType[bytes]):  # type: ignore[misc]
    """Kafka's uuid: 16 bytes as they are."""

    @classmethod
    def encode(cls, value: bytes) -> bytes:
        return value

    @classmethod
    def decode(cls, data: BytesIO) -> bytes:
        value = data.read(16)
        if len(value) != 16:
            raise ValueError("buffer underrun decoding a uuid")
        return value


_ZERO_UUID = bytes(16)


class _MetadataResponseV12(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 12
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            CompactArray(
                ("node_id", Int32),
                ("host", CompactString("utf-8")),
                ("port", Int32),
                ("rack", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            CompactArray(
                ("error_code", Int16),
                ("name", CompactString("utf-8")),
                ("topic_id", _Uuid),
                ("is_internal", Boolean),
                (
                    "partitions",
                    CompactArray(
                        ("error_code", Int16),
                        ("partition_index", Int32),
                        ("leader_id", Int32),
                        ("leader_epoch", Int32),
                        ("replica_nodes", CompactArray(Int32)),
                        ("isr_nodes", CompactArray(Int32)),
                        ("offline_replicas", CompactArray(Int32)),
                        ("tags", TaggedFields),
                    ),
                ),
                ("topic_authorized_operations", Int32),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _MetadataRequestV12(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 12
    RESPONSE_TYPE = _MetadataResponseV12
    SCHEMA = Schema(
        (
            "topics",
            CompactArray(
                ("topic_id", _Uuid), ("name", CompactString("utf-8")), ("tags", TaggedFields)
            ),
        ),
        ("allow_auto_topic_creation", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _TopicMetadataRequest(Request[_MetadataRequestV12]):  # type: ignore[misc]
    """Metadata of one topic, never creating it."""

    API_KEY = 3

    def __init__(self, topic: str) -> None:
        self._topic = topic

    def build(self, request_struct_class: type[_MetadataRequestV12]) -> _MetadataRequestV12:
        return request_struct_class([(_ZERO_UUID, self._topic, {})], False, True, {})


@dataclass(frozen=True)
class PartitionReplicas:
    partition: int
    replicas: tuple[int, ...]
    in_sync: tuple[int, ...]


# Operations on a topic a process may need, by the bit of each (Kafka's AclOperation codes) in
# the topic's authorized operations that a Metadata answer carries.
READ = "Read"
WRITE = "Write"
_OPERATION_BITS = {READ: 3, WRITE: 4}
_OPERATIONS_UNKNOWN = -(2**31)  # what a broker answers when it does not say


@dataclass(frozen=True)
class TopicDescription:
    """A topic as the cluster describes it."""

    name: str
    topic_id: uuid.UUID
    partitions: tuple[PartitionReplicas, ...]
    brokers: int  # in the cluster
    authorized_operations: int = _OPERATIONS_UNKNOWN  # of the client that asked

    @property
    def replication_factor(self) -> int:
        return min((len(p.replicas) for p in self.partitions), default=0)

    def missing(self, operations: Collection[str]) -> list[str]:
        """Which of ``operations`` the client may not do on the topic (none when the broker
        does not say)."""
        if self.authorized_operations == _OPERATIONS_UNKNOWN:
            return []
        return [
            name
            for name in operations
            if not self.authorized_operations & (1 << _OPERATION_BITS[name])
        ]


async def describe_topic(admin: AIOKafkaAdminClient, topic: str) -> TopicDescription | None:
    """``topic`` as the cluster describes it, or None if it has no such topic."""
    # The admin client's own sender: it picks a broker and negotiates the version.
    try:
        response = await admin._send_request(_TopicMetadataRequest(topic))
    except (NotImplementedError, IncompatibleBrokerVersion):
        raise EnvironmentProblem(
            "the Kafka cluster does not answer Metadata requests of version 12 (topic ids, "
            "no auto-creation): it is older than Kafka 3.1; this service needs Kafka 3.1 or newer"
        ) from None
    answer = response.to_object()
    (found,) = answer["topics"]
    code = found["error_code"]
    if code == _UNKNOWN_TOPIC:
        return None
    if code == _TOPIC_AUTHORIZATION_FAILED:
        raise EnvironmentProblem(
            f"not allowed to describe topic {topic}: grant this client's principal Describe "
            "on it, or the Read that implies it (docs/operations.md, Kafka ACLs)"
        )
    if code != _NONE:
        raise EnvironmentProblem(
            f"cannot describe topic {topic}: Kafka error {code}; check the broker's log"
        )
    return TopicDescription(
        name=topic,
        topic_id=uuid.UUID(bytes=found["topic_id"]),
        partitions=tuple(
            PartitionReplicas(
                p["partition_index"], tuple(p["replica_nodes"]), tuple(p["isr_nodes"])
            )
            for p in sorted(found["partitions"], key=lambda p: p["partition_index"])
        ),
        brokers=len(answer["brokers"]),
        authorized_operations=found["topic_authorized_operations"],
    )


# -- what a topic must be ---------------------------------------------------------------------


def history_problems(config: Mapping[str, str]) -> list[str]:
    """What in a topic's ``config`` would delete or compact events."""
    problems = []
    for name, required in HISTORY_CONFIG.items():
        actual = config.get(name)
        if name == "cleanup.policy":
            if actual is not None and "compact" in actual:
                problems.append(f"cleanup.policy={actual}")
        elif actual is not None and actual != required:
            problems.append(f"{name}={actual}")
    return problems


def durability_problems(description: TopicDescription, config: Mapping[str, str]) -> list[str]:
    """What would let an acknowledged event be lost with one broker, on a cluster large enough
    to avoid it (``DURABLE_BROKERS``); nothing on a smaller one, which cannot do better."""
    if description.brokers < DURABLE_BROKERS:
        return []
    problems = []
    if description.replication_factor < DURABLE_BROKERS:
        problems.append(f"replication factor {description.replication_factor}")
    min_in_sync = int(config.get("min.insync.replicas", "1"))
    if min_in_sync < MIN_IN_SYNC:
        problems.append(f"min.insync.replicas={min_in_sync}")
    if config.get("unclean.leader.election.enable", "false").lower() == "true":
        problems.append("unclean.leader.election.enable=true")
    return problems


def min_in_sync_for(replication_factor: int) -> int:
    """The ``min.insync.replicas`` a new topic gets: two copies when it has three or more, so
    one broker may be away without stopping writes and an acknowledged event is never on one
    broker only."""
    return MIN_IN_SYNC if replication_factor >= DURABLE_BROKERS else 1


@dataclass(frozen=True)
class TopicFacts:
    """What a process learns of the topic it is about to use."""

    name: str
    topic_id: uuid.UUID
    partitions: int
    replication_factor: int
    min_in_sync: int
    brokers: int


async def _config(admin: AIOKafkaAdminClient, topic: str) -> dict[str, str]:
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    (resource,) = responses[0].to_object()["resources"]
    # A refusal comes back as an error code with no entries: checked as they are, they would
    # pass for a topic that keeps its history.
    if resource["error_code"] == _TOPIC_AUTHORIZATION_FAILED:
        raise EnvironmentProblem(
            f"not allowed to read the configuration of topic {topic}: grant this client's "
            "principal DescribeConfigs on it, which every process needs to check that the "
            "topic keeps its history (docs/operations.md, Kafka ACLs)"
        )
    if resource["error_code"] != _NONE:
        raise EnvironmentProblem(
            f"cannot read the configuration of topic {topic}: "
            f"{resource['error_message'] or 'Kafka error'} ({resource['error_code']})"
        )
    return {entry["config_names"]: entry["config_value"] for entry in resource["config_entries"]}


def _missing(topic: str, kafka: KafkaTarget) -> TopicMissing:
    return TopicMissing(
        f"no topic {topic} at {connection(kafka).bootstrap_servers}: create it with "
        f"`orders topic create` (ORDERS_TOPIC={topic}), or fix ORDERS_TOPIC or "
        "KAFKA_BOOTSTRAP_SERVERS if it exists elsewhere"
    )


async def _verified(
    admin: AIOKafkaAdminClient,
    description: TopicDescription,
    *,
    allow_deleting: bool,
    allow_undurable: bool,
) -> TopicFacts:
    topic = description.name
    config = await _config(admin, topic)
    problems = history_problems(config)
    if problems:
        message = (
            f"topic {topic} would lose history ({', '.join(problems)}); the events topic is "
            "the source of truth and needs retention.ms=-1, retention.bytes=-1 and "
            "cleanup.policy=delete. Fix it with kafka-configs.sh --alter, or set "
            "ORDERS_ALLOW_DELETING_TOPIC=1 to start anyway"
        )
        if not allow_deleting:
            raise TopicWouldLoseHistory(message)
        _log.warning("starting despite an unsafe topic: %s", message)
    problems = durability_problems(description, config)
    if problems:
        message = (
            f"topic {topic} is not durable on a cluster of {description.brokers} brokers "
            f"({', '.join(problems)}): an acknowledged event could live on one broker only. "
            f"It needs replication factor {DURABLE_BROKERS} or more, min.insync.replicas="
            f"{MIN_IN_SYNC} or more and unclean.leader.election.enable=false; fix it with "
            "kafka-configs.sh --alter (and kafka-reassign-partitions.sh for the replicas), or "
            "set ORDERS_ALLOW_UNDURABLE_TOPIC=1 to start anyway"
        )
        if not allow_undurable:
            raise TopicNotDurable(message)
        _log.warning("starting despite an undurable topic: %s", message)
    return TopicFacts(
        name=topic,
        topic_id=description.topic_id,
        partitions=len(description.partitions),
        replication_factor=description.replication_factor,
        min_in_sync=int(config.get("min.insync.replicas", "1")),
        brokers=description.brokers,
    )


class TopicAccessMissing(EnvironmentProblem):
    """The client's principal may not do on the events topic what its process needs."""


def _access_missing(kafka: KafkaTarget, topic: str, missing: list[str]) -> TopicAccessMissing:
    target = connection(kafka)
    user = target.security.sasl_username
    principal = f"User:{user}" if user else "this client's principal"
    return TopicAccessMissing(
        f"Kafka at {target.bootstrap_servers} does not allow {principal} to "
        f"{' or '.join(missing)} topic {topic}: grant it {' and '.join(missing)} on that topic "
        "(docs/operations.md, Kafka ACLs)"
    )


async def check_topic(
    kafka: KafkaTarget,
    topic: str,
    *,
    needs: Collection[str] = (),
    allow_deleting: bool = False,
    allow_undurable: bool = False,
) -> TopicFacts:
    """The events topic, checked to keep its history and enough copies, and to allow this
    client the operations it ``needs`` (``READ``, ``WRITE``); ``TopicMissing`` when there is
    none (it is never created here)."""
    admin = admin_client(kafka)
    await admin.start()
    try:
        description = await describe_topic(admin, topic)
        if description is None:
            raise _missing(topic, kafka)
        missing = description.missing(needs)
        if missing:
            raise _access_missing(kafka, topic, missing)
        return await _verified(
            admin, description, allow_deleting=allow_deleting, allow_undurable=allow_undurable
        )
    finally:
        await admin.close()


@dataclass(frozen=True)
class TopicCreation:
    facts: TopicFacts
    created: bool  # False: it existed already


async def create_topic(
    kafka: KafkaTarget,
    topic: str,
    *,
    partitions: int,
    replication_factor: int | None = None,
    allow_deleting: bool = False,
    allow_undurable: bool = False,
) -> TopicCreation:
    """Create the events topic (infinite retention; ``replication_factor`` copies, by default
    as many as the cluster has up to three; ``min_in_sync_for`` that), or check the one there.

    A topic that appeared meanwhile (``TOPIC_ALREADY_EXISTS``: another creator, or a broker
    that auto-created it) is checked like any existing one, never reported as created.
    """
    admin = admin_client(kafka)
    await admin.start()
    try:
        description, created = await _created(
            admin, topic, partitions, replication_factor, HISTORY_CONFIG
        )
        facts = await _verified(
            admin, description, allow_deleting=allow_deleting, allow_undurable=allow_undurable
        )
        return TopicCreation(facts, created)
    finally:
        await admin.close()


def state_topic_for(topic: str) -> str:
    """The name of the writer's changelog of ``topic`` (``service.write.snapshots``)."""
    return f"{topic}.writer-state"


async def create_state_topic(
    kafka: KafkaTarget, topic: str, *, partitions: int, replication_factor: int | None = None
) -> bool:
    """Create the writer's changelog ``topic``: compacted (the latest state of each order is
    all it needs), with the events topic's ``partitions``; True if it was created, False if it
    existed already with that many partitions (else ``EnvironmentProblem``)."""
    admin = admin_client(kafka)
    await admin.start()
    try:
        description, created = await _created(
            admin, topic, partitions, replication_factor, {"cleanup.policy": "compact"}
        )
        if len(description.partitions) != partitions:
            raise EnvironmentProblem(
                f"{topic} has {len(description.partitions)} partitions, not {partitions} as the "
                "events topic: delete it and run `orders topic create` again"
            )
        return created
    finally:
        await admin.close()


async def _created(
    admin: AIOKafkaAdminClient,
    topic: str,
    partitions: int,
    replication_factor: int | None,
    config: Mapping[str, str],
) -> tuple[TopicDescription, bool]:
    """``topic`` as it is, or created with ``config``, ``replication_factor`` copies (by default
    as many as the cluster has, up to three) and ``min_in_sync_for`` that; and whether this
    created it. One that appeared meanwhile (``TOPIC_ALREADY_EXISTS``: another creator, or a
    broker that auto-created it) is returned as it is, never reported as created."""
    description = await describe_topic(admin, topic)
    if description is not None:
        return description, False
    brokers = len((await admin.describe_cluster())["brokers"])
    replicas = replication_factor or min(DURABLE_BROKERS, brokers)
    settings = {
        **config,
        "min.insync.replicas": str(min_in_sync_for(replicas)),
        "unclean.leader.election.enable": "false",
    }
    response = await admin.create_topics(
        [NewTopic(topic, partitions, replicas, topic_configs=settings)]
    )
    error = response.to_object()["topic_errors"][0]
    if error["error_code"] not in (_NONE, _TOPIC_ALREADY_EXISTS):
        raise EnvironmentProblem(
            f"could not create topic {topic}: {error['error_message'] or 'Kafka error'} "
            f"({error['error_code']})"
        )
    return await _wait_for_partitions(admin, topic), error["error_code"] == _NONE


async def _wait_for_partitions(admin: AIOKafkaAdminClient, topic: str) -> TopicDescription:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        description = await describe_topic(admin, topic)
        if description is not None and description.partitions:
            return description
        await asyncio.sleep(0.1)  # pacing between metadata polls
    raise EnvironmentProblem(f"topic {topic} was created but its partitions never appeared")


async def look_up_topic(kafka: KafkaTarget, topic: str) -> TopicDescription | None:
    """``describe_topic`` through an admin client of its own: None if there is no such topic;
    raises, saying which ACL to grant, if it exists but Kafka's ACLs hide it from this client
    (rather than let it pass for a missing one)."""
    admin = admin_client(kafka)
    await admin.start()
    try:
        return await describe_topic(admin, topic)
    finally:
        await admin.close()


async def topic_partitions(kafka: KafkaTarget, topic: str) -> list[int]:
    """The partition ids of ``topic``; ``TopicMissing`` if there is no such topic."""
    description = await look_up_topic(kafka, topic)
    if description is None:
        raise _missing(topic, kafka)
    return [p.partition for p in description.partitions]


def describe_facts(facts: TopicFacts) -> str:
    """One line an operator reads: what the topic is."""
    return (
        f"{facts.partitions} partitions, replication factor {facts.replication_factor}, "
        f"min.insync.replicas {facts.min_in_sync}, infinite retention, on {facts.brokers} "
        f"broker{'s' if facts.brokers != 1 else ''} (topic id {facts.topic_id})"
    )
