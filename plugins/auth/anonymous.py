"""Anonymous authentication: everyone gets a guest identity. For development and public demos."""

from __future__ import annotations

import uuid
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


class AnonymousAuthenticator:
    expiry_grace = 0.0

    def __init__(self, options: AnonymousOptions) -> None:
        self.options = options

    async def authenticate(self, request: HTTPServerRequest) -> Identity:
        user = f"{self.options.name_prefix}-{uuid.uuid4().hex[:8]}"
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
