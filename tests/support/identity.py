"""The identity provider of the tests: a development issuer (an ES256 key pair and its JWKS in
a temporary folder, made once per test session) and tokens it signs.

Every app and service the tests start checks tokens against it, as a deployment checks them
against its identity provider's JWKS; clients send ``BACK_OFFICE`` unless a test is about
who may do what.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

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


# -- tokens the service must refuse -------------------------------------------------------------


def _genuine_claims(sub: str, scopes: str) -> dict[str, Any]:
    """The claims of a token of the issuer for ``sub`` with ``scopes``, to sign another way."""
    claims: dict[str, Any] = jwt.decode(token(sub, scopes), options={"verify_signature": False})
    return claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_by_an_impostor(sub: str, scopes: str) -> str:
    """Genuine claims signed by another key that gives the issuer's key id."""
    impostor = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(
        _genuine_claims(sub, scopes), impostor, algorithm="ES256", headers={"kid": ISSUER.kid}
    )


def unsigned(sub: str, scopes: str) -> str:
    """Genuine claims with ``alg: none`` and no signature."""
    return jwt.encode(
        _genuine_claims(sub, scopes), None, algorithm="none", headers={"kid": ISSUER.kid}
    )


def signed_with_the_public_key(sub: str, scopes: str) -> str:
    """Genuine claims "signed" with HS256 keyed by the issuer's public key (the algorithm
    confusion attack). By hand: PyJWT refuses a PEM key as an HMAC secret."""
    header = {"alg": "HS256", "kid": ISSUER.kid, "typ": "JWT"}
    signed = ".".join(
        _b64(json.dumps(part).encode()) for part in (header, _genuine_claims(sub, scopes))
    )
    public_pem = jwt.algorithms.ECAlgorithm.from_jwk(ISSUER.public_jwk).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = hmac.new(public_pem, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{_b64(signature)}"
