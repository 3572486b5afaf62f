"""JWKS: the keys of an identity provider's JWK set URL, parsed (public signature keys only) and cached."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from wirehub.builtins.auth.jwt_config import (
    MAX_JWKS_BYTES,
    MAX_JWKS_KEYS,
    MIN_RSA_BITS,
    VerifyKey,
    key_algorithms,
    show,
)

log = logging.getLogger("wirehub.auth.jwt")


def _jwk_public_key(jwk: Mapping[str, Any]) -> Any:
    kty = jwk.get("kty")
    parsed: Any
    if kty == "RSA":
        parsed = RSAAlgorithm.from_jwk(dict(jwk))
    elif kty == "EC":
        parsed = ECAlgorithm.from_jwk(dict(jwk))
    elif kty == "OKP":
        parsed = OKPAlgorithm.from_jwk(dict(jwk))
    else:
        raise ValueError(f"kty {show(kty)} is not a public-key type "
                         "(symmetric keys are never taken from a JWKS)")
    private = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey,
               ed448.Ed448PrivateKey)
    return parsed.public_key() if isinstance(parsed, private) else parsed


def parse_jwks(document: Any, algorithms: frozenset[str]) -> tuple[VerifyKey, ...]:
    """The usable signature keys of a JWK set; unusable entries are skipped with a log line."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK set (an object with a 'keys' list)")
    out: list[VerifyKey] = []
    for i, jwk in enumerate(document["keys"][:MAX_JWKS_KEYS]):
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
        if jwk.get("use", "sig") != "sig":
            continue
        try:
            public_key = _jwk_public_key(jwk)
        except Exception as exc:  # PyJWT raises several types; one bad key must not hide the rest
            log.warning("jwt: JWKS key %d (kid %s) skipped: %s", i, show(kid), exc)
            continue
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
            log.warning("jwt: JWKS key %d (kid %s) skipped: RSA key of %d bits", i, show(kid),
                        public_key.key_size)
            continue
        usable = key_algorithms(public_key) & algorithms
        if "alg" in jwk:
            usable &= {jwk["alg"]}
        if usable:
            out.append(VerifyKey(kid, frozenset(usable), public_key, f"jwks kid={show(kid)}"))
    return tuple(out)


class JwksCache:
    """The keys of a JWKS URL: fetched lazily with a timeout, cached, one fetch at a time.

    A fetch happens when the cache is empty or older than ``ttl``, or when a token names a kid
    the cache lacks; fetch attempts (good or failed) are at least ``refetch_interval`` apart, so
    tokens with random kids cannot hammer the identity provider. A failed fetch keeps the old keys.
    """

    def __init__(self, url: str, algorithms: frozenset[str], timeout: float, ttl: float,
                 refetch_interval: float) -> None:
        self.url = url
        self.algorithms = algorithms
        self.timeout = timeout
        self.ttl = ttl
        self.refetch_interval = refetch_interval
        self.keys: tuple[VerifyKey, ...] = ()
        self.fetches = 0
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None

    def _may_fetch(self) -> bool:
        if self._inflight is not None or self._attempted_at is None:
            return True
        return time.monotonic() - self._attempted_at >= self.refetch_interval

    async def get(self, kid: str | None) -> tuple[VerifyKey, ...]:
        stale = self._fetched_at is None or time.monotonic() - self._fetched_at >= self.ttl
        fetched = False
        if stale and self._may_fetch():
            await self._refresh()
            fetched = True
        if (kid is not None and not fetched and not any(k.kid == kid for k in self.keys)
                and self._may_fetch()):
            await self._refresh()  # a new kid: the provider may have rotated its keys
        return self.keys

    async def _refresh(self) -> None:
        if self._inflight is None:
            self._attempted_at = time.monotonic()
            self._inflight = asyncio.ensure_future(self._fetch())
        # shielded: an upgrade that goes away must not cancel the fetch others wait for
        await asyncio.shield(self._inflight)

    async def _fetch(self) -> None:
        self.fetches += 1
        # Tornado's client is non-blocking (DNS in a thread); max_body_size bounds a hostile answer.
        client = AsyncHTTPClient(force_instance=True, max_body_size=MAX_JWKS_BYTES)
        where = urlsplit(self.url)._replace(query="", fragment="").geturl()
        try:
            request = HTTPRequest(self.url, connect_timeout=self.timeout, request_timeout=self.timeout,
                                  follow_redirects=False, headers={"Accept": "application/json"})
            response = await client.fetch(request, raise_error=False)
            if response.code != 200:
                log.warning("jwt: JWKS %s answered HTTP %d; keeping %d cached keys", where, response.code,
                            len(self.keys))
                return
            keys = parse_jwks(json.loads(response.body), self.algorithms)
        except Exception as exc:
            log.warning("jwt: JWKS fetch from %s failed (%s: %s); keeping %d cached keys", where,
                        type(exc).__name__, exc, len(self.keys))
            return
        finally:
            client.close()
            self._inflight = None
        self.keys = keys
        self._fetched_at = time.monotonic()
        log.info("jwt: JWKS %s: %d usable keys (kids %s)", where, len(keys), [k.kid for k in keys])
