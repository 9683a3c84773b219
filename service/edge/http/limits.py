"""Per-caller rate limits: a token bucket per caller, refilled continuously.

Pure: the time comes in with each call. A caller may spend ``burst`` requests at once, then
``rate`` per second; a request finding its bucket empty is refused with the seconds until a
token is back. Buckets of callers that have been quiet long enough to be full again are
forgotten, so memory follows the callers of the last few seconds, not every caller ever seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float  # when ``tokens`` was counted


class TokenBuckets:
    def __init__(self, *, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._refill_s = burst / rate  # an idle bucket is full again after this long
        self._swept_at = 0.0

    def take(self, caller: str, now: float) -> float:
        """Spend one token of ``caller``'s bucket: 0.0 when there was one, else the seconds
        to wait before the next one (and nothing is spent)."""
        bucket = self._buckets.get(caller)
        if bucket is None:
            if now - self._swept_at > self._refill_s:
                self._sweep(now)
            self._buckets[caller] = _Bucket(self.burst - 1, now)
            return 0.0
        tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if tokens >= 1:
            bucket.tokens = tokens - 1
            return 0.0
        bucket.tokens = tokens
        return (1 - tokens) / self.rate

    @staticmethod
    def retry_after(wait_s: float) -> int:
        """Whole seconds for a ``Retry-After`` header (at least 1)."""
        return max(1, math.ceil(wait_s))

    def _sweep(self, now: float) -> None:
        """Forget buckets that have refilled completely: a new one would be the same."""
        self._swept_at = now
        full = [
            caller for caller, bucket in self._buckets.items() if now - bucket.at >= self._refill_s
        ]
        for caller in full:
            del self._buckets[caller]

    def __len__(self) -> int:
        return len(self._buckets)


class Backlog:
    """Commands in the service now, and the rate they leave it at: by Little's law a command
    arriving now would spend about ``in_flight / rate`` seconds in the service. One that would
    spend more than ``max_delay_s`` is refused at once (a fast 503), before it costs anything.

    This sees what the writer's own queue cannot: when the process's CPU is the bottleneck,
    requests wait for their turn in the event loop before they ever reach the writer. Pure:
    the time comes in with each call. Below ``floor`` commands in flight everything is taken
    (a rate measured at low load says little), and so is everything before a rate is known.
    """

    def __init__(self, max_delay_s: float, *, floor: int = 32, window_s: float = 0.25) -> None:
        self.max_delay_s = max_delay_s
        self.floor = floor
        self.window_s = window_s
        self.in_flight = 0
        self.rate = 0.0  # commands leaving per second, smoothed over recent windows
        self._window_started: float | None = None
        self._left_in_window = 0

    def admit(self, now: float) -> bool:
        """Take a command in (True), or refuse it (False: nothing is counted)."""
        self._roll(now)
        crowded = self.in_flight >= self.floor and self.rate > 0.0
        if crowded and self.in_flight >= self.rate * self.max_delay_s:
            return False
        self.in_flight += 1
        return True

    def leave(self, now: float) -> None:
        """A command taken in has been answered."""
        self._roll(now)
        self.in_flight -= 1
        self._left_in_window += 1

    def _roll(self, now: float) -> None:
        if self._window_started is None:
            self._window_started = now
            return
        elapsed = now - self._window_started
        if elapsed < self.window_s:
            return
        measured = self._left_in_window / elapsed
        # The newest window weighs a third: a stall of one window (a slow commit, a GC pause)
        # moves the estimate little; a lasting change shows within a second or two.
        self.rate = measured if self.rate == 0.0 else self.rate + (measured - self.rate) / 3
        self._window_started = now
        self._left_in_window = 0
