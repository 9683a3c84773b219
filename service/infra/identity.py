"""Access tokens from an identity provider: its signing keys (a JWKS) and the checks a bearer
JWT must pass (RFC 9068 style). The JOSE work is PyJWT's; nothing here does cryptography.

* Keys come from a JWKS document, read from a file or fetched over HTTP(S). They are cached
  and read again when a token names a key id not in the cache (a rotation), at most once per
  ``min_refresh_s``, and when the cache is older than ``max_age_s``; one read at a time.
* A token must be signed with RS256, ES256 or EdDSA by a key of the set, with the algorithm
  that key is for (so a token "signed" with HMAC and a public key, or with ``alg: none``, is
  refused), and carry ``exp``, ``iss``, ``aud`` and ``sub``, checked with a small leeway.
* Tokens already verified are remembered until they expire or the key set changes: a client
  sends the same token with every request, and checking a signature costs more than the rest
  of a small request does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.kernel.errors import EnvironmentProblem, Unavailable

_log = logging.getLogger(__name__)

ALGORITHMS = ("RS256", "ES256", "EdDSA")


class TokenRejected(Exception):
    """The bearer token is malformed, not signed by a known key, expired, or not for
    this service. ``reason`` says which, for the ``WWW-Authenticate`` error description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeysUnavailable(Unavailable):
    """The identity provider's keys cannot be read, and none are cached."""


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says about its bearer."""

    sub: str
    client_id: str | None
    scopes: frozenset[str]
    expires_at: float  # epoch seconds


# -- where the keys come from -------------------------------------------------------------------


class JwksSource(ABC):
    @abstractmethod
    async def read(self) -> dict[str, Any]:
        """The JWKS document (``{"keys": [...]}``)."""

    @abstractmethod
    def describe(self) -> str: ...


class JwksFile(JwksSource):
    def __init__(self, path: Path) -> None:
        self.path = path

    async def read(self) -> dict[str, Any]:
        text = await asyncio.to_thread(self.path.read_text, encoding="utf-8")
        document: dict[str, Any] = json.loads(text)
        return document

    def describe(self) -> str:
        return str(self.path)


class JwksUrl(JwksSource):
    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    async def read(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            response = await client.get(self.url, headers={"Accept": "application/json"})
            response.raise_for_status()
            document: dict[str, Any] = response.json()
            return document

    def describe(self) -> str:
        return self.url


def signing_keys(document: dict[str, Any]) -> dict[str | None, jwt.PyJWK]:
    """The keys of a JWKS that can verify our algorithms, by key id; others are skipped."""
    keys: dict[str | None, jwt.PyJWK] = {}
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError('a JWKS is a JSON object with a "keys" list')
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError) as error:
            _log.warning("skipping JWKS key %r: %s", entry.get("kid"), error)
            continue
        if key.algorithm_name in ALGORITHMS:
            keys[entry.get("kid")] = key
    return keys


class KeyCache:
    """The signing keys of one JWKS source, read again on an unknown key id (bounded rate)."""

    def __init__(
        self, source: JwksSource, *, min_refresh_s: float = 30.0, max_age_s: float = 300.0
    ) -> None:
        self.source = source
        self.min_refresh_s = min_refresh_s
        self.max_age_s = max_age_s
        self.generation = 0  # goes up whenever the key set changes
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._read_at: float | None = None  # monotonic time of the last attempt
        self._reading: asyncio.Task[None] | None = None

    async def get(self, kid: str | None) -> jwt.PyJWK | None:
        if self._reading is not None and not self._reading.done():
            await self.refresh()  # a read in flight (the first one): wait for its keys
        now = time.monotonic()
        if self._read_at is None or now - self._read_at > self.max_age_s:
            await self.refresh()
        elif kid not in self._keys and now - self._read_at >= self.min_refresh_s:
            await self.refresh()  # a key rotated in since the last read
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))  # a token without kid, one key to try
        return self._keys.get(kid)

    async def refresh(self) -> None:
        """Read the key set again (callers arriving meanwhile share the one read)."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.create_task(self._read(), name="jwks-read")
        await asyncio.shield(self._reading)

    async def _read(self) -> None:
        self._read_at = time.monotonic()
        try:
            keys = signing_keys(await self.source.read())
        except (OSError, ValueError, httpx.HTTPError) as error:
            if not self._keys:
                raise KeysUnavailable(
                    f"the token signing keys cannot be read from {self.source.describe()}: {error}"
                ) from error
            _log.warning(
                "reading the JWKS from %s failed (%s); keeping the %d keys cached",
                self.source.describe(),
                error,
                len(self._keys),
            )
            return
        if keys.keys() != self._keys.keys():
            _log.info(
                "token signing keys from %s: %s", self.source.describe(), sorted(map(str, keys))
            )
        if {kid: key.key for kid, key in keys.items()} != {
            kid: key.key for kid, key in self._keys.items()
        }:
            self.generation += 1
        self._keys = keys


# -- checking a token ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Remembered:
    claims: Claims
    generation: int


class TokenVerifier:
    """Checks bearer tokens against the keys, issuer and audience of one identity provider."""

    MAX_REMEMBERED = 10_000

    def __init__(self, keys: KeyCache, *, issuer: str, audience: str, leeway_s: float = 30.0):
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self._remembered: dict[str, _Remembered] = {}

    async def verify(self, token: str) -> Claims:
        remembered = self._remembered.get(token)
        if remembered is not None:
            if (
                remembered.generation == self.keys.generation
                and time.time() < remembered.claims.expires_at + self.leeway_s
            ):
                return remembered.claims
            del self._remembered[token]
        claims = await self._check(token)
        if len(self._remembered) >= self.MAX_REMEMBERED:
            del self._remembered[next(iter(self._remembered))]  # the oldest
        self._remembered[token] = _Remembered(claims, self.keys.generation)
        return claims

    async def _check(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as error:
            raise TokenRejected(f"the token is not a JWT: {error}") from error
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise TokenRejected(
                f"tokens signed with {algorithm!r} are not accepted (only {', '.join(ALGORITHMS)})"
            )
        kid = header.get("kid")
        key = await self.keys.get(kid if isinstance(kid, str) else None)
        if key is None:
            raise TokenRejected(f"the token's signing key {kid!r} is not one of the issuer's")
        if key.algorithm_name != algorithm:
            raise TokenRejected(f"key {kid!r} signs with {key.algorithm_name}, not {algorithm}")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as error:
            raise TokenRejected("the token has expired") from error
        except jwt.ImmatureSignatureError as error:
            raise TokenRejected("the token is not valid yet (nbf/iat in the future)") from error
        except jwt.InvalidAudienceError as error:
            raise TokenRejected(f"the token is not for this service ({error})") from error
        except jwt.InvalidIssuerError as error:
            raise TokenRejected(f"the token is not from the expected issuer ({error})") from error
        except jwt.InvalidTokenError as error:
            raise TokenRejected(f"the token is invalid: {error}") from error
        return _claims(payload)


def _claims(payload: dict[str, Any]) -> Claims:
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenRejected("the token's sub is not a string")
    # RFC 9068: "scope", space-separated; some providers use "scp" (a string or a list).
    raw = payload.get("scope", payload.get("scp", ""))
    scopes = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
    client_id = payload.get("client_id", payload.get("azp"))
    return Claims(
        sub=sub,
        client_id=client_id if isinstance(client_id, str) else None,
        scopes=frozenset(scope for scope in scopes if isinstance(scope, str)),
        expires_at=float(payload["exp"]),
    )


# -- a development issuer -----------------------------------------------------------------------

DEVELOPMENT_ISSUER = "urn:orders:development"
DEVELOPMENT_AUDIENCE = "orders"


class DevelopmentIssuer:
    """An ES256 key pair in a folder, its JWKS beside it, and tokens signed with it: what
    ``orders dev`` and ``orders token`` use instead of a real identity provider."""

    KEY_FILE = "token-signing-key.pem"
    JWKS_FILE = "jwks.json"

    def __init__(self, folder: Path, private_key: ec.EllipticCurvePrivateKey) -> None:
        self.folder = folder
        self._private_key = private_key
        public_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key()))
        self.kid = _thumbprint(public_jwk)
        self.public_jwk = {**public_jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}

    @property
    def jwks_path(self) -> Path:
        return self.folder / self.JWKS_FILE

    @classmethod
    def exists(cls, folder: Path) -> bool:
        return (folder / cls.KEY_FILE).is_file()

    @classmethod
    def load(cls, folder: Path, *, create: bool = False) -> DevelopmentIssuer:
        """The folder's key pair; ``create``: make one first if there is none."""
        path = folder / cls.KEY_FILE
        if not path.is_file():
            if not create:
                raise EnvironmentProblem(
                    f"no development signing key in {folder}: run `orders dev` once (it "
                    "creates one), or mint tokens with your identity provider"
                )
            folder.mkdir(parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(pem)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise EnvironmentProblem(
                f"{path} is not an EC private key; delete it to make a new one"
            )
        issuer = cls(folder, loaded)
        issuer.jwks_path.write_text(json.dumps(issuer.jwks(), indent=2) + "\n", encoding="utf-8")
        return issuer

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.public_jwk]}

    def mint(
        self,
        sub: str,
        scopes: str | list[str],
        *,
        ttl: timedelta = timedelta(hours=12),
        client_id: str | None = None,
        issuer: str = DEVELOPMENT_ISSUER,
        audience: str = DEVELOPMENT_AUDIENCE,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer,
            "aud": audience,
            "sub": sub,
            "scope": scopes if isinstance(scopes, str) else " ".join(scopes),
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl.total_seconds()),
        }
        if client_id is not None:
            claims["client_id"] = client_id
        return jwt.encode(
            claims, self._private_key, algorithm="ES256", headers={"kid": self.kid, "typ": "at+jwt"}
        )


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint of an EC public key: its stable key id."""
    canonical = json.dumps(
        {name: jwk[name] for name in ("crv", "kty", "x", "y")}, separators=(",", ":")
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
