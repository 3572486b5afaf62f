"""A test authenticator ``test-header``: the user id comes from the ``X-User`` header (so two
connections can be one user, as two browser tabs) and the room patterns from ``X-Rooms``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tornado.httputil import HTTPServerRequest

from wirehub import AuthError, Identity, hookimpl


class HeaderAuthenticator:
    expiry_grace = 0.0

    async def authenticate(self, request: HTTPServerRequest) -> Identity:
        user = request.headers.get("X-User")
        if not user:
            raise AuthError(401, "missing")
        rooms = tuple(p.strip() for p in request.headers.get("X-Rooms", "*").split(",") if p.strip())
        return Identity(user=user, name=request.headers.get("X-Name", ""), rooms=rooms)

    async def refresh(self, identity: Identity, token: str) -> Identity:
        raise AuthError(400, "unsupported")

    def describe(self) -> str:
        return "auth test-header (tests only)"


def _factory(options: Mapping[str, Any], key: str) -> HeaderAuthenticator:
    return HeaderAuthenticator()


@hookimpl
def wirehub_register_authenticators() -> Mapping[str, Any]:
    return {"test-header": _factory}
