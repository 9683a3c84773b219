"""Who the benchmarks' loads act as: many customers, each with its own bearer token.

The API checks a bearer JWT on every command (issue 19), so the load generator acts as a real
client population would: a development issuer (an ES256 key pair and its JWKS in a temporary
folder) signs one token per simulated customer (``sub`` = customer id, scopes ``orders:read
orders:write``), minted once, before any load, so signing never runs inside a measurement.
Each customer creates and changes only its own orders, so the API's verified-token cache and
its per-caller rate limit see as many callers as there are customers. The ``orders api``
processes started here check tokens against that JWKS (``environment``).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from pathlib import Path

from service.infra.identity import DEVELOPMENT_AUDIENCE, DEVELOPMENT_ISSUER, DevelopmentIssuer
from service.kernel.access import Scope
from service.kernel.settings import Settings

CUSTOMER_SCOPES = f"{Scope.ORDERS_READ} {Scope.ORDERS_WRITE}"
TOKEN_TTL = timedelta(hours=2)  # longer than any run


@dataclass(frozen=True, slots=True)
class Customer:
    """A simulated customer: its id (the token's ``sub``) and its Authorization header line."""

    customer_id: str
    authorization: bytes  # b"Authorization: Bearer <token>\r\n"


@dataclass(frozen=True)
class RateLimit:
    """``ORDERS_RATE_LIMIT`` (per caller per second; 0: off) and ``ORDERS_RATE_LIMIT_BURST``."""

    per_second: float
    burst: int

    @classmethod
    def service_default(cls) -> RateLimit:
        """What ``orders api`` applies when neither is set."""
        defaults = Settings()
        return cls(defaults.rate_limit_per_s, defaults.rate_limit_burst)

    def environment(self) -> dict[str, str]:
        return {
            "ORDERS_RATE_LIMIT": f"{self.per_second:g}",
            "ORDERS_RATE_LIMIT_BURST": str(self.burst),
        }

    def describe(self) -> str:
        return f"{self.per_second:,.0f}/s per caller, burst {self.burst:,}"


# Throughput phases: the limiter runs (it is on the request path in production) but never
# refuses. With ORDERS_AUTH=off every request counts against one caller, the client's address,
# so the limit must exceed the whole load, not one customer's share.
NEVER_BITES = RateLimit(per_second=1_000_000, burst=1_000_000)
# The same for load shedding: the closed loops sit at capacity on purpose, and their clients
# send again at once instead of honouring Retry-After, so a refusal there starts a storm of
# refusals that measures the shedding, not the service. The overload phase (f) measures it.
NO_SHEDDING = {"ORDERS_MAX_QUEUE_DELAY_MS": "60000"}


@dataclass
class Callers:
    """The issuer of a run and its customers (minted on first use)."""

    issuer: DevelopmentIssuer
    count: int

    @cached_property
    def customers(self) -> tuple[Customer, ...]:
        """``count`` customers ``c-00000`` ..., each with a token of its own."""
        width = max(5, len(str(self.count - 1)))
        customers = []
        for index in range(self.count):
            customer_id = f"c-{index:0{width}d}"
            token = self.issuer.mint(customer_id, CUSTOMER_SCOPES, ttl=TOKEN_TTL)
            customers.append(
                Customer(customer_id, b"Authorization: Bearer %s\r\n" % token.encode())
            )
        return tuple(customers)

    def environment(self, *, auth: bool, rate_limit: RateLimit) -> dict[str, str]:
        """What an ``orders api`` process needs to check these callers' tokens (or not)."""
        env = {
            "ORDERS_AUTH": "on" if auth else "off",
            "ORDERS_JWKS_FILE": str(self.issuer.jwks_path),
            "ORDERS_JWT_ISSUER": DEVELOPMENT_ISSUER,
            "ORDERS_JWT_AUDIENCE": DEVELOPMENT_AUDIENCE,
        }
        return env | rate_limit.environment()


@contextlib.contextmanager
def callers(count: int) -> Iterator[Callers]:
    """A development issuer in a temporary folder (removed on exit) and ``count`` customers."""
    with tempfile.TemporaryDirectory(prefix="orders-bench-identity-") as folder:
        yield Callers(DevelopmentIssuer.load(Path(folder), create=True), count)
