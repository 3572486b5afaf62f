"""The two upgrade paths on a real server: version 13 through the lean path (service/upgrade.py),
versions 7 and 8 through Tornado's handler; both open the same kind of session, and a refusal after
authentication on the lean path is the documented JSON answer."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Awaitable, Callable

import pytest

from wirehub.testing import LiveServer
from wirehub.upgrade import LeanSocket
from wirehub.websocket import WirehubSocket

Start = Callable[..., Awaitable[LiveServer]]
ECHO = [{"path": "/ws/echo", "handler": "echo"}]


async def upgrade(server: LiveServer, version: str, extra: str = "") -> tuple[bytes, asyncio.StreamReader,
                                                                               asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws/echo HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n"
                 f"{extra}\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return head, reader, writer


async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    mask = os.urandom(4)
    payload = b'{"n":1}'
    writer.write(bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    head = await asyncio.wait_for(reader.readexactly(2), 5)
    return await reader.readexactly(head[1] & 0x7F)


@pytest.mark.parametrize(("version", "kind"), [("13", LeanSocket), ("8", WirehubSocket)])
async def test_both_paths_open_a_working_session(version: str, kind: type, wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    head, reader, writer = await upgrade(server, version, "Sec-WebSocket-Protocol: wirehub.v1, bearer.x\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"sec-websocket-protocol: wirehub.v1\r\n" in head.lower() and b"bearer" not in head
    assert await echo_once(reader, writer) == b'{"echo":{"n":1}}'
    (socket_side,) = server.app.sessions.values()
    assert isinstance(socket_side, kind)
    writer.close()
    await writer.wait_closed()
    for _ in range(100):
        if not server.app.sessions:
            break
        await asyncio.sleep(0.02)
    assert not server.app.sessions
    assert not server.app.connections.users  # the per-user count was released


async def test_a_limit_on_the_lean_path_is_the_documented_429(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO, "server": {"max_connections_per_ip": 1}})
    head, _, writer = await upgrade(server, "13")
    assert head.startswith(b"HTTP/1.1 101"), head
    refused, reader2, writer2 = await upgrade(server, "13")
    assert refused.startswith(b"HTTP/1.1 429"), refused
    assert b"Retry-After: 5" in refused and b"Content-Type: application/json" in refused
    length = int(refused.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    body = json.loads(await reader2.readexactly(length))
    assert body == {"error": "too_many_connections", "reason": "too_many_connections_from_ip"}
    for w in (writer, writer2):
        w.close()
        await w.wait_closed()
