"""Applying one projection's share of a batch: its rows and its checkpoints in ONE
Postgres transaction (design.md, invariant 6), the event at fault found and halted at when
the fold or the database refuses it (invariant 7).

Each transaction first locks its versions' registry rows (``FOR SHARE``): a rebuild switches
versions between transactions, and one that finds its version switched raises
``VersionsChanged`` for the runner to follow. Its checkpoint moves are compare-and-set, and
an instance that lost the partition (a zombie) rolls back on ``StaleCheckpoint``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from projections import metrics
from projections.batches import Group, Halt, Plan, Raw, Traced, split_parked
from projections.bookkeeping.checkpoints import (
    StaleCheckpoint,
    advance_checkpoints,
    read_checkpoints,
)
from projections.bookkeeping.halts import clear_halts, store_halt, stored_halts
from projections.bookkeeping.parked import parked_counts, parked_orders, set_aside
from projections.bookkeeping.registry import share_version_states
from projections.halts import Bisection
from projections.partitions import Partitions
from projections.projection import Applied, Db, Projection, State, Target, begin, store
from projections.spans import TransactionSpans
from projections.versions import building as building_target
from projections.versions import live_targets
from service.infra.database import (
    EncodingRefused,
    connection_lost,
    refused_by_environment,
    sqlstate,
)

_log = logging.getLogger(__name__)


def transient(error: BaseException) -> bool:
    """A database error worth retrying: lost connection, deadlock, shutdown, no resources, or
    a database that refuses the work (read-only, a privilege missing: ``refused_by_environment``),
    which is the environment's problem, never an event's: no halt, no parking.

    A lost connection (``connection_lost``) includes one left out of step by a server that
    went away mid-statement: ``begin`` discards it, and the retry gets a fresh one."""
    return (
        connection_lost(error)
        or refused_by_environment(error)
        or sqlstate(error)[:2] in {"40", "53", "57"}
    )


class VersionsChanged(Exception):
    """A version this runner applies to is no longer in the state it runs for (a switch)."""


class _FoldFailed(Exception):
    """A fold refused an event. Private control flow: raised out of a transaction (to roll it
    back) and caught by ``Applier.commit``, which halts at the event; never leaves this module."""

    def __init__(self, applied: Applied, reason: str) -> None:
        super().__init__(reason)
        self.applied = applied
        self.reason = reason


def _context(target: Target, applied: Applied) -> dict[str, object]:
    """What a log line about one event carries: where it is, its order, its correlation id."""
    return {
        "projection": target.name,
        "partition": applied.partition,
        "offset": applied.offset,
        "order_id": applied.envelope.order_id,
        "correlation_id": applied.envelope.correlation_id,
    }


def _fold(target: Target, state: State, events: Sequence[Applied]) -> None:
    fold = target.projection.fold
    for applied in events:
        try:
            fold(state, applied)
        except Exception as error:  # a handler bug must halt, not vanish
            raise _FoldFailed(applied, f"{type(error).__name__}: {error}") from error


async def targets_of(
    engine: AsyncEngine, projections: Sequence[Projection], *, building: bool
) -> list[Target]:
    """The versions to apply to: the live ones, or (``building``) those being built; raises
    ``VersionsChanged`` when none is being built (any more)."""
    async with begin(engine) as connection:
        if not building:
            return await live_targets(connection, projections)
        found = [await building_target(connection, p) for p in projections]
    targets = [t for t in found if t is not None]
    if not targets:
        names = ", ".join(p.name for p in projections)
        raise VersionsChanged(f"no version of {names} is being built")
    return targets


@dataclass
class RunnerStats:
    batches: int = 0
    events: int = 0
    rows_written: int = 0
    stale_batches: int = 0


@dataclass
class Applier:
    """The runner's database side: commits one projection's groups of a batch (halting where
    an event is refused), reads checkpoints to seek to, stores and lifts halts.

    ``partitions`` and ``stats`` are the runner's, kept up to date here; ``halt`` records a
    halt (and pauses the partition once every projection halted there)."""

    engine: AsyncEngine
    topic: str
    building: bool
    partitions: Partitions
    stats: RunnerStats
    halt: Callable[[Halt], None]

    async def apply(
        self, planned: Plan, *, copy: bool, traced: Traced | None = None
    ) -> tuple[list[int], list[BaseException]]:
        """Commit each projection's groups of ``planned`` in ONE transaction, side by side on
        their own connections (Postgres writes one projection's rows while this process folds
        another's). Each stands alone: its checkpoints move with its rows, and a query waits on
        the checkpoint of the projection it reads.

        Returns the errors of the projections that failed, and the partitions to seek again:
        the halts a failed projection found meanwhile are undone (its retry finds them again).
        ``traced``: the batch's traced records, whose spans its transactions continue.
        """
        by_projection = planned.by_projection()
        halted_before = dict(self.partitions.halted)
        outcomes = await asyncio.gather(
            *(
                self.commit(part, planned.raw, copy=copy, traced=traced)
                for part in by_projection.values()
            ),
            return_exceptions=True,
        )
        failed: set[str] = set()
        errors: list[BaseException] = []
        for name, outcome in zip(by_projection, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failed.add(name)
                errors.append(outcome)
                if isinstance(outcome, StaleCheckpoint):
                    metrics.series(name).conflicts.inc()
            else:
                applied = self.partitions.moved(outcome)
                self.stats.events += applied
                metrics.series(name).applied.inc(applied)
        self.stats.batches += 1
        if not errors:
            return [], []
        return self.partitions.undo_halts(halted_before, failed), errors

    async def commit(
        self, groups: list[Group], raw: Raw, *, copy: bool, traced: Traced | None = None
    ) -> list[Group]:
        """Apply one projection's groups; returns those that committed (some perhaps cut
        short by a halt). See ``halts.Bisection`` for the order in which they are tried."""
        bisection = Bisection(groups, self.partitions.halted)
        while (part := bisection.next()) is not None:
            try:
                with metrics.transaction(part):
                    await self._transaction(part, raw, copy, traced)
                bisection.succeeded(part)
            except _FoldFailed as failed:
                self.halt(bisection.fold_failed(part, failed.applied, failed.reason))
            except (asyncpg.PostgresError, DBAPIError, EncodingRefused) as error:
                if transient(error) or not Bisection.blames_an_event(part):
                    raise  # a bare checkpoint move refused is no event's fault
                halt = bisection.refused(part, f"the database refused it: {error}")
                if halt is not None:
                    self.halt(halt)
        return bisection.committed

    async def _transaction(
        self, groups: list[Group], raw: Raw, copy: bool, traced: Traced | None
    ) -> None:
        targets = {g.target.name: g.target for g in groups}
        spans = TransactionSpans(self.topic, groups, traced)  # nothing while tracing is off
        async with spans, begin(self.engine) as connection:
            await self.check_versions(connection, list(targets.values()))
            await advance_checkpoints(connection, self.topic, groups)
            parked = await parked_orders(
                connection,
                list(targets.values()),
                (a.envelope.order_id for g in groups for a in g.events),
            )
            applying, aside = split_parked(groups, parked)
            for name, events in applying.items():
                target = targets[name]
                db = Db(connection, target.schema)
                state = await target.projection.load(db, events)
                _fold(target, state, events)
                self.stats.rows_written += await store(db, state, copy=copy)
            if aside:
                await set_aside(connection, self.topic, aside, raw)
            passed = self.partitions.passed_halts(groups)
            if passed:
                keys = [(g.target, g.partition) for g in passed]
                await clear_halts(connection, self.topic, keys)
                self.partitions.halts_cleared(passed)
        for target, applied in aside:
            _log.info(
                "%s: set aside %d/%d with its parked order %s",
                target,
                applied.partition,
                applied.offset,
                applied.envelope.order_id,
                extra=_context(target, applied),
            )

    async def sought(self, targets: Sequence[Target], partitions: Sequence[int]) -> None:
        """Read the stored checkpoints and halts of ``partitions``: the runner goes on from
        there (and seeks each partition next)."""
        async with begin(self.engine) as connection:
            stored = await read_checkpoints(connection, targets, self.topic, partitions)
            halts = await stored_halts(connection, targets, self.topic, partitions)
        self.partitions.sought(
            {p: {t.name: stored[(t.name, p)] for t in targets} for p in partitions}, halts
        )

    async def sync_halts(
        self, targets: Sequence[Target], resume: Callable[[Halt, int], None]
    ) -> None:
        """Store new halts; lift a halt whose stored row an operator removed (a park), and
        ``resume`` its partition from the stored checkpoint."""
        by_name = {t.name: t for t in targets}
        async with begin(self.engine) as connection:
            stored = await stored_halts(connection, targets, self.topic)
            lift, new = self.partitions.halts_to_sync(stored)
            for halt in lift:
                target = by_name[halt.projection]
                found = await read_checkpoints(connection, [target], self.topic, [halt.partition])
                checkpoint = found[(halt.projection, halt.partition)]
                self.partitions.lifted(halt, checkpoint)
                resume(halt, checkpoint)
            for halt in new:
                await store_halt(connection, by_name[halt.projection], self.topic, halt)
                self.partitions.halt_stored(halt)

    async def past_markers(self, moves: Sequence[Group]) -> bool:
        """Move checkpoints over offsets only transaction markers fill (``marker_moves``);
        False when another instance moved one meanwhile (seek again)."""
        try:
            async with begin(self.engine) as connection:
                await self.check_versions(connection, list({g.target for g in moves}))
                await advance_checkpoints(connection, self.topic, moves)
        except StaleCheckpoint:
            for name in {g.target.name for g in moves}:
                metrics.series(name).conflicts.inc()
            return False
        self.partitions.moved(moves)
        return True

    async def parked_counts(self, targets: Sequence[Target]) -> dict[str, int]:
        """Projection name -> how many events of its version in ``targets`` are parked."""
        async with begin(self.engine) as connection:
            counts = await parked_counts(connection, self.topic)
        return {t.name: counts.get((t.name, t.version), 0) for t in targets}

    async def check_versions(
        self, connection: asyncpg.Connection, targets: Sequence[Target]
    ) -> None:
        wanted = "building" if self.building else "live"
        states = await share_version_states(connection, [t.name for t in targets])
        for target in targets:
            state = states.get((target.name, target.version))
            if state != wanted:
                raise VersionsChanged(f"{target} is {state or 'gone'}, no longer {wanted}")
