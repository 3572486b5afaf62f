"""JWT settings: the ``auth.jwt`` options, their checks, and the static keys they name (secrets, PEM public
keys and certificates). Every error is a ConfigError naming the dotted key."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from wirehub import ConfigError, opt, parse_block

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
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def show(value: Any) -> str:
    """An attacker-supplied value, made safe and short for a log line."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


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
