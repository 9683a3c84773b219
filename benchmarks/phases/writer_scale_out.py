"""(j) Several API instances on one topic (``service.write.ownership``): commands/s with one
instance and with two, and the CPU a forwarded command costs against a direct one.

* **One against two.** Instance A alone, then B joins (the partitions are shared), then B
  leaves again: runs in the order one, two, two, one, so drift weighs on both sides alike.
  With two, half the clients send to A and half to B, as a plain load balancer would: about
  half of each instance's commands belong to the other's partitions and are forwarded.
* **Forwarded against direct.** With both running, the same open loop (a fixed rate both
  sides sustain) against A, once with only commands for A's partitions (direct) and once with
  only commands for B's (each forwarded to B), alternating. The CPU of both instances per
  command answered: what a forwarded command costs the whole service; and its latency.

This machine has 2 cores, shared by the broker, Postgres, the load generator and the
instances: two instances cannot double the rate here; the figures say what they do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import statistics
import time
import uuid
from collections.abc import Callable, Sequence

import httpx

from benchmarks import events, httpload
from benchmarks.auth_cost import PAUSE_S, cpu_per_command_us, order
from benchmarks.callers import NEVER_BITES, NO_SHEDDING, Customer
from benchmarks.context import HOST, Context, empty_log_file
from benchmarks.loads import measured
from benchmarks.meters import CpuMeter
from benchmarks.report import Row, ms, n, ratio
from service.infra.eventlog import partition_for
from service.infra.topic import create_state_topic, state_topic_for

_log = logging.getLogger("benchmarks")

PARTITIONS = 12  # httpload.api_process creates the topic with 12
RUNS = 4  # forwarded against direct, alternating
# Forwarded against direct: the same offered rate on both sides (one both sustain), so that
# the instances' background work weighs on the same number of commands.
FORWARDING_RATE = 50
FORWARDING_SECONDS = 8.0


class RoutedWorkload(httpload.Workload):
    """The benchmark's commands, only those whose order's partition ``keep`` accepts (a
    create's partition is the one its caller and Idempotency-Key pick)."""

    def __init__(self, customers: Sequence[Customer], keep: Callable[[int], bool]) -> None:
        super().__init__(customers)
        self._keep = keep

    def next(self) -> httpload.Command:
        for _ in range(10_000):
            command = super().next()
            if self._keep(_partition_of(command)):
                return command
        raise RuntimeError("no command falls in the wanted partitions")


def _partition_of(command: httpload.Command) -> int:
    if command.kind == "create":
        key = command.headers.split(b"Idempotency-Key: ", 1)[1].split(b"\r\n", 1)[0].decode()
        caller = json.dumps([command.customer.customer_id, key])
        return partition_for(caller.encode(), PARTITIONS)
    order_id = command.path.split("/")[2]
    return partition_for(order_id.encode(), PARTITIONS)


async def _owned(port: int) -> list[int]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        health = (await client.get(f"http://{HOST}:{port}/health")).json()
    return list(health.get("partitions") or [])


async def _until_shared(ports: Sequence[int], *, timeout: float = 90.0) -> dict[int, list[int]]:
    """Poll the instances' ``/health`` until they decide for every partition, each once."""
    deadline = time.monotonic() + timeout
    while True:
        owned = {port: await _owned(port) for port in ports}
        every = sorted(p for share in owned.values() for p in share)
        if every == list(range(PARTITIONS)):
            return owned
        if time.monotonic() > deadline:
            raise RuntimeError(f"the instances never shared the partitions: {owned}")
        await asyncio.sleep(0.2)  # polling interval


async def writer_scale_out(ctx: Context) -> None:
    """(j) commands/s with one and with two instances; forwarded against direct CPU."""
    plan, infra = ctx.plan, ctx.infra
    bootstrap = infra.kafka_bootstrap_servers
    topic = f"bench.instances.{uuid.uuid4().hex[:8]}"
    clients = max(plan.closed_clients)
    settings = ctx.callers.environment(auth=True, rate_limit=NEVER_BITES) | NO_SHEDDING
    await events.create_topic(bootstrap, topic)
    await create_state_topic(bootstrap, state_topic_for(topic), partitions=PARTITIONS)

    def instance(name: str) -> contextlib.AbstractContextManager[httpload.ApiProcess]:
        return httpload.api_process(
            bootstrap=bootstrap,
            database_url=infra.database_url,
            topic=topic,
            log_file=empty_log_file(f"instances-{name}"),
            settings=settings,
        )

    rates: dict[str, list[float]] = {"one": [], "two": []}
    cpu_us: dict[str, list[float]] = {"direct": [], "forwarded": []}
    p50: dict[str, list[float]] = {"direct": [], "forwarded": []}
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(instance("a"))
        await httpload.wait_ready(a, timeout=90)
        workload = httpload.Workload(ctx.callers.customers)
        await httpload.introduce(HOST, a.port, workload, clients=clients, timeout=120)
        meter_one = CpuMeter(ctx.infra_pids() | {"api a": a.process.pid, "loadgen": os.getpid()})
        await httpload.closed_loop(HOST, a.port, workload, clients=clients, duration=1.0)

        async def one() -> None:
            load = await measured(
                meter_one,
                httpload.closed_loop(
                    HOST, a.port, workload, clients=clients, duration=plan.http_seconds
                ),
            )
            rates["one"].append(load.achieved_per_second)
            _log.info("one instance: %.0f commands/s", load.achieved_per_second)

        async def two(b: httpload.ApiProcess) -> None:
            loads = await asyncio.gather(
                *(
                    httpload.closed_loop(
                        HOST, port, workload, clients=clients // 2, duration=plan.http_seconds
                    )
                    for port in (a.port, b.port)
                )
            )
            rate = sum(load.achieved_per_second for load in loads)
            rates["two"].append(rate)
            _log.info("two instances: %.0f commands/s", rate)

        await one()
        with instance("b") as b:
            await httpload.wait_ready(b, timeout=90)
            owned = await _until_shared([a.port, b.port])
            _log.info("partitions: A %s, B %s", owned[a.port], owned[b.port])
            await two(b)
            await asyncio.sleep(PAUSE_S)
            await two(b)
            mine = set(owned[a.port])
            routed = {
                "direct": RoutedWorkload(ctx.callers.customers, lambda p: p in mine),
                "forwarded": RoutedWorkload(ctx.callers.customers, lambda p: p not in mine),
            }
            meter_two = CpuMeter(
                ctx.infra_pids()
                | {"api a": a.process.pid, "api b": b.process.pid, "loadgen": os.getpid()}
            )
            for side in ("direct", "forwarded"):  # each side's first orders, not counted
                await httpload.introduce(HOST, a.port, routed[side], clients=clients, timeout=120)
            for index, direct in enumerate(order(RUNS)):
                side = "direct" if direct else "forwarded"
                if index:
                    await asyncio.sleep(PAUSE_S)
                load = await measured(
                    meter_two,
                    httpload.open_loop(
                        HOST,
                        a.port,
                        routed[side],
                        rate=FORWARDING_RATE,
                        duration=FORWARDING_SECONDS,
                        connections=32,
                    ),
                )
                cost = cpu_per_command_us(load, "api a") + cpu_per_command_us(load, "api b")
                cpu_us[side].append(cost)
                p50[side].append(load.percentile(0.5))
                _log.info(
                    "%s: %.0f commands/s, %.0f us of CPU (both instances) per command, p50 %s",
                    side,
                    load.achieved_per_second,
                    cost,
                    ms(load.percentile(0.5)),
                )
        await _until_shared([a.port])
        await one()
    one_rate, two_rate = statistics.median(rates["one"]), statistics.median(rates["two"])
    direct_us = statistics.median(cpu_us["direct"])
    forwarded_us = statistics.median(cpu_us["forwarded"])
    ctx.results["writer_scale_out"] = {
        "clients": clients,
        "run_seconds": plan.http_seconds,
        "one_instance_commands_per_second": rates["one"],
        "two_instances_commands_per_second": rates["two"],
        "direct_cpu_us_per_command": cpu_us["direct"],
        "forwarded_cpu_us_per_command": cpu_us["forwarded"],
        "direct_p50_s": p50["direct"],
        "forwarded_p50_s": p50["forwarded"],
    }
    ctx.rows.append(
        Row(
            "(j) Two API instances against one, same topic, commands/s",
            n(two_rate, "commands/s"),
            n(one_rate, "commands/s (one instance)"),
            ratio(two_rate, one_rate),
            details=f"{clients} closed-loop clients (split over the two), medians of 2 runs a "
            "side (one, two, two, one); about half of each instance's commands forwarded",
        )
    )
    ctx.rows.append(
        Row(
            "(j) CPU of a forwarded command against a direct one (both instances)",
            n(forwarded_us, "us/command"),
            n(direct_us, "us/command (direct)"),
            ratio(forwarded_us, direct_us),
            details=f"{FORWARDING_RATE} commands/s offered to one instance, only its own "
            f"partitions' commands or only the other's; medians of {RUNS // 2} runs a side, "
            f"alternating; p50 {ms(statistics.median(p50['forwarded']))} forwarded, "
            f"{ms(statistics.median(p50['direct']))} direct",
        )
    )
