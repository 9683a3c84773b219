"""A workload of many concurrent HTTP clients, and an audit of the topic against what they heard.

Each client behaves as a good client would: it sends a seeded, random mix of valid and invalid
commands over many orders (with and without ``If-Match`` and ``Idempotency-Key``), retries on
503 (honouring ``Retry-After``, bounded) and on connection errors, and remembers every command
in a ledger: what it sent, every answer, and the final outcome. Every logical command carries a
unique ``X-Correlation-Id`` on all its attempts; the envelope keeps it, so the audit can find
the events of each command in the topic.

Outcomes: ``acknowledged`` (a 2xx), ``rejected`` (a final 4xx), ``not-sent`` (gave up while
nothing listened) and ``unknown`` (gave up after an attempt whose outcome is unknown). An
attempt's outcome is unknown when the connection broke after the request left, or the answer
was a 503 (the API does not say whether the writer had appended it). With an Idempotency-Key a
retry settles the question (a replay returns the original answer); without one it cannot, and
the command stays ``ambiguous`` whatever the retry answered: its events may be there twice.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiokafka import ConsumerRecord, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.checkpoints import wait_for_checkpoint
from projections.projection import Applied
from tests.support.identity import BACK_OFFICE, bearer
from tests.support.projection_harness import assert_tables_equal_oracle

# What ``projection_harness.read_records`` returns: each partition's records in offset order.
Fetched = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]

# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    """How much traffic, and how the clients behave. All bounds, no open-ended loops."""

    clients: int = 16
    seed: str = "20261128"
    max_commands: int = 200_000
    open_orders_per_client: int = 4
    keyed_share: float = 0.7
    if_match_share: float = 0.4
    invalid_share: float = 0.15
    query_share: float = 0.05
    race_share: float = 0.1
    retry_deadline_s: float = 90.0
    max_attempts: int = 200
    max_retry_after_s: float = 2.0
    connect_backoff_s: float = 0.25
    request_timeout_s: float = 30.0


# -- the ledger ---------------------------------------------------------------------------------


@dataclass
class Sent:
    """One logical command and everything its attempts were told."""

    correlation_id: str
    operation: str
    intent: str  # "valid" or the kind of invalid command meant
    method: str
    path: str
    idempotency_key: str | None
    if_match: int | None
    statuses: list[int] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    ambiguous: bool = False
    outcome: str = ""
    order_id: str | None = None
    version: int | None = None
    token: tuple[int, int] | None = None
    current_version: int | None = None  # from the ETag of a 412

    @property
    def attempts(self) -> int:
        return len(self.statuses) + len(self.transport_errors)

    @property
    def settled_by_retry(self) -> bool:
        """With an Idempotency-Key, a definitive answer settles earlier unknown attempts."""
        return self.idempotency_key is not None and self.outcome in ("acknowledged", "rejected")


@dataclass(frozen=True)
class TransportFailure:
    """A request that got no HTTP answer: when it started and ended, and how it failed."""

    started: float
    ended: float
    kind: str
    operation: str


@dataclass
class Ledger:
    commands: list[Sent] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    transport_failures: list[TransportFailure] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    queries: int = 0

    def answer(self, operation: str, response: httpx.Response) -> None:
        """Count an HTTP answer; a 5xx other than 503 with Retry-After is a violation."""
        self.statuses[response.status_code] += 1
        if response.status_code == 503 and "retry-after" not in response.headers:
            self.violations.append(f"{operation}: 503 without Retry-After: {response.text[:200]}")
        elif response.status_code >= 500 and response.status_code != 503:
            self.violations.append(f"{operation}: {response.status_code} {response.text[:200]}")

    def outcomes(self) -> Counter[str]:
        return Counter(sent.outcome for sent in self.commands)


# -- what a client believes about an order ------------------------------------------------------


@dataclass
class OrderView:
    """A client's belief about an order, from the answers it got (may lag behind others')."""

    order_id: str
    currency: str
    version: int = 1
    status: str = "draft"
    items: dict[str, tuple[int, int]] = field(default_factory=dict)  # sku -> (quantity, price)
    next_sku: int = 0

    @property
    def total(self) -> int:
        return sum(quantity * price for quantity, price in self.items.values())

    @property
    def finished(self) -> bool:
        return self.status in ("delivered", "cancelled")


_NEXT_STATUS = {
    "place": "placed",
    "pay": "paid",
    "ship": "shipped",
    "deliver": "delivered",
    "cancel": "cancelled",
}


@dataclass(frozen=True)
class Request:
    operation: str
    intent: str
    method: str
    path: str
    body: dict[str, Any] | None = None
    if_match: int | None = None
    idempotency_key: str | None = None
    view: OrderView | None = None
    effect: tuple[str, Any] | None = None  # what an acknowledgement does to the view


# -- the clients --------------------------------------------------------------------------------


@dataclass
class Workload:
    """Many concurrent clients against one API base URL, sharing a ledger and their orders.

    With ``instances`` (base URLs of several API instances of one topic; the test may change
    the list as they come and go, like a load balancer's health checks), each attempt goes to
    one of them at random: a retry often reaches another."""

    base_url: str
    config: WorkloadConfig
    instances: list[str] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    orders: dict[str, OrderView] = field(default_factory=dict)
    acknowledged_keys: list[tuple[str, str]] = field(default_factory=list)  # (key, path)
    _sequence: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    async def run(self, stop: asyncio.Event) -> Ledger:
        """Run every client until ``stop`` is set or the command budget is spent.

        Once ``stop`` is set, a command being retried gets no further attempt."""
        self._stop = stop
        limits = httpx.Limits(max_connections=self.config.clients * 2)
        timeout = httpx.Timeout(self.config.request_timeout_s, connect=5.0)
        async with httpx.AsyncClient(
            base_url=self.base_url, limits=limits, timeout=timeout, headers=bearer(BACK_OFFICE)
        ) as http:
            await asyncio.gather(
                *(self._client(http, index, stop) for index in range(self.config.clients))
            )
        return self.ledger

    async def _client(self, http: httpx.AsyncClient, index: int, stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.config.seed}-{index}")
        own: list[OrderView] = []
        while not stop.is_set() and len(self.ledger.commands) < self.config.max_commands:
            own = [view for view in own if not view.finished]
            if rng.random() < self.config.query_share and own:
                await self._query(http, rng.choice(own), rng)
                continue
            request = self._next_request(rng, own)
            sent = await self._send(http, request, rng)
            if sent.outcome == "acknowledged":
                self._learn(request, sent, own)
            elif sent.outcome == "rejected" and request.view is not None:
                self._resync(request.view, sent)

    # -- choosing what to send ------------------------------------------------------------------

    def _next_request(self, rng: random.Random, own: list[OrderView]) -> Request:
        if not own or (len(own) < self.config.open_orders_per_client and rng.random() < 0.5):
            return self._create(rng)
        if rng.random() < self.config.race_share and self.orders:
            view = self.orders[rng.choice(list(self.orders))]  # someone else's order, maybe
        else:
            view = rng.choice(own)
        if rng.random() < self.config.invalid_share:
            return self._invalid(rng, view)
        return self._valid(rng, view)

    def _keyed(self, rng: random.Random) -> str | None:
        return (
            uuid.UUID(int=rng.getrandbits(128)).hex
            if rng.random() < self.config.keyed_share
            else None
        )

    def _if_match(self, rng: random.Random, view: OrderView) -> int | None:
        return view.version if rng.random() < self.config.if_match_share else None

    @staticmethod
    def _key(rng: random.Random) -> str:
        return uuid.UUID(int=rng.getrandbits(128)).hex

    def _create(self, rng: random.Random) -> Request:
        # Always keyed: the API refuses a create without one (a retry must not make two).
        body: dict[str, Any] = {
            "customer_id": f"c-{rng.randrange(40)}",
            "currency": rng.choice(["EUR", "USD"]),
        }
        if rng.random() < 0.3:
            body["shipping_address"] = _address(rng)
        return Request("create", "valid", "POST", "/orders", body, idempotency_key=self._key(rng))

    def _set_address(self, path: str, rng: random.Random, common: dict[str, Any]) -> Request:
        return Request(
            "address", method="PUT", path=f"{path}/shipping-address", body=_address(rng), **common
        )

    def _valid(self, rng: random.Random, view: OrderView) -> Request:
        path = f"/orders/{view.order_id}"
        common: dict[str, Any] = {
            "intent": "valid",
            "if_match": self._if_match(rng, view),
            "idempotency_key": self._keyed(rng),
            "view": view,
        }
        if view.status == "draft":
            choice = rng.random()
            if not view.items or (choice < 0.35 and len(view.items) < 6):
                sku = f"S{view.next_sku}"
                view.next_sku += 1
                quantity, price = rng.randint(1, 5), rng.randint(1, 5000)
                body = {
                    "sku": sku,
                    "name": f"item {sku}",
                    "quantity": quantity,
                    "unit_price": price,
                }
                return Request(
                    "add",
                    method="POST",
                    path=f"{path}/items",
                    body=body,
                    effect=("add", (sku, quantity, price)),
                    **common,
                )
            sku = rng.choice(sorted(view.items))
            if choice < 0.5:
                quantity = rng.randint(1, 9)
                return Request(
                    "change",
                    method="PATCH",
                    path=f"{path}/items/{sku}",
                    body={"quantity": quantity},
                    effect=("change", (sku, quantity)),
                    **common,
                )
            if choice < 0.6 and len(view.items) > 1:
                return Request(
                    "remove",
                    method="DELETE",
                    path=f"{path}/items/{sku}",
                    effect=("remove", sku),
                    **common,
                )
            if choice < 0.7:
                return self._set_address(path, rng, common)
            if choice < 0.95:
                return Request("place", method="POST", path=f"{path}/place", **common)
        elif view.status == "placed" and rng.random() < 0.1:
            return self._set_address(path, rng, common)
        elif view.status == "placed" and rng.random() < 0.9:
            body = {
                "amount": view.total,
                "currency": view.currency,
                "payment_reference": f"psp-{rng.randrange(10**9)}",
            }
            return Request("pay", method="POST", path=f"{path}/pay", body=body, **common)
        elif view.status == "paid" and rng.random() < 0.9:
            body = {"carrier": "DHL", "tracking_number": f"T{rng.randrange(10**9)}"}
            return Request("ship", method="POST", path=f"{path}/ship", body=body, **common)
        elif view.status == "shipped":
            return Request("deliver", method="POST", path=f"{path}/deliver", **common)
        return Request(
            "cancel",
            method="POST",
            path=f"{path}/cancel",
            body={"reason": "changed mind"},
            **common,
        )

    def _invalid(self, rng: random.Random, view: OrderView) -> Request:
        """A command meant to be refused (400, 404, 409, 412 or 422), never to append."""
        path = f"/orders/{view.order_id}"
        kind = rng.choice(
            [
                "malformed",
                "unknown-field",
                "unknown-order",
                "illegal-transition",
                "stale-if-match",
                "payment-mismatch",
                "reused-key",
                "bad-address",
            ]
        )
        key = self._keyed(rng)
        if kind == "malformed":
            body = {"sku": "X", "name": "x", "quantity": 0, "unit_price": 1}
            return Request("add", kind, "POST", f"{path}/items", body, idempotency_key=key)
        if kind == "unknown-field":
            body = {"customer_id": "c-1", "currency": "EUR", "discount": 5}
            key = key or self._key(rng)
            return Request("create", kind, "POST", "/orders", body, idempotency_key=key)
        if kind == "unknown-order":
            unknown = uuid.UUID(int=rng.getrandbits(128))
            return Request("place", kind, "POST", f"/orders/{unknown}/place", idempotency_key=key)
        if kind == "illegal-transition" and view.status in ("draft", "placed"):
            return Request(
                "deliver", kind, "POST", f"{path}/deliver", idempotency_key=key, view=view
            )
        if kind == "stale-if-match" and view.version > 1:
            return Request(
                "cancel",
                kind,
                "POST",
                f"{path}/cancel",
                {"reason": "stale"},
                if_match=view.version - 1,
                idempotency_key=key,
                view=view,
            )
        if kind == "payment-mismatch" and view.status == "placed":
            body = {
                "amount": view.total + 1,
                "currency": view.currency,
                "payment_reference": "psp-wrong",
            }
            return Request("pay", kind, "POST", f"{path}/pay", body, idempotency_key=key, view=view)
        if kind == "bad-address":
            body = {**_address(rng), "country": "XX"}  # no such ISO 3166 code
            return Request("address", kind, "PUT", f"{path}/shipping-address", body)
        if kind == "reused-key" and self.acknowledged_keys:
            reused, _ = rng.choice(self.acknowledged_keys)
            return Request(
                "place", kind, "POST", f"/orders/{uuid.uuid4()}/place", idempotency_key=reused
            )
        body = {"amount": -1, "currency": "EUR", "payment_reference": "p"}
        return Request("pay", "malformed", "POST", f"{path}/pay", body, idempotency_key=key)

    # -- sending, with retries --------------------------------------------------------------

    async def _send(self, http: httpx.AsyncClient, request: Request, rng: random.Random) -> Sent:
        self._sequence += 1
        sent = Sent(
            correlation_id=f"wl-{self._run_id}-{self._sequence}",
            operation=request.operation,
            intent=request.intent,
            method=request.method,
            path=request.path,
            idempotency_key=request.idempotency_key,
            if_match=request.if_match,
        )
        self.ledger.commands.append(sent)
        headers = {"X-Correlation-Id": sent.correlation_id}
        if request.if_match is not None:
            headers["If-Match"] = f'"{request.if_match}"'
        if request.idempotency_key is not None:
            headers["Idempotency-Key"] = request.idempotency_key
        deadline = time.monotonic() + self.config.retry_deadline_s
        while (
            sent.attempts < self.config.max_attempts
            and time.monotonic() < deadline
            and not (sent.attempts and self._stop.is_set())
        ):
            started = time.monotonic()
            try:
                response = await http.request(
                    request.method, self._url(rng, request.path), json=request.body, headers=headers
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
                self._failed(sent, started, error, sent_out=False)
                await asyncio.sleep(self.config.connect_backoff_s * rng.uniform(0.5, 1.5))
                continue
            except httpx.TransportError as error:  # the request left: outcome unknown
                self._failed(sent, started, error, sent_out=True)
                await asyncio.sleep(self.config.connect_backoff_s * rng.uniform(0.5, 1.5))
                continue
            self.ledger.answer(request.operation, response)
            sent.statuses.append(response.status_code)
            if response.status_code == 503:
                sent.ambiguous = True
                await asyncio.sleep(self._retry_after(response, rng))
                continue
            if response.status_code >= 500:
                sent.ambiguous = True
                break
            if response.is_success:
                self._acknowledged(sent, request, response)
            else:
                sent.outcome = "rejected"
                sent.current_version = _version_of(response)
            return sent
        sent.outcome = "unknown" if sent.ambiguous else "not-sent"
        return sent

    def _url(self, rng: random.Random, path: str) -> str:
        """Where an attempt goes: the base URL, or one of the instances at random."""
        return f"{rng.choice(self.instances)}{path}" if self.instances else path

    def _failed(
        self, sent: Sent, started: float, error: httpx.TransportError, *, sent_out: bool
    ) -> None:
        kind = type(error).__name__
        sent.transport_errors.append(kind)
        sent.ambiguous = sent.ambiguous or sent_out
        self.ledger.transport_failures.append(
            TransportFailure(started, time.monotonic(), kind, sent.operation)
        )

    def _retry_after(self, response: httpx.Response, rng: random.Random) -> float:
        try:
            asked = float(response.headers.get("retry-after", "1"))
        except ValueError:
            asked = 1.0
        return min(max(asked, 0.05), self.config.max_retry_after_s) * rng.uniform(0.5, 1.0)

    def _acknowledged(self, sent: Sent, request: Request, response: httpx.Response) -> None:
        payload = response.json()
        partition, offset = payload["consistency_token"].split(":")
        sent.outcome = "acknowledged"
        sent.order_id = payload["order_id"]
        sent.version = payload["version"]
        sent.token = (int(partition), int(offset))
        if request.idempotency_key is not None:
            self.acknowledged_keys.append((request.idempotency_key, request.path))

    # -- learning from answers ------------------------------------------------------------------

    def _learn(self, request: Request, sent: Sent, own: list[OrderView]) -> None:
        assert sent.order_id is not None
        assert sent.version is not None
        if request.operation == "create":
            if sent.order_id in self.orders:  # a replay of an order we know
                return
            assert request.body is not None
            created = OrderView(sent.order_id, request.body["currency"], version=sent.version)
            self.orders[sent.order_id] = created
            own.append(created)
            return
        view = request.view
        if view is None or sent.version <= view.version:
            return
        view.version = sent.version
        if request.effect is not None:
            what, detail = request.effect
            if what == "add":
                sku, quantity, price = detail
                view.items[sku] = (quantity, price)
            elif what == "change":
                sku, quantity = detail
                if sku in view.items:
                    view.items[sku] = (quantity, view.items[sku][1])
            elif what == "remove":
                view.items.pop(detail, None)
        view.status = _NEXT_STATUS.get(request.operation, view.status)

    @staticmethod
    def _resync(view: OrderView, sent: Sent) -> None:
        """A valid command refused: our belief was stale (another client moved the order).
        A 412 names the current version; after a 409 the status is unknown, so we let go."""
        if sent.intent != "valid":
            return
        if sent.current_version is not None:
            view.version = max(view.version, sent.current_version)
        elif sent.statuses[-1] == 409:
            view.status = "cancelled"

    async def _query(self, http: httpx.AsyncClient, view: OrderView, rng: random.Random) -> None:
        """A read: must never be a 500 (503 with Retry-After when the database is away)."""
        self.ledger.queries += 1
        started = time.monotonic()
        try:
            response = await http.get(self._url(rng, f"/orders/{view.order_id}"))
        except httpx.TransportError as error:
            self.ledger.transport_failures.append(
                TransportFailure(started, time.monotonic(), type(error).__name__, "query")
            )
            await asyncio.sleep(self.config.connect_backoff_s * rng.uniform(0.5, 1.5))
            return
        self.ledger.answer("query", response)


def _address(rng: random.Random) -> dict[str, Any]:
    """A shipping address, now and then with a second line or a region."""
    address: dict[str, Any] = {
        "name": f"Customer {rng.randrange(1000)}",
        "lines": [f"{rng.randint(1, 200)} Main Street"],
        "city": rng.choice(["Berlin", "Lyon", "Austin", "Osaka"]),
        "postal_code": f"{rng.randrange(10**5):05d}",
        "country": rng.choice(["DE", "FR", "US", "JP"]),
    }
    if rng.random() < 0.3:
        address["lines"].append(f"Floor {rng.randint(1, 9)}")
    if address["country"] == "US":
        address["region"] = "TX"
    return address


def _version_of(response: httpx.Response) -> int | None:
    etag = response.headers.get("etag", "").strip('"')
    return int(etag) if response.status_code == 412 and etag.isdigit() else None


# -- the audit: the topic against the ledger ----------------------------------------------------


@dataclass
class Audit:
    """The figures of a run, and the problems found (each list must be empty)."""

    sent: int = 0
    acknowledged: int = 0
    rejected: int = 0
    unknown: int = 0
    not_sent: int = 0
    ambiguous_unkeyed: int = 0  # no key, and an attempt's outcome unknown: no exactly-once
    events: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    phantom: list[str] = field(default_factory=list)
    version_problems: list[str] = field(default_factory=list)
    ack_lost: int = 0  # commands never acknowledged whose events are in the topic
    unknown_duplicates: int = 0  # extra events of ambiguous commands without a key


def audit(ledger: Ledger, events: Sequence[Applied]) -> Audit:
    """Check the topic against the ledger: exactly once, nothing unasked, gapless versions."""
    result = Audit(events=len(events))
    by_correlation: dict[str, list[Applied]] = defaultdict(list)
    by_key: dict[str, list[Applied]] = defaultdict(list)
    at: dict[tuple[int, int], Applied] = {}
    for applied in events:
        by_correlation[applied.envelope.correlation_id].append(applied)
        if applied.envelope.idempotency_key is not None:
            by_key[applied.envelope.idempotency_key].append(applied)
        at[(applied.partition, applied.offset)] = applied
    known = {sent.correlation_id for sent in ledger.commands}
    for correlation_id, found in by_correlation.items():
        if correlation_id not in known:
            result.phantom.append(f"{len(found)} event(s) of an unknown command {correlation_id}")
    for key, found in by_key.items():
        if len({applied.envelope.command_id for applied in found}) > 1:
            result.duplicated.append(f"idempotency key {key}: {len(found)} events")
    for sent in ledger.commands:
        _audit_command(result, sent, by_correlation.get(sent.correlation_id, []), at)
    result.version_problems = version_problems(events)
    return result


def _audit_command(
    result: Audit, sent: Sent, found: list[Applied], at: dict[tuple[int, int], Applied]
) -> None:
    result.sent += 1
    strict = sent.idempotency_key is not None or not sent.ambiguous
    result.ambiguous_unkeyed += not strict
    what = f"{sent.method} {sent.path} ({sent.correlation_id}, {sent.statuses})"
    if sent.outcome == "acknowledged":
        result.acknowledged += 1
        assert sent.token is not None
        event = at.get(sent.token)
        if (
            event is None
            or event.envelope.correlation_id != sent.correlation_id
            or event.envelope.order_id != sent.order_id
            or event.envelope.version != sent.version
        ):
            result.lost.append(f"{what}: acknowledged at {sent.token}, not there")
        if strict and len(found) > 1:
            result.duplicated.append(f"{what}: {len(found)} events")
        elif not strict:
            result.unknown_duplicates += max(0, len(found) - 1)
        return
    if sent.outcome == "rejected":
        result.rejected += 1
    elif sent.outcome == "unknown":
        result.unknown += 1
    else:
        result.not_sent += 1
    if not found:
        return
    if sent.outcome == "unknown" or not strict:
        result.ack_lost += 1
        if sent.idempotency_key is not None and len(found) > 1:
            result.duplicated.append(f"{what}: {len(found)} events, never acknowledged")
    else:
        result.phantom.append(f"{what}: {sent.outcome}, yet {len(found)} event(s)")


def version_problems(events: Sequence[Applied]) -> list[str]:
    """Per order, versions must run 1, 2, 3 ... in topic order: no gap, no repeat."""
    versions: dict[str, list[int]] = defaultdict(list)
    for applied in sorted(events, key=lambda a: (a.partition, a.offset)):
        versions[applied.envelope.order_id].append(applied.envelope.version)
    return [
        f"order {order_id}: versions {seen[:20]}"
        for order_id, seen in versions.items()
        if seen != list(range(1, len(seen) + 1))
    ]


# -- read models: caught up, and where each projection stands ------------------------------------


async def wait_projected(
    engine: AsyncEngine, names: Iterable[str], topic: str, fetched: Fetched, *, timeout: float
) -> list[str]:
    """Wait until every projection has applied the last record of every partition; the
    (projection, partition)s still behind at the deadline (an empty list when caught up)."""
    deadline = time.monotonic() + timeout
    behind = []
    for name in names:
        for tp, records in sorted(fetched.items(), key=lambda item: item[0].partition):
            if not records:
                continue
            remaining = max(0.0, deadline - time.monotonic())
            last = records[-1].offset
            if not await wait_for_checkpoint(engine, name, topic, tp.partition, last, remaining):
                behind.append(f"{name} partition {tp.partition} (last offset {last})")
    return behind


async def applied_part(engine: AsyncEngine, name: str, topic: str, fetched: Fetched) -> Fetched:
    """The records ``name`` has applied by its checkpoints: per partition, those below it.

    Found with ``wait_for_checkpoint(..., timeout_s=0)`` ("is this offset applied?"), which
    is monotonic in the offset, by bisection over each partition's records.
    """
    applied: Fetched = {}
    for tp, records in fetched.items():
        if records and await wait_for_checkpoint(
            engine, name, topic, tp.partition, records[-1].offset, 0
        ):
            applied[tp] = records
            continue
        low, high = 0, len(records) - 1  # records[:low] applied, records[high:] not
        while low < high:
            middle = (low + high) // 2
            offset = records[middle].offset
            if await wait_for_checkpoint(engine, name, topic, tp.partition, offset, 0):
                low = middle + 1
            else:
                high = middle
        applied[tp] = records[:low]
    return applied


async def oracle_mismatches(
    engine: AsyncEngine, names: Iterable[str], events: Sequence[Applied]
) -> dict[str, str]:
    """Per projection whose tables differ from a pure fold of ``events``: the differences."""
    mismatches = {}
    for name in names:
        try:
            await assert_tables_equal_oracle(engine, [name], events)
        except AssertionError as error:
            mismatches[name] = str(error)
    return mismatches
