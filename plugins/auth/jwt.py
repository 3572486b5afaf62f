"""JWT authentication: a signed token decides who connects, before the WebSocket upgrade.

The token comes from the first configured source that carries one (``token`` query parameter,
a cookie, ``Authorization: Bearer``, or a ``bearer.<token>`` entry of ``Sec-WebSocket-Protocol``).
Its ``alg`` must be one of ``algorithms``; only keys of that algorithm's family are tried (an HS
token is only ever checked against the HMAC secrets, never against a public key), so key
confusion cannot happen. ``sub`` becomes the user, ``rooms`` the allowed room patterns, ``name``
the display name and ``exp`` the session's expiry (4001 at ``exp + expiry_grace`` unless the
client sends ``refresh {token}``).

Every refusal is an :class:`AuthError` with a reason from :data:`REASONS`; the log-only detail
never contains the token. docs/auth.md is the reference for the options.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import re
import time
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import HTTPServerRequest

from wirehub import AuthError, AuthFactory, Config, ConfigError, Identity, hookimpl, opt, parse_block

log = logging.getLogger("wirehub.auth.jwt")

#: the client-visible reasons of a 401 (and of a refused ``refresh``)
REASONS = ("missing", "malformed", "expired", "not_yet_valid", "bad_signature", "bad_audience", "bad_issuer",
           "unknown_key")

#: HMAC algorithms and the shortest secret each accepts (RFC 7518 section 3.2: the hash size)
HMAC_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
#: EC algorithm -> the curve its key must be on
EC_ALGORITHMS = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1", "ES521": "secp521r1",
                 "ES256K": "secp256k1"}
OKP_ALGORITHMS = frozenset({"EdDSA"})
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | frozenset(EC_ALGORITHMS) | OKP_ALGORITHMS
SUPPORTED_ALGORITHMS = frozenset(HMAC_ALGORITHMS) | ASYMMETRIC_ALGORITHMS
SOURCES = ("query", "cookie", "header", "subprotocol")

MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 1 << 20
MAX_JWKS_KEYS = 100
MAX_CLAIM_CHARS = 256
#: 9999-12-31T23:59:59Z: a larger time claim is garbage, not a far future
MAX_TIME = 253402300799
#: compact JWS: three base64url segments (the signature may be empty: "alg: none" then fails as
#: bad_signature); PyJWT tolerates "=" padding, which some issuers (AWS ALB) add
_COMPACT = re.compile(r"[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}\.(?:[A-Za-z0-9_-]+={0,2})?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TTL = re.compile(r"(\d+)([smhd])")
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# -- options -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicKeyOptions:
    """One ``public_keys`` entry: a PEM public key or X.509 certificate, from ``file`` or inline ``pem``."""

    file: str | None = None
    pem: str | None = None
    #: tokens whose header names this ``kid`` are checked with this key only; none: any kid
    kid: str | None = None
    #: algorithms this key verifies; default: those of ``algorithms`` that fit the key type
    algorithms: tuple[str, ...] = ()


@dataclass(frozen=True)
class JwtOptions:
    """The ``auth.jwt`` block. docs/auth.md describes every key."""

    algorithms: tuple[str, ...]
    secret: str | None = None
    previous_secret: str | None = None
    #: ISO 8601 time (or UNIX seconds) until which ``previous_secret`` is still accepted
    previous_secret_until: Any = None
    public_keys: tuple[PublicKeyOptions, ...] = ()
    jwks_url: str | None = None
    jwks_timeout: float = opt(3.0, min=0.05, max=60)
    jwks_cache_ttl: float = opt(300.0, min=0)
    jwks_refetch_interval: float = opt(10.0, min=0)
    audience: str | tuple[str, ...] = ()
    issuer: str | tuple[str, ...] = ()
    leeway: float = opt(30.0, min=0, max=600)
    expiry_grace: float = opt(30.0, min=0)
    sources: tuple[str, ...] = SOURCES
    query_param: str = "token"
    cookie: str = "wirehub_token"
    max_token_bytes: int = opt(8192, min=512, max=65536)
    rooms_claim: str = "rooms"
    name_claim: str = "name"
    default_rooms: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifyKey:
    """A key that may verify a signature: HMAC bytes or a `cryptography` public key."""

    kid: str | None
    algorithms: frozenset[str]
    key: Any
    label: str  # for the log: "secret", "public_keys[0]", "jwks kid='a'"
    until: float | None = None  # not used at or after this UNIX time (a rotated-out secret)


@dataclass(frozen=True)
class Settings:
    """Validated options plus the static keys they name."""

    options: JwtOptions
    key: str
    algorithms: frozenset[str]
    audience: tuple[str, ...]
    issuer: tuple[str, ...]
    static_keys: tuple[VerifyKey, ...]
    secret: bytes | None = None
    previous_until: float | None = None


def _parse_time(value: Any, key: str) -> float:
    if isinstance(value, bool):
        pass
    elif isinstance(value, int | float):
        return float(value)
    elif isinstance(value, dt.datetime):  # YAML turns an unquoted timestamp into a datetime
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()
    raise ConfigError(key, "expected an ISO 8601 time like 2026-12-01T00:00:00Z or UNIX seconds, "
                           f"got {value!r}")


def _strings(value: str | tuple[str, ...], key: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    for i, item in enumerate(items):
        if not item:
            raise ConfigError(key if isinstance(value, str) else f"{key}[{i}]", "must not be empty")
    return items


def key_algorithms(public_key: Any) -> frozenset[str]:
    """The asymmetric algorithms a public key can verify (by key type and, for EC, curve)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return frozenset(alg for alg, curve in EC_ALGORITHMS.items() if public_key.curve.name == curve)
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return OKP_ALGORITHMS
    return frozenset()


def _load_pem(data: bytes, key: str) -> Any:
    if b"PRIVATE KEY" in data:
        raise ConfigError(key, "is a private key; give wirehub only the public key (or a certificate)")
    try:
        if b"-----BEGIN CERTIFICATE" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(key, f"is not a PEM public key or certificate ({type(exc).__name__})") from None


def _public_key(entry: PublicKeyOptions, algorithms: frozenset[str], key: str) -> VerifyKey:
    if (entry.file is None) == (entry.pem is None):
        raise ConfigError(key, "give exactly one of file (a PEM path) or pem (the PEM text)")
    if entry.file is not None:
        try:
            data = Path(entry.file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{key}.file", f"cannot read {entry.file}: {exc.strerror}") from None
        where = f"{key}.file"
    else:
        assert entry.pem is not None
        data, where = entry.pem.encode(), f"{key}.pem"
    public_key = _load_pem(data, where)
    fits = key_algorithms(public_key)
    if not fits:
        raise ConfigError(where, f"unsupported key type {type(public_key).__name__}")
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
        raise ConfigError(where, f"the RSA key has {public_key.key_size} bits; "
                                 f"at least {MIN_RSA_BITS} are required")
    if entry.algorithms:
        for i, alg in enumerate(entry.algorithms):
            sub = f"{key}.algorithms[{i}]"
            if alg in HMAC_ALGORITHMS:
                raise ConfigError(sub, f"{alg} is an HMAC algorithm; a public key only verifies asymmetric "
                                       "algorithms (HS and asymmetric algorithms can't be mixed for one key)")
            if alg not in algorithms:
                raise ConfigError(sub, f"{alg} is not listed in algorithms")
            if alg not in fits:
                raise ConfigError(sub, f"{alg} does not fit this key (it fits: {', '.join(sorted(fits))})")
        usable = frozenset(entry.algorithms)
    else:
        usable = fits & algorithms
        if not usable:
            raise ConfigError(where, f"none of algorithms fits this key (it fits: {', '.join(sorted(fits))})")
    return VerifyKey(entry.kid, usable, public_key, key)


def _check_jwks_url(url: str, key: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1", "::1"):
        return  # a sidecar or a test server; anything else must be TLS, or keys could be swapped in transit
    raise ConfigError(key, f"expected an https:// URL (http:// only for localhost), got {url!r}")


def compile_settings(options: Mapping[str, Any], key: str) -> Settings:
    """Validate the ``auth.jwt`` block and load its static keys; every error names the dotted key."""
    opts = parse_block(JwtOptions, options, key)
    if not opts.algorithms:
        raise ConfigError(f"{key}.algorithms", "list at least one algorithm, e.g. [HS256] or [RS256]")
    for i, alg in enumerate(opts.algorithms):
        if alg.lower() == "none":
            raise ConfigError(f"{key}.algorithms[{i}]",
                              "'none' is refused: unsigned tokens would let anyone in")
        if alg not in SUPPORTED_ALGORITHMS:
            raise ConfigError(f"{key}.algorithms[{i}]",
                              f"{alg!r} is not supported; choose from "
                              f"{', '.join(sorted(SUPPORTED_ALGORITHMS))}")
    algorithms = frozenset(opts.algorithms)
    hmac_algs = algorithms & frozenset(HMAC_ALGORITHMS)
    asym_algs = algorithms & ASYMMETRIC_ALGORITHMS

    keys: list[VerifyKey] = []
    secret: bytes | None = None
    previous_until: float | None = None
    if opts.secret is not None:
        if not hmac_algs:
            raise ConfigError(f"{key}.secret",
                              "is set, but algorithms lists no HMAC algorithm (HS256, HS384, HS512)")
        secret = opts.secret.encode()
        need = max(HMAC_ALGORITHMS[a] for a in hmac_algs)
        for name, value in (("secret", opts.secret), ("previous_secret", opts.previous_secret)):
            if value is not None and len(value.encode()) < need:
                raise ConfigError(f"{key}.{name}",
                                  f"is {len(value.encode())} bytes; {', '.join(sorted(hmac_algs))} needs "
                                  f"at least {need} (e.g. `openssl rand -base64 48`)")
        keys.append(VerifyKey(None, hmac_algs, secret, "secret"))
    elif hmac_algs:
        raise ConfigError(f"{key}.secret", f"is required for {', '.join(sorted(hmac_algs))}")
    if opts.previous_secret is not None:
        if secret is None:
            raise ConfigError(f"{key}.previous_secret", "needs secret (the current one) as well")
        if opts.previous_secret_until is None:
            raise ConfigError(f"{key}.previous_secret_until",
                              "is required with previous_secret: say when the rotation ends")
        previous_until = _parse_time(opts.previous_secret_until, f"{key}.previous_secret_until")
        previous = opts.previous_secret.encode()
        keys.append(VerifyKey(None, hmac_algs, previous, "previous_secret", previous_until))
    elif opts.previous_secret_until is not None:
        raise ConfigError(f"{key}.previous_secret_until", "is set without previous_secret")

    for i, entry in enumerate(opts.public_keys):
        keys.append(_public_key(entry, algorithms, f"{key}.public_keys[{i}]"))
    if opts.jwks_url is not None:
        _check_jwks_url(opts.jwks_url, f"{key}.jwks_url")
    if asym_algs and opts.jwks_url is None:
        covered = frozenset().union(*(k.algorithms for k in keys))
        missing = sorted(asym_algs - covered)
        if missing:
            raise ConfigError(f"{key}.algorithms",
                              f"{', '.join(missing)} has no key: add public_keys or jwks_url")
    if not asym_algs and (opts.public_keys or opts.jwks_url):
        what = "public_keys" if opts.public_keys else "jwks_url"
        raise ConfigError(f"{key}.{what}",
                          "is set, but algorithms lists no asymmetric algorithm (RS256, ES256, ...)")

    if not opts.sources:
        raise ConfigError(f"{key}.sources", f"list at least one of: {', '.join(SOURCES)}")
    for i, source in enumerate(opts.sources):
        if source not in SOURCES:
            raise ConfigError(f"{key}.sources[{i}]", f"{source!r} is not one of: {', '.join(SOURCES)}")
        if source in opts.sources[:i]:
            raise ConfigError(f"{key}.sources[{i}]", f"{source!r} is listed twice")
    for name in ("query_param", "cookie", "rooms_claim", "name_claim"):
        if not getattr(opts, name):
            raise ConfigError(f"{key}.{name}", "must not be empty")
    return Settings(
        options=opts,
        key=key,
        algorithms=algorithms,
        audience=_strings(opts.audience, f"{key}.audience"),
        issuer=_strings(opts.issuer, f"{key}.issuer"),
        static_keys=tuple(keys),
        secret=secret,
        previous_until=previous_until,
    )


# -- JWKS ----------------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """An attacker-supplied value, made safe and short for a log line."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


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
        raise ValueError(f"kty {_show(kty)} is not a public-key type "
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
            log.warning("jwt: JWKS key %d (kid %s) skipped: %s", i, _show(kid), exc)
            continue
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
            log.warning("jwt: JWKS key %d (kid %s) skipped: RSA key of %d bits", i, _show(kid),
                        public_key.key_size)
            continue
        usable = key_algorithms(public_key) & algorithms
        if "alg" in jwk:
            usable &= {jwk["alg"]}
        if usable:
            out.append(VerifyKey(kid, frozenset(usable), public_key, f"jwks kid={_show(kid)}"))
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


# -- the authenticator ---------------------------------------------------------------------------------------


def _refuse(reason: str, detail: str) -> AuthError:
    return AuthError(401, reason, detail)


def _number_claim(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    # PyJWT would accept "123" (it calls int()); a JSON number is what RFC 7519 requires
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse("malformed", f"claim {name} is not a number: {_show(value)}")
    if (isinstance(value, float) and not math.isfinite(value)) or not 0 <= value <= MAX_TIME:
        raise _refuse("malformed", f"claim {name} is out of range: {_show(value)}")
    return float(value)


def _text_claim(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_CLAIM_CHARS or _CONTROL.search(value):
        raise _refuse("malformed", f"{what} must be a non-empty printable string of at most "
                                   f"{MAX_CLAIM_CHARS} characters, got {_show(value)}")
    return value


def _list_claim(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items: Iterable[Any] = (p.strip() for p in value.split(",") if p.strip())
    elif isinstance(value, list):
        items = value
    else:
        raise _refuse("malformed", f"{what} must be a list of strings, got {_show(value)}")
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
            raise _refuse("malformed", f"header: {_show(str(exc))}") from None
        if "crit" in header:
            # RFC 7515 4.1.11: a critical extension we do not implement means the token is invalid
            raise _refuse("malformed", f"crit header {_show(header['crit'])}: no extension is supported")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.settings.algorithms:
            raise _refuse("bad_signature", f"alg {_show(alg)} is not one of algorithms")
        kid = header.get("kid")
        keys = await self._keys_for(alg, kid)
        if not keys:
            raise _refuse("unknown_key", f"no {alg} key for kid {_show(kid)}")
        payload: bytes | None = None
        for candidate in keys:
            try:
                payload = self._jws.decode(token, key=candidate.key, algorithms=[alg])
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue
            except jwt.PyJWTError as exc:
                raise _refuse("malformed", f"{type(exc).__name__}: {_show(str(exc))}") from None
            log.debug("jwt: signature verified with %s", candidate.label)
            break
        if payload is None:
            raise _refuse("bad_signature",
                          f"{alg} signature does not verify with {len(keys)} key(s), kid {_show(kid)}")
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
            raise _refuse("bad_issuer", f"iss {_show(claims.get('iss'))}")
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
            raise _refuse("bad_audience", f"aud {_show(aud)} is not a string or a list of strings")
        # RFC 7519 4.1.3: a token that names audiences must name us; with no audience set, it never does
        if not set(values) & set(self.settings.audience):
            raise _refuse("bad_audience", f"aud {_show(aud)}")


# -- `wirehub token` -----------------------------------------------------------------------------------------


def parse_ttl(ttl: str) -> int:
    """``30s``, ``15m``, ``1h``, ``7d`` -> seconds; ConfigError (key ``--ttl``) otherwise."""
    match = _TTL.fullmatch(ttl.strip())
    if match is None or int(match.group(1)) == 0:
        raise ConfigError("--ttl", f"expected a duration like 30s, 15m, 1h or 7d, got {ttl!r}")
    return int(match.group(1)) * _TTL_UNITS[match.group(2)]


def mint_token_from_config(config: Config, *, sub: str, rooms: str = "*", ttl: str = "1h",
                           name: str | None = None) -> str:
    """A token signed with the configured HMAC secret (development and tests): ``wirehub token``.

    ``rooms`` is a comma-separated list of glob patterns; ``ttl`` a duration like ``15m``. The
    token carries ``aud``/``iss`` when they are configured, so the server accepts it.
    """
    if config.auth.plugin != "jwt":
        raise ConfigError("auth.plugin",
                          f"`wirehub token` signs with the jwt plugin's HMAC secret, but auth.plugin is "
                          f"{config.auth.plugin!r}; configure auth: {{plugin: jwt, jwt: "
                          "{algorithms: [HS256], secret: $env:WIREHUB_JWT_SECRET}}")
    settings = compile_settings(config.auth.options, config.auth.key)
    if settings.secret is None:
        raise ConfigError(f"{settings.key}.secret",
                          "`wirehub token` needs an HMAC secret (and HS256, HS384 or HS512 in algorithms); "
                          "this config verifies public keys only")
    alg = next(a for a in settings.options.algorithms if a in HMAC_ALGORITHMS)
    if not sub or _CONTROL.search(sub) or len(sub) > MAX_CLAIM_CHARS:
        raise ConfigError("--sub", f"expected a non-empty printable user id, got {sub!r}")
    patterns = [p.strip() for p in rooms.split(",") if p.strip()]
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, settings.options.rooms_claim: patterns, "iat": now,
                              "exp": now + parse_ttl(ttl)}
    if name:
        claims[settings.options.name_claim] = name
    if settings.audience:
        claims["aud"] = settings.audience[0]
    if settings.issuer:
        claims["iss"] = settings.issuer[0]
    return jwt.encode(claims, settings.secret, algorithm=alg)


# -- registration --------------------------------------------------------------------------------------------


def _factory(options: Mapping[str, Any], key: str) -> JwtAuthenticator:
    return JwtAuthenticator(compile_settings(options, key))


@hookimpl
def wirehub_register_authenticators() -> Mapping[str, AuthFactory]:
    return {"jwt": _factory}
