"""An authenticator that takes 0.3 s (a slow JWKS fetch, say), for races at the upgrade."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from tornado.httputil import HTTPServerRequest

from wirehub import AuthError, Identity, hookimpl


class SlowAuthenticator:
    expiry_grace = 0.0

    async def authenticate(self, request: HTTPServerRequest) -> Identity:
        await asyncio.sleep(0.3)
        return Identity(user="slow-user", rooms=("*",))

    async def refresh(self, identity: Identity, token: str) -> Identity:
        raise AuthError(400, "unsupported")

    def describe(self) -> str:
        return "auth slow (tests)"


@hookimpl
def wirehub_register_authenticators() -> Mapping[str, Any]:
    return {"slow": lambda options, key: SlowAuthenticator()}
