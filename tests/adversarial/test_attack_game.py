"""Issue 12, defect 3, against a real server on the memory, Redis and NATS buses: a poisoned game room.

One member used to add deeply nested lists to a room's state until every later update, from anyone,
answered ``internal``. Now patches and states are bounded in depth (``max_state_depth``, 32 here: the
default) and a patch cannot multiply the state's size by copying; each attempt gets an exact
``too_large`` (or ``bad_json`` for a frame deeper than ``server.max_json_depth``), and the other
members' updates go on being acked. A state already too deep in the store (written there directly,
through the backend) is reset to ``initial_state`` when read, with one log line: the room never
answers ``internal`` because of it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.helpers import bus_options
from tests.plugins_for_tests.game_client import GameClient
from wirehub.builtins.bus._broker import encode_room
from wirehub.inbound import value_depth
from wirehub.testing import LiveServer, unique_room

GAME = "/ws/game"
INITIAL = {"n": 0}
ServerFactory = Callable[..., Awaitable[LiveServer]]


@pytest.fixture(params=["memory", "redis", "nats"])
async def game(request: pytest.FixtureRequest, wirehub_server: ServerFactory) -> LiveServer:
    kind = str(request.param)
    bus: dict[str, Any] = {"plugin": kind}
    if kind != "memory":  # the session's shared broker, a key prefix of this test's own
        broker = request.getfixturevalue(f"{kind}_server")
        bus[kind] = bus_options(kind, broker, f"poison{uuid.uuid4().hex[:8]}")
    return await wirehub_server({
        "bus": bus,
        "endpoints": [{"path": GAME, "handler": "game", "options": {
            "tick": 0.02, "verify_interval": 0.5, "initial_state": INITIAL, "updates_per_second": 0}}],
    })


@pytest.fixture
async def clients(game: LiveServer) -> AsyncIterator[Callable[[], Awaitable[GameClient]]]:
    made: list[GameClient] = []

    async def connect() -> GameClient:
        made.append(await GameClient.connect(game.ws_url(GAME)))
        return made[-1]

    yield connect
    for c in made:
        assert not [f for f in c.frames + c.replies if f.get("code") == "internal"], "internal was answered"
        await c.aclose()


def nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


async def error_of(c: GameClient, request: dict[str, Any]) -> dict[str, Any]:
    reply = await c.request(request)
    assert reply["op"] == "error", reply
    return {k: v for k, v in reply.items() if k != "id"}


async def others_still_play(server: LiveServer, room: str, *members: GameClient) -> None:
    """Every member's update in ``room`` is acked and reaches the others; a fresh room works too."""
    for i, m in enumerate(members):
        ack = await m.update(room, [{"op": "replace", "path": "/n", "value": i + 100}])
        assert ack["op"] == "ack", ack
        for other in members:
            assert (await other.wait_version(room, ack["version"]))[1]["n"] == i + 100
    fresh = unique_room("bystander")
    c = await GameClient.connect(server.ws_url(GAME))
    try:
        await c.join(fresh)
        assert (await c.update(fresh, [{"op": "add", "path": "/ok", "value": True}]))["op"] == "ack"
    finally:
        await c.aclose()


async def stored_state(server: LiveServer, room: str) -> Any:
    found = await server.app.backend.state.get(f"game/{room}")
    assert found is not None
    return found[1]["s"]


async def test_a_member_cannot_poison_a_room(game: LiveServer, clients: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    attacker, member = await clients(), await clients()
    room = unique_room("poison")
    for c in (attacker, member):
        await c.join(room)
    # 1. a frame nested 600 deep never reaches the game: bad_json, before the id is read
    await attacker.send({"op": "update", "room": room, "patch": [{"op": "add", "path": "/x", "value": nest(600)}]})
    await attacker.wait_for(lambda: any(f.get("code") == "bad_json" for f in attacker.frames))
    # 2. nesting built up in steps: the 21-level path plus a 20-deep value is refused
    assert (await attacker.update(room, [{"op": "add", "path": "/a", "value": nest(20)}]))["op"] == "ack"
    deepest = "/a" + "/0" * 20
    assert await error_of(attacker, {"op": "update", "room": room, "patch": [
        {"op": "add", "path": deepest, "value": nest(20)}]}) == {
        "op": "error", "code": "too_large", "max_depth": 32,
        "message": "the update would nest the state 41 levels deep; the limit is 32"}
    # up to the limit is fine, one more level is not
    assert (await attacker.update(room, [{"op": "add", "path": deepest, "value": nest(11)}]))["op"] == "ack"
    assert (await error_of(attacker, {"op": "update", "room": room, "patch": [
        {"op": "add", "path": deepest + "/0" * 11, "value": [1]}]}))["code"] == "too_large"
    # 3. copy and move cannot deepen it either
    for op in ("copy", "move"):
        assert (await error_of(attacker, {"op": "update", "room": room, "patch": [
            {"op": op, "from": "/a", "path": "/a/0/0"}]}))["code"] == "too_large"
    state = await stored_state(game, room)
    assert value_depth(state, 1000) == 32
    # 4. a patch that copies the state into itself until it is huge: refused on the bytes copied
    big = unique_room("copies")
    await attacker.join(big)
    assert (await attacker.update(big, [{"op": "add", "path": "/a", "value": {"blob": "x" * 1000}}]))["op"] == "ack"
    doubling: list[Any] = []
    for i in range(30):  # /a = {..., k<i>: copy of /a}: each round doubles /a
        doubling += [{"op": "copy", "from": "/a", "path": "/b"}, {"op": "copy", "from": "/b", "path": f"/a/k{i}"}]
    assert await error_of(attacker, {"op": "update", "room": big, "patch": doubling}) == {
        "op": "error", "code": "too_large", "max_bytes": 65536,
        "message": "the update copies over 65536 bytes; the state's limit"}
    assert await stored_state(game, big) == {"n": 0, "a": {"blob": "x" * 1000}}
    # everyone else's updates still succeed, in the poisoned room and elsewhere; nothing was logged
    await others_still_play(game, room, member, attacker)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("wirehub")], \
        caplog.text


async def _write_raw(server: LiveServer, key: str, state_text: str, state: Any) -> None:
    """Put a document with ``state`` (``state_text`` as JSON) in the store, bypassing compare_and_set's
    encoder (which cannot encode it): what an older release or another program could have left."""
    store: Any = server.app.backend.state
    doc_text = '{"e":"old","c":"c0","s":' + state_text + "}"
    kind = server.app.config.bus.plugin
    if kind == "memory":
        store._docs[key] = (1, {"e": "old", "c": "c0", "s": state})
    elif kind == "redis":
        await store.bus.client.hset(store.bus.key("s", key), mapping={"v": "1", "d": doc_text})
    else:
        await store.bus.state_kv.put(encode_room(key), ('{"v":1,"d":' + doc_text + "}").encode())


@pytest.mark.parametrize("stored", ["too deep", "unreadable", "NaN"])
async def test_a_state_too_deep_in_the_store_is_reset_not_internal_forever(
        game: LiveServer, clients: Any, caplog: pytest.LogCaptureFixture, stored: str) -> None:
    caplog.set_level(logging.INFO)
    room = unique_room("stored")
    key = f"game/{room}"
    if stored == "too deep":  # 40 levels: readable, written through the store's own compare-and-set
        await game.app.backend.state.compare_and_set(key, 0, {"e": "old", "c": "c0", "s": nest(40)})
    elif stored == "unreadable":  # 5,000 levels: too deep for the store's decoder (or the memory copy)
        await _write_raw(game, key, "[" * 5000 + "]" * 5000, nest(5000))
    else:
        await _write_raw(game, key, '{"n":NaN}', {"n": float("nan")})
    a, b = await clients(), await clients()
    for c in (a, b):
        reply = await c.join(room)
        assert reply["op"] == "state" and reply["state"] == INITIAL, str(reply)[:300]
    for _ in range(20):
        reply = await a.update(room, [{"op": "add", "path": "/x", "value": 1}])
        assert reply["op"] == "ack", reply
    assert await stored_state(game, room) == {**INITIAL, "x": 1}
    await others_still_play(game, room, a, b)
    lines = [r for r in caplog.records if r.name == "wirehub.game" and r.levelno >= logging.ERROR]
    assert len(lines) == 1 and key in lines[0].getMessage(), caplog.text
    assert len(caplog.text) < 2000
