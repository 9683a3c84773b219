"""The consumer example of docs/events.md, run as written against a real broker: a reader
outside the service, with plain aiokafka, sees the events the API wrote."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.edge.http.app import Resources, create_app
from tests.support.http import serve
from tests.support.identity import access
from tests.support.projection_harness import Api
from tests.support.topics import new_topic
from tests.support.writers import started_writer

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"
PARTITIONS = 3
EXAMPLE_TIMEOUT_S = 60.0


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "docs/events.md should hold one Python example"
    return str(blocks[0])


@pytest.fixture
async def api(bootstrap: str, topic: str) -> AsyncIterator[Api]:
    await new_topic(bootstrap, topic, PARTITIONS)
    async with (
        started_writer(bootstrap, topic) as writer,
        serve(create_app(Resources(writer=writer), access=access())) as client,
    ):
        yield Api(client)


async def test_the_consumer_example_reads_what_the_api_wrote(
    api: Api, bootstrap: str, topic: str, tmp_path: Path
) -> None:
    address = {
        "name": "Jane Roe",
        "lines": ["1 Main St"],
        "city": "Austin",
        "postal_code": "78701",
        "region": "TX",
        "country": "US",
    }
    shipped = (await api.create("c-1", "USD", address)).order_id
    await api.add(shipped, "A", 1, 100)
    await api.place(shipped)
    await api.pay(shipped, 100, "USD")
    await api.ship(shipped)
    plain = (await api.create("c-2")).order_id
    await api.set_address(plain, {**address, "city": "Dallas", "region": None})
    await api.cancel(plain)

    script = tmp_path / "consumer.py"
    script.write_text(_example())
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "ORDERS_TOPIC": topic},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), EXAMPLE_TIMEOUT_S)
    assert process.returncode == 0, err.decode()

    lines = sorted(out.decode().splitlines())
    assert lines == sorted(
        [
            f"{shipped} 1 OrderCreated Austin, US",
            f"{shipped} 5 OrderShipped Austin, US",
            f"{plain} 1 OrderCreated -",
            f"{plain} 2 ShippingAddressSet Dallas, US",
        ]
    )
