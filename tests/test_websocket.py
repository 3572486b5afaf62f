"""The core on one port: HTTP checks before the upgrade, the echo endpoint, limits and bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClosedError

import wirehub
from wirehub.testing import LiveServer, ws_connect

Start = Callable[..., Awaitable[LiveServer]]
ECHO = {"endpoints": [{"path": "/ws/echo", "handler": "echo"}]}


async def test_http_and_websocket_share_one_port(wirehub_server: Start) -> None:
    server = await wirehub_server(ECHO)
    health = await server.http("/healthz")
    assert health.code == 200 and json.loads(health.body)["status"] == "ok"
    ready = await server.http("/readyz")
    assert ready.code == 200
    client = await server.ws("/ws/echo")
    await client.send('{"hello":"server"}')
    assert await client.recv_raw() == '{"echo":{"hello":"server"}}'


async def test_non_json_text_gets_bad_json_and_the_connection_stays_open(wirehub_server: Start) -> None:
    server = await wirehub_server(ECHO)
    client = await server.ws("/ws/echo")
    await client.send("not json {")
    assert await client.recv() == {"op": "error", "code": "bad_json", "message": "frame is not valid JSON"}
    await client.send([1, 2])
    assert await client.recv() == {"echo": [1, 2]}


async def test_binary_frame_gets_bad_request(wirehub_server: Start) -> None:
    server = await wirehub_server(ECHO)
    client = await server.ws("/ws/echo")
    await client.send(b"\x00\x01")
    error = await client.recv()
    assert error["op"] == "error" and error["code"] == "bad_request"
    await client.send({"still": "open"})
    assert await client.recv() == {"echo": {"still": "open"}}


async def test_frame_over_the_size_limit_closes_1009_and_others_go_on(wirehub_server: Start) -> None:
    server = await wirehub_server({**ECHO, "server": {"max_message_size": 1024}})
    other = await server.ws("/ws/echo")
    big = await server.ws("/ws/echo")
    await big.send(json.dumps({"x": "a" * 2000}))
    code, _ = await big.wait_closed()
    assert code == 1009
    await other.send({"ok": 1})
    assert await other.recv() == {"echo": {"ok": 1}}


async def test_upgrade_on_unknown_path_is_404_before_upgrade(wirehub_server: Start) -> None:
    server = await wirehub_server(ECHO)
    with pytest.raises(HTTPClientError) as err:
        await ws_connect(server.ws_url("/ws/nope"))
    assert err.value.code == 404
    assert err.value.response is not None
    assert json.loads(err.value.response.body) == {"error": "not_found", "reason": "no route for /ws/nope"}


async def test_plain_get_on_an_endpoint_asks_for_an_upgrade(wirehub_server: Start) -> None:
    server = await wirehub_server(ECHO)
    response = await server.http("/ws/echo")
    assert response.code == 426
    assert json.loads(response.body)["error"] == "upgrade_required"


async def test_foreign_origin_is_403_before_upgrade(wirehub_server: Start) -> None:
    server = await wirehub_server(ECHO)
    with pytest.raises(HTTPClientError) as err:
        await ws_connect(server.ws_url("/ws/echo"), headers={"Origin": "https://evil.example"})
    assert err.value.code == 403
    assert err.value.response is not None
    assert json.loads(err.value.response.body) == {"error": "forbidden_origin", "reason": "origin not allowed"}
    # Same origin is allowed by default.
    same = await ws_connect(server.ws_url("/ws/echo"), headers={"Origin": f"http://127.0.0.1:{server.port}"})
    same.close()


async def test_origin_allowlist_is_exact_and_star_allows_any(wirehub_server: Start) -> None:
    server = await wirehub_server({**ECHO, "server": {"allowed_origins": ["https://app.example"]}})
    ok = await ws_connect(server.ws_url("/ws/echo"), headers={"Origin": "https://app.example"})
    ok.close()
    for origin in ("https://app.example.evil", f"http://127.0.0.1:{server.port}", "https://APP.example:443"):
        with pytest.raises(HTTPClientError) as err:
            await ws_connect(server.ws_url("/ws/echo"), headers={"Origin": origin})
        assert err.value.code == 403
    anyone = await wirehub_server({**ECHO, "server": {"allowed_origins": ["*"]}})
    client = await ws_connect(anyone.ws_url("/ws/echo"), headers={"Origin": "https://whoever.example"})
    client.close()


async def test_draining_replica_refuses_upgrades_with_503(wirehub_server: Start) -> None:
    server = await wirehub_server(ECHO)
    server.app.draining = True
    with pytest.raises(HTTPClientError) as err:
        await ws_connect(server.ws_url("/ws/echo"))
    assert err.value.code == 503
    ready = await server.http("/readyz")
    assert ready.code == 503 and json.loads(ready.body)["reason"] == "draining"
    server.app.draining = False


async def test_connection_limit_per_ip_is_429(wirehub_server: Start) -> None:
    server = await wirehub_server({**ECHO, "server": {"max_connections_per_ip": 2}})
    a, b = await server.ws("/ws/echo"), await server.ws("/ws/echo")
    with pytest.raises(HTTPClientError) as err:
        await ws_connect(server.ws_url("/ws/echo"))
    assert err.value.code == 429
    assert err.value.response is not None
    assert json.loads(err.value.response.body)["reason"] == "too_many_connections_from_ip"
    a.close()
    await asyncio.sleep(0.2)
    c = await server.ws("/ws/echo")  # a's slot was released
    await c.send({"n": 1})
    assert await c.recv() == {"echo": {"n": 1}}
    del b


async def test_subprotocol_is_selected_and_a_bearer_token_is_never_echoed(wirehub_server: Start) -> None:
    server = await wirehub_server(ECHO)
    client = await server.ws("/ws/echo", subprotocols=["wirehub.v1", "bearer.abc"])
    assert client.conn.selected_subprotocol == "wirehub.v1"


async def test_access_log_never_prints_query_strings(wirehub_server: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = await wirehub_server(ECHO)
    client = await ws_connect(server.ws_url("/ws/echo?token=SECRET-TOKEN-123"))
    await client.send({"a": 1})
    await client.recv()
    await server.http("/nope?token=SECRET-TOKEN-123")
    client.close()
    await asyncio.sleep(0.1)
    assert "/ws/echo" in caplog.text
    assert "SECRET-TOKEN-123" not in caplog.text


def _raw_upgrade(port: int, path: str, rcvbuf: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def _masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    header = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big") if n >= 126 else bytes((0x81, 0x80 | n))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_client_that_stops_reading_is_closed_4008_and_memory_stays_capped(wirehub_server: Start) -> None:
    cap = 64 * 1024
    server = await wirehub_server({**ECHO, "server": {"send_queue_bytes": cap}})
    other = await server.ws("/ws/echo")
    peak = 0

    sock = await asyncio.to_thread(_raw_upgrade, server.port, "/ws/echo", 4096)
    frame = _masked_text(json.dumps({"fill": "x" * 4000}).encode())
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(3000):  # ~12 MB of echo requests, never reading a reply
            if server.app.metrics.slow_consumers._value.get():
                break
            await asyncio.wait_for(loop.sock_sendall(sock, frame), 5)
            for session in server.app.sessions:
                peak = max(peak, session.buffered)
    except (ConnectionError, TimeoutError):
        pass
    finally:
        sock.close()
    assert server.app.metrics.slow_consumers._value.get() == 1
    assert peak <= cap, f"send queue grew to {peak} bytes past the {cap} cap"
    await other.send({"still": "served"})
    assert await other.recv() == {"echo": {"still": "served"}}


async def test_write_after_close_is_harmless(wirehub_server: Start) -> None:
    server = await wirehub_server(ECHO)
    client = await server.ws("/ws/echo")
    client.close()
    await asyncio.sleep(0.1)
    with pytest.raises(WebSocketClosedError):
        await client.send({"late": True})
    assert (await server.http("/healthz")).code == 200


async def test_demo_page_and_plugin_listing_can_be_turned_off(wirehub_server: Start) -> None:
    on = await wirehub_server(ECHO)
    assert (await on.http("/")).code == 200 and (await on.http("/api/plugins")).code == 200
    off = await wirehub_server({**ECHO, "server": {"demo_page": False, "plugin_listing": False}})
    assert (await off.http("/")).code == 404 and (await off.http("/api/plugins")).code == 404
    assert (await off.http("/static/wirehub.js")).code == 200


async def test_static_serves_what_the_wheel_ships_and_not_the_js_package_tests(
        wirehub_server: Start, tmp_path: Any) -> None:
    server = await wirehub_server(ECHO)
    for shipped in ("/static/wirehub-client/index.js", "/static/wirehub-client/package.json",
                    "/static/wirehub-client/types/index.d.ts"):
        assert (await server.http(shipped)).code == 200, shipped
    package = Path(wirehub.__file__).parent / "static" / "wirehub-client"
    assert (package / "test" / "helpers.mjs").is_file()  # in a source checkout, yet never served
    for private in ("/static/wirehub-client/test/helpers.mjs", "/static/wirehub-client/node_modules/x.js",
                    "/static/wirehub-client/.npmrc"):
        response = await server.http(private)
        assert response.code == 404 and json.loads(response.body)["error"] == "not_found", private


async def test_a_client_gone_during_authentication_leaves_no_session_and_no_count(wirehub_server: Start) -> None:
    server = await wirehub_server({**ECHO, "auth": {"plugin": "slow"},
                                   "plugins": {"load": ["tests.plugins_for_tests.slow_auth"]},
                                   "server": {"max_connections_per_user": 1}})
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (
        f"GET /ws/echo HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    await asyncio.sleep(0.1)
    sock.close()  # gone while the authenticator still works
    await asyncio.sleep(0.5)
    assert server.app.sessions == {}
    assert not server.app.connections.users and not server.app.connections.ips
    client = await server.ws("/ws/echo")  # the one allowed connection of the user is still free
    await client.send({"ok": 1})
    assert await client.recv() == {"echo": {"ok": 1}}
