"""JWT authentication: a signed token decides who connects, before the WebSocket upgrade.

The token comes from the first configured source that carries one (``token`` query parameter,
a cookie, ``Authorization: Bearer``, or a ``bearer.<token>`` entry of ``Sec-WebSocket-Protocol``).
Its ``alg`` must be one of ``algorithms``; only keys of that algorithm's family are tried (an HS
token is only ever checked against the HMAC secrets, never against a public key), so key
confusion cannot happen. ``sub`` becomes the user, ``rooms`` the allowed room patterns, ``name``
the display name and ``exp`` the session's expiry (4001 at ``exp + expiry_grace`` unless the
client sends ``refresh {token}``).

The parts: :mod:`~wirehub.builtins.auth.jwt_config` (options, checks, static keys),
:mod:`~wirehub.builtins.auth.jwt_jwks` (JWKS fetching and cache), :mod:`~wirehub.builtins.auth.jwt_verify`
(the authenticator and its refusal reasons). This module registers the plugin and mints development
tokens (``wirehub token``). docs/auth.md is the reference for the options.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import jwt

from wirehub import AuthFactory, Config, ConfigError, hookimpl
from wirehub.builtins.auth.jwt_config import CONTROL, HMAC_ALGORITHMS, MAX_CLAIM_CHARS, compile_settings
from wirehub.builtins.auth.jwt_jwks import parse_jwks
from wirehub.builtins.auth.jwt_verify import REASONS, JwtAuthenticator

__all__ = ["REASONS", "JwtAuthenticator", "compile_settings", "mint_token_from_config", "parse_jwks", "parse_ttl",
           "wirehub_register_authenticators"]

_TTL = re.compile(r"(\d+)([smhd])")
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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
    if not sub or CONTROL.search(sub) or len(sub) > MAX_CLAIM_CHARS:
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
