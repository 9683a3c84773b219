"""What access control costs: the same load against a service with auth on and one with
``ORDERS_AUTH=off``, in one run, alternating.

Both services run side by side from the start (each idle while the other is measured) and get
the same warm-up: every customer's first order, so each token has been verified once and later
requests find it in the verified-token cache, as in a steady state where one token serves many
requests. Then one run of the load on each side, not counted (in trial runs the first seconds
of real load on a young topic and service were much slower), and the counted runs in
``order``: on, off, off, on (then off, on, on, off ...), so a drift during the run (warming
up, the machine's other work) weighs on both sides alike. Both get the very same requests,
bearer tokens included; the service with auth off ignores them. Each side's figures pool its
runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from benchmarks.httpload import LoadResult, pooled
from benchmarks.report import ms, n

_log = logging.getLogger("benchmarks")

PAUSE_S = 1.0  # between runs: the writer's queue drains

T = TypeVar("T")


def side(auth: bool) -> str:
    return "on" if auth else "off"


@dataclass
class Alternated(Generic[T]):
    """The counted runs of one load, in the order they ran (``order``)."""

    runs: list[tuple[bool, T]]

    def of(self, auth: bool) -> list[T]:
        return [run for on, run in self.runs if on is auth]


def order(runs: int) -> tuple[bool, ...]:
    """Auth on or off, run by run: on, off, off, on, off, on, on, off ... (the Thue-Morse
    sequence), so that each side's runs sit on average at the same place in time."""
    return tuple(bin(index).count("1") % 2 == 0 for index in range(runs))


async def alternate(
    measure: Callable[[bool], Awaitable[T]], *, runs: int, what: str = "auth"
) -> Alternated[T]:
    """``measure(on)`` once on each side, not counted, then ``runs`` times in ``order``, a
    pause between runs. ``what`` is switched on and off (for the log)."""
    for auth in (True, False):
        _log.info("%s %s: a run to warm up, not counted", what, side(auth))
        await measure(auth)
        await asyncio.sleep(PAUSE_S)
    counted: list[tuple[bool, T]] = []
    for index, auth in enumerate(order(runs)):
        if index:
            await asyncio.sleep(PAUSE_S)
        _log.info("%s %s, run %d of %d", what, side(auth), index + 1, runs)
        counted.append((auth, await measure(auth)))
    return Alternated(counted)


def cpu_per_command_us(load: LoadResult, process: str = "api") -> float:
    """Microseconds of ``process``'s CPU per command answered 2xx (NaN without a meter)."""
    share = load.cpu.get(process)
    if share is None or not load.ok:
        return float("nan")
    return share / 100 * load.elapsed / load.ok * 1e6


@dataclass(frozen=True)
class Compared:
    """A load's runs with auth on and off, each side pooled."""

    runs: Alternated[LoadResult]

    @property
    def on(self) -> LoadResult:
        return pooled(self.runs.of(True))

    @property
    def off(self) -> LoadResult:
        return pooled(self.runs.of(False))

    def rate_ratio(self) -> float:
        off = self.off.achieved_per_second
        return self.on.achieved_per_second / off if off > 0 else float("nan")

    def p50_added_s(self) -> float:
        return self.on.percentile(0.5) - self.off.percentile(0.5)

    def summary(self) -> dict[str, object]:
        on, off = self.on, self.off
        return {
            "order": [side(auth) for auth, _ in self.runs.runs],
            "runs": [run.summary() for _, run in self.runs.runs],
            "on": on.summary() | {"api_cpu_us_per_command": cpu_per_command_us(on)},
            "off": off.summary() | {"api_cpu_us_per_command": cpu_per_command_us(off)},
            "per_second_on_over_off": self.rate_ratio(),
            "p50_added_ms": self.p50_added_s() * 1000,
            "p99_added_ms": (on.percentile(0.99) - off.percentile(0.99)) * 1000,
        }

    def details(self) -> str:
        """Per-side latencies and CPU, each run in order, errors: for the table."""
        on, off = self.on, self.off
        runs = ", ".join(
            f"{side(auth)} {n(run.achieved_per_second)}/s p50 {ms(run.percentile(0.5))}"
            for auth, run in self.runs.runs
        )
        errors = "; ".join(
            f"errors {side(auth)} "
            + (", ".join(f"{k} x{v}" for k, v in sorted(load.errors.items())) or "0")
            for auth, load in ((True, on), (False, off))
        )
        return (
            f"p50 {ms(on.percentile(0.5))} / {ms(off.percentile(0.5))}, p99 "
            f"{ms(on.percentile(0.99))} / {ms(off.percentile(0.99))}; API CPU per command "
            f"{cpu_per_command_us(on):,.0f} / {cpu_per_command_us(off):,.0f} us; runs in "
            f"order: {runs}; {errors}"
        )
