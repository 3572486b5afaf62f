"""Issue 12, defects 4 and 5, against a real server: deeply nested JSON and JSON the server must not send.

Defect 4: frames nested 30,000 levels deep in chat, 600 in a game update and 5,000 in echo, and a
publish-API body 5,000 deep, used to raise RecursionError (answered ``internal`` / 500 with a
traceback per frame). Now each gets ``bad_json`` / 400, the log does not grow with what the attacker
sends, and a bystander is served throughout. A client that makes a plugin fail on every frame gets
one log line per interval.

Defect 5: NaN and Infinity used to come back in ids and echoes. Now they are refused (``bad_json``),
ids outside the rule get ``bad_request``, and every frame the server sends parses strictly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from wirehub.config import ConfigError
from wirehub.testing import LiveServer, WsClient, unique_room

ECHO, CHAT, GAME = "/ws/echo", "/ws/chat", "/ws/game"
KEY = "attack-json-key"
ServerFactory = Callable[..., Awaitable[LiveServer]]
TOO_DEEP = {"op": "error", "code": "bad_json", "message": "frame is not valid JSON: JSON nested deeper than 32 levels"}
BAD_ID = {"op": "error", "code": "bad_request",
          "message": "field 'id' must be a string of at most 64 characters or an integer within +-2^53"}


@pytest.fixture
async def server(wirehub_server: ServerFactory) -> LiveServer:
    return await wirehub_server({
        "endpoints": [
            {"path": ECHO, "handler": "echo"},
            {"path": CHAT, "handler": "chat"},
            {"path": GAME, "handler": "game", "options": {"tick": 0.02, "updates_per_second": 0}},
        ],
        "plugins": {"load": ["tests.plugins_for_tests.game_rules"]},
        "api": {"keys": [KEY]},
    })


def strict(raw: str | bytes | None) -> dict[str, Any]:
    """A frame the server sent, read by a parser that refuses NaN and Infinity."""
    assert isinstance(raw, str), raw

    def refuse(name: str) -> None:
        raise AssertionError(f"the server sent {name}: {raw}")

    frame: dict[str, Any] = json.loads(raw, parse_constant=refuse)
    return frame


def nest(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def raw(obj: dict[str, Any], text: str) -> str:
    """``obj`` as JSON with the JSON text ``text`` (nested, NaN, ...) in place of the value ``"@"``."""
    return json.dumps(obj, separators=(",", ":")).replace('"@"', text)


async def bystander_pair(server: LiveServer) -> tuple[WsClient, WsClient, str]:
    room = unique_room("bystander")
    a, b = await server.ws(CHAT, welcome=True), await server.ws(CHAT, welcome=True)
    for ws in (a, b):
        assert (await ws.request({"op": "join", "room": room}))["op"] == "joined"
    return a, b, room


async def bystander_served(a: WsClient, b: WsClient, room: str, text: str) -> None:
    assert (await a.request({"op": "publish", "room": room, "data": text}))["op"] == "ack"
    assert (await b.recv_op("message"))["data"] == text


async def test_deeply_nested_frames_get_bad_json_and_do_not_grow_the_log(
        server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    a, b, room = await bystander_pair(server)
    chat, game, echo = (await server.ws(CHAT, welcome=True), await server.ws(GAME, welcome=True),
                        await server.ws(ECHO))
    game_room = unique_room("game")
    assert (await game.request({"op": "join", "room": game_room}))["op"] == "state"
    frames = [
        (chat, raw({"op": "publish", "room": room, "data": "@"}, nest(30_000))),
        (game, raw({"op": "update", "room": game_room, "patch": [{"op": "add", "path": "/x", "value": "@"}]},
                   nest(600))),
        (echo, nest(5_000)),
    ]
    log_before = len(caplog.text)
    sent = 0
    for i in range(200):
        ws, text = frames[i % 3]
        await ws.send(text)
        sent += len(text)
        assert strict(await ws.recv_raw()) == TOO_DEEP
        if i % 50 == 0:
            await bystander_served(a, b, room, f"still here {i}")
    logged = len(caplog.text) - log_before
    assert logged < sent // 1000, caplog.text[-2000:]  # in fact nothing: bad input is answered, not logged
    # the attackers' connections are still usable, and the bystander is served
    assert (await chat.request({"op": "ping"}))["op"] == "pong"
    assert (await game.request({"op": "update", "room": game_room,
                                "patch": [{"op": "add", "path": "/ok", "value": nest(20)}]}))["op"] == "ack"
    await echo.send('{"fine":[1]}')
    assert strict(await echo.recv_raw()) == {"echo": {"fine": [1]}}
    await bystander_served(a, b, room, "done")


async def test_a_deeply_nested_publish_api_body_is_400(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    a, b, room = await bystander_pair(server)
    auth = {"Authorization": f"Bearer {KEY}"}
    body = raw({"room": room, "data": "@"}, nest(5_000))
    for _ in range(20):
        resp = await server.http("/api/publish", "POST", body=body, headers=auth)
        assert resp.code == 400
        assert json.loads(resp.body) == {"error": "bad_request",
                                         "reason": "the body is not valid JSON: JSON nested deeper than 32 levels"}
    # one access-log warning line per request at most, no traceback
    assert "Traceback" not in caplog.text and len(caplog.text) < 20 * len(body) // 100
    resp = await server.http("/api/publish", "POST", body={"room": room, "data": "from the api"}, headers=auth)
    assert resp.code == 200
    assert (await b.recv_op("message"))["data"] == "from the api"
    await bystander_served(a, b, room, "after the api attack")


async def test_a_plugin_failing_on_every_frame_is_logged_once_per_interval(
        server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    a, b, room = await bystander_pair(server)
    attacker = await server.ws(GAME, welcome=True)
    broken = unique_room("broken")  # the test rules plugin raises on an update of /raise there
    assert (await attacker.request({"op": "join", "room": broken}))["op"] == "state"
    update = {"op": "update", "room": broken, "patch": [{"op": "add", "path": "/raise", "value": 1}]}
    before = len(caplog.text)
    sent = 0
    for _ in range(100):
        sent += len(json.dumps(update))
        reply = await attacker.request(update)
        assert reply["code"] == "internal" and reply["op"] == "error"  # a plugin bug, not the client's input
    text = caplog.text[before:]
    assert text.count("Traceback") <= 1, text[:3000]
    assert len(text) < sent, (len(text), sent)
    await bystander_served(a, b, room, "served")


async def test_a_plugin_putting_nan_in_a_frame_gets_internal_and_nothing_invalid_is_sent(
        server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    attacker, member = await server.ws(GAME, welcome=True), await server.ws(GAME, welcome=True)
    broken = unique_room("broken")  # the test rules plugin answers an update of /nan with a NaN value
    for ws in (attacker, member):
        assert (await ws.request({"op": "join", "room": broken}))["op"] == "state"
    for _ in range(50):
        await attacker.send({"op": "update", "id": "nan", "room": broken,
                             "patch": [{"op": "add", "path": "/nan", "value": 1}]})
        assert strict(await attacker.recv_raw()) == {"op": "error", "id": "nan", "code": "internal",
                                                      "message": "internal error"}
    assert caplog.text.count("a rules plugin returned an invalid patch") == 1
    # the room, and the members' other updates, are not affected
    await member.send({"op": "update", "id": "ok", "room": broken, "patch": [{"op": "add", "path": "/ok", "value": 1}]})
    while (frame := strict(await member.recv_raw())).get("id") != "ok":
        pass
    assert frame["op"] == "ack"


async def test_nan_and_infinity_are_refused_and_never_sent(server: LiveServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    a, b, room = await bystander_pair(server)
    chat, echo = await server.ws(CHAT, welcome=True), await server.ws(ECHO)
    await chat.send('{"op":"ping","id":1e400}')  # a float, not an integer
    assert strict(await chat.recv_raw()) == BAD_ID
    for literal in ("NaN", "Infinity", "-Infinity"):
        expected = {"op": "error", "code": "bad_json",
                    "message": f"frame is not valid JSON: {literal} is not valid JSON"}
        await chat.send(raw({"op": "ping", "id": "@"}, literal))
        assert strict(await chat.recv_raw()) == expected
        await chat.send(raw({"op": "publish", "room": room, "data": {"x": ["@"]}}, literal))
        assert strict(await chat.recv_raw()) == expected
        await echo.send(raw({"value": "@"}, literal))
        assert strict(await echo.recv_raw()) == expected
    # a lone surrogate could not be sent back as UTF-8
    await echo.send('{"s":"\\ud800"}')
    assert strict(await echo.recv_raw()) == {
        "op": "error", "code": "bad_json", "message": "frame is not valid JSON: a string holds a lone UTF-16 surrogate"}
    await echo.send('{"s":"\\ud83d\\ude00 [ok]"}')  # a valid pair is fine
    assert strict(await echo.recv_raw()) == {"echo": {"s": "\U0001f600 [ok]"}}
    # 1e400 parses as a float infinity: it is never sent back as Infinity
    assert (await chat.request({"op": "join", "room": room}))["op"] == "joined"
    await chat.send(raw({"op": "publish", "room": room, "id": "big", "data": "@"}, "1e400"))
    reply = strict(await chat.recv_raw())
    assert reply == {"op": "error", "id": "big", "code": "bad_request",
                     "message": "field 'data' must be JSON without NaN or Infinity"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await bystander_served(a, b, room, "after NaN")


@pytest.mark.parametrize("bad_id", ["1.5", "true", "false", str(2**53 + 1), str(-(2**53) - 1), '"' + "x" * 65 + '"',
                                    '{"a":1}', "[1]", "1e3", "-0.0"])
async def test_ids_outside_the_rule_are_bad_requests(server: LiveServer, bad_id: str) -> None:
    a, b, room = await bystander_pair(server)
    chat = await server.ws(CHAT, welcome=True)
    await chat.send(raw({"op": "ping", "id": "@"}, bad_id))
    assert strict(await chat.recv_raw()) == BAD_ID
    await bystander_served(a, b, room, "ok")


@pytest.mark.parametrize("good_id", [2**53, -(2**53), 0, "x" * 64, "", "m-17"])
async def test_ids_within_the_rule_come_back(server: LiveServer, good_id: Any) -> None:
    chat = await server.ws(CHAT, welcome=True)
    await chat.send(json.dumps({"op": "ping", "id": good_id}))
    reply = strict(await chat.recv_raw())
    assert reply["op"] == "pong" and reply["id"] == good_id
    await asyncio.sleep(0)


async def test_the_depth_limit_is_configurable(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server({"server": {"max_json_depth": 4},
                                   "endpoints": [{"path": ECHO, "handler": "echo"}, {"path": CHAT, "handler": "chat"}]})
    echo = await server.ws(ECHO)
    await echo.send(nest(4))
    assert strict(await echo.recv_raw()) == {"echo": [[[[1]]]]}
    await echo.send(nest(5))
    assert strict(await echo.recv_raw()) == {
        "op": "error", "code": "bad_json", "message": "frame is not valid JSON: JSON nested deeper than 4 levels"}
    chat = await server.ws(CHAT, welcome=True)
    await chat.send(raw({"op": "ping", "id": 1, "x": "@"}, nest(4)))  # the envelope is one level
    assert strict(await chat.recv_raw())["code"] == "bad_json"
    assert (await chat.request({"op": "ping", "x": [[["ok"]]]}))["op"] == "pong"


@pytest.mark.parametrize(("config", "message"), [
    ({"server": {"max_json_depth": 1000}}, "server.max_json_depth: must be at most 256, got 1000"),
    ({"server": {"max_json_depth": 1}}, "server.max_json_depth: must be at least 2, got 1"),
    ({"server": {"error_log_interval": -1}}, "server.error_log_interval: must be at least 0, got -1.0"),
    ({"endpoints": [{"path": GAME, "handler": "game", "options": {"max_state_depth": 0}}]},
     "endpoints[0].options.max_state_depth: must be at least 1, got 0"),
])
async def test_limit_config_errors_name_the_key(wirehub_server: ServerFactory, config: dict[str, Any],
                                               message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        await wirehub_server(config)
