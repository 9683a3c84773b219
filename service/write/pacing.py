"""How long a command queued now would wait for its batch: the decision loop's pace, learned
from the batches it ran (the writer refuses a command that would wait too long).

With group commit the queue drains a batch at a time: every command queued while a batch is in
flight goes into the next one, up to ``max_batch``. So a new command waits for what is left of
the batch in flight, plus one full batch for every ``max_batch`` commands queued ahead of it.
A batch costs about ``fixed + per_command * n`` seconds (one transaction, n decisions), so
its per-command cost alone would take a burst after a quiet spell, when batches held one
command each, for a queue that needs many transactions. Pure: the writer measures the time.
"""

from __future__ import annotations

# The newest batch's weight in the running means: about the last 10-20 batches count.
_WEIGHT = 0.1
# Batch sizes that vary less than this (a standard deviation of half a command) cannot tell
# the fixed cost from the per-command cost: each command is then charged the batch's average.
_LEAST_SPREAD = 0.25


class Pace:
    """The recent cost of the decision loop's batches, fitted by least squares over the
    batches it ran (exponentially weighted: the newest weigh most)."""

    __slots__ = ("_n", "_nn", "_nt", "_observed", "_t")

    def __init__(self) -> None:
        self._observed = False
        # Weighted means of a batch's size n, its seconds t, n * n and n * t.
        self._n = self._t = self._nn = self._nt = 0.0

    def observe(self, commands: int, seconds: float) -> None:
        """Take in a batch of ``commands`` that took ``seconds`` from taken to answered."""
        weight = _WEIGHT if self._observed else 1.0
        self._observed = True
        self._n += weight * (commands - self._n)
        self._t += weight * (seconds - self._t)
        self._nn += weight * (commands * commands - self._nn)
        self._nt += weight * (commands * seconds - self._nt)

    def batch_seconds(self, commands: int) -> float:
        """How long a batch of ``commands`` is expected to take (0 before any was seen)."""
        if not self._observed or commands <= 0:
            return 0.0
        spread = self._nn - self._n * self._n
        if spread < _LEAST_SPREAD:
            return self._t / self._n * commands
        per_command = max(0.0, (self._nt - self._n * self._t) / spread)
        fixed = max(0.0, self._t - per_command * self._n)
        return fixed + per_command * commands

    def expected_wait(
        self, *, queued: int, max_batch: int, in_flight: int, in_flight_for: float
    ) -> float:
        """Seconds until a command queued now is taken into a batch: ``queued`` commands are
        ahead of it, and a batch of ``in_flight`` commands has run for ``in_flight_for``."""
        left_in_flight = max(0.0, self.batch_seconds(in_flight) - in_flight_for)
        return left_in_flight + queued // max_batch * self.batch_seconds(max_batch)
