"""The results table: rows, number formatting, the markdown files written after a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    measurement: str
    value: str
    limit: str = ""
    ratio: str = ""
    details: str = ""


@dataclass(frozen=True)
class Target:
    """A target an issue set, and whether this run met it (None: not measured)."""

    name: str
    wanted: str
    measured: str
    met: bool | None


def n(value: float, unit: str = "") -> str:
    """A number for the table: thousands separated, two decimals below 100."""
    if value != value:  # NaN: nothing was measured
        return "n/a"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1000:,.1f} ms"


def div(value: float, limit: float) -> float | None:
    return value / limit if limit > 0 else None


def ratio(value: float, limit: float) -> str:
    return f"{value / limit:.2f}" if limit > 0 and value == value else ""


def times(value: float, limit: float) -> str:
    """A multiple: ``12.3x``."""
    return f"{value / limit:.1f}x" if limit > 0 and value > 0 else ""


def table(rows: list[Row]) -> str:
    lines = [
        "| Measurement | Value | Limit (same run) | Ratio | Details |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r.measurement} | {r.value} | {r.limit} | {r.ratio} | {r.details} |")
    return "\n".join(lines)


def targets_table(targets: list[Target]) -> str:
    lines = ["| Target | Wanted | This run | Met |", "|---|---|---|:-:|"]
    for t in targets:
        met = "n/a" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.name} | {t.wanted} | {t.measured} | {met} |")
    return "\n".join(lines)


def heading(results: dict[str, Any]) -> str:
    env = results["environment"]
    start, end = env["load_average_at_start"][0], env.get("load_average_at_end", [float("nan")])[0]
    return (
        f"{'Quick' if env['quick'] else 'Full'} run of {env['when']} on commit "
        f"{env['git_commit']}: {env['cpus']} CPUs, Python {env['python']}, load average "
        f"{start:.2f} at start / {end:.2f} at end, {results.get('total_seconds', 0):.0f} s "
        "in all; Kafka, PostgreSQL, the service and the load generator all on this machine "
        "(127.0.0.1)."
    )


def markdown(results: dict[str, Any], rows: list[Row], targets: list[Target]) -> str:
    """``latest.md``: heading, the results table, the targets, the plots."""
    return (
        "\n\n".join(
            [
                "# Benchmark results",
                heading(results),
                table(rows),
                "## Targets",
                targets_table(targets),
                "![throughput over time](throughput.png)\n\n"
                "![latency against offered load](latency.png)",
            ]
        )
        + "\n"
    )


_MEANINGS = """\
What each figure means:

- **Limits** are measured in the same run on the same broker and database, so the ratios
  compare like with like on any machine. *Raw produce*: one aiokafka producer configured as the
  writer (idempotent, acks=all, transactions of 500 records) sending pre-built envelopes of our
  real size. *Raw consume*: `getmany` plus `envelope.decode` of every record, read_committed,
  with the projector's fetch sizes (best of several passes). *Raw COPY* and *raw upsert*:
  asyncpg `copy_records_to_table` and one `INSERT ... SELECT * FROM unnest($1::text[], ...)
  ON CONFLICT DO UPDATE` per batch into a copy of the `orders` table with its indexes.
  *HTTP ceiling*: a bare Litestar app (same bodies, same server settings as `orders api`:
  one uvicorn process, httptools, uvloop) under the same load generator.
- **(a) Projector**: `run_projector` with all projections in a process of its own, from offset
  0 of a topic of N events, exactly-once (each projection's rows and checkpoints in one
  transaction per batch). *Sustained*
  is the rate between 10% and 90% of the events (start-up and tail excluded), *overall* from
  process start to the last projection caught up. Ratio to raw consume.
- **(b) Rebuild**: `orders projections rebuild all` in a process of its own, from its start to
  its exit: new versions of every projection built from the same N events, indexed, switched.
- **Peer**: a projector written as tutorials do (one transaction and one offset commit per
  event, one read model only) on the same topic; ours as a multiple of it.
- **(c) Command API**: open loop, requests leave on schedule whatever the answers do and
  latency counts from the scheduled time, so queueing shows; achieved/offered is the ratio.
  Closed loop: clients send the next command when the last one is answered; ratio to the
  HTTP ceiling's closed loop (at the largest number of clients). *Sustained* is the best
  closed loop: with N clients a closed loop can reach at most N / latency, so only enough
  clients to keep the API's core busy measure what the API can sustain, and their latency
  is mostly queueing. Every command is acknowledged after its Kafka transaction committed
  (acks=all).
- **Callers**: every HTTP load acts as many customers (2,000 in a quick run, 5,000 in a full
  one), each with its own bearer token from a development issuer, minted before any load;
  each customer creates its own orders (with an Idempotency-Key) and adds items to them.
- **(c) Auth on / off**: what access control costs. An `orders api` with auth on and one with
  `ORDERS_AUTH=off` run side by side and get the same warm-up (every customer's first order,
  so every token is in the verified-token cache; that first order's cost is its own row), one
  run each not counted, then the same loads in turn: on, off, off, on (then off, on, on, off
  in a full run). Each side pools its runs; the ratio is on / off. Both get the very same
  requests, tokens included, and the same per-caller rate limit, set so high that it never
  refuses (with auth off every request counts against one caller, the client's address).
  The closed loop (as many clients as the sustained figure) gives commands/s; the open loop
  at 500/s, well below capacity, gives the latency auth adds.
- **(d) Command-to-queryable**: from a command's acknowledgement until `GET /orders/{id}` with
  its `X-Consistency-Token` answers 200, with the projector in its own process; an API and
  projector with auth on and another pair with auth off take turns as in (c), and (d) is the
  runs with auth on.
- **(f) Overload**: once (c) has measured the sustained rate, commands are offered at twice
  that rate for 10 s (20 s in a full run), open loop with independent arrivals: each command
  leaves when due, on a new connection when none is free (at most 4,096), so the API, not the
  load generator, holds the backlog. The API runs as deployed (auth on, the default rate limit
  and queue limits). Accepted (2xx), refused with 503 (which must carry Retry-After), 429,
  other statuses: their shares and latencies from the due time.
- **(e) Memory**: writer RSS growth per order after rebuilding its state from the log, and the
  projector process's RSS after run (a).
"""


def readme_section(results: dict[str, Any], rows: list[Row], targets: list[Target]) -> str:
    """A ready-to-paste ``## Benchmarks`` section for the README."""
    return (
        "\n\n".join(
            [
                "## Benchmarks",
                "```sh\n.venv/bin/python -m benchmarks.run           # full run, 1,000,000 events\n"
                ".venv/bin/python -m benchmarks.run --quick   # smaller sizes, a few minutes\n```",
                "It starts its own Kafka broker and PostgreSQL (or uses `KAFKA_BOOTSTRAP_SERVERS` /"
                " `DATABASE_URL`), all traffic on 127.0.0.1, prints the table below and writes "
                "`bench-results/latest.json`, `latest.md`, `throughput.png` and `latency.png`.",
                _MEANINGS.rstrip(),
                heading(results),
                table(rows),
                targets_table(targets),
            ]
        )
        + "\n"
    )
