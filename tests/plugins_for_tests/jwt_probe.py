"""A handler "probe" for the JWT tests, plus their shared helpers.

The handler is an :class:`wirehub.handler.OpHandler` (welcome, ``ping``, ``refresh``) with one more
ops, ``whoami`` (the session's identity) and ``may`` (the room policy's answer for it), so the JWT tests do
not depend on chat.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import jwt

from wirehub import HandlerContext, OpHandler, Session, hookimpl, require_str

MODULE = "tests.plugins_for_tests.jwt_probe"
PATH = "/ws/probe"
SECRET = "s3cret-for-tests-only-0123456789abcdef"  # >= 32 bytes, as HS256 requires
OLD_SECRET = "old-s3cret-for-tests-only-0123456789abcdef"


class ProbeHandler(OpHandler):
    def __init__(self, context: HandlerContext) -> None:
        super().__init__(context)
        self.ops["whoami"] = self.op_whoami
        self.ops["may"] = self.op_may

    async def op_whoami(self, session: Session, request: dict[str, Any]) -> None:
        ident = session.identity
        self.reply(session, request, "identity", user=ident.user, name=ident.name, rooms=list(ident.rooms),
                   expires_at=ident.expires_at)


    async def op_may(self, session: Session, request: dict[str, Any]) -> None:
        """``may {room, action?}``: the answer of the wirehub_authorize policy for this session."""
        room = require_str(request, "room")
        action = str(request.get("action", "join"))
        allowed = await self.context.hooks.authorize(session.identity, action, room)
        self.reply(session, request, "may", room=room, action=action, allowed=allowed)


def _factory(options: Mapping[str, Any], key: str, context: HandlerContext) -> ProbeHandler:
    return ProbeHandler(context)


@hookimpl
def wirehub_register_handlers() -> Mapping[str, Any]:
    return {"probe": _factory}


# -- helpers for tests/test_jwt*.py ------------------------------------------------------------------------


def server_config(server: Mapping[str, Any] | None = None, **jwt_options: Any) -> dict[str, Any]:
    """wirehub_server overrides: JWT auth (HS256 with SECRET unless overridden) and the probe endpoint."""
    options: dict[str, Any] = {"algorithms": ["HS256"], "secret": SECRET, "leeway": 0, **jwt_options}
    options = {k: v for k, v in options.items() if v is not None}
    config: dict[str, Any] = {
        "auth": {"plugin": "jwt", "jwt": options},
        "endpoints": [{"path": PATH, "handler": "probe"}],
        "plugins": {"load": [MODULE]},
    }
    if server:
        config["server"] = dict(server)
    return config


def claims(sub: str = "alice", ttl: float = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"sub": sub, "rooms": ["lobby", "team-*"], "iat": now, "exp": now + int(ttl)}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def token(sub: str = "alice", *, key: Any = SECRET, alg: str = "HS256", headers: dict[str, Any] | None = None,
          ttl: float = 300, **extra: Any) -> str:
    """A token signed by PyJWT; extra claims override (None removes one)."""
    return jwt.encode(claims(sub, ttl, **extra), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None = None) -> str:
    """A hand-made compact JWS (PyJWT refuses to make some of the attacks): HS256 over ``hmac_key``, or
    an empty signature."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if hmac_key is None else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


UPGRADE_HEADERS = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
