"""The writer places records itself (one record batch per partition): exactly where the Kafka
clients' default partitioner would, so every order keeps the partition it always had."""

from __future__ import annotations

import random
import uuid
from collections import Counter

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2

from service.infra.eventlog import _murmur2, new_order_id, partition_for


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


@pytest.mark.parametrize("partitions", [1, 3, 12, 50])
def test_a_new_orders_partition_follows_its_caller_and_idempotency_key(partitions: int) -> None:
    for n in range(200):
        caller, key = f"c-{n % 7}", f"key-{n}"
        first = new_order_id(caller, key, partitions)
        retried = new_order_id(caller, key, partitions)
        assert first != retried  # a new random id each time ...
        # ... in the one partition the caller and key pick, whichever instance draws it
        assert partition_for(first.encode(), partitions) == partition_for(
            retried.encode(), partitions
        )
        assert str(uuid.UUID(first)) == first


def test_new_orders_spread_over_every_partition() -> None:
    partitions = 12
    seen = Counter(
        partition_for(new_order_id("c-1", f"key-{n}", partitions).encode(), partitions)
        for n in range(1200)
    )
    assert set(seen) == set(range(partitions))
    assert max(seen.values()) < 3 * min(seen.values())
    by_other_caller = {
        partition_for(new_order_id(caller, "same-key", partitions).encode(), partitions)
        for caller in (f"c-{n}" for n in range(60))
    }
    assert len(by_other_caller) > 1  # the key is each caller's own
