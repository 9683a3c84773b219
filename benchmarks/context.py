"""What every benchmark phase shares: the plan (sizes and time limits), the context (the
infrastructure, results so far, the table's rows and targets), and where results are written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import events, httpload, naive_projector, projector, queryable
from benchmarks.callers import Callers
from benchmarks.report import Row, Target
from service.infra.embedded.stack import Infrastructure

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Plan:
    """The sizes and time limits of a run (``--quick`` or full)."""

    quick: bool
    events: int  # the projector's topic; raw produce/consume are measured while filling it
    base_events: int  # sealed through the domain; the rest are copies under new ids
    produce_events: int  # the first ones, sent as the writer sends (the limit); the rest batched
    consume_passes: int
    consume_events: int  # per pass: the first ones of the topic
    pg_rows: int  # raw COPY and raw upsert
    projector_timeout: float
    rebuild_timeout: float
    naive_events: int
    naive_seconds: float
    writer_orders: int
    http_rates: tuple[int, ...]
    http_seconds: float
    http_connections: int
    closed_clients: tuple[int, ...]
    queryable_rate: int
    queryable_seconds: float
    customers: int  # simulated customers, one bearer token each
    auth_runs: int  # counted runs of each auth on/off comparison, both sides together
    auth_seconds: float  # each auth on/off run of (c)
    auth_open_rate: int  # the open loop of (c)'s auth on/off comparison: well below capacity
    overload_seconds: float  # arrivals at twice the sustained rate
    overload_connections: int  # at most, as many independent clients
    # Phases that would start later than this after the broker and database are up are
    # skipped (reported as such), and none may run past it by more than OVERRUN_S: a run on
    # a busy machine stays bounded.
    budget_seconds: float

    @classmethod
    def make(cls, quick: bool) -> Plan:
        """The plan of a quick or a full run."""
        return cls(
            quick=quick,
            events=30_000 if quick else 1_000_000,
            base_events=10_000 if quick else 25_000,
            produce_events=30_000 if quick else 100_000,
            consume_passes=3,
            consume_events=30_000 if quick else 300_000,
            pg_rows=10_000 if quick else 100_000,
            projector_timeout=45 if quick else 240,
            rebuild_timeout=45 if quick else 120,
            naive_events=3_000 if quick else 20_000,
            naive_seconds=5 if quick else 20,
            writer_orders=20_000 if quick else 100_000,
            http_rates=(250, 500, 1000, 2000),
            http_seconds=2.0 if quick else 6.0,
            http_connections=256,
            closed_clients=(64,) if quick else (16, 64, 256),
            queryable_rate=500,
            queryable_seconds=3.0 if quick else 10.0,
            customers=2_000 if quick else 5_000,
            auth_runs=4 if quick else 8,
            auth_seconds=3.0 if quick else 6.0,
            auth_open_rate=500,
            overload_seconds=10.0 if quick else 20.0,
            overload_connections=4096,
            budget_seconds=300 if quick else 960,
        )


@dataclass
class Context:
    """What the phases share: the infrastructure, the plan, results so far, and the table."""

    infra: Infrastructure
    plan: Plan
    results: dict[str, Any]
    callers: Callers  # who the HTTP loads act as
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    topic: str = ""  # the N-event topic
    filled: events.Filled | None = None
    projector_database: str = ""  # the read models of run (a), for the rebuild
    projector_run: projector.ProjectorRun | None = None
    naive_run: naive_projector.NaiveRun | None = None
    ceiling: dict[float, httpload.LoadResult] = field(default_factory=dict)  # by offered rate
    ceiling_closed: httpload.LoadResult | None = None
    api_open: dict[float, httpload.LoadResult] = field(default_factory=dict)
    visible: queryable.QueryableResult | None = None

    def limit(self, name: str) -> float:
        """A limit measured earlier in this run (0 when that phase failed)."""
        value: float = self.results.get(name, {}).get("per_second", 0.0)
        return value

    def require_topic(self) -> events.Filled:
        """The N-event topic filled by ``limits_kafka``."""
        if self.filled is None:
            raise RuntimeError("needs the events topic, whose fill failed")
        return self.filled

    def infra_pids(self) -> dict[str, int | None]:
        """The broker's and the database server's processes, for the CPU meters."""
        kafka = self.infra.kafka
        postgres = self.infra.postgres
        return {
            "kafka": kafka.process.pid if kafka and kafka.process else None,
            "postgres*": postgres.process.pid if postgres and postgres.process else None,
        }


def empty_log_file(name: str) -> Path:
    """An empty ``bench-results/NAME.log`` for a process this run starts."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.log"
    path.write_bytes(b"")
    return path
