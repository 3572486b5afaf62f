"""JWT verification: :class:`JwtAuthenticator` finds the token in the request, checks its signature with
the keys of its ``alg`` (and ``kid``), then its claims, and returns the Identity.

Every refusal is an :class:`AuthError` with a reason from :data:`REASONS`; the log-only detail never
contains the token.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import time
import types
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import jwt
from tornado.httputil import HTTPServerRequest

from wirehub import AuthError, Identity
from wirehub.builtins.auth.jwt_config import (
    ASYMMETRIC_ALGORITHMS,
    CONTROL,
    MAX_CLAIM_CHARS,
    MAX_TIME,
    Settings,
    VerifyKey,
    show,
)
from wirehub.builtins.auth.jwt_jwks import JwksCache

log = logging.getLogger("wirehub.auth.jwt")

#: the client-visible reasons of a 401 (and of a refused ``refresh``)
REASONS = ("missing", "malformed", "expired", "not_yet_valid", "bad_signature", "bad_audience", "bad_issuer",
           "unknown_key")
#: compact JWS: three base64url segments (the signature may be empty: "alg: none" then fails as
#: bad_signature); PyJWT tolerates "=" padding, which some issuers (AWS ALB) add
_COMPACT = re.compile(r"[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}\.(?:[A-Za-z0-9_-]+={0,2})?")


def _refuse(reason: str, detail: str) -> AuthError:
    return AuthError(401, reason, detail)


def _number_claim(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    # PyJWT would accept "123" (it calls int()); a JSON number is what RFC 7519 requires
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse("malformed", f"claim {name} is not a number: {show(value)}")
    if (isinstance(value, float) and not math.isfinite(value)) or not 0 <= value <= MAX_TIME:
        raise _refuse("malformed", f"claim {name} is out of range: {show(value)}")
    return float(value)


def _text_claim(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_CLAIM_CHARS or CONTROL.search(value):
        raise _refuse("malformed", f"{what} must be a non-empty printable string of at most "
                                   f"{MAX_CLAIM_CHARS} characters, got {show(value)}")
    return value


def _list_claim(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items: Iterable[Any] = (p.strip() for p in value.split(",") if p.strip())
    elif isinstance(value, list):
        items = value
    else:
        raise _refuse("malformed", f"{what} must be a list of strings, got {show(value)}")
    return tuple(_text_claim(item, what) for item in items)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class JwtAuthenticator:
    """Verifies a token at the upgrade and on ``refresh``; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.options = settings.options
        #: read by the core: the session is closed with 4001 at ``exp + expiry_grace``
        self.expiry_grace = settings.options.expiry_grace
        # enforce_minimum_key_length: a short key is refused, never a warning at request time
        self._jws = jwt.PyJWS(algorithms=sorted(settings.algorithms),
                              options={"enforce_minimum_key_length": True})
        self.jwks: JwksCache | None = None
        if self.options.jwks_url is not None:
            self.jwks = JwksCache(self.options.jwks_url, settings.algorithms & ASYMMETRIC_ALGORITHMS,
                                  self.options.jwks_timeout, self.options.jwks_cache_ttl,
                                  self.options.jwks_refetch_interval)

    # -- the contract ------------------------------------------------------------------------------------

    async def authenticate(self, request: HTTPServerRequest) -> Identity:
        found = self.extract(request)
        if found is None:
            raise _refuse("missing", f"no token in any of {', '.join(self.options.sources)}")
        token, source = found
        try:
            identity = await self._verify_safely(token)
        except AuthError as exc:
            raise AuthError(exc.status, exc.reason, f"{exc.detail} (token from {source})", exc.error) from None
        log.debug("jwt: %s authenticated by a token from %s", identity.user, source)
        return identity

    async def refresh(self, identity: Identity, token: str) -> Identity:
        try:
            renewed = await self._verify_safely(token)
        except AuthError as exc:
            log.info("jwt: refresh refused for %s: %s", identity.user, exc)
            raise
        if renewed.user != identity.user:
            log.info("jwt: refresh refused for %s: the token is for %s", identity.user, renewed.user)
            raise AuthError(403, "bad_sub", "the refresh token is for another user")
        return renewed

    def describe(self) -> str:
        keys = []
        for k in self.settings.static_keys:
            if k.until is not None:
                keys.append(f"previous_secret until {dt.datetime.fromtimestamp(k.until, dt.UTC).isoformat()}")
            else:
                keys.append(k.label if k.kid is None else f"{k.label} (kid {k.kid})")
        if self.jwks is not None:
            keys.append(f"JWKS {urlsplit(self.jwks.url)._replace(query='').geturl()}")
        parts = [f"algorithms {sorted(self.settings.algorithms)}", f"keys: {', '.join(keys)}",
                 f"token from {' > '.join(self.options.sources)}"]
        if self.settings.audience:
            parts.append(f"audience {list(self.settings.audience)}")
        if self.settings.issuer:
            parts.append(f"issuer {list(self.settings.issuer)}")
        return "auth jwt: " + "; ".join(parts)

    # -- token sources -------------------------------------------------------------------------------------

    def extract(self, request: HTTPServerRequest) -> tuple[str, str] | None:
        """The token of the first configured source that carries a non-empty one, and that source."""
        for source in self.options.sources:
            token = getattr(self, f"_from_{source}")(request)
            if token:
                return token, source
        return None

    def _from_query(self, request: HTTPServerRequest) -> str:
        values = request.query_arguments.get(self.options.query_param) or [b""]
        return values[0].decode("utf-8", "replace").strip()

    def _from_cookie(self, request: HTTPServerRequest) -> str:
        morsel = request.cookies.get(self.options.cookie)
        return morsel.value.strip() if morsel is not None else ""

    def _from_header(self, request: HTTPServerRequest) -> str:
        for value in request.headers.get_list("Authorization"):
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
        return ""

    def _from_subprotocol(self, request: HTTPServerRequest) -> str:
        # "wirehub.v1, bearer.<token>": the core selects wirehub.v1 and never echoes this entry
        for value in request.headers.get_list("Sec-WebSocket-Protocol"):
            for item in value.split(","):
                item = item.strip()
                if item.startswith("bearer.") and len(item) > len("bearer."):
                    return item[len("bearer."):]
        return ""

    # -- verification ----------------------------------------------------------------------------------------

    async def _verify_safely(self, token: str) -> Identity:
        try:
            return await self.verify(token)
        except AuthError:
            raise
        except Exception as exc:
            # A bug must not escape to Tornado, whose "Uncaught exception" log line prints the request URI
            # (with a query-string token); the traceback holds no token (no message here quotes it).
            log.error("jwt: internal error while verifying a token (%s); refused as malformed",
                      type(exc).__name__, exc_info=True)
            raise _refuse("malformed", "internal error, see the log") from None

    async def verify(self, token: str) -> Identity:
        """The identity a token stands for, or an AuthError with a reason from :data:`REASONS`."""
        if not token:
            raise _refuse("missing", "empty token")
        if len(token) > self.options.max_token_bytes:
            raise _refuse("malformed", f"token of {len(token)} characters (max_token_bytes "
                                       f"{self.options.max_token_bytes})")
        if not _COMPACT.fullmatch(token):
            raise _refuse("malformed", "not three base64url segments")
        try:
            header = self._jws.get_unverified_header(token)
        except jwt.PyJWTError as exc:  # includes PyJWT's own refusal of an unknown "crit"
            raise _refuse("malformed", f"header: {show(str(exc))}") from None
        if "crit" in header:
            # RFC 7515 4.1.11: a critical extension we do not implement means the token is invalid
            raise _refuse("malformed", f"crit header {show(header['crit'])}: no extension is supported")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.settings.algorithms:
            raise _refuse("bad_signature", f"alg {show(alg)} is not one of algorithms")
        kid = header.get("kid")
        keys = await self._keys_for(alg, kid)
        if not keys:
            raise _refuse("unknown_key", f"no {alg} key for kid {show(kid)}")
        payload: bytes | None = None
        for candidate in keys:
            try:
                payload = self._jws.decode(token, key=candidate.key, algorithms=[alg])
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue
            except jwt.PyJWTError as exc:
                raise _refuse("malformed", f"{type(exc).__name__}: {show(str(exc))}") from None
            log.debug("jwt: signature verified with %s", candidate.label)
            break
        if payload is None:
            raise _refuse("bad_signature",
                          f"{alg} signature does not verify with {len(keys)} key(s), kid {show(kid)}")
        try:
            claims = json.loads(payload, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise _refuse("malformed", "payload is not JSON") from None
        if not isinstance(claims, dict):
            raise _refuse("malformed", "payload is not a JSON object")
        return self._identity(claims)

    async def _keys_for(self, alg: str, kid: Any) -> list[VerifyKey]:
        """Keys to try: those with the token's kid, else (or for a kid-less token) every key of alg."""
        now = time.time()
        keys = [k for k in self.settings.static_keys
                if alg in k.algorithms and (k.until is None or now < k.until)]
        kid_known = kid is not None and any(k.kid == kid for k in keys)
        if self.jwks is not None and alg in ASYMMETRIC_ALGORITHMS and not kid_known:
            keys += [k for k in await self.jwks.get(kid) if alg in k.algorithms]
        if kid is None:
            return keys
        exact = [k for k in keys if k.kid == kid]
        return exact or [k for k in keys if k.kid is None]

    def _identity(self, claims: dict[str, Any]) -> Identity:
        opts = self.options
        exp = _number_claim(claims, "exp")
        if exp is None:
            raise _refuse("malformed", "no exp claim (exp is always required)")
        nbf = _number_claim(claims, "nbf")
        iat = _number_claim(claims, "iat")
        user = _text_claim(claims.get("sub"), "claim sub")
        rooms = opts.default_rooms
        if claims.get(opts.rooms_claim) is not None:
            rooms = _list_claim(claims[opts.rooms_claim], f"claim {opts.rooms_claim}")
        name = ""
        if claims.get(opts.name_claim) is not None:
            name = _text_claim(claims[opts.name_claim], f"claim {opts.name_claim}")
        now = time.time()
        if exp <= now - opts.leeway:
            raise _refuse("expired", f"exp {exp:.0f} is {now - exp:.0f}s ago (leeway {opts.leeway:g}s)")
        for claim, value in (("nbf", nbf), ("iat", iat)):
            if value is not None and value > now + opts.leeway:
                raise _refuse("not_yet_valid",
                              f"{claim} is {value - now:.0f}s ahead (leeway {opts.leeway:g}s)")
        if self.settings.issuer and claims.get("iss") not in self.settings.issuer:
            raise _refuse("bad_issuer", f"iss {show(claims.get('iss'))}")
        self._check_audience(claims)
        return Identity(user=user, name=name, rooms=rooms, claims=types.MappingProxyType(claims),
                        expires_at=exp)

    def _check_audience(self, claims: Mapping[str, Any]) -> None:
        if "aud" not in claims:
            if self.settings.audience:
                raise _refuse("bad_audience", "no aud claim")
            return
        aud = claims["aud"]
        values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else None
        if values is None or not all(isinstance(v, str) for v in values):
            raise _refuse("bad_audience", f"aud {show(aud)} is not a string or a list of strings")
        # RFC 7519 4.1.3: a token that names audiences must name us; with no audience set, it never does
        if not set(values) & set(self.settings.audience):
            raise _refuse("bad_audience", f"aud {show(aud)}")
