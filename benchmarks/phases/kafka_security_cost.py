"""(h) What a secured cluster costs the writer: commands/s through ``Writer.submit`` (the
writer's own limit, no HTTP) on the PLAINTEXT broker and on a SASL_SSL one (SCRAM-SHA-512,
TLS), runs alternating in Thue-Morse order in the same run, so drift on this machine weighs
on both sides alike."""

from __future__ import annotations

import asyncio
import logging
import statistics
import uuid

from benchmarks import writer_direct
from benchmarks.context import Context
from benchmarks.report import Row, n, ratio
from service.infra.embedded.kafka import LocalKafka
from service.infra.kafka_clients import KafkaTarget
from service.infra.topic import create_topic

_log = logging.getLogger("benchmarks")

RUNS_PER_SIDE = 4
RUN_SECONDS = 8.0
CLIENTS = 64
# ABBA BAAB: each side runs as often first as second.
ORDER = ("PLAINTEXT", "SASL_SSL", "SASL_SSL", "PLAINTEXT") * (RUNS_PER_SIDE // 2)


async def kafka_security_cost(ctx: Context) -> None:
    """(h) the writer's commands/s on a SASL_SSL broker against a PLAINTEXT one."""
    secured = LocalKafka(secured=True)
    await asyncio.to_thread(secured.start)
    try:
        targets: dict[str, KafkaTarget] = {
            "PLAINTEXT": ctx.infra.kafka_bootstrap_servers,
            "SASL_SSL": secured.connection_as(),
        }
        topics = {}
        for name, target in targets.items():
            topics[name] = f"bench.security.{name.lower()}.{uuid.uuid4().hex[:8]}"
            await create_topic(target, topics[name], partitions=12)
        rates: dict[str, list[float]] = {name: [] for name in targets}
        for name in ORDER:
            [result] = await writer_direct.closed_loop(
                targets[name],
                topics[name],
                clients=[CLIENTS],
                duration=RUN_SECONDS,
                warm_up=2.0,
                timeout=120,
            )
            rates[name].append(result.achieved_per_second)
            _log.info("writer on %s: %.0f commands/s", name, result.achieved_per_second)
    finally:
        await asyncio.to_thread(secured.stop)
    plain = statistics.median(rates["PLAINTEXT"])
    sasl = statistics.median(rates["SASL_SSL"])
    ctx.results["kafka_security_cost"] = {
        "clients": CLIENTS,
        "run_seconds": RUN_SECONDS,
        "plaintext_commands_per_second": rates["PLAINTEXT"],
        "sasl_ssl_commands_per_second": rates["SASL_SSL"],
        "ratio_sasl_ssl_to_plaintext": sasl / plain if plain > 0 else None,
    }
    ctx.rows.append(
        Row(
            "Writer on SASL_SSL (SCRAM-SHA-512, TLS) vs PLAINTEXT",
            n(sasl, "commands/s"),
            n(plain, "commands/s"),
            ratio(sasl, plain),
            details=f"Writer.submit, {CLIENTS} closed-loop clients, median of {RUNS_PER_SIDE} "
            f"runs of {RUN_SECONDS:.0f} s a side, alternating; one broker each",
        )
    )
