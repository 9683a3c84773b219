"""How far each partition of the event log reaches, for judging consistency tokens.

A token names the offset of a command's last event; the query then waits for its projection to
apply it. A token past the end of its partition's log (never written, so never issued by this
service) would wait out the whole budget and answer 503, retried forever; knowing the end
turns it into a 400 at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Mapping
from typing import Protocol

from aiokafka.errors import KafkaError

from service.kernel.errors import EnvironmentProblem, Unavailable
from service.kernel.log_ends import KnownLogEnds, refresh_delay

_log = logging.getLogger(__name__)


class LogEndUnknown(Unavailable):
    """The event log (Kafka) did not say how far its partitions reach: retry shortly."""


class EndReader(Protocol):
    """Reads the end of every partition of the topic (``service.infra.eventlog.HighWatermarks``)."""

    async def read(self) -> Mapping[int, int]: ...

    async def close(self) -> None: ...


class LogEnds:
    """The known end of each partition of the event log, raised two ways: ``note``, for every
    record this process's writer committed (no I/O), and a refresh from Kafka, only when a token
    lies beyond what is known.

    Refreshes are coalesced (every query waiting for one shares its single request) and start
    at most once per ``min_interval_s``, so a flood of made-up tokens costs Kafka a bounded
    rate of requests. A query joins only a refresh whose request goes out after it asked: one
    sent before may have read the ends before the query's record was written.
    """

    def __init__(
        self,
        reader: EndReader | None,
        *,
        min_interval_s: float = 0.05,
        timeout_s: float = 2.0,
    ) -> None:
        self.known = KnownLogEnds()
        self.reader = reader  # None: no Kafka to ask, only what ``note`` says
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self.refreshes = 0  # requests sent to Kafka
        self._refresh: asyncio.Task[None] | None = None  # the latest refresh started
        self._started = 0  # refreshes started so far: the latest one's number
        self._last_started_at = -math.inf

    def note(self, partition: int, offset: int) -> None:
        """The writer committed a record at ``offset`` of ``partition``: the log reaches it."""
        self.known.note(partition, offset)

    def knows(self, partition: int, offset: int) -> bool:
        """The log of ``partition`` is known to hold ``offset``, without asking Kafka."""
        return self.known.reaches(partition, offset)

    async def reaches(self, partition: int, offset: int) -> bool | None:
        """Whether the log of ``partition`` holds ``offset``. None when this cannot be told
        (no Kafka to ask and nothing noted that far). Raises ``LogEndUnknown`` when Kafka does
        not answer in ``timeout_s``."""
        if self.known.reaches(partition, offset):
            return True
        if self.reader is None:
            return None
        await self._refreshed_after(self.refreshes)
        return self.known.reaches(partition, offset)

    async def close(self) -> None:
        """Stop a refresh in flight and close the reader (the process is shutting down)."""
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()
            await asyncio.wait([self._refresh])
        if self.reader is not None:
            await self.reader.close()

    async def _refreshed_after(self, sent: int) -> None:
        """Return once a refresh whose request went out after the first ``sent`` has read the
        ends (or raise its error). Refreshes run one at a time, so the latest one started
        sends after those ``sent`` iff its number is above ``sent``."""
        while True:
            refresh = self._refresh
            if refresh is not None and self._started > sent:
                await asyncio.shield(refresh)  # a caller that goes away leaves it to the others
                return
            if refresh is not None and not refresh.done():
                await asyncio.wait([refresh])  # too early for this caller: the next one
                continue
            delay = refresh_delay(self._last_started_at, time.monotonic(), self.min_interval_s)
            if delay > 0:
                await asyncio.sleep(delay)  # the rate bound; another caller may start it first
                continue
            self._started += 1
            self._last_started_at = time.monotonic()
            # Shared by its callers: outside the context (correlation id) of the one starting it.
            self._refresh = asyncio.create_task(
                self._read(), name="log-ends-refresh", context=contextvars.Context()
            )
            # Its error is raised to those waiting; this keeps asyncio from logging it again.
            self._refresh.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _read(self) -> None:
        assert self.reader is not None
        self.refreshes += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                ends = await self.reader.read()
        except (KafkaError, OSError, EnvironmentProblem) as error:  # OSError: TimeoutError too
            _log.warning("cannot read the event log's ends to check a token: %r", error)
            raise LogEndUnknown(
                "the event log (Kafka) cannot be reached to check the consistency token; "
                "retry shortly"
            ) from error
        self.known.learn(ends)
