"""Bearer tokens checked against an identity provider's JWKS: what is refused and why, and how
a rotation of the provider's keys is followed (a JWKS served over real HTTP on 127.0.0.1)."""

from __future__ import annotations

import base64
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from service.infra.identity import (
    DEVELOPMENT_AUDIENCE,
    DEVELOPMENT_ISSUER,
    DevelopmentIssuer,
    JwksFile,
    JwksUrl,
    KeyCache,
    KeysUnavailable,
    TokenRejected,
    TokenVerifier,
)
from tests.support.identity import (
    ISSUER,
    signed_by_an_impostor,
    signed_with_the_public_key,
    unsigned,
)


def _verifier(source: Any, **options: Any) -> TokenVerifier:
    return TokenVerifier(
        KeyCache(source, **options), issuer=DEVELOPMENT_ISSUER, audience=DEVELOPMENT_AUDIENCE
    )


@pytest.fixture
def verifier() -> TokenVerifier:
    return _verifier(JwksFile(ISSUER.jwks_path))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": DEVELOPMENT_ISSUER,
        "aud": DEVELOPMENT_AUDIENCE,
        "sub": "c-1",
        "scope": "orders:read",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


async def test_a_token_of_the_issuer_is_accepted_with_its_subject_scopes_and_client(
    verifier: TokenVerifier,
) -> None:
    token = ISSUER.mint("c-7", "orders:read orders:write", client_id="web-shop")
    claims = await verifier.verify(token)
    assert claims.sub == "c-7"
    assert claims.scopes == {"orders:read", "orders:write"}
    assert claims.client_id == "web-shop"


async def test_scopes_in_an_scp_list_as_some_providers_send_them_are_read(
    verifier: TokenVerifier,
) -> None:
    token = jwt.encode(
        _claims(scope=None, scp=["orders:read", "reports:read"], azp="backoffice-app"),
        ISSUER._private_key,
        algorithm="ES256",
        headers={"kid": ISSUER.kid},
    )
    claims = await verifier.verify(token)
    assert claims.scopes == {"orders:read", "reports:read"}
    assert claims.client_id == "backoffice-app"


REFUSED: dict[str, Any] = {
    "expired": lambda: ISSUER.mint("c-1", "orders:read", ttl=timedelta(seconds=-120)),
    "wrong audience": lambda: ISSUER.mint("c-1", "orders:read", audience="someone-else"),
    "wrong issuer": lambda: ISSUER.mint("c-1", "orders:read", issuer="https://evil.example"),
    "not yet valid": lambda: jwt.encode(
        _claims(nbf=int(time.time()) + 600),
        ISSUER._private_key,
        algorithm="ES256",
        headers={"kid": ISSUER.kid},
    ),
    "no exp": lambda: jwt.encode(
        _claims(exp=None), ISSUER._private_key, algorithm="ES256", headers={"kid": ISSUER.kid}
    ),
    "no sub": lambda: jwt.encode(
        _claims(sub=None), ISSUER._private_key, algorithm="ES256", headers={"kid": ISSUER.kid}
    ),
    "forged with another key": lambda: signed_by_an_impostor("c-1", "orders:read"),
    "alg none": lambda: unsigned("c-1", "orders:read"),
    "HS256 with the public key": lambda: signed_with_the_public_key("c-1", "orders:read"),
    "unknown kid": lambda: jwt.encode(
        _claims(), ISSUER._private_key, algorithm="ES256", headers={"kid": "nobody"}
    ),
    "tampered claims": lambda: _tampered(),
    "not a JWT": lambda: "not-a-token",
}


def _tampered() -> str:
    head, _, signature = ISSUER.mint("c-1", "orders:read").split(".")
    body = _b64(json.dumps(_claims(scope="orders:read:any orders:write:any")).encode())
    return f"{head}.{body}.{signature}"


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_a_bad_token_is_refused_with_the_reason(verifier: TokenVerifier, case: str) -> None:
    with pytest.raises(TokenRejected) as refused:
        await verifier.verify(REFUSED[case]())
    assert refused.value.reason


async def test_an_expired_token_is_refused_even_after_it_was_accepted(
    verifier: TokenVerifier,
) -> None:
    # Within the leeway when minted, past it when checked again: the remembered verification
    # must not outlive the token.
    token = ISSUER.mint("c-1", "orders:read", ttl=timedelta(seconds=-25))
    await verifier.verify(token)
    verifier.leeway_s = 0
    with pytest.raises(TokenRejected, match="expired"):
        await verifier.verify(token)


async def test_rs256_and_eddsa_keys_are_accepted_too() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ed_jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(ed_key.public_key()))
    folder = Path(tempfile.mkdtemp(prefix="jwks-"))
    jwks = folder / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**rsa_jwk, "kid": "rsa-1"}, {**ed_jwk, "kid": "ed-1"}]}))
    verifier = _verifier(JwksFile(jwks))
    rsa_token = jwt.encode(_claims(sub="r"), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    ed_token = jwt.encode(_claims(sub="e"), ed_key, algorithm="EdDSA", headers={"kid": "ed-1"})
    assert (await verifier.verify(rsa_token)).sub == "r"
    assert (await verifier.verify(ed_token)).sub == "e"
    # The algorithm is the key's, not the token's: an RSA key does not verify PS256 or ES256.
    ps_token = jwt.encode(_claims(), rsa_key, algorithm="PS256", headers={"kid": "rsa-1"})
    with pytest.raises(TokenRejected):
        await verifier.verify(ps_token)


# -- a JWKS served over HTTP, and its rotation -------------------------------------------------


class _Jwks:
    """A JWKS endpoint on 127.0.0.1 whose keys a test changes, counting the reads."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.reads = 0
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                jwks.reads += 1
                body = json.dumps(jwks.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def serve(self, *issuers: DevelopmentIssuer) -> None:
        self.document = {"keys": [issuer.public_jwk for issuer in issuers]}


@pytest.fixture
def jwks() -> Iterator[_Jwks]:
    served = _Jwks()
    served.thread.start()
    yield served
    served.server.shutdown()
    served.server.server_close()


def _new_issuer() -> DevelopmentIssuer:
    return DevelopmentIssuer.load(Path(tempfile.mkdtemp(prefix="rotating-")), create=True)


async def test_a_rotation_is_followed_new_key_taken_removed_key_refused(jwks: _Jwks) -> None:
    old, new = _new_issuer(), _new_issuer()
    jwks.serve(old)
    verifier = _verifier(JwksUrl(jwks.url), min_refresh_s=0)
    old_token = old.mint("c-1", "orders:read")
    assert (await verifier.verify(old_token)).sub == "c-1"

    jwks.serve(new)  # the provider rotates: the old key is withdrawn, a new one signs
    assert (await verifier.verify(new.mint("c-2", "orders:read"))).sub == "c-2"
    with pytest.raises(TokenRejected, match="signing key"):
        await verifier.verify(old_token)  # remembered once, refused now its key is gone


async def test_unknown_key_ids_read_the_jwks_at_a_bounded_rate(jwks: _Jwks) -> None:
    known = _new_issuer()
    jwks.serve(known)
    verifier = _verifier(JwksUrl(jwks.url), min_refresh_s=60)
    await verifier.verify(known.mint("c-1", "orders:read"))
    assert jwks.reads == 1
    for _ in range(50):  # a flood of tokens naming keys nobody has
        stranger = _new_issuer()
        with pytest.raises(TokenRejected):
            await verifier.verify(stranger.mint("c-1", "orders:read"))
    assert jwks.reads == 1


async def test_an_unreachable_jwks_is_unavailable_not_a_bad_token() -> None:
    verifier = _verifier(JwksUrl("http://127.0.0.1:9/jwks.json"))
    with pytest.raises(KeysUnavailable):
        await verifier.verify(ISSUER.mint("c-1", "orders:read"))


async def test_cached_keys_outlive_an_outage_of_the_jwks(jwks: _Jwks) -> None:
    issuer = _new_issuer()
    jwks.serve(issuer)
    verifier = _verifier(JwksUrl(jwks.url), min_refresh_s=0, max_age_s=0)
    await verifier.verify(issuer.mint("c-1", "orders:read"))
    jwks.server.shutdown()
    jwks.server.server_close()
    # The key set is stale (max_age 0) and cannot be read again: the cached keys still serve.
    assert (await verifier.verify(issuer.mint("c-2", "orders:read"))).sub == "c-2"
