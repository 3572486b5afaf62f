"""Anonymous auth with a guest key: one person across endpoints (the demo page's chat and board), a
random guest without a key, and a clear 400 for a key that is not one."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from typing import Any

from wirehub.testing import LiveServer

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


async def welcome_user(server: LiveServer, path: str) -> str:
    ws = await server.ws(path)
    frame = await ws.recv(5)
    assert frame["op"] == "welcome", frame
    user: str = frame["user"]
    return user


async def test_the_same_key_is_the_same_guest_on_every_endpoint(wirehub_server: Callable[..., Any]) -> None:
    server: LiveServer = await wirehub_server()
    key, other = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    chat = await welcome_user(server, f"/ws/chat?guest={key}")
    game = await welcome_user(server, f"/ws/game?guest={key}")
    again = await welcome_user(server, f"/ws/chat?guest={key}")
    assert chat == game == again == f"guest-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    assert key not in chat  # the user shown to everyone does not give the key away
    assert await welcome_user(server, f"/ws/chat?guest={other}") != chat
    # without a key: a new guest per connection, as before
    first, second = await welcome_user(server, "/ws/chat"), await welcome_user(server, "/ws/chat")
    assert first != second and first.startswith("guest-") and len(first) == len("guest-") + 8


async def test_a_bad_guest_key_is_a_400_with_a_reason(wirehub_server: Callable[..., Any]) -> None:
    server: LiveServer = await wirehub_server()
    for bad in ("short", "x" * 129, "has%20space" + "y" * 16, "semi;colon" + "z" * 16):
        response = await server.http(f"/ws/chat?guest={bad}", headers=UPGRADE)
        assert response.code == 400, (bad, response.code)
        assert json.loads(response.body) == {"error": "bad_request", "reason": "bad_guest_key"}
