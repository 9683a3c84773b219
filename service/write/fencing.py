"""Reopening a transactional producer without fencing a newer writer (Kafka's KIP-360).

A transactional producer's start (``InitProducerId``) fences every earlier producer with its
transactional id. That is how a new writer takes over; but a writer reopening its producer
after a failure would, the same way, fence the writer that took over meanwhile, and then write
again: the old writer would win back the log from the new one.

So a writer that reopens sends the producer id and epoch it last held (``InitProducerId`` v3).
The transaction coordinator then bumps the epoch only if nobody else has initialised the
transactional id since, and otherwise answers ``INVALID_PRODUCER_EPOCH`` and fences nobody.
A retry after a lost answer is recognised by the coordinator and gets the same epoch.

aiokafka sends only ``InitProducerId`` v0, so the request is defined here and handed to the
producer's sender in place of its own (aiokafka is pinned to a minor version: the sender's
``_do_init_pid`` and transaction manager are the seams used).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.producer.sender import InitPIDHandler
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import CompactString, Int16, Int32, Int64, Schema, TaggedFields

from service.infra.kafka_clients import KafkaTarget, client_options


class ProducerIdentity(NamedTuple):
    """What a transactional producer holds once started: its producer id and epoch."""

    producer_id: int
    epoch: int


class _InitProducerIdResponseV3(Response):  # type: ignore[misc]
    API_KEY = 22
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


class _InitProducerIdRequestV3(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 22
    API_VERSION = 3
    RESPONSE_TYPE = _InitProducerIdResponseV3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("transaction_timeout_ms", Int32),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


class _ResumeProducerId(Request[_InitProducerIdRequestV3]):  # type: ignore[misc]
    API_KEY = 22

    def __init__(self, transactional_id: str, timeout_ms: int, held: ProducerIdentity) -> None:
        self._fields = (transactional_id, timeout_ms, held.producer_id, held.epoch)

    def build(
        self, request_struct_class: type[_InitProducerIdRequestV3]
    ) -> _InitProducerIdRequestV3:
        return request_struct_class(*self._fields, {})


class _ResumeHandler(InitPIDHandler):  # type: ignore[misc]
    """aiokafka's handler (same answers, same retries), sending the identity last held."""

    def __init__(self, sender: Any, held: ProducerIdentity) -> None:
        super().__init__(sender)
        self._held = held

    def create_request(self) -> _ResumeProducerId:
        manager = self._sender._txn_manager
        return _ResumeProducerId(
            manager.transactional_id, manager.transaction_timeout_ms, self._held
        )


def resume(producer: AIOKafkaProducer, held: ProducerIdentity) -> None:
    """Make ``producer.start()`` take its transactional id over only from ``held``.

    Call before ``start()``. If another producer has initialised the id since, ``start()``
    raises ``InvalidProducerEpoch`` (or ``ProducerFenced``) and that producer is untouched.
    """
    sender = producer._sender

    async def init_as_held(node_id: int) -> bool:
        done: bool = await _ResumeHandler(sender, held).do(node_id)
        return done

    sender._do_init_pid = init_as_held


def identity_of(producer: AIOKafkaProducer) -> ProducerIdentity:
    """The producer id and epoch a started transactional producer holds."""
    held = producer._txn_manager._pid_and_epoch
    return ProducerIdentity(held.pid, held.epoch)


async def fence(kafka: KafkaTarget, transactional_ids: Iterable[str]) -> dict[str, int]:
    """Fence whoever holds one of ``transactional_ids`` (its open transaction is aborted, its
    next request refused) by initialising each with a producer of our own, closed at once; the
    epoch each id got. Used by a writer that takes partitions another kind of writer (with
    another transactional id) may still be writing (``service.write.ownership``)."""

    async def one(transactional_id: str) -> tuple[str, int]:
        producer = AIOKafkaProducer(
            **client_options(kafka), transactional_id=transactional_id, enable_idempotence=True
        )
        try:
            await producer.start()
            return transactional_id, identity_of(producer).epoch
        finally:
            await producer.stop()

    return dict(await asyncio.gather(*(one(tid) for tid in transactional_ids)))
