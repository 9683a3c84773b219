"""Partition ownership: several ``orders api`` instances share the topic's partitions, each
deciding only for the orders of the partitions it owns (the way Kafka Streams splits tasks).

How one writer per partition is kept (docs/scaling.md):

* Each partition has a writer of its own (``service.write.writer.Writer`` on that partition
  alone) with a transactional id of its own, ``<prefix>-<topic>-<partition>``. Starting it runs
  ``init_transactions`` for that id before anything is read: the previous owner's producer of
  the partition is fenced, and its open transaction aborted, before the new owner reads the
  partition's state. From then on only the new owner can commit to the partition. The group
  decides who *should* own a partition; fencing decides who *can*, whatever the group's timing.
* The group is a Kafka consumer group, ``<group>.<topic>``, subscribed to the events topic but
  reading nothing (every partition it is given stays paused). Its leader assigns the partitions
  (``assign_partitions``): each member keeps what it owns up to an even share, the rest goes to
  the members below theirs. Every member advertises the address other instances reach it at
  in its group metadata, and the assignment hands every member the whole map of owners: a
  command for a partition owned elsewhere is forwarded there (``OwnedElsewhere``).
* aiokafka's rebalancing is eager (each member gives up everything before it rejoins), but a
  writer here goes on deciding until an assignment without its partition arrives: a partition
  that stays with its owner never pauses. A partition that moves answers 503 + Retry-After
  (``PartitionMoving``) until its new owner has read its state.
* A writer fenced while its partition is still assigned here (another instance, acting on an
  older assignment, took it) is not taken back at once, which could fence the other in turn,
  again and again: the next assignment, which every rejoin brings to every member, decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from service.infra.eventlog import partition_for
from service.infra.kafka_clients import client_options
from service.infra.topic import READ, WRITE, check_topic
from service.kernel.errors import EnvironmentProblem
from service.write.contract import Accepted, CommandRequest, WriterConfig, WriterUnavailable
from service.write.visibility import StableOffsets
from service.write.writer import Writer, WriterState

_log = logging.getLogger(__name__)

# What retrying does not mend: the instance does not start (or, later, the partition waits).
_NEEDS_AN_OPERATOR = (
    EnvironmentProblem,
    TransactionalIdAuthorizationFailed,
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
)

# A partition whose writer could not start (broker away) is tried again after this long,
# doubling up to the maximum.
_RETRY_S, _MAX_RETRY_S = 0.5, 5.0


class OwnedElsewhere(WriterUnavailable):
    """The command's partition is owned by another instance, at ``owner``: forward it there.
    (Not forwarded, it is a 503 with Retry-After, like a partition that moves.)"""

    def __init__(self, partition: int, owner: str) -> None:
        super().__init__(
            f"partition {partition} is owned by the instance at {owner}: try again shortly"
        )
        self.partition = partition
        self.owner = owner


class PartitionMoving(WriterUnavailable):
    """The command's partition is between owners: nothing of the command was decided here."""

    def __init__(self, partition: int, detail: str = "") -> None:
        super().__init__(
            f"partition {partition} is moving between instances{detail}: retry shortly "
            "(with the same Idempotency-Key)"
        )
        self.partition = partition


def transactional_id_for(prefix: str, topic: str, partition: int | None = None) -> str:
    """The transactional id of the writer of ``partition`` (None: of a writer of every
    partition, as one instance alone runs): whoever starts it fences the last."""
    return f"{prefix}-{topic}" if partition is None else f"{prefix}-{topic}-{partition}"


def group_for(prefix: str, topic: str) -> str:
    """The consumer group the writers of ``topic`` share partitions through."""
    return f"{prefix}.{topic}"


def assign_partitions(partitions: int, owned: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Each member's partitions: an even share (sizes differ by at most one), each member
    keeping as much of what it owns (``owned``) as its share allows, so that a rebalance moves
    as few partitions as it can. Pure and deterministic: the same claims, the same answer."""
    # Those that own the most get the larger shares first, then by member id.
    members = sorted(owned, key=lambda member: (-len(owned[member]), member))
    if not members:
        return {}
    base, larger = divmod(partitions, len(members))
    room = {member: base + (1 if i < larger else 0) for i, member in enumerate(members)}
    shares: dict[str, list[int]] = {member: [] for member in members}
    free = set(range(partitions))
    for member in members:
        for partition in sorted(set(owned[member])):
            if partition in free and len(shares[member]) < room[member]:
                shares[member].append(partition)
                free.discard(partition)
    for partition in sorted(free):
        member = min(members, key=lambda m: (len(shares[m]) - room[m], members.index(m)))
        shares[member].append(partition)
    return {member: sorted(share) for member, share in shares.items()}


class _OwnershipAssignor:
    """The group's assignment strategy (aiokafka calls ``metadata`` when this member joins,
    ``assign`` on the leader, ``on_assignment`` with this member's share)."""

    name = "orders-writers"
    version = 0

    def __init__(self, topic: str, address: str, owned: Callable[[], list[int]]) -> None:
        self.topic = topic
        self.address = address
        self._owned = owned
        # Partition -> the address of its owner, as the last assignment said.
        self.owners: dict[int, str] = {}

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        claim = {"address": self.address, "owned": self._owned()}
        return ConsumerProtocolMemberMetadata(
            self.version, sorted(topics), json.dumps(claim).encode()
        )

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        claims = {member: json.loads(meta.user_data) for member, meta in members.items()}
        addresses = [claim["address"] for claim in claims.values()]
        for address in {a for a in addresses if addresses.count(a) > 1}:
            _log.error(
                "%d instances advertise %s: commands forwarded there reach only one of them "
                "(and the others' partitions answer 503); give each its own "
                "ORDERS_ADVERTISED_URL",
                addresses.count(address),
                address,
            )
        count = len(cluster.partitions_for_topic(self.topic) or ())
        shares = assign_partitions(count, {m: claim["owned"] for m, claim in claims.items()})
        owners = {p: claims[m]["address"] for m, share in shares.items() for p in share}
        user_data = json.dumps({"owners": owners}).encode()
        return {
            member: ConsumerProtocolMemberAssignment(self.version, [(self.topic, share)], user_data)
            for member, share in shares.items()
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        owners = json.loads(assignment.user_data)["owners"]
        self.owners = {int(p): address for p, address in owners.items()}


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, group: WriterGroup) -> None:
        self._group = group

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """The writers that decide go on until an assignment takes their partitions away;
        those still starting stop (their partitions are taken again if assigned again)."""
        self._group.rebalancing()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._group.assigned({tp.partition for tp in assigned})


class WriterGroup:
    """This instance's share of the write side: a writer per partition it owns, and the map
    of who owns the others. Use like a ``Writer``: ``start``, ``submit``, ``stop``."""

    def __init__(self, config: WriterConfig, *, group_prefix: str, address: str) -> None:
        self.config = config
        self.group = group_for(group_prefix, config.topic)
        self.address = address
        self.partition_count = 0
        self._writers: dict[int, Writer] = {}
        self._starting: dict[Writer, asyncio.Task[None]] = {}
        self._stopping: dict[int, asyncio.Task[None]] = {}
        self._assignor = _OwnershipAssignor(config.topic, address, self.owned)
        self._consumer: AIOKafkaConsumer | None = None
        # One watcher of last stable offsets for all of this instance's writers.
        self._stable_offsets = StableOffsets(config.kafka, config.topic)
        self._polling: asyncio.Task[None] | None = None
        self._first_assignment = asyncio.Event()
        self._started = False
        self._stopped = False

    def owned(self) -> list[int]:
        """The partitions this instance holds a writer for (not one fenced)."""
        return sorted(p for p, w in self._writers.items() if not w.fenced)

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the group; return once the partitions of the first assignment are taken."""
        topic = await check_topic(
            self.config.kafka,
            self.config.topic,
            needs=(READ, WRITE),
            allow_deleting=self.config.allow_deleting_topic,
            allow_undurable=self.config.allow_undurable_topic,
        )
        self.partition_count = topic.partitions
        await self._stable_offsets.start()
        consumer = AIOKafkaConsumer(
            **client_options(self.config.kafka),
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            partition_assignment_strategy=(self._assignor,),
            # A member that stops heartbeating loses its partitions after this long.
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            rebalance_timeout_ms=30_000,
        )
        consumer.subscribe([self.config.topic], listener=_Rebalance(self))
        await consumer.start()
        self._consumer = consumer
        self._polling = asyncio.create_task(self._keep_polling(), name="writer-group")
        waiting = asyncio.create_task(self._first_assignment.wait())
        done, _ = await asyncio.wait({waiting, self._polling}, return_when="FIRST_COMPLETED")
        if self._polling in done:
            waiting.cancel()
            self._polling.result()
        # The first share is taken before the instance says it is ready; a writer that cannot
        # start because of how Kafka is set up stops the instance, with that problem.
        outcomes = await asyncio.gather(*self._starting.values(), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome  # the first; every task's outcome was retrieved
        self._started = True

    async def _keep_polling(self) -> None:
        """Stay in the group: a member that does not poll for ``max_poll_interval`` leaves it.
        Every partition is paused, so nothing is fetched."""
        consumer = self._consumer
        assert consumer is not None
        while True:
            await consumer.getmany(timeout_ms=1000)

    async def stop(self, *, timeout: float = 20.0) -> None:
        """Stop every writer (each finishes its batch in flight), then leave the group, so that
        the others take the partitions at once rather than after the session timeout."""
        self._stopped = True
        for task in self._starting.values():
            task.cancel()
        writers, self._writers = self._distinct_writers(), {}
        await asyncio.gather(
            *(writer.stop(timeout=timeout) for writer in writers),
            *self._stopping.values(),
            return_exceptions=True,
        )
        if self._polling is not None:
            self._polling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._polling
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        await self._stable_offsets.stop()

    # -- the assignment -------------------------------------------------------------------------

    def assigned(self, partitions: set[int]) -> None:
        """A new assignment: release the writers of the partitions it does not list, take the
        partitions it adds (and those whose writer was fenced: this assignment is newer).

        An instance given every partition runs ONE writer for all of them (one transaction per
        batch, whatever the partitions: as fast as a single writer); otherwise one writer per
        partition. Going from one layout to the other releases every writer, then takes."""
        consumer = self._consumer
        if consumer is not None:
            consumer.pause(*(TopicPartition(self.config.topic, p) for p in partitions))
        if self._stopped:
            return
        whole = partitions == set(range(self.partition_count))
        for writer in self._distinct_writers():
            other_layout = (writer.config.partitions is None) is not whole
            taken_away = not set(self._partitions_of(writer)) <= partitions
            if other_layout or taken_away or writer.fenced:
                self._release(writer)
        if whole and not self._writers:
            self._take(sorted(partitions))
        elif not whole:
            for partition in sorted(partitions - set(self._writers)):
                self._take([partition])
        _log.info(
            "writer group %s: this instance owns partitions %s",
            self.group,
            sorted(partitions),
            extra={"owners": self._assignor.owners},
        )
        self._first_assignment.set()

    def rebalancing(self) -> None:
        """Stop taking partitions until the next assignment: a writer that started after
        its partition went to another member would fence the new owner."""
        if self._started:
            for writer in list(self._starting):
                self._release(writer)

    def _distinct_writers(self) -> list[Writer]:
        return list(dict.fromkeys(self._writers.values()))

    def _partitions_of(self, writer: Writer) -> list[int]:
        return [p for p, w in self._writers.items() if w is writer]

    def _release(self, writer: Writer) -> None:
        partitions = self._partitions_of(writer)
        for partition in partitions:
            del self._writers[partition]
        starting = self._starting.pop(writer, None)
        if starting is not None:
            starting.cancel()
        _log.info("writer group %s: releasing partitions %s", self.group, partitions)
        stopping = asyncio.create_task(self._stop_writer(writer, starting), name="release")
        for partition in partitions:
            self._stopping[partition] = stopping

    async def _stop_writer(self, writer: Writer, starting: asyncio.Task[None] | None) -> None:
        try:
            if starting is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await starting
            await writer.stop()
        finally:
            for partition, task in list(self._stopping.items()):
                if task is asyncio.current_task():
                    del self._stopping[partition]

    def _take(self, partitions: list[int]) -> None:
        """Start a writer for ``partitions``: all of them (its transactional id is the topic's,
        and it fences every partition's), or one (its own id; it fences the topic's)."""
        prefix, topic = self.config.transactional_id, self.config.topic
        if len(partitions) == self.partition_count:
            config = replace(
                self.config,
                transactional_id=transactional_id_for(prefix, topic),
                partitions=None,
                fences=tuple(transactional_id_for(prefix, topic, p) for p in partitions),
            )
        else:
            [partition] = partitions
            config = replace(
                self.config,
                transactional_id=transactional_id_for(prefix, topic, partition),
                partitions=frozenset(partitions),
                fences=(transactional_id_for(prefix, topic),),
            )
        writer = Writer(config, stable_offsets=self._stable_offsets)
        for partition in partitions:
            self._writers[partition] = writer
        self._starting[writer] = asyncio.create_task(
            self._start_writer(partitions, writer), name=f"take-{partitions}"
        )

    async def _start_writer(self, partitions: list[int], writer: Writer) -> None:
        """Start the writer (fencing the last owners of its partitions), retrying while the
        broker is away and the partitions are still this instance's."""
        releasing = {self._stopping[p] for p in partitions if p in self._stopping}
        if releasing:  # this instance's own last writers of them, stopping
            await asyncio.wait(releasing)
        delay = _RETRY_S
        try:
            while self._writers.get(partitions[0]) is writer:
                try:
                    await writer.start()
                except _NEEDS_AN_OPERATOR as problem:
                    if not self._started:
                        raise  # the instance does not start: Kafka must be set up first
                    _log.error("cannot take partitions %s: %s", partitions, problem)
                    return  # they answer 503 until the problem is fixed and they move again
                except Exception as error:
                    _log.warning(
                        "could not take partitions %s (%r); retrying in %.1fs",
                        partitions,
                        error,
                        delay,
                    )
                    await asyncio.sleep(delay)  # back-off while the broker is away
                    delay = min(delay * 2, _MAX_RETRY_S)
                    continue
                self._log_takeover(partitions, writer)
                return
        finally:
            if self._starting.get(writer) is asyncio.current_task():
                del self._starting[writer]

    def _log_takeover(self, partitions: list[int], writer: Writer) -> None:
        """One line per partition taken, with every transactional id the taking fenced and the
        epoch it got: each later takeover of the partition must show higher ones."""
        epochs = {writer.config.transactional_id: writer.epoch, **writer.fenced_epochs}
        prefix, topic = self.config.transactional_id, self.config.topic
        for partition in partitions:
            ids = (
                transactional_id_for(prefix, topic),
                transactional_id_for(prefix, topic, partition),
            )
            _log.info(
                "took partition %d with transactional id %s (epoch %d): %d events and %d "
                "changelog records read in %.2fs",
                partition,
                writer.config.transactional_id,
                writer.epoch,
                writer.loaded_events,
                writer.loaded_state_records,
                writer.load_seconds,
                extra={
                    "partition": partition,
                    "transactional_id": writer.config.transactional_id,
                    "epochs": {tid: epochs[tid] for tid in ids},
                },
            )

    # -- commands -------------------------------------------------------------------------------

    async def submit(self, request: CommandRequest) -> Accepted:
        """Decide and append the command on its partition's writer here (``Writer.submit``);
        ``OwnedElsewhere`` if another instance owns the partition, ``PartitionMoving`` while
        nobody does."""
        order_id = request.command.order_id
        partition = partition_for(order_id.encode(), self.partition_count or 1)
        writer = self._writers.get(partition)
        if writer is None or writer.fenced:
            owner = self._assignor.owners.get(partition)
            if owner is not None and owner != self.address and writer is None:
                raise OwnedElsewhere(partition, owner)
            raise PartitionMoving(partition)
        try:
            return await writer.submit(request)
        except WriterUnavailable as error:
            if writer.fenced:
                raise PartitionMoving(
                    partition, ": the command may not have been recorded"
                ) from error
            raise

    # -- what health, readiness and metrics read ------------------------------------------------

    @property
    def state_name(self) -> str:
        if self._stopped:
            return WriterState.STOPPED.value
        if not self._started:
            return WriterState.STARTING.value
        if any(writer.fenced for writer in self._writers.values()):
            return WriterState.FENCED.value  # until the next assignment moves the partition
        if all(writer.ready for writer in self._writers.values()):
            return WriterState.READY.value
        return WriterState.RECOVERING.value

    @property
    def ready(self) -> bool:
        """Ready once the first share is taken: from then on every command is decided here,
        forwarded, or answered 503 while its partition moves."""
        return self._started and not self._stopped

    @property
    def deciding_partitions(self) -> list[int]:
        return sorted(p for p, writer in self._writers.items() if writer.ready)

    @property
    def queue_depth(self) -> int:
        return sum(writer.queue_depth for writer in self._distinct_writers())

    @property
    def orders_held(self) -> int:
        return sum(writer.orders_held for writer in self._distinct_writers())

    @property
    def idempotency_keys_held(self) -> int:
        return sum(writer.idempotency_keys_held for writer in self._distinct_writers())

    @property
    def loaded_events(self) -> int:
        return sum(writer.loaded_events for writer in self._distinct_writers())

    @property
    def load_seconds(self) -> float:
        return max((writer.load_seconds for writer in self._distinct_writers()), default=0.0)
