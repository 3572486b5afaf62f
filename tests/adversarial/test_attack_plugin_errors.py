"""Issue 12, defect 6: an exception in a plugin hook must not leak the session.

A real ``wirehub serve`` process loads tests/plugins_for_tests/raising_hooks.py: a handler whose
``on_open`` raises, one whose ``on_message`` raises, and ``wirehub_authorize`` /
``wirehub_filter_message`` hooks that raise for marked rooms and data. Each raising open is closed
with 1011 and releases its session and per-IP slot; each raising message-level hook is answered
``error internal`` and the session goes on; one log line per (plugin, hook) names both; a metric
counts them; a bystander is served throughout, and SIGTERM does not wait out the grace.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from tests.helpers import ServerProcess, write_config
from wirehub.testing import LiveServer, WsClient, free_port, unique_room, ws_connect

PLUGIN = "tests.plugins_for_tests.raising_hooks"
GRACE = 20.0


def start_replica(tmp_path: Path) -> ServerProcess:
    port = free_port()
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "ping_interval": 0, "node_id": "boom",
                   "max_connections_per_ip": 2},
        "drain": {"grace": GRACE, "reconnect_jitter": 0},
        "logging": {"level": "info", "access_log": False},
        "endpoints": [
            {"path": "/ws/open", "handler": "raising-open"},
            {"path": "/ws/message", "handler": "raising-message"},
            {"path": "/ws/chat", "handler": "chat"},
            {"path": "/ws/game", "handler": "game"},
        ],
        "plugins": {"load": [PLUGIN]},
    }
    # run from the project root: the plugin module is tests.plugins_for_tests.raising_hooks
    return ServerProcess(write_config(tmp_path / "boom.yaml", config), port, name="boom",
                         unset_env=("WIREHUB_CONFIG",))


async def metric(replica: ServerProcess, name: str, **labels: str) -> float:
    resp = await AsyncHTTPClient().fetch(HTTPRequest(replica.url("/metrics"), request_timeout=2), raise_error=False)
    total = 0.0
    for family in text_string_to_metric_families(resp.body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def chat(replica: ServerProcess) -> WsClient:
    return await ws_connect(replica.url("/ws/chat", "ws"), welcome=True)


def finish(client: WsClient) -> None:
    """Release the client once the server closed it (else a ResourceWarning)."""
    client.close()
    if client.conn.stream is not None:
        client.conn.stream.close()


def lines_naming(replica: ServerProcess, hook: str) -> list[str]:
    return [line for line in replica.output().splitlines() if PLUGIN in line and f"hook {hook} " in line]


async def test_raising_hooks_release_the_session_and_answer_internal(tmp_path: Path) -> None:
    replica = start_replica(tmp_path)
    await replica.start_ready()
    try:
        # 5 raising opens in a row from one IP with max_connections_per_ip 2: each is closed with
        # 1011 and gives its slot back (a leak would refuse the third with 429).
        for _ in range(5):
            client = await ws_connect(replica.url("/ws/open", "ws"))
            assert await client.wait_closed() == (1011, "internal error")
            finish(client)

        async def open_sessions_gone() -> bool:
            return await metric(replica, "wirehub_sessions", endpoint="/ws/open") == 0

        await eventually(open_sessions_gone)
        assert await metric(replica, "wirehub_plugin_errors_total", plugin=PLUGIN, hook="on_open") == 5
        assert await metric(replica, "wirehub_plugin_errors_total", plugin=PLUGIN, hook="on_close") == 5

        # two good sessions fit in the per-IP limit again: a publisher and a bystander
        publisher, bystander = await chat(replica), await chat(replica)
        room = unique_room()
        for c in (publisher, bystander):
            assert (await c.request({"op": "join", "room": room}))["op"] == "joined"

        # message-level hooks: error internal, and the session stays usable
        reply = await publisher.request({"op": "publish", "room": room, "data": "boom"})
        assert (reply["op"], reply["code"]) == ("error", "internal")
        reply = await publisher.request({"op": "join", "room": unique_room("boom-authz")})
        assert (reply["op"], reply["code"]) == ("error", "internal")
        for i in range(3):
            reply = await publisher.request({"op": "publish", "room": room, "data": f"ok{i}"})
            assert reply["op"] == "ack"
            got = await bystander.recv_op("message")
            assert got["data"] == f"ok{i}"  # the bystander never saw "boom"
        assert await metric(replica, "wirehub_plugin_errors_total", plugin=PLUGIN, hook="filter_message") == 1
        assert await metric(replica, "wirehub_plugin_errors_total", plugin=PLUGIN, hook="authorize") == 1
        publisher.close()
        await publisher.wait_closed()
        finish(publisher)

        # a game rules hook that raises: error internal for that update, the room stays usable
        game = await ws_connect(replica.url("/ws/game", "ws"), welcome=True)
        game_room = unique_room("g")
        assert (await game.request({"op": "join", "room": game_room}))["op"] == "state"
        for _ in range(3):
            reply = await game.request({"op": "update", "room": game_room,
                                        "patch": [{"op": "add", "path": "/x", "value": "boom"}]})
            assert (reply["op"], reply["code"]) == ("error", "internal")
        reply = await game.request({"op": "update", "room": game_room,
                                    "patch": [{"op": "add", "path": "/x", "value": 1}]})
        assert (reply["op"], reply["version"]) == ("ack", 1)
        game.close()
        await game.wait_closed()
        finish(game)

        # Server-Sent Events: a raising authorize answers 500 internal before any stream starts
        resp = await AsyncHTTPClient().fetch(HTTPRequest(replica.url(f"/sse?rooms={unique_room('boom-authz')}"),
                                                         request_timeout=2), raise_error=False)
        assert (resp.code, json.loads(resp.body)) == (500, {"error": "internal", "reason": "internal error"})

        # a handler whose on_message raises: error internal each time, the session stays open
        raising = await ws_connect(replica.url("/ws/message", "ws"), welcome=True)
        for _ in range(20):
            await raising.send({"op": "anything"})
            reply = await raising.recv()
            assert (reply["op"], reply["code"]) == ("error", "internal")
        assert await metric(replica, "wirehub_plugin_errors_total", plugin=PLUGIN, hook="on_message") == 20
        raising.close()
        await raising.wait_closed()
        finish(raising)

        # one log line per (plugin, hook), however often it raised (rate-limited), and no traceback
        assert await metric(replica, "wirehub_plugin_errors_total", plugin=PLUGIN, hook="authorize") == 2
        assert await metric(replica, "wirehub_plugin_errors_total", plugin=PLUGIN, hook="validate_update") == 3
        for hook in ("on_open", "on_close", "on_message", "filter_message", "authorize", "validate_update"):
            lines = lines_naming(replica, hook)
            assert len(lines) == 1, (hook, lines)
        assert "Traceback" not in replica.output()

        assert (await bystander.request({"op": "ping"}))["op"] == "pong"  # still served after all that

        # SIGTERM drains the one open session (the bystander) and exits well within the grace
        assert await metric(replica, "wirehub_sessions") == 1
        started = time.monotonic()
        assert await asyncio.to_thread(replica.stop, GRACE + 5) == 0
        assert time.monotonic() - started < GRACE / 2
        assert (await bystander.wait_closed())[0] == 1001
        finish(bystander)
    finally:
        replica.kill()


async def test_a_raising_authenticator_answers_500_before_the_upgrade(
    wirehub_server: Callable[..., Awaitable[LiveServer]],
) -> None:
    server = await wirehub_server({"auth": {"plugin": "raising"}, "plugins": {"load": [PLUGIN]},
                                   "server": {"max_connections_per_ip": 1},
                                   "endpoints": [{"path": "/ws/echo", "handler": "echo"}]})
    for _ in range(3):
        try:
            await ws_connect(server.ws_url("/ws/echo"), headers={"X-Boom": "1"})
        except HTTPClientError as exc:
            assert exc.response is not None
            assert (exc.code, json.loads(exc.response.body)) == (500, {"error": "internal", "reason": "internal error"})
        else:
            raise AssertionError("the upgrade went through")
    # a raising wirehub_session_opened closes with 1011 and gives the slot back, every time
    for _ in range(3):
        client = await server.ws("/ws/echo", headers={"X-User": "boom-user"})
        assert await client.wait_closed() == (1011, "internal error")
        finish(client)
    bystander = await server.ws("/ws/echo")  # nothing was counted against the per-IP limit of 1
    await bystander.send({"hello": 1})
    assert await bystander.recv() == {"echo": {"hello": 1}}
    metrics = server.app.metrics
    assert metrics.plugin_errors.labels(PLUGIN, "authenticate")._value.get() == 3
    assert metrics.plugin_errors.labels(PLUGIN, "session_opened")._value.get() == 3
    assert metrics.sessions.labels("/ws/echo")._value.get() == 1  # the bystander only
