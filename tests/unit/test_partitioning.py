"""The writer places records itself (one record batch per partition): exactly where the Kafka
clients' default partitioner would, so every order keeps the partition it always had."""

from __future__ import annotations

import random
import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2

from service.infra.eventlog import _murmur2, partition_for


@pytest.mark.parametrize("partitions", [1, 4, 12, 50])
def test_an_order_goes_to_the_partition_the_default_partitioner_picks(partitions: int) -> None:
    keys = [str(uuid.uuid4()).encode() for _ in range(2000)] + [b"", b"o-1", "ü-€".encode()]
    every = list(range(partitions))

    for key in keys:
        assert partition_for(key, partitions) == DefaultPartitioner()(key, every, every), key


def test_murmur2_equals_the_kafka_clients_on_keys_of_every_length() -> None:
    rng = random.Random(7)
    for length in range(70):
        for _ in range(20):
            key = rng.randbytes(length)
            assert _murmur2(key) == murmur2(key), key
