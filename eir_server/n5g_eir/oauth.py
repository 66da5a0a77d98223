"""OAuth2 access tokens on N5g-eir (TS 33.501 13.4.1, TS 29.510 6.3.5.2.4 AccessTokenClaims;
RFC 6750 for the answers). Pure: the time is an argument, keys are loaded once at start.

A request needs `Authorization: Bearer <JWT>` signed by a configured key (a PEM public key, or
a JWKS file whose `kid` picks the key), with `exp` in the future, `aud` naming our NF instance
id or our NF type (5G_EIR), and `scope` containing n5g-eir-eic. Missing or bad token: 401 with
`WWW-Authenticate: Bearer ...`; a valid token without the scope: 403 insufficient_scope.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt

from .app import Authorizer, Response, problem

SCOPE = "n5g-eir-eic"
# Asymmetric only: a public key must never be usable as an HMAC secret, and "none" never.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA"]
CACHE_MAX = 10_000  # validated tokens kept (a consumer reuses one token until it expires)


def _challenge(status: int, error: str | None, description: str) -> Response:
    value = 'Bearer realm="n5g-eir"'
    if error:
        value += f', error="{error}", error_description="{description}"'
        if error == "insufficient_scope":
            value += f', scope="{SCOPE}"'
    title = "Unauthorized" if status == 401 else "Forbidden"
    return problem(status, title, detail=description,
                   extra_headers=(("www-authenticate", value),))


_NO_TOKEN = _challenge(401, None, "a bearer access token is required")


class BearerAuthorizer(Authorizer):
    def __init__(self, keys: dict[str | None, Any], audiences: Iterable[str]) -> None:
        """`keys`: key id -> public key (None: the key for tokens without a known kid)."""
        if not keys:
            raise ValueError("OAuth2: no public key configured")
        self.keys = keys
        self.audiences = frozenset(audiences)
        self._valid: dict[str, float] = {}  # token -> exp

    @classmethod
    def from_files(cls, public_key: str, jwks: str, audiences: Iterable[str]
                   ) -> BearerAuthorizer:
        keys: dict[str | None, Any] = {}
        if public_key:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key
            keys[None] = load_pem_public_key(Path(public_key).read_bytes())
        if jwks:
            try:
                keyset = jwt.PyJWKSet.from_dict(json.loads(Path(jwks).read_text()))
            except (ValueError, jwt.PyJWTError) as e:
                raise ValueError(f"oauth2_jwks {jwks}: {e}") from None
            for k in keyset.keys:
                keys[k.key_id] = k.key
            if len(keyset.keys) == 1:  # a lone key also verifies tokens without a kid
                keys.setdefault(None, keyset.keys[0].key)
        return cls(keys, audiences)

    def check(self, authorization: str | None, now: float) -> Response | None:
        if not authorization:
            return _NO_TOKEN
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _NO_TOKEN
        exp = self._valid.get(token)
        if exp is not None:
            if now < exp:
                return None
            del self._valid[token]
            return _challenge(401, "invalid_token", "the access token expired")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self.keys.get(kid) if kid in self.keys else self.keys.get(None)
            if key is None:
                return _challenge(401, "invalid_token", "unknown signing key")
            # exp and aud are checked here against `now` and our identities, not by PyJWT's
            # clock; "require" still insists that exp is present.
            claims = jwt.decode(token, key, algorithms=ALGORITHMS,
                                options={"verify_exp": False, "verify_aud": False,
                                         "verify_iat": False, "verify_nbf": False,
                                         "require": ["exp"]})
        except (jwt.PyJWTError, TypeError, ValueError):
            # TypeError: PyJWT's answer when the token's alg does not fit the key's type.
            return _challenge(401, "invalid_token", "the access token is not valid")
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool) or now >= exp:
            return _challenge(401, "invalid_token", "the access token expired")
        aud = claims.get("aud")
        auds = {aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else set()
        if not auds & self.audiences:
            return _challenge(401, "invalid_token", "the access token is not for this NF")
        scope = claims.get("scope")
        if not isinstance(scope, str) or SCOPE not in scope.split():
            return _challenge(403, "insufficient_scope", f"the access token lacks {SCOPE}")
        if len(self._valid) >= CACHE_MAX:
            self._valid.clear()
        self._valid[token] = float(exp)
        return None
