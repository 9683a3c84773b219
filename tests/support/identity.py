"""The identity provider of the tests: a development issuer (an ES256 key pair and its JWKS in
a temporary folder, made once per test session) and tokens it signs.

Every app and service the tests start checks tokens against it, as a deployment checks them
against its identity provider's JWKS; clients send ``BACK_OFFICE`` unless a test is about
who may do what.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

from service.edge.http.auth import Access
from service.edge.http.limits import TokenBuckets
from service.infra.identity import (
    DEVELOPMENT_AUDIENCE,
    DEVELOPMENT_ISSUER,
    DevelopmentIssuer,
    JwksFile,
    KeyCache,
    TokenVerifier,
)
from service.kernel.access import ALL_SCOPES

ISSUER = DevelopmentIssuer.load(Path(tempfile.mkdtemp(prefix="orders-test-identity-")), create=True)

# Every scope: what the tests that are not about access control act as.
BACK_OFFICE = ISSUER.mint("back-office", sorted(ALL_SCOPES), ttl=timedelta(days=1))


def token(
    sub: str, scopes: str, *, ttl: timedelta = timedelta(hours=1), client_id: str | None = None
) -> str:
    """A token for ``sub`` with the space-separated ``scopes``."""
    return ISSUER.mint(sub, scopes, ttl=ttl, client_id=client_id)


def bearer(access_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token}"}


def access(*, rate_limit: TokenBuckets | None = None, min_refresh_s: float = 30.0) -> Access:
    """Authentication against the test issuer's JWKS file, as ``orders api`` sets it up."""
    keys = KeyCache(JwksFile(ISSUER.jwks_path), min_refresh_s=min_refresh_s)
    verifier = TokenVerifier(keys, issuer=DEVELOPMENT_ISSUER, audience=DEVELOPMENT_AUDIENCE)
    return Access(verifier, rate_limit)


def environment() -> dict[str, str]:
    """The same for an ``orders`` process."""
    return {
        "ORDERS_JWKS_FILE": str(ISSUER.jwks_path),
        "ORDERS_JWT_ISSUER": DEVELOPMENT_ISSUER,
        "ORDERS_JWT_AUDIENCE": DEVELOPMENT_AUDIENCE,
    }
