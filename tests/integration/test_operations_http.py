"""Operator actions over HTTP (issue 19): park, list, skip and retry parked events, each behind
its scope, with the functions and the refusals of ``orders projections ...``.

A poison record written straight to the topic halts ``orders`` in one partition; an operator
holding only ``ops:write`` parks, skips and retries over HTTP, a viewer holding only ``ops:read``
lists, and neither may do the other's part. Every refusal is compared with what the parking
functions (the CLI's) say to the same request. Real broker, real database; waiting is polling.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar
from sqlalchemy.ext.asyncio import AsyncEngine

from projections import parking
from projections.parking import ParkingRefused
from projections.status import HALTED
from service.edge.http.app import Resources, create_app
from service.edge.http.ops import ParkedEvents, ParkedEventView, Retried
from service.kernel.access import ALL_SCOPES, Scope
from service.write.writer import Writer
from tests.support.http import serve
from tests.support.identity import access, token
from tests.support.poison import produce, unknown_type
from tests.support.projection_harness import Api, eventually, running, wait_caught_up

PARTITIONS = 4
NAMES = ["orders"]
OPERATOR = "operator-on-call"  # holds ops:write only
VIEWER = "dashboard"  # holds ops:read only
PARKED_WITH_ORDER = "its order is parked"


# -- fixtures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clients:
    operator: httpx.AsyncClient  # ops:write
    viewer: httpx.AsyncClient  # ops:read
    app: Litestar


@pytest.fixture
async def ops(
    db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str
) -> AsyncIterator[Clients]:
    """The app with operations only (an engine and the Kafka address, no writer), called by an
    operator and by a viewer."""
    resources = Resources(
        engine=db, kafka_bootstrap=bootstrap, topic=topic, projection_group_prefix=group_prefix
    )
    app = create_app(resources, access=access())
    async with (
        serve(app, token=token(OPERATOR, Scope.OPS_WRITE)) as operator,
        serve(app, token=token(VIEWER, Scope.OPS_READ)) as viewer,
    ):
        yield Clients(operator, viewer, app)


# -- helpers -----------------------------------------------------------------------------------


def problem_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The problem body of ``response``, after checking its status, media type and type."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert (body["status"], body["type"].rsplit("/", 1)[-1]) == (status, code), body
    return body


async def refusal_of(action: Awaitable[Any]) -> str:
    """What the parking function (the CLI's) says when it refuses."""
    with pytest.raises(ParkingRefused) as refused:
        await action
    return str(refused.value)


def assert_refused_as_the_cli(response: httpx.Response, refusal: str) -> None:
    body = problem_of(response, 409, "refused")
    assert body["detail"] == refusal, body


def assert_needs_scope(response: httpx.Response, scope: Scope) -> None:
    body = problem_of(response, 403, "insufficient-scope")
    assert body["required_scopes"] == [scope], body


def view(event: parking.ParkedEvent) -> ParkedEventView:
    return msgspec.convert(event, ParkedEventView, from_attributes=True)


async def listed(client: httpx.AsyncClient, projection: str | None = None) -> list[ParkedEventView]:
    params = {"projection": projection} if projection is not None else None
    response = await client.get("/ops/projections/parked", params=params)
    assert response.status_code == 200, response.text
    return msgspec.json.decode(response.content, type=ParkedEvents).events


async def parked_now(db: AsyncEngine, topic: str) -> list[ParkedEventView]:
    return [view(event) for event in await parking.parked(db, topic)]


def operator_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "service.edge.http.ops" and record.levelno == logging.WARNING
    ]


# -- the scenario ------------------------------------------------------------------------------


async def test_a_halted_projection_is_parked_listed_skipped_and_retried_over_http(
    api: Api,
    db: AsyncEngine,
    ops: Clients,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="service.edge.http.ops")
    operator, viewer = ops.operator, ops.viewer
    async with running(db, bootstrap, topic, group_prefix, NAMES, assigned=PARTITIONS) as run:
        victim = await api.create(f"victim-{suffix}")
        await api.add(victim.order_id, "MUG", 2, 1250)
        poisoned = victim.partition
        poison = unknown_type(victim.order_id, 3)
        poison_at = await produce(bootstrap, topic, poisoned, poison, victim.order_id.encode())
        later = await api.add(victim.order_id, "TEA", 1, 500)  # parked with its order

        async def halted() -> tuple[bool, Any]:
            response = await viewer.get("/ops/projections")
            assert response.status_code == 200, response.text
            (orders,) = [v for v in response.json()["projections"] if v["projection"] == "orders"]
            (row,) = [row for row in orders["partitions"] if row["partition"] == poisoned]
            return row["state"] == HALTED, row

        halt = await eventually(halted, f"orders to halt in partition {poisoned}", alive=run)
        assert (halt["halted_at_offset"], halt["halted_order_id"]) == (poison_at, victim.order_id)

        # -- park: another offset is refused as the CLI refuses it; a viewer may not ----------
        wrong = {"partition": poisoned, "offset": later.offset}
        response = await operator.post("/ops/projections/orders/park", json=wrong)
        assert_refused_as_the_cli(
            response,
            await refusal_of(parking.park(db, bootstrap, topic, "orders", poisoned, later.offset)),
        )
        assert f"is halted at {poison_at}" in response.json()["detail"]
        at_poison = {"partition": poisoned, "offset": poison_at}
        response = await viewer.post("/ops/projections/orders/park", json=at_poison)
        assert_needs_scope(response, Scope.OPS_WRITE)
        assert (await halted())[0]
        assert await parked_now(db, topic) == []
        assert operator_lines(caplog) == []

        response = await operator.post("/ops/projections/orders/park", json=at_poison)
        assert response.status_code == 200, response.text
        parked = msgspec.json.decode(response.content, type=ParkedEventView)
        assert (parked.projection, parked.version, parked.partition, parked.offset) == (
            "orders",
            1,
            poisoned,
            poison_at,
        )
        assert parked.order_id == victim.order_id
        assert parked.reason == halt["reason"]
        assert "unknown event type 'NoSuchEvent'" in parked.reason
        logged = [
            f"{OPERATOR} parked {poisoned}/{poison_at} of orders v1 with order "
            f"{victim.order_id} ({parked.reason})"
        ]
        assert operator_lines(caplog) == logged

        # The partition goes on; the order's later event is set aside with it.
        await wait_caught_up(db, topic, NAMES, api.ends(), alive=run)
        assert not (await halted())[0]

        # -- list: what parking.parked says, for a viewer only -------------------------------
        everything = await listed(viewer)
        assert everything == await parked_now(db, topic)
        assert [(e.partition, e.offset, e.order_id, e.reason) for e in everything] == [
            (poisoned, poison_at, victim.order_id, parked.reason),
            (poisoned, later.offset, victim.order_id, PARKED_WITH_ORDER),
        ]
        assert everything[0] == parked
        assert await listed(viewer, "orders") == everything
        assert await listed(viewer, "order_history") == []
        assert_needs_scope(await operator.get("/ops/projections/parked"), Scope.OPS_READ)

        # -- skip: the poison, for good; the order stays parked ------------------------------
        response = await viewer.post("/ops/projections/orders/skip", json=at_poison)
        assert_needs_scope(response, Scope.OPS_WRITE)
        assert await listed(viewer) == everything
        response = await operator.post("/ops/projections/orders/skip", json=at_poison)
        assert response.status_code == 200, response.text
        assert msgspec.json.decode(response.content, type=ParkedEventView) == parked
        assert await listed(viewer) == everything[1:]
        logged.append(
            f"{OPERATOR} discarded parked event {poisoned}/{poison_at} of order "
            f"{victim.order_id} from orders v1"
        )
        assert operator_lines(caplog) == logged

        # -- retry: the order's parked event applied, the order un-parked --------------------
        retry_victim = {"order_id": victim.order_id}
        response = await viewer.post("/ops/projections/orders/retry", json=retry_victim)
        assert_needs_scope(response, Scope.OPS_WRITE)
        assert await listed(viewer) == everything[1:]
        response = await operator.post("/ops/projections/orders/retry", json=retry_victim)
        assert response.status_code == 200, response.text
        retried = msgspec.json.decode(response.content, type=Retried)
        assert retried == Retried(applied=everything[1:], order_ids=[victim.order_id])
        assert await listed(viewer) == []
        logged.append(
            f"{OPERATOR} applied 1 parked event(s) of 1 order(s) to orders: {victim.order_id}"
        )
        assert operator_lines(caplog) == logged
        shown = await api.client.get(f"/orders/{victim.order_id}")
        assert shown.status_code == 200, shown.text
        assert shown.json()["version"] == later.version
        assert {item["sku"] for item in shown.json()["items"]} == {"MUG", "TEA"}

        # Nothing left: refused as the CLI refuses it.
        response = await operator.post("/ops/projections/orders/retry", json={})
        assert_refused_as_the_cli(response, await refusal_of(parking.retry(db, topic, "orders")))
        assert "no parked order" in response.json()["detail"]


# -- scopes ------------------------------------------------------------------------------------

# method, path, body, the scope it needs, and its answer to a caller with only that scope when
# no projection is halted or parked (a refusal or an empty list: never a 403).
ROUTES = [
    ("GET", "/ops/projections/parked", None, Scope.OPS_READ, 200),
    ("POST", "/ops/projections/orders/park", {"partition": 0, "offset": 0}, Scope.OPS_WRITE, 409),
    ("POST", "/ops/projections/orders/retry", {}, Scope.OPS_WRITE, 409),
    ("POST", "/ops/projections/orders/skip", {"partition": 0, "offset": 0}, Scope.OPS_WRITE, 409),
]


async def test_each_operator_route_needs_its_scope(writer: Writer, ops: Clients) -> None:
    """A token with every other scope is refused (403 naming the scope); one with only that
    scope gets the route's answer. (``writer`` creates the topic.)"""
    for method, path, body, scope, answer in ROUTES:
        others = " ".join(sorted(ALL_SCOPES - {scope}))
        async with serve(ops.app, token=token("someone-else", others)) as lacking:
            assert_needs_scope(await lacking.request(method, path, json=body), scope)
        async with serve(ops.app, token=token("holder", scope)) as holding:
            response = await holding.request(method, path, json=body)
        assert response.status_code == answer, (path, response.text)


# -- refusals ----------------------------------------------------------------------------------


async def test_operator_actions_are_refused_as_the_cli_refuses_them(
    api: Api, db: AsyncEngine, ops: Clients, bootstrap: str, topic: str, suffix: str
) -> None:
    """Without a halt or a parked event every action is refused (409) with the parking
    functions' own words; what the CLI checks before them, and what no function could take, is
    a 400 or 404. Never a 500, and nothing changes."""
    operator = ops.operator
    created = await api.create(f"refused-{suffix}")
    at, offset = created.partition, created.offset

    async def same_refusal(route: str, body: dict[str, Any], function: Awaitable[Any]) -> str:
        response = await operator.post(f"/ops/projections/orders/{route}", json=body)
        refusal = await refusal_of(function)
        assert_refused_as_the_cli(response, refusal)
        return refusal

    position = {"partition": at, "offset": offset}
    assert "is not halted" in await same_refusal(
        "park", position, parking.park(db, bootstrap, topic, "orders", at, offset)
    )
    assert f"has no event at {offset + 5}" in await same_refusal(
        "park",
        {"partition": at, "offset": offset + 5},
        parking.park(db, bootstrap, topic, "orders", at, offset + 5),
    )
    assert "has no live or building version 7" in await same_refusal(
        "park",
        {**position, "version": 7},
        parking.park(db, bootstrap, topic, "orders", at, offset, version=7),
    )
    assert "no parked order" in await same_refusal(
        "retry",
        {"order_id": created.order_id},
        parking.retry(db, topic, "orders", order_id=created.order_id),
    )
    assert "no parked event" in await same_refusal(
        "skip", position, parking.skip(db, topic, "orders", at, offset)
    )

    # What the CLI checks before parking: the partition (its advice, in HTTP terms).
    response = await operator.post(
        "/ops/projections/orders/park", json={"partition": 99, "offset": 0}
    )
    detail = problem_of(response, 400, "unknown-partition")["detail"]
    assert detail == (
        f"topic {topic} has no partition 99 (it has 0-{PARTITIONS - 1}): check partition "
        "against GET /ops/projections"
    )
    # A projection nobody knows: 404 on its path, 400 as a filter.
    for route in ("park", "retry", "skip"):
        body = {} if route == "retry" else position
        response = await operator.post(f"/ops/projections/nope/{route}", json=body)
        assert "no projection 'nope'" in problem_of(response, 404, "projection-not-found")["detail"]
    response = await ops.viewer.get("/ops/projections/parked", params={"projection": "nope"})
    assert "known: " in problem_of(response, 400, "unknown-projection")["detail"]

    # Bodies as strict as the commands': unknown fields, values no column could hold, not JSON.
    too_big = 2**31
    for route, body in [
        ("park", {**position, "force": True}),
        ("park", {"partition": -1, "offset": 0}),
        ("skip", {"partition": too_big, "offset": 0}),
        ("skip", {**position, "version": too_big}),
        ("skip", {"partition": at}),
        ("retry", {"order_id": "a\x00b"}),
        ("retry", {"order_id": ""}),
    ]:
        response = await operator.post(f"/ops/projections/orders/{route}", json=body)
        problem_of(response, 400, "invalid-request")
    response = await operator.post("/ops/projections/orders/retry", content=b"{}")
    problem_of(response, 415, "unsupported-media-type")

    assert await parking.parked(db, topic) == []
