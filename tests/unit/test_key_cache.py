"""The token verifier's key cache: tokens that arrive while the keys are first read."""

from __future__ import annotations

import asyncio
from typing import Any

from service.infra.identity import JwksSource, KeyCache
from tests.support.identity import ISSUER


class _SlowSource(JwksSource):
    """The issuer's JWKS, handed over only when the test says so."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.reads = 0

    async def read(self) -> dict[str, Any]:
        self.reads += 1
        await self.release.wait()
        return ISSUER.jwks()

    def describe(self) -> str:
        return "a slow source"


async def test_tokens_arriving_while_the_keys_are_first_read_wait_for_them() -> None:
    source = _SlowSource()
    cache = KeyCache(source)
    first = asyncio.create_task(cache.get(ISSUER.kid))
    await asyncio.sleep(0)  # the first caller starts the read
    others = [asyncio.create_task(cache.get(ISSUER.kid)) for _ in range(3)]
    await asyncio.sleep(0)
    source.release.set()
    keys = await asyncio.gather(first, *others)
    assert all(key is not None for key in keys)
    assert source.reads == 1
