"""Anonymous authentication: everyone gets a guest identity. For development and public demos.

A client may send a guest key (``?guest=<16-128 of [A-Za-z0-9_-]>``, a random secret it keeps): every
connection with the same key is the same guest, so a page's chat and board connections are one person.
The user is derived from the key by a one-way hash, so showing the user (presence, messages) does not
reveal the key that claims it. Without a key each connection is a new guest.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tornado.httputil import HTTPServerRequest

from wirehub import AuthError, AuthFactory, Identity, hookimpl, parse_block


@dataclass(frozen=True)
class AnonymousOptions:
    #: glob patterns of the rooms guests may join and publish to
    rooms: tuple[str, ...] = ("*",)
    #: guests are named "<prefix>-<8 hex digits>"
    name_prefix: str = "guest"


#: what a guest key may be: long enough to be unguessable when random, short enough for a URL
GUEST_KEY = re.compile(r"[A-Za-z0-9_-]{16,128}")


def guest_user(prefix: str, key: str | None) -> str:
    """``<prefix>-<8 hex digits>``: from the key's SHA-256 (the same on every replica), or 32 random bits
    from the OS's CSPRNG (what ``uuid4`` drew them from, without building a UUID: 7% of a handshake)."""
    digits = hashlib.sha256(key.encode()).hexdigest()[:8] if key is not None else os.urandom(4).hex()
    return f"{prefix}-{digits}"


class AnonymousAuthenticator:
    expiry_grace = 0.0

    def __init__(self, options: AnonymousOptions) -> None:
        self.options = options

    async def authenticate(self, request: HTTPServerRequest) -> Identity:
        keys = request.query_arguments.get("guest")
        key = keys[-1].decode("latin-1") if keys else None
        if key is not None and not GUEST_KEY.fullmatch(key):
            raise AuthError(400, "bad_guest_key", "the guest key must be 16-128 of [A-Za-z0-9_-]",
                            error="bad_request")
        user = guest_user(self.options.name_prefix, key)
        return Identity(user=user, name=user, rooms=self.options.rooms, anonymous=True)

    async def refresh(self, identity: Identity, token: str) -> Identity:
        raise AuthError(400, "unsupported", "anonymous sessions have no token to refresh")

    def describe(self) -> str:
        return f"auth anonymous: ANYONE may connect, as a guest allowed rooms {list(self.options.rooms)}"


def _factory(options: Mapping[str, Any], key: str) -> AnonymousAuthenticator:
    return AnonymousAuthenticator(parse_block(AnonymousOptions, options, key))


@hookimpl
def wirehub_register_authenticators() -> Mapping[str, AuthFactory]:
    return {"anonymous": _factory}
