"""OAuth2 bearer tokens on N5g-eir: real RS256/ES256 JWTs (PyJWT + cryptography), validated
against a PEM key or a JWKS file; 401/403 with WWW-Authenticate, over real HTTP/2 too."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from eir_server.n5g_eir.oauth import BearerAuthorizer
from tests.n5g_eir.conftest import PATH

NOW = 1_800_000_000.0
NF_ID = "4947a69a-f61b-4bc1-b9da-47c9c5d14b64"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def token(key=RSA_KEY, alg: str = "RS256", kid: str | None = None, **claims) -> str:
    body = {"iss": "nrf-1", "sub": "amf-1", "aud": NF_ID, "scope": "n5g-eir-eic",
            "exp": int(NOW) + 300, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


@pytest.fixture
def pem(tmp_path: Path) -> str:
    p = tmp_path / "nrf.pub.pem"
    p.write_bytes(RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(p)


@pytest.fixture
def jwks(tmp_path: Path) -> str:
    keys = []
    for kid, k in (("rsa-1", RSA_KEY), ("ec-1", EC_KEY)):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[
            "RS256" if kid == "rsa-1" else "ES256"].to_jwk(k.public_key()))
        keys.append({**jwk, "kid": kid})
    p = tmp_path / "jwks.json"
    p.write_text(json.dumps({"keys": keys}))
    return str(p)


def status(auth: BearerAuthorizer, header: str | None, now: float = NOW):
    r = auth.check(header, now)
    return None if r is None else (r.status, dict(r.headers).get("www-authenticate", ""))


def test_pem_key_accepts_good_tokens_and_refuses_the_rest(pem: str) -> None:
    auth = BearerAuthorizer.from_files(pem, "", [NF_ID, "5G_EIR"])
    assert status(auth, "Bearer " + token()) is None
    assert status(auth, "Bearer " + token(aud=["5G_EIR", "other"])) is None
    assert status(auth, "Bearer " + token(scope="nudm-sdm n5g-eir-eic")) is None
    s, h = status(auth, None)
    assert s == 401 and h == 'Bearer realm="n5g-eir"'
    assert status(auth, "Basic dXNlcjpwdw==")[0] == 401
    for bad in (token(exp=int(NOW) - 1), token(aud="some-other-nf"), token(exp=None),
                token(key=EC_KEY, alg="ES256"), "not.a.jwt",
                jwt.encode({"aud": NF_ID, "scope": "n5g-eir-eic", "exp": NOW + 300}, "s" * 32,
                           algorithm="HS256")):
        s, h = status(auth, "Bearer " + bad)
        assert s == 401 and 'error="invalid_token"' in h, bad
    s, h = status(auth, "Bearer " + token(scope="nudm-sdm"))
    assert s == 403 and 'error="insufficient_scope"' in h and 'scope="n5g-eir-eic"' in h


def test_a_cached_token_still_expires(pem: str) -> None:
    auth = BearerAuthorizer.from_files(pem, "", [NF_ID])
    t = "Bearer " + token(exp=int(NOW) + 10)
    assert status(auth, t, NOW) is None
    assert status(auth, t, NOW + 5) is None
    assert status(auth, t, NOW + 10)[0] == 401


def test_jwks_picks_the_key_by_kid(jwks: str) -> None:
    auth = BearerAuthorizer.from_files("", jwks, [NF_ID])
    assert status(auth, "Bearer " + token(kid="rsa-1")) is None
    assert status(auth, "Bearer " + token(EC_KEY, "ES256", kid="ec-1")) is None
    assert status(auth, "Bearer " + token(EC_KEY, "ES256", kid="rsa-1"))[0] == 401
    assert status(auth, "Bearer " + token(kid="unknown"))[0] == 401


async def test_tokens_over_http2(eirs, pem: str) -> None:
    eir = await eirs(authorizer=BearerAuthorizer.from_files(pem, "", [NF_ID, "5G_EIR"]))
    q = {"pei": "imei-352099001761481"}
    async with eir.h2c() as c:
        r = await c.get(PATH, params=q)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.headers["content-type"] == "application/problem+json"
        r = await c.get(PATH, params=q, headers={"authorization": "Bearer " + token()})
        assert (r.status_code, r.json()) == (200, {"status": "BLACKLISTED"})
        r = await c.get(PATH, params=q,
                        headers={"authorization": "Bearer " + token(scope="nudm-sdm")})
        assert r.status_code == 403 and "insufficient_scope" in r.headers["www-authenticate"]
        assert r.json()["status"] == 403
    assert eir.metrics.requests[("n5g_eir", "GET", "401")] == 1
    assert eir.metrics.requests[("n5g_eir", "GET", "403")] == 1
