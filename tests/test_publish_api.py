"""POST /api/publish over real HTTP, with chat members on real WebSockets receiving the messages."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from wirehub.config import load_config
from wirehub.testing import LiveServer, WsClient, unique_room

CHAT = "/ws/chat"
KEY = "s3cret-key-for-tests"
ServerFactory = Callable[..., Awaitable[LiveServer]]
AUTH = {"Authorization": f"Bearer {KEY}"}


def api_config(keys: list[str] | None = None, chat: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "endpoints": [{"path": CHAT, "handler": "chat", "options": chat or {}}],
        "api": {"keys": [KEY] if keys is None else keys, **extra.pop("api", {})},
        **extra,
    }


async def member(server: LiveServer, room: str) -> WsClient:
    ws = await server.ws(CHAT, welcome=True)
    reply = await ws.request({"op": "join", "room": room})
    assert reply["op"] == "joined", reply
    return ws


async def post(server: LiveServer, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    resp = await server.http("/api/publish", "POST", body=body, headers=AUTH if headers is None else headers)
    assert resp.headers["Content-Type"] == "application/json"
    return resp.code, json.loads(resp.body)


@pytest.fixture
async def api(wirehub_server: ServerFactory) -> LiveServer:
    return await wirehub_server(api_config())


async def test_publish_reaches_every_member_as_from_server(api: LiveServer) -> None:
    room = unique_room()
    a, b = await member(api, room), await member(api, room)
    code, body = await post(api, {"room": room, "data": {"text": "deploy done"}})
    assert (code, body) == (200, {"room": room, "offset": 1})
    for ws in (a, b):
        msg = await ws.recv_op("message")
        assert msg["from"] == "server" and msg["data"] == {"text": "deploy done"} and msg["offset"] == 1
        assert msg["room"] == room and isinstance(msg["ts"], float)
    # stored like any message: a member's history shows it
    hist = await a.request({"op": "history", "room": room})
    assert [(m["from"], m["offset"]) for m in hist["messages"]] == [("server", 1)]
    # and the next chat publish continues the offsets
    ack = await a.request({"op": "publish", "room": room, "data": "thanks"})
    assert ack["offset"] == 2


async def test_publish_to_an_empty_room_is_stored(api: LiveServer) -> None:
    room = unique_room()
    assert (await post(api, {"room": room, "data": 1}))[0] == 200
    late = await member(api, room)
    hist = await late.request({"op": "history", "room": room})
    assert [m["data"] for m in hist["messages"]] == [1]


async def test_no_keys_configured_is_503(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(api_config(keys=[]))
    code, body = await post(server, {"room": "r", "data": 1})
    assert code == 503 and body == {"error": "unavailable",
                                    "reason": "the publish API is off: no api.keys are configured"}


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": "Bearer "},
    {"Authorization": KEY},
    {"Authorization": f"Bearer {KEY}x"},
])
async def test_missing_or_invalid_key_is_401(api: LiveServer, headers: dict[str, str]) -> None:
    room = unique_room()
    ws = await member(api, room)
    resp = await api.http("/api/publish", "POST", body={"room": room, "data": 1}, headers=headers)
    assert resp.code == 401 and json.loads(resp.body) == {"error": "unauthorized",
                                                          "reason": "missing or invalid bearer key"}
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    await ws.expect_nothing(0.1)
    assert (await post(api, {"room": room, "data": "ok"}))[0] == 200  # the right key still works
    assert (await ws.recv_op("message"))["data"] == "ok"


async def test_any_of_several_keys_and_lowercase_bearer(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(api_config(keys=["first-key", KEY]))
    assert (await post(server, {"room": "r", "data": 1}, {"Authorization": f"bearer {KEY}"}))[0] == 200
    assert (await post(server, {"room": "r", "data": 1}, {"Authorization": "Bearer first-key"}))[0] == 200


@pytest.mark.parametrize(("body", "reason"), [
    ("{not json", "the body is not valid JSON"),
    ("", "the body is not valid JSON"),
    ("[1, 2]", "the body must be a JSON object {room, data}"),
    ({"room": "r"}, "the body needs a field 'data' (any JSON value)"),
    ({"data": 1}, "field 'room' must be a string"),
    ({"room": 7, "data": 1}, "field 'room' must be a string"),
    ({"room": "bad room", "data": 1}, "invalid room name: it must match ^[A-Za-z0-9_\\-.:@]{1,128}$"),
    ('{"room": "r", "data": NaN}', "the body is not valid JSON: NaN is not valid JSON"),
    ('{"room": "r", "data": ' + "[" * 33 + "]" * 33 + "}",
     "the body is not valid JSON: JSON nested deeper than 32 levels"),
])
async def test_bad_bodies_are_400(api: LiveServer, body: Any, reason: str) -> None:
    code, answer = await post(api, body)
    assert (code, answer) == (400, {"error": "bad_request", "reason": reason})
    await _still_publishes(api)


async def test_body_over_api_max_body_is_413(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(api_config(api={"max_body": 200}))
    code, body = await post(server, {"room": "r", "data": "x" * 300})
    assert (code, body) == (413, {"error": "too_large", "reason": "the body is over api.max_body (200 bytes)"})
    await _still_publishes(server)


async def test_message_over_the_room_size_is_413(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(api_config(chat={"max_message_bytes": 10,
                                                   "room_limits": [{"pattern": "big-*", "max_message_bytes": 100}]}))
    code, body = await post(server, {"room": "small", "data": "x" * 20})
    assert (code, body) == (413, {"error": "too_large", "reason": "message data is 22 bytes; room 'small' allows 10"})
    assert (await post(server, {"room": "big-1", "data": "x" * 20}))[0] == 200


async def test_filter_runs_with_session_none_and_can_drop(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(api_config(plugins={"load": ["tests.plugins_for_tests.chat_policy"]}))
    room = unique_room()
    ws = await member(server, room)
    assert (await post(server, {"room": room, "data": {"text": "darn"}}))[0] == 200
    msg = await ws.recv_op("message")
    assert msg["data"] == {"text": "****", "via": "api"}  # via: the filter saw session=None
    code, body = await post(server, {"room": room, "data": {"spam": True}})
    assert (code, body) == (422, {"error": "rejected", "reason": "the message was rejected by a filter"})
    await ws.expect_nothing(0.1)


async def test_bus_down_is_503(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(api_config(bus={"plugin": "flaky"},
                                             plugins={"load": ["tests.plugins_for_tests.chat_flaky_bus"]}))
    bus: Any = server.app.backend.bus
    bus.set_down(True)
    resp = await server.http("/api/publish", "POST", body={"room": "r", "data": 1}, headers=AUTH)
    assert resp.code == 503 and resp.headers["Retry-After"] == "1"
    assert json.loads(resp.body) == {"error": "unavailable", "reason": "the message bus is unavailable; retry later"}
    bus.set_down(False)
    assert (await post(server, {"room": "r", "data": 1}))[0] == 200


async def test_get_is_405_json(api: LiveServer) -> None:
    resp = await api.http("/api/publish", headers=AUTH)
    assert resp.code == 405 and json.loads(resp.body)["error"] == "method_not_allowed"


def test_default_config_reads_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WIREHUB_API_KEY", raising=False)
    monkeypatch.delenv("WIREHUB_CONFIG", raising=False)  # load_config(None): the built-in defaults
    assert load_config(None).api.keys == ()  # unset: the API is off
    monkeypatch.setenv("WIREHUB_API_KEY", KEY)
    assert load_config(None).api.keys == (KEY,)
    chat = [ep for ep in load_config(None).endpoints if ep.path == CHAT]
    assert [ep.handler for ep in chat] == ["chat"]


async def test_env_key_end_to_end(wirehub_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WIREHUB_API_KEY", KEY)
    server = await wirehub_server(api_config(keys=["$env?:WIREHUB_API_KEY"]))
    assert (await post(server, {"room": "r", "data": 1}))[0] == 200


async def _still_publishes(server: LiveServer) -> None:
    room = unique_room()
    ws = await member(server, room)
    assert (await post(server, {"room": room, "data": "fine"}))[0] == 200
    assert (await ws.recv_op("message"))["data"] == "fine"
