"""The chat endpoint over real WebSockets: rooms, broadcast, acks, presence, history, recovery, limits."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.helpers import rejoin_collecting
from wirehub.app import Wirehub
from wirehub.config import ConfigError, config_from_dict
from wirehub.testing import LiveServer, WsClient, config_for_tests, unique_room

CHAT = "/ws/chat"
ServerFactory = Callable[..., Awaitable[LiveServer]]
HEADER_AUTH = "tests.plugins_for_tests.chat_auth"
POLICY = "tests.plugins_for_tests.chat_policy"
FLAKY = "tests.plugins_for_tests.chat_flaky_bus"
SLOW_AUTHORIZE = "tests.plugins_for_tests.slow_authorize"


def chat_config(options: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    return {"endpoints": [{"path": CHAT, "handler": "chat", "options": options or {}}], **overrides}


def header_auth(*modules: str) -> dict[str, Any]:
    return {"auth": {"plugin": "test-header"}, "plugins": {"load": [HEADER_AUTH, *modules]}}


class Member:
    """A connected chat client and the user id its welcome named."""

    def __init__(self, ws: WsClient, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.user: str = welcome["user"]
        self.welcome = welcome

    async def join(self, room: str, **fields: Any) -> dict[str, Any]:
        reply = await self.ws.request({"op": "join", "room": room, **fields})
        assert reply["op"] == "joined", reply
        return reply

    async def publish(self, room: str, data: Any, **fields: Any) -> dict[str, Any]:
        return await self.ws.request({"op": "publish", "room": room, "data": data, **fields})

    async def error(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = await self.ws.request(request)
        assert reply["op"] == "error", reply
        return reply


async def connect(server: LiveServer, user: str | None = None, rooms: str | None = None) -> Member:
    headers = {}
    if user is not None:
        headers["X-User"] = user
    if rooms is not None:
        headers["X-Rooms"] = rooms
    ws = await server.ws(CHAT, headers=headers)
    welcome = await ws.recv()
    assert welcome["op"] == "welcome", welcome
    return Member(ws, welcome)


async def still_works(server: LiveServer, *members: Member) -> None:
    """Every given member still answers, and a fresh pair can chat in a fresh room."""
    for m in members:
        assert (await m.ws.request({"op": "ping"}))["op"] == "pong"
    room = unique_room()
    a, b = await connect(server, "still-a"), await connect(server, "still-b")
    await a.join(room)
    await b.join(room)
    ack = await a.publish(room, "still here")
    assert ack["op"] == "ack"
    msg = await b.ws.recv_op("message")
    assert msg["data"] == "still here" and msg["offset"] == ack["offset"]


@pytest.fixture
async def chat(wirehub_server: ServerFactory) -> LiveServer:
    return await wirehub_server(chat_config())


# -- the happy path -----------------------------------------------------------------------------------


async def test_welcome_and_ping(chat: LiveServer) -> None:
    m = await connect(chat)
    assert m.welcome["v"] == 1 and m.user.startswith("guest-") and m.welcome["session"]
    pong = await m.ws.request({"op": "ping", "id": "p1"})
    assert pong["op"] == "pong" and pong["id"] == "p1" and isinstance(pong["ts"], float)


async def test_join_reports_position_and_presence(chat: LiveServer) -> None:
    room = unique_room()
    a = await connect(chat)
    joined = await a.join(room, id="j1")
    assert joined["id"] == "j1" and joined["room"] == room
    assert joined["offset"] == 0 and isinstance(joined["epoch"], str) and joined["epoch"]
    assert joined["recovered"] is False
    assert joined["presence"] == [{"user": a.user, "name": a.user, "connections": 1}]


async def test_publish_reaches_the_others_and_acks_the_sender(chat: LiveServer) -> None:
    room = unique_room()
    a, b, c = await connect(chat), await connect(chat), await connect(chat)
    for m in (a, b, c):
        await m.join(room)
    ack = await a.publish(room, {"text": "hi"}, id="m1")
    assert ack == {"op": "ack", "id": "m1", "offset": 1}
    for m in (b, c):
        msg = await m.ws.recv_op("message")
        assert msg["room"] == room and msg["from"] == a.user and msg["data"] == {"text": "hi"}
        assert msg["offset"] == 1 and isinstance(msg["ts"], float)
        assert set(msg) == {"op", "room", "from", "data", "offset", "ts"}
    await a.ws.expect_nothing()  # not its own message
    ack2 = await b.publish(room, "second")
    assert ack2["offset"] == 2
    assert (await a.ws.recv_op("message"))["data"] == "second"


async def test_echo_true_sends_the_sender_its_own_message(chat: LiveServer) -> None:
    room = unique_room()
    a, b = await connect(chat), await connect(chat)
    await a.join(room)
    await b.join(room)
    await a.ws.recv_op("presence.join")
    await a.ws.send({"op": "publish", "room": room, "data": 42, "echo": True, "id": "e"})
    msg = await a.ws.recv()
    ack = await a.ws.recv()
    assert msg["op"] == "message" and msg["data"] == 42 and msg["from"] == a.user
    assert ack == {"op": "ack", "id": "e", "offset": msg["offset"]}
    assert (await b.ws.recv_op("message"))["data"] == 42


async def test_rooms_are_separate(chat: LiveServer) -> None:
    r1, r2 = unique_room(), unique_room()
    a, b, c = await connect(chat), await connect(chat), await connect(chat)
    await a.join(r1)
    await a.join(r2)
    await b.join(r1)
    await c.join(r2)
    await a.publish(r2, "for r2")
    assert (await c.ws.recv_op("message"))["room"] == r2
    await b.ws.expect_nothing()


async def test_leave_stops_messages(chat: LiveServer) -> None:
    room = unique_room()
    a, b = await connect(chat), await connect(chat)
    await a.join(room)
    await b.join(room)
    assert await b.ws.request({"op": "leave", "room": room, "id": "l"}) == {"op": "left", "id": "l", "room": room}
    await a.publish(room, "gone?")
    await b.ws.expect_nothing()
    err = await b.error({"op": "leave", "room": room})
    assert err["code"] == "not_joined"


# -- presence ----------------------------------------------------------------------------------------------


async def test_presence_events_and_two_tabs_of_one_user(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config(**header_auth()))
    room = unique_room()
    alice = await connect(server, "alice")
    await alice.join(room)
    bob1 = await connect(server, "bob")
    joined = await bob1.join(room)
    assert [p["user"] for p in joined["presence"]] == ["alice", "bob"]
    assert await alice.ws.recv_op("presence.join") == {"op": "presence.join", "room": room, "user": "bob"}
    await bob1.ws.expect_nothing(0.1)  # no event about itself

    bob2 = await connect(server, "bob")  # a second tab: still one member
    joined2 = await bob2.join(room)
    assert {p["user"]: p["connections"] for p in joined2["presence"]} == {"alice": 1, "bob": 2}
    await alice.ws.expect_nothing(0.2)
    listing = await alice.ws.request({"op": "presence", "room": room, "id": "p"})
    assert listing == {"op": "presence", "id": "p", "room": room, "members": [
        {"user": "alice", "connections": 1}, {"user": "bob", "connections": 2}],
        "count": {"users": 2, "connections": 3}}

    bob1.ws.close()  # one tab closes: bob is still here
    await alice.ws.expect_nothing(0.3)
    bob2.ws.close()  # the last tab: bob leaves
    assert await alice.ws.recv_op("presence.leave") == {"op": "presence.leave", "room": room, "user": "bob"}
    listing = await alice.ws.request({"op": "presence", "room": room})
    assert [p["user"] for p in listing["members"]] == ["alice"]


async def test_leave_op_sends_presence_leave(chat: LiveServer) -> None:
    room = unique_room()
    a, b = await connect(chat), await connect(chat)
    await a.join(room)
    await b.join(room)
    await a.ws.recv_op("presence.join")
    await b.ws.request({"op": "leave", "room": room})
    assert (await a.ws.recv_op("presence.leave"))["user"] == b.user


async def test_presence_events_can_be_turned_off(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config({"presence_events": False}))
    room = unique_room()
    a, b = await connect(server), await connect(server)
    await a.join(room)
    await b.join(room)
    b.ws.close()
    await a.ws.expect_nothing(0.3)


async def test_presence_and_history_of_a_room_not_joined(chat: LiveServer) -> None:
    room = unique_room()
    a, b = await connect(chat), await connect(chat)
    await a.join(room)
    await a.publish(room, "x")
    listing = await b.ws.request({"op": "presence", "room": room})
    assert [p["user"] for p in listing["members"]] == [a.user]
    hist = await b.ws.request({"op": "history", "room": room})
    assert [m["data"] for m in hist["messages"]] == ["x"]


# -- history and recovery ---------------------------------------------------------------------------------


async def test_history_newest_first_page_and_since(chat: LiveServer) -> None:
    room = unique_room()
    a = await connect(chat)
    joined = await a.join(room)
    for i in range(5):
        await a.publish(room, i)
    hist = await a.ws.request({"op": "history", "room": room, "limit": 2, "id": "h"})
    assert hist["op"] == "history" and hist["id"] == "h" and hist["room"] == room
    assert hist["offset"] == 5 and hist["epoch"] == joined["epoch"] and hist["complete"] is True
    assert [(m["data"], m["offset"]) for m in hist["messages"]] == [(3, 4), (4, 5)]
    assert all(m["op"] == "message" and m["from"] == a.user and m["room"] == room for m in hist["messages"])
    after = await a.ws.request({"op": "history", "room": room, "since": {"offset": 1, "epoch": joined["epoch"]}})
    assert [m["offset"] for m in after["messages"]] == [2, 3, 4, 5] and after["complete"] is True
    other_epoch = await a.ws.request({"op": "history", "room": room, "since": {"offset": 1, "epoch": "nope"}})
    assert other_epoch["complete"] is False and other_epoch["messages"] == [] and other_epoch["offset"] == 5
    garbage = await a.ws.request({"op": "history", "room": room, "since": {"offset": "x", "epoch": 3}})
    assert garbage["complete"] is False and garbage["messages"] == []


async def test_history_bad_limit(chat: LiveServer) -> None:
    a = await connect(chat)
    room = unique_room()
    for bad in (0, -1, 501, "5", 2.5, True, None):
        err = await a.error({"op": "history", "room": room, "limit": bad})
        assert err["code"] == "bad_request" and "limit" in err["message"], (bad, err)
    err = await a.error({"op": "history", "room": room, "since": "yesterday"})
    assert err["code"] == "bad_request" and "since" in err["message"]
    await still_works(chat, a)


async def test_reconnect_with_since_recovers_missed_messages_in_order(chat: LiveServer) -> None:
    room = unique_room()
    a, b = await connect(chat), await connect(chat)
    joined = await a.join(room)
    await b.join(room)
    await b.publish(room, "m1")
    seen = await a.ws.recv_op("message")
    position = {"offset": seen["offset"], "epoch": joined["epoch"]}
    a.ws.close()  # the network drops
    for text in ("m2", "m3"):
        await b.publish(room, text)
    a2 = await connect(chat)
    rejoined = await a2.join(room, since=position)
    assert rejoined["recovered"] is True and rejoined["offset"] == 3 and rejoined["epoch"] == joined["epoch"]
    replay = [await a2.ws.recv_op("message"), await a2.ws.recv_op("message")]
    assert [(m["data"], m["offset"]) for m in replay] == [("m2", 2), ("m3", 3)]
    await b.publish(room, "m4")
    live = await a2.ws.recv_op("message")
    assert (live["data"], live["offset"]) == ("m4", 4)
    await a2.ws.expect_nothing()


async def test_since_up_to_date_recovers_nothing(chat: LiveServer) -> None:
    room = unique_room()
    a = await connect(chat)
    joined = await a.join(room)
    await a.publish(room, "x")
    a2 = await connect(chat)
    rejoined = await a2.join(room, since={"offset": 1, "epoch": joined["epoch"]})
    assert rejoined["recovered"] is True and rejoined["offset"] == 1
    await a2.ws.expect_nothing(0.2)


@pytest.mark.parametrize("since", [
    {"offset": "abc", "epoch": "E"},
    {"offset": -5, "epoch": "E"},
    {"offset": 1.5, "epoch": "E"},
    {"offset": True, "epoch": "E"},
    {"offset": 1},
    {"epoch": "E"},
    {"offset": 1, "epoch": None},
    {},
])
async def test_garbage_since_is_not_recoverable(chat: LiveServer, since: dict[str, Any]) -> None:
    room = unique_room()
    a = await connect(chat)
    epoch = (await a.join(room))["epoch"]
    await a.publish(room, "x")
    b = await connect(chat)
    since = {k: (epoch if v == "E" else v) for k, v in since.items()}
    joined = await b.join(room, since=since)
    assert joined["recovered"] is False and joined["offset"] == 1 and joined["epoch"] == epoch
    await b.ws.expect_nothing(0.1)  # nothing replayed
    await a.publish(room, "live")
    assert (await b.ws.recv_op("message"))["offset"] == 2


async def test_since_not_an_object_is_bad_request(chat: LiveServer) -> None:
    a = await connect(chat)
    room = unique_room()
    for bad in ("5", 5, ["offset", 1]):
        err = await a.error({"op": "join", "room": room, "since": bad})
        assert err["code"] == "bad_request" and "since" in err["message"]
    assert (await a.join(room))["recovered"] is False  # the failed joins left nothing behind
    await still_works(chat, a)


async def test_unknown_epoch_or_offset_beyond_top_is_not_recoverable(chat: LiveServer) -> None:
    room = unique_room()
    a = await connect(chat)
    epoch = (await a.join(room))["epoch"]
    await a.publish(room, "x")
    b = await connect(chat)
    assert (await b.join(room, since={"offset": 0, "epoch": "another-epoch"}))["recovered"] is False
    c = await connect(chat)
    assert (await c.join(room, since={"offset": 99, "epoch": epoch}))["recovered"] is False


async def test_trimmed_history_is_not_recoverable(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config(bus={"plugin": "memory", "memory": {"history_size": 3}}))
    room = unique_room()
    a = await connect(server)
    epoch = (await a.join(room))["epoch"]
    for i in range(6):
        await a.publish(room, i)
    b = await connect(server)
    joined = await b.join(room, since={"offset": 1, "epoch": epoch})
    assert joined["recovered"] is False and joined["offset"] == 6
    await b.ws.expect_nothing(0.1)
    c = await connect(server)
    ok = await c.join(room, since={"offset": 3, "epoch": epoch})
    assert ok["recovered"] is True
    assert [(await c.ws.recv_op("message"))["data"] for _ in range(3)] == [3, 4, 5]


async def test_history_is_bounded_by_age(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config(bus={"plugin": "memory", "memory": {"history_ttl": 1}}))
    room = unique_room()
    a = await connect(server)
    epoch = (await a.join(room))["epoch"]
    await a.publish(room, "old")
    await asyncio.sleep(0.6)
    await a.publish(room, "new")  # also keeps the room alive (a room idle for the TTL gets a new epoch)
    await asyncio.sleep(0.6)
    hist = await a.ws.request({"op": "history", "room": room})
    assert [(m["data"], m["offset"]) for m in hist["messages"]] == [("new", 2)] and hist["epoch"] == epoch
    b = await connect(server)
    assert (await b.join(room, since={"offset": 0, "epoch": epoch}))["recovered"] is False  # "old" expired
    c = await connect(server)
    assert (await c.join(room, since={"offset": 1, "epoch": epoch}))["recovered"] is True
    assert (await c.ws.recv_op("message"))["data"] == "new"


async def test_more_missed_than_recovery_limit_is_not_recoverable(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config({"recovery_limit": 2}))
    room = unique_room()
    a = await connect(server)
    epoch = (await a.join(room))["epoch"]
    for i in range(3):
        await a.publish(room, i)
    b = await connect(server)
    assert (await b.join(room, since={"offset": 0, "epoch": epoch}))["recovered"] is False
    c = await connect(server)
    assert (await c.join(room, since={"offset": 1, "epoch": epoch}))["recovered"] is True
    assert [(await c.ws.recv_op("message"))["offset"] for _ in range(2)] == [2, 3]


async def test_history_reply_and_replay_fit_half_the_send_queue(wirehub_server: ServerFactory) -> None:
    """A reply bigger than the send queue would close the session with 4008 however fast it reads."""
    server = await wirehub_server(chat_config(server={"send_queue_bytes": 4096}))
    room = unique_room()
    a = await connect(server)
    epoch = (await a.join(room))["epoch"]
    for i in range(10):
        await a.publish(room, {"i": i, "pad": "x" * 400})
    newest = await a.ws.request({"op": "history", "room": room, "limit": 10})
    got = [m["offset"] for m in newest["messages"]]
    assert 2 <= len(got) < 10 and got == list(range(11 - len(got), 11)) and newest["complete"] is True
    oldest = await a.ws.request({"op": "history", "room": room, "limit": 10, "since": {"offset": 0, "epoch": epoch}})
    got = [m["offset"] for m in oldest["messages"]]
    assert 2 <= len(got) < 10 and got == list(range(1, len(got) + 1))  # page on with since = got[-1]
    b = await connect(server)
    joined = await b.join(room, since={"offset": 0, "epoch": epoch})
    assert joined["recovered"] is False and joined["offset"] == 10  # 10 x 450 bytes do not fit
    await b.ws.expect_nothing(0.1)
    c = await connect(server)
    assert (await c.join(room, since={"offset": 8, "epoch": epoch}))["recovered"] is True
    assert [(await c.ws.recv_op("message"))["offset"] for _ in range(2)] == [9, 10]
    assert not c.ws.close_code and not b.ws.close_code


async def test_recovery_under_concurrent_publishing_has_no_gap_and_no_duplicate(
    wirehub_server: ServerFactory,
) -> None:
    """Publishes keep coming while a client reconnects; the bus yields inside the join (delay),
    so messages arrive between hub.join and the history read."""
    server = await wirehub_server(chat_config(
        {"publish_rate": 10000, "publish_burst": 10000},
        bus={"plugin": "flaky"}, plugins={"load": [FLAKY]},
    ))
    bus: Any = server.app.backend.bus
    room = unique_room()
    publisher = await connect(server)
    await publisher.join(room)
    total = 120

    async def publish_all() -> None:
        for i in range(total):
            await publisher.publish(room, i)
            await asyncio.sleep(0.002)  # spread over the reconnects

    a = await connect(server)
    epoch = (await a.join(room))["epoch"]
    task = asyncio.ensure_future(publish_all())
    got: list[int] = []
    while len(got) < 20:
        got.append((await a.ws.recv_op("message"))["offset"])
    a.ws.close()
    bus.delay = 0.01
    for _ in range(3):  # several reconnects while publishing goes on
        a = await connect(server)
        joined = await rejoin_collecting(a.ws, room, {"offset": got[-1], "epoch": epoch}, got)
        assert joined["recovered"] is True
        target = len(got) + 15
        while len(got) < min(target, total):
            got.append((await a.ws.recv_op("message"))["offset"])
        a.ws.close()
    a = await connect(server)
    await rejoin_collecting(a.ws, room, {"offset": got[-1], "epoch": epoch}, got)
    while len(got) < total:
        got.append((await a.ws.recv_op("message"))["offset"])
    await task
    assert got == list(range(1, total + 1))
    await a.ws.expect_nothing(0.2)


# -- bad input: every error path, and the others carry on ---------------------------------------------------


async def test_unknown_op_and_bad_frames(chat: LiveServer) -> None:
    a = await connect(chat)
    err = await a.error({"op": "shout", "id": "u"})
    assert err["code"] == "unknown_op" and err["id"] == "u"
    assert "join" in err["message"] and "publish" in err["message"]
    await a.ws.send("{not json")
    assert (await a.ws.recv())["code"] == "bad_json"
    await a.ws.send(b"\x00binary")
    assert (await a.ws.recv())["code"] == "bad_request"
    await a.ws.send({"no": "op"})
    assert (await a.ws.recv())["code"] == "bad_request"
    await still_works(chat, a)


@pytest.mark.parametrize("request_", [
    {"op": "join"},
    {"op": "join", "room": 5},
    {"op": "join", "room": None},
    {"op": "publish", "data": "x"},
    {"op": "publish", "room": ["a"], "data": "x"},
    {"op": "leave"},
    {"op": "presence"},
    {"op": "history", "room": {}},
])
async def test_missing_or_wrong_typed_room(chat: LiveServer, request_: dict[str, Any]) -> None:
    a = await connect(chat)
    err = await a.error(request_)
    assert err["code"] == "bad_request" and err["message"] == "field 'room' must be a string"
    await still_works(chat, a)


@pytest.mark.parametrize("room", ["", "has space", "slash/room", "x" * 129, "ünïcode", "new\nline"])
async def test_invalid_room_names(chat: LiveServer, room: str) -> None:
    a = await connect(chat)
    for op in ("join", "history", "presence"):
        err = await a.error({"op": op, "room": room})
        assert err["code"] == "bad_request" and err["message"].startswith("invalid room name: it must match ^")
    await still_works(chat, a)


async def test_room_pattern_is_configurable(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config({"room_pattern": r"team-[0-9]+"}))
    a = await connect(server)
    assert (await a.error({"op": "join", "room": "lobby"}))["code"] == "bad_request"
    await a.join("team-42")


async def test_publish_field_errors(chat: LiveServer) -> None:
    room = unique_room()
    a = await connect(chat)
    await a.join(room)
    err = await a.error({"op": "publish", "room": room})
    assert err["code"] == "bad_request" and "'data'" in err["message"]
    err = await a.error({"op": "publish", "room": room, "data": 1, "echo": "yes"})
    assert err["code"] == "bad_request" and "'echo'" in err["message"]
    await a.ws.send(f'{{"op":"publish","room":"{room}","data":NaN,"id":"nan"}}')
    err = await a.ws.recv()
    # the inbound decoder refuses NaN before the id is read (issue 12, defect 5)
    assert err == {"op": "error", "code": "bad_json", "message": "frame is not valid JSON: NaN is not valid JSON"}
    await still_works(chat, a)


async def test_publish_to_a_room_not_joined(chat: LiveServer) -> None:
    room = unique_room()
    a, b = await connect(chat), await connect(chat)
    await b.join(room)
    err = await a.error({"op": "publish", "room": room, "data": "x", "id": "nj"})
    assert err == {"op": "error", "id": "nj", "code": "not_joined",
                   "message": f"join room {room!r} before publishing to it"}
    await b.ws.expect_nothing(0.1)
    await still_works(chat, a, b)


async def test_join_twice_is_bad_request(chat: LiveServer) -> None:
    room = unique_room()
    a = await connect(chat)
    await a.join(room)
    err = await a.error({"op": "join", "room": room})
    assert err["code"] == "bad_request" and "already joined" in err["message"]
    await still_works(chat, a)


async def test_forbidden_rooms_for_guests(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config(auth={"plugin": "anonymous", "anonymous": {"rooms": ["public-*"]}}))
    a = await connect(server)
    err = await a.error({"op": "join", "room": "private-1", "id": "f"})
    assert err == {"op": "error", "id": "f", "code": "forbidden",
                   "message": "not allowed to join room 'private-1'", "reason": "not_allowed"}
    assert (await a.error({"op": "history", "room": "private-1"}))["code"] == "forbidden"
    assert (await a.error({"op": "presence", "room": "private-1"}))["code"] == "forbidden"
    room = "public-" + unique_room()
    await a.join(room)
    b = await connect(server)
    await b.join(room)
    await a.publish(room, "hello")
    assert (await b.ws.recv_op("message"))["data"] == "hello"
    assert (await a.error({"op": "publish", "room": "private-1", "data": 1}))["code"] == "not_joined"


async def test_identity_room_patterns_decide(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config(**header_auth()))
    a = await connect(server, "carol", rooms="team-a-*, lobby")
    await a.join("lobby")
    await a.join("team-a-1")
    assert (await a.error({"op": "join", "room": "team-b-1"}))["code"] == "forbidden"
    await still_works(server, a)


async def test_policy_plugin_authorize_and_filter(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config(**header_auth(POLICY)))
    a, b = await connect(server, "ann"), await connect(server, "ben")
    # readonly-*: joining is fine, publishing is forbidden
    await a.join("readonly-news")
    err = await a.error({"op": "publish", "room": "readonly-news", "data": "x"})
    assert err["code"] == "forbidden" and err["reason"] == "not_allowed"
    # vip-*: only users whose id starts with vip
    assert (await a.error({"op": "join", "room": "vip-lounge"}))["code"] == "forbidden"
    vip = await connect(server, "vip-victor")
    await vip.join("vip-lounge")
    # the filter rewrites, then drops
    room = unique_room()
    await a.join(room)
    await b.join(room)
    ack = await a.publish(room, {"text": "darn it"})
    msg = await b.ws.recv_op("message")
    assert msg["data"] == {"text": "**** it"} and msg["offset"] == ack["offset"]
    err = await a.error({"op": "publish", "room": room, "data": {"spam": True}, "id": "s"})
    assert err == {"op": "error", "id": "s", "code": "rejected", "message": "the message was rejected by a filter"}
    await b.ws.expect_nothing(0.1)
    hist = await b.ws.request({"op": "history", "room": room})
    assert [m["data"] for m in hist["messages"]] == [{"text": "**** it"}]  # the dropped one is not stored
    await still_works(server, a, b)


async def test_a_failing_policy_plugin_is_error_internal(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config(**header_auth(POLICY)))
    a, b = await connect(server, "ann"), await connect(server, "ben")
    err = await a.error({"op": "join", "room": "boom-1", "id": "x"})
    assert err == {"op": "error", "id": "x", "code": "internal", "message": "internal error"}
    room = unique_room()
    await a.join(room)
    await b.join(room)
    err = await a.error({"op": "publish", "room": room, "data": {"boom": True}})
    assert err["code"] == "internal"
    await b.ws.expect_nothing(0.1)
    await still_works(server, a, b)


async def test_message_size_per_room(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config({
        "max_message_bytes": 100,
        "room_limits": [{"pattern": "big-*", "max_message_bytes": 1000}, {"pattern": "tiny-*", "max_message_bytes": 5}],
    }))
    a, b = await connect(server), await connect(server)
    for room in ("plain", "big-1", "tiny-1"):
        await a.join(room)
        await b.join(room)
    err = await a.error({"op": "publish", "room": "plain", "data": "x" * 99, "id": "big"})
    assert err == {"op": "error", "id": "big", "code": "too_large",
                   "message": "message data is 101 bytes; room 'plain' allows 100", "max_bytes": 100}
    assert (await a.publish("plain", "x" * 98))["op"] == "ack"  # 100 bytes as JSON: at the limit
    assert (await a.publish("big-1", "x" * 500))["op"] == "ack"
    assert (await a.error({"op": "publish", "room": "tiny-1", "data": "123456"}))["code"] == "too_large"
    got = [(await b.ws.recv_op("message"))["room"] for _ in range(2)]
    assert got == ["plain", "big-1"]
    await b.ws.expect_nothing(0.1)
    await still_works(server, a, b)


async def test_rooms_per_session_limit(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config({"max_rooms": 2}))
    a = await connect(server)
    await a.join("r1")
    await a.join("r2")
    err = await a.error({"op": "join", "room": "r3"})
    assert err["code"] == "forbidden" and err["reason"] == "room_limit" and "at most 2 rooms" in err["message"]
    await a.ws.request({"op": "leave", "room": "r1"})
    await a.join("r3")
    await still_works(server, a)


async def test_publish_flood_is_rate_limited_then_closed_4029(wirehub_server: ServerFactory) -> None:
    # 0.1/s: no token comes back during the test, however slow the machine
    server = await wirehub_server(chat_config({"publish_rate": 0.1, "publish_burst": 3, "rate_limit_close_after": 5}))
    room = unique_room()
    a, b = await connect(server), await connect(server)
    await a.join(room)
    await b.join(room)
    for i in range(3):
        assert (await a.publish(room, i))["op"] == "ack"
    err = await a.error({"op": "publish", "room": room, "data": "too fast", "id": "rl"})
    assert err["code"] == "rate_limited" and err["id"] == "rl" and 9000 < err["retry_ms"] <= 10001
    for _ in range(3):
        assert (await a.error({"op": "publish", "room": room, "data": "x"}))["code"] == "rate_limited"
    await a.ws.send({"op": "publish", "room": room, "data": "x", "id": "last"})
    assert (await a.ws.recv())["code"] == "rate_limited"  # the 5th in a row: error, then close
    code, reason = await a.ws.wait_closed()
    assert code == 4029 and reason == "rate limited; retry_ms=30000"  # the time to refill the burst
    assert [(await b.ws.recv_op("message"))["data"] for _ in range(3)] == [0, 1, 2]
    assert (await b.ws.recv_op("presence.leave"))["user"] == a.user  # nothing of the flood got through
    await still_works(server, b)


async def test_rate_limit_recovers_after_waiting(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config({"publish_rate": 2, "publish_burst": 1}))
    room = unique_room()
    a = await connect(server)
    await a.join(room)
    assert (await a.publish(room, 1))["op"] == "ack"
    err = await a.error({"op": "publish", "room": room, "data": 2})
    assert err["code"] == "rate_limited"
    await asyncio.sleep(err["retry_ms"] / 1000)
    assert (await a.publish(room, 2))["op"] == "ack"


@pytest.mark.parametrize("burst", [1, 3])
async def test_the_op_rate_counts_the_first_request_without_a_bucket(wirehub_server: ServerFactory,
                                                                      burst: int) -> None:
    """A session's first request is admitted without a token bucket (its time is kept); the second makes the
    bucket as it would stand had it been made then: ``op_burst`` requests pass, the next is refused."""
    # 0.1/s: no token comes back during the test, however slow the machine
    server = await wirehub_server(chat_config(server={"op_rate": 0.1, "op_burst": burst}))
    a = await connect(server)
    for i in range(burst):
        assert (await a.ws.request({"op": "ping", "id": i}))["op"] == "pong"
    err = await a.error({"op": "ping", "id": "over"})
    assert err["code"] == "rate_limited" and err["id"] == "over" and 9000 < err["retry_ms"] <= 10001


# -- the bus is down -------------------------------------------------------------------------------------------


async def test_bus_outage_is_error_unavailable_never_delivered(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config(bus={"plugin": "flaky"}, plugins={"load": [FLAKY]}))
    bus: Any = server.app.backend.bus
    room = unique_room()
    a, b = await connect(server), await connect(server)
    await a.join(room)
    await b.join(room)
    bus.set_down(True)
    err = await a.error({"op": "publish", "room": room, "data": "lost?", "id": "u"})
    assert err == {"op": "error", "id": "u", "code": "unavailable",
                   "message": "the message bus is unavailable; retry later"}
    c = await connect(server)
    assert (await c.error({"op": "join", "room": unique_room()}))["code"] == "unavailable"
    assert (await c.error({"op": "history", "room": room}))["code"] == "unavailable"
    d = await connect(server)
    bus.set_down(False)
    for m in (a, b):  # events sent meanwhile did not reach them (not in history): told to reload the list
        assert (await m.ws.recv_op("presence.diff"))["truncated"] is True
    await d.join(room)
    for m in (a, b):
        assert (await m.ws.recv_op("presence.join"))["user"] == d.user
    bus.set_down(True)
    assert (await d.ws.request({"op": "leave", "room": room}))["op"] == "left"  # leaving always works
    bus.set_down(False)
    notice = await b.ws.recv()
    assert {k: notice[k] for k in ("op", "room", "joins", "leaves", "truncated")} == {
        "op": "presence.diff", "room": room, "joins": [], "leaves": [], "truncated": True}, notice
    assert (await a.ws.recv_op("presence.diff"))["truncated"] is True
    await b.ws.expect_nothing(0.1)
    ack = await a.publish(room, "back")
    assert ack["offset"] == 1  # the failed publish was not stored
    assert (await b.ws.recv_op("message"))["data"] == "back"
    await d.ws.expect_nothing(0.1)
    # the failed join left no trace: c can join now, and is in no room it did not get
    await c.join(room)
    assert (await a.ws.recv_op("presence.join"))["user"] == c.user


async def test_join_failing_half_way_leaves_no_trace(wirehub_server: ServerFactory) -> None:
    """hub.join works (the room is already subscribed), the presence call after it fails: no
    membership, no presence, no stray messages."""
    server = await wirehub_server(chat_config(bus={"plugin": "flaky"}, plugins={"load": [FLAKY]}))
    bus: Any = server.app.backend.bus
    room = unique_room()
    a, b = await connect(server), await connect(server)
    await a.join(room)
    bus.down = True  # without telling the hub: calls fail, the room stays subscribed
    assert (await b.error({"op": "join", "room": room}))["code"] == "unavailable"
    bus.down = False
    await a.publish(room, "after")
    await b.ws.expect_nothing(0.2)
    listing = await a.ws.request({"op": "presence", "room": room})
    assert [p["user"] for p in listing["members"]] == [a.user]
    assert (await b.error({"op": "publish", "room": room, "data": 1}))["code"] == "not_joined"


async def test_connection_lost_during_a_join_leaves_no_member_behind(wirehub_server: ServerFactory) -> None:
    """The client vanishes while its join awaits a slow bus, and a write to it fails: whichever
    of the join and on_close finishes last, no membership or presence entry is left behind."""
    server = await wirehub_server(chat_config(bus={"plugin": "flaky"}, plugins={"load": [FLAKY]}))
    bus: Any = server.app.backend.bus
    lobby, room = unique_room(), unique_room()
    a, b = await connect(server), await connect(server)
    await a.join(lobby)
    await b.join(lobby)
    bus.delay = 0.3
    await a.ws.send({"op": "join", "room": room})
    await eventually(lambda: bool(server.app.hub.members(room)))  # the join waits for the bus now
    stream = a.ws.conn.stream
    assert stream is not None and stream.socket is not None
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.close()  # the network drops: a reset, no close frame
    bus.delay = 0.0
    for _ in range(3):  # fan-out to a's dead socket fails: the core closes the session
        await b.publish(lobby, "anyone?")
        await asyncio.sleep(0.02)
    await eventually(lambda: not [s for s in server.app.sessions if s.id == a.welcome["session"]])
    await asyncio.sleep(0.5)  # the delayed join is over
    assert server.app.hub.members(room) == [] and room not in server.app.hub.rooms()
    assert await server.app.backend.presence.members(room) == []
    assert [e.user for e in await server.app.backend.presence.members(lobby)] == [b.user]


async def test_connection_lost_while_an_authorize_hook_waits_leaves_no_member_behind(
        wirehub_server: ServerFactory) -> None:
    """As above, with the wait in a plugin's authorize hook and a join that then waits for nothing (the room
    subscribed here, no ``since``, events off): the session closes, and on_close runs, before the member is
    in the room, so the join itself must see it closed and leave (found by review: the at-once path did not)."""
    server = await wirehub_server(chat_config({"presence_rules": [{"pattern": "*", "events": "off"}]},
                                              plugins={"load": [SLOW_AUTHORIZE]}))
    lobby, room = unique_room(), "slow-" + unique_room()
    a, b = await connect(server), await connect(server)
    await a.join(lobby)
    await b.join(lobby)
    await b.ws.send({"op": "join", "room": room, "id": 9})  # the room subscribed here (b's join waits 0.6 s)
    await b.ws.recv_op("joined")
    await a.ws.send({"op": "join", "room": room})  # waits 0.6 s in authorize
    await asyncio.sleep(0.1)
    stream = a.ws.conn.stream
    assert stream is not None and stream.socket is not None
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.close()  # the network drops: a reset, no close frame
    for _ in range(3):  # fan-out to a's dead socket fails: the core closes the session
        await b.publish(lobby, "anyone?")
        await asyncio.sleep(0.02)
    await eventually(lambda: not [s for s in server.app.sessions if s.id == a.welcome["session"]])
    await asyncio.sleep(1.0)  # the delayed join is over
    assert [e.user for e in await server.app.backend.presence.members(room)] == [b.user]
    assert len(server.app.hub.members(room)) == 1


async def test_gap_after_an_outage_that_history_cannot_cover(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config(
        bus={"plugin": "flaky", "flaky": {"history_size": 3}}, plugins={"load": [FLAKY]},
    ))
    bus: Any = server.app.backend.bus
    room, covered = unique_room(), unique_room()
    a = await connect(server)
    epoch = (await a.join(room))["epoch"]
    await a.join(covered)
    b = await connect(server)
    await b.join(room)
    await b.join(covered)
    await b.publish(room, "before")
    await b.publish(covered, "before")
    assert (await a.ws.recv_op("message"))["offset"] == 1
    assert (await a.ws.recv_op("message"))["offset"] == 1
    bus.set_down(True)
    # meanwhile "another replica" published: 5 messages (history keeps 3) and 2 messages
    await bus.inner.unsubscribe(room)
    await bus.inner.unsubscribe(covered)
    for i in range(5):
        await bus.inner.publish(room, b" 0\n" + json.dumps({"op": "message", "room": room, "data": i}).encode(),
                                history=True)
    for i in range(2):
        await bus.inner.publish(covered, b" 0\n" + json.dumps({"op": "message", "room": covered, "data": i}).encode(),
                                history=True)
    await bus.inner.subscribe(room)
    await bus.inner.subscribe(covered)
    bus.set_down(False)
    frames = [await a.ws.recv() for _ in range(6)]
    # offsets 2 and 3 of `room` were trimmed: the gap says so, and 4 to 6, still in history, follow it
    assert [(f["op"], f.get("offset")) for f in frames if f["room"] == room] == [
        ("gap", 3), ("message", 4), ("message", 5), ("message", 6)]
    assert {"op": "gap", "room": room, "epoch": epoch, "offset": 3} in frames
    replayed = [(f["data"], f["offset"]) for f in frames if f["op"] == "message" and f["room"] == covered]
    assert replayed == [(0, 2), (1, 3)]


# -- a slow consumer -----------------------------------------------------------------------------------------------


def _client_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    header = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _raw_chat_client(port: int) -> socket.socket:
    """A WebSocket client on a plain socket with a tiny receive buffer, so it can stop reading."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (
        f"GET {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


async def _read_until_close(sock: socket.socket) -> tuple[int, str]:
    """Read frames until the server's close frame; returns its (code, reason)."""
    loop = asyncio.get_running_loop()
    buf = b""

    async def need(n: int) -> None:
        nonlocal buf
        while len(buf) < n:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            assert chunk, "connection dropped without a close frame"
            buf += chunk

    while True:
        await need(2)
        opcode, n, start = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if n == 126:
            await need(4)
            n, start = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            await need(10)
            n, start = int.from_bytes(buf[2:10], "big"), 10
        await need(start + n)
        payload, buf = buf[start:start + n], buf[start + n:]
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big"), payload[2:].decode()


async def test_member_that_stops_reading_is_closed_4008_and_others_keep_receiving(
    wirehub_server: ServerFactory,
) -> None:
    server = await wirehub_server(chat_config(
        {"publish_rate": 10000, "publish_burst": 10000, "max_message_bytes": 60000},
        server={"send_queue_bytes": 65536},
    ))
    room = unique_room()
    before = set(server.app.sessions)
    slow = await _raw_chat_client(server.port)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(slow, _client_frame(json.dumps({"op": "join", "room": room}).encode()))
    publisher, reader = await connect(server), await connect(server)
    await publisher.join(room)
    await reader.join(room)
    await eventually(lambda: len(server.app.hub.members(room)) == 3)
    others = {publisher.welcome["session"], reader.welcome["session"]}
    [slow_session] = [s for s in server.app.sessions if s not in before and s.id not in others]
    total, blob = 300, "x" * 50000

    async def read_all() -> list[int]:
        return [(await reader.ws.recv_op("message"))["offset"] for _ in range(total)]

    async def watch_slow() -> tuple[int, str]:
        await eventually(lambda: slow_session.close_code is not None, timeout=30)
        return await _read_until_close(slow)  # now it reads again: the backlog, then the close frame

    reading, watching = asyncio.ensure_future(read_all()), asyncio.ensure_future(watch_slow())
    for i in range(total):
        assert (await publisher.publish(room, {"i": i, "blob": blob}))["op"] == "ack"
    assert await reading == list(range(1, total + 1))  # the reader got every message
    assert await watching == (4008, "slow consumer; retry_ms=1000")
    slow.close()
    await still_works(server, publisher, reader)


# -- configuration ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "key", "text"), [
    ({"room_pattern": "(unclosed"}, "endpoints[0].options.room_pattern", "not a valid regular expression"),
    ({"max_rooms": 0}, "endpoints[0].options.max_rooms", "must be at least 1"),
    ({"publish_rate": "fast"}, "endpoints[0].options.publish_rate", "expected a number"),
    ({"romo_pattern": "x"}, "endpoints[0].options.romo_pattern", "unknown key"),
    ({"room_limits": [{"pattern": "a-*"}]}, "endpoints[0].options.room_limits[0].max_message_bytes", "is required"),
    ({"history_limit": 600}, "endpoints[0].options.history_limit", "above history_max_limit"),
])
def test_option_errors_name_the_dotted_key(options: dict[str, Any], key: str, text: str) -> None:
    config = config_from_dict(config_for_tests(chat_config(options)))
    with pytest.raises(ConfigError) as err:
        Wirehub.build(config)
    assert err.value.key == key and text in err.value.message


async def test_refresh_that_drops_a_room_leaves_it(wirehub_server: Any) -> None:
    import time

    from tests.plugins_for_tests.jwt_probe import SECRET, token

    server = await wirehub_server({
        "auth": {"plugin": "jwt", "jwt": {"algorithms": ["HS256"], "secret": SECRET}},
        "endpoints": [{"path": "/ws/chat", "handler": "chat"}],
    })
    exp = int(time.time()) + 600
    client = await server.ws("/ws/chat", headers={"Authorization": f"Bearer {token(exp=exp, rooms=['a', 'b'])}"},
                             welcome=True)
    for room in ("a", "b"):
        assert (await client.request({"op": "join", "room": room}))["op"] == "joined"
    reply = await client.request({"op": "refresh", "token": token(exp=exp, rooms=["a"])})
    assert reply["op"] == "refreshed"
    assert await client.recv() == {"op": "left", "room": "b", "reason": "forbidden"}
    error = await client.request({"op": "publish", "room": "b", "data": 1})
    assert error["code"] == "not_joined"
    assert (await client.request({"op": "publish", "room": "a", "data": 1}))["op"] == "ack"
