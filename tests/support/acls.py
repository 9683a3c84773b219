"""Kafka ACLs for tests of a secured broker, granted the way ``kafka-acls.sh --add`` grants them
(a CreateAcls request, sent by a super user). The service never grants ACLs: operators do
(docs/operations.md, Kafka ACLs)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from aiokafka.errors import for_code
from aiokafka.protocol.admin import CreateAclsRequest

from service.infra.kafka_clients import KafkaTarget, admin_client


class Resource(enum.IntEnum):
    TOPIC = 2
    GROUP = 3
    CLUSTER = 4
    TRANSACTIONAL_ID = 5


class Pattern(enum.IntEnum):
    LITERAL = 3
    PREFIXED = 4


class Operation(enum.IntEnum):
    READ = 3
    WRITE = 4
    CREATE = 5
    DESCRIBE = 8
    DESCRIBE_CONFIGS = 10
    IDEMPOTENT_WRITE = 12


_ALLOW = 3
CLUSTER_NAME = "kafka-cluster"  # the one name the cluster resource has


@dataclass(frozen=True)
class Acl:
    """``User:<user>`` may do ``operation`` on ``resource`` ``name`` (from any host)."""

    user: str
    operation: Operation
    resource: Resource
    name: str
    pattern: Pattern = Pattern.LITERAL


async def grant(kafka: KafkaTarget, acls: list[Acl]) -> None:
    """Create each of ``acls``; ``kafka`` logs in as a super user."""
    admin = admin_client(kafka)
    await admin.start()
    try:
        for acl in acls:
            response = await admin._send_request(
                CreateAclsRequest(
                    acl.resource,
                    acl.name,
                    acl.pattern,
                    f"User:{acl.user}",
                    "*",
                    acl.operation,
                    _ALLOW,
                )
            )
            ((code, message),) = response.creation_responses
            if code != 0:
                raise for_code(code)(f"granting {acl}: {message}")
    finally:
        await admin.close()
