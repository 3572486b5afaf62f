"""Joins carried by the upgrade URL (docs/protocol.md, "Joining in the upgrade URL"), on a real server with
real clients: each is handled as a ``join`` frame sent first would be (reply, replay, errors, op budget, order),
and a malformed ``join`` parameter is refused with 400 before the upgrade, on the lean path and Tornado's."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.test_upgrade_head import closed, exchange, read_answer, text_frame, upgrade_head
from wirehub.client import Client
from wirehub.handler import OpHandler
from wirehub.protocol import CloseCode, close_reason
from wirehub.session import Session
from wirehub.testing import LiveServer, WsClient, unique_room
from wirehub.upgrade import LeanSocket
from wirehub.websocket import WirehubSocket

Start = Callable[..., Awaitable[LiveServer]]
CHAT = "/ws/chat"
POLICY = "tests.plugins_for_tests.chat_policy"


def chat(options: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    return {"endpoints": [{"path": CHAT, "handler": "chat", "options": options or {}},
                          {"path": "/ws/echo", "handler": "echo"}], **overrides}


def url(*joins: str | dict[str, Any], path: str = CHAT, **params: str) -> str:
    """``path`` with one ``join`` parameter per item (a room name, or an object as JSON) and ``params``."""
    pairs = [("join", j if isinstance(j, str) else json.dumps(j)) for j in joins] + list(params.items())
    return path + "?" + urllib.parse.urlencode(pairs)


async def open_ws(server: LiveServer, path: str) -> WsClient:
    ws = await server.ws(path)
    assert (await ws.recv())["op"] == "welcome"
    return ws


async def test_plain_and_object_joins_answer_joined_in_order(wirehub_server: Start) -> None:
    server = await wirehub_server(chat())
    a, b = unique_room(), unique_room()
    ws = await server.ws(url(a, {"room": b, "id": "j-b"}))
    welcome = await ws.recv()
    assert welcome["op"] == "welcome" and welcome["joins"] == 2  # announced: a server that ignores them says none
    assert "joins" not in await (await server.ws(CHAT)).recv()
    first, second = await ws.recv(), await ws.recv()
    assert first["op"] == "joined" and first["room"] == a and "id" not in first
    assert second["op"] == "joined" and second["room"] == b and second["id"] == "j-b"
    other = await open_ws(server, CHAT)
    await other.request({"op": "join", "room": b})
    await other.request({"op": "publish", "room": b, "data": "hi"})
    assert (await ws.recv_op("message"))["data"] == "hi"  # a member, as after a join frame


async def test_a_rejoin_with_since_replays_what_was_missed_while_others_publish(wirehub_server: Start) -> None:
    server = await wirehub_server(chat({"publish_rate": 10000, "publish_burst": 10000}))
    room = unique_room()
    publisher = await open_ws(server, CHAT)
    joined = await publisher.request({"op": "join", "room": room})
    since = {"offset": joined["offset"], "epoch": joined["epoch"]}
    for n in range(5):
        assert (await publisher.request({"op": "publish", "room": room, "data": n}))["op"] == "ack"
    stop = asyncio.Event()

    async def keep_publishing() -> int:
        n = 5
        while not stop.is_set():
            assert (await publisher.request({"op": "publish", "room": room, "data": n}))["op"] == "ack"
            n += 1
        return n

    task = asyncio.create_task(keep_publishing())
    ws = await open_ws(server, url({"room": room, "since": since, "id": 1}))
    reply = await ws.recv()
    assert reply["op"] == "joined" and reply["id"] == 1 and reply["recovered"] is True
    await asyncio.sleep(0.2)  # live messages keep coming after the replay
    stop.set()
    published = await task
    got: list[int] = []
    while len(got) < published:
        frame = await ws.recv_op("message")
        got.append(frame["data"])
    assert got == list(range(published))  # nothing lost, nothing twice, in order
    await ws.expect_nothing(0.1)


async def test_refused_joins_are_error_frames_with_their_id_and_the_session_stays(wirehub_server: Start) -> None:
    server = await wirehub_server(chat(plugins={"load": [POLICY]}))
    ok = unique_room()
    ws = await open_ws(server, url({"room": "vip-x", "id": "v"}, {"room": "bad room!", "id": 7}, ok, ok))
    forbidden, bad, joined, twice = [await ws.recv() for _ in range(4)]
    assert (forbidden["op"], forbidden["code"], forbidden["id"]) == ("error", "forbidden", "v")
    assert (bad["op"], bad["code"], bad["id"]) == ("error", "bad_request", 7)
    assert joined["op"] == "joined" and joined["room"] == ok
    assert twice["op"] == "error" and twice["code"] == "bad_request" and "already joined" in twice["message"]
    assert (await ws.request({"op": "ping"}))["op"] == "pong"


async def test_frames_sent_with_the_upgrade_are_handled_after_the_url_joins(wirehub_server: Start) -> None:
    server = await wirehub_server(chat())
    a, b = unique_room(), unique_room()
    ping = text_frame(b'{"op":"ping","id":"p"}')
    leave = text_frame(json.dumps({"op": "leave", "room": a, "id": "l"}).encode())
    reader, writer = await exchange(server, upgrade_head(url(a, b)) + ping + leave)  # one packet
    status, _, _ = await read_answer(reader)
    assert status == 101
    frames = [json.loads(await _read_frame(reader)) for _ in range(5)]
    assert [(f["op"], f.get("room"), f.get("id")) for f in frames] == [
        ("welcome", None, None), ("joined", a, None), ("joined", b, None), ("pong", None, "p"), ("left", a, "l")]
    await closed(writer)


@pytest.mark.parametrize(("after_plain", "version", "kind"), [
    (True, b"13", LeanSocket), (False, b"8", WirehubSocket), (True, b"8", WirehubSocket)])
async def test_url_joins_on_every_upgrade_path(wirehub_server: Start, after_plain: bool, version: bytes,
                                               kind: type) -> None:
    """After a plain request (Tornado's HTTP/1 connection, then the lean upgrade), and on Tornado's own
    WebSocket handler (version 8, first head or not): the same welcome, joined, then the frame that followed."""
    server = await wirehub_server(chat())
    room = unique_room()
    ping = text_frame(b'{"op":"ping","id":"p"}')
    head = upgrade_head(url({"room": room, "id": 3})).replace(b"Version: 13", b"Version: " + version)
    plain = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" if after_plain else b""
    reader, writer = await exchange(server, plain + head)
    if after_plain:
        assert (await read_answer(reader))[0] == 200
    assert (await read_answer(reader))[0] == 101
    writer.write(ping)
    frames = [json.loads(await _read_frame(reader)) for _ in range(3)]
    assert [(f["op"], f.get("id")) for f in frames] == [("welcome", None), ("joined", 3), ("pong", "p")]
    (socket_side,) = server.app.sessions.values()
    assert isinstance(socket_side, kind)
    await closed(writer)


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readexactly(2), 5)
    size = head[1] & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    return await asyncio.wait_for(reader.readexactly(size), 5)


async def test_url_joins_are_counted_in_the_op_budget(wirehub_server: Start) -> None:
    server = await wirehub_server(chat(server={"op_rate": 0.01, "op_burst": 2, "op_rate_close_after": 0}))
    rooms = [unique_room() for _ in range(3)]
    ws = await open_ws(server, url(*({"room": r, "id": i} for i, r in enumerate(rooms))))
    replies = [await ws.recv() for _ in range(3)]
    assert [r["op"] for r in replies] == ["joined", "joined", "error"]
    assert replies[2]["code"] == "rate_limited" and replies[2]["id"] == 2
    refused = await ws.request({"op": "ping"})  # the budget is spent: the next frame is refused too
    assert refused["code"] == "rate_limited"


async def test_max_rooms_joins_are_served_and_one_more_is_refused_before_the_upgrade(wirehub_server: Start) -> None:
    server = await wirehub_server(chat({"max_rooms": 2}))
    ws = await open_ws(server, url(unique_room(), unique_room()))
    assert [(await ws.recv())["op"] for _ in range(2)] == ["joined", "joined"]
    reader, writer = await exchange(server, upgrade_head(url(*(unique_room() for _ in range(3)))))
    status, _, body = await read_answer(reader)
    assert status == 400 and json.loads(body) == {"error": "bad_request", "reason": "at most 2 join parameters"}
    await closed(writer)


async def test_a_token_in_the_query_still_authenticates_beside_joins(wirehub_server: Start) -> None:
    server = await wirehub_server(chat())
    key = "k" * 16
    room = unique_room()
    one = await server.ws(url(room, guest=key))
    two = await server.ws(url(guest=key, path=CHAT))
    welcomes = [await one.recv(), await two.recv()]
    assert welcomes[0]["user"] == welcomes[1]["user"]  # the same guest: the query's key was read
    assert (await one.recv())["op"] == "joined"


async def test_a_jwt_in_the_query_authenticates_beside_joins(wirehub_server: Start) -> None:
    import time

    import jwt

    secret = "s" * 40
    server = await wirehub_server(chat(auth={"plugin": "jwt", "jwt": {"algorithms": ["HS256"], "secret": secret}}))
    token = jwt.encode({"sub": "ann", "rooms": ["*"], "exp": int(time.time()) + 600}, secret, algorithm="HS256")
    room = unique_room()
    ws = await server.ws(url({"room": room, "id": 1}, token=token))
    welcome = await ws.recv()
    assert welcome["user"] == "ann" and welcome["joins"] == 1
    reply = await ws.recv()
    assert reply["op"] == "joined" and reply["id"] == 1 and reply["room"] == room


MALFORMED = [
    ("{", "join is not valid JSON"),
    ('{"room": 5}', "join: field 'room' must be a non-empty string"),
    ('{"room": "a", "x": 1}', "join: a JSON object takes only the fields room, since and id"),
    ('{"room": "a", "since": 4}', None),
    ('{"room": "a", "since": {"offset": -1, "epoch": "e"}}', None),
    ('{"room": "a", "id": [1]}', "join: field 'id' must be a string of at most 64 characters or an integer"),
    ("", None),
    ("r" * 1025, None),
]


def bad_head(value: str) -> bytes:
    return upgrade_head(CHAT + "?join=" + urllib.parse.quote(value, safe=""))


@pytest.mark.parametrize(("value", "reason"), MALFORMED)
async def test_a_malformed_join_is_a_400_before_the_upgrade_on_the_lean_path(
        wirehub_server: Start, value: str, reason: str | None) -> None:
    server = await wirehub_server(chat())
    reader, writer = await exchange(server, bad_head(value))  # a first head: the accept path reads it
    status, head, body = await read_answer(reader)
    answer = json.loads(body)
    assert status == 400 and answer["error"] == "bad_request" and b"application/json" in head
    assert reason is None or answer["reason"] == reason
    assert not server.app.sessions
    await closed(writer)


@pytest.mark.parametrize(("value", "reason"), MALFORMED[:3])
async def test_a_malformed_join_is_a_400_before_the_upgrade_on_tornados_path(
        wirehub_server: Start, value: str, reason: str) -> None:
    server = await wirehub_server(chat())
    # after a plain request, the same connection's upgrade goes through Tornado's HTTP/1 connection
    reader, writer = await exchange(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + bad_head(value))
    assert (await read_answer(reader))[0] == 200
    status, _, body = await read_answer(reader)
    assert status == 400 and json.loads(body) == {"error": "bad_request", "reason": reason}
    await closed(writer)


async def test_a_non_utf8_join_is_a_400(wirehub_server: Start) -> None:
    server = await wirehub_server(chat())
    reader, writer = await exchange(server, upgrade_head(CHAT + "?join=%ff"))
    status, _, body = await read_answer(reader)
    assert status == 400 and json.loads(body)["reason"] == "join: not UTF-8"
    await closed(writer)


async def test_an_endpoint_without_a_join_op_leaves_the_parameter_alone(wirehub_server: Start) -> None:
    server = await wirehub_server(chat())
    reader, writer = await exchange(server, upgrade_head("/ws/echo?join=%7B"))
    assert (await read_answer(reader))[0] == 101
    await closed(writer)


async def test_the_game_endpoint_joins_from_the_url_too(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": [{"path": "/ws/game", "handler": "game"}]})
    room = unique_room()
    ws = await open_ws(server, url({"room": room, "id": "g"}, path="/ws/game"))
    reply = await ws.recv()
    assert reply["op"] == "state" and reply["id"] == "g" and reply["room"] == room


# -- the Python client ------------------------------------------------------------------------------------------

FAST = {"backoff_min": 0.05, "backoff_max": 0.2, "ack_timeout": 5.0, "ping_interval": 0}


@pytest.fixture
def join_frames(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The rooms of the join frames the server reads (the URL's joins are not frames)."""
    seen: list[str] = []
    original = OpHandler.on_message

    async def counting(self: OpHandler, session: Session, data: str | bytes) -> None:
        frame = json.loads(data)
        if frame.get("op") == "join":
            seen.append(frame["room"])
        await original(self, session, data)

    monkeypatch.setattr(OpHandler, "on_message", counting)
    return seen


async def _eventually(cond: Callable[[], bool], what: str) -> None:
    for _ in range(250):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within 5 s")


async def test_the_client_joins_and_rejoins_with_since_in_the_url(wirehub_server: Start,
                                                                  join_frames: list[str]) -> None:
    server = await wirehub_server(chat())
    room, late = unique_room(), unique_room()
    listener, other = Client(server.ws_url(CHAT), **FAST), Client(server.ws_url(CHAT), **FAST)
    try:
        got: list[Any] = []
        joins: list[dict[str, Any]] = []
        sub = await listener.join(room, lambda m: got.append(m["data"]), on_joined=joins.append)  # connects
        await other.join(room, lambda m: None)
        assert join_frames == []  # both joined in their URL
        await listener.join(late, lambda m: None)  # a room added while connected: a frame
        assert join_frames == [late]
        await other.publish(room, "before")
        await _eventually(lambda: got == ["before"], "the first message")
        (session,) = [s for s in server.app.sessions if s.identity.user == (listener.welcome or {})["user"]]
        session.close(CloseCode.GOING_AWAY, close_reason(CloseCode.GOING_AWAY, 50))
        await _eventually(lambda: listener.status == "reconnecting", "the drop")
        await other.publish(room, "while away")
        await _eventually(lambda: len(joins) == 2 and listener.status == "open", "the rejoin")
        assert joins[1]["rejoin"] is True and joins[1]["recovered"] is True and sub.recovered is True
        assert join_frames == [late]  # both rooms rejoined in the URL, the first with since
        await other.publish(room, "after")
        await _eventually(lambda: len(got) == 3, "the live message")
        assert got == ["before", "while away", "after"]
        assert set(listener.rooms) == {room, late}
    finally:
        await listener.close()
        await other.close()


async def test_a_room_left_while_reconnecting_is_left_on_the_server(wirehub_server: Start,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``leave`` after the upgrade URL was made with the room's join in it: the join still happens on the
    server, so the client leaves it once the connection is open, and the server holds it in no room."""
    server = await wirehub_server(chat())
    keep, drop = unique_room(), unique_room()
    client = Client(server.ws_url(CHAT), **FAST)
    try:
        await client.join(keep, lambda m: None)
        await client.join(drop, lambda m: None)
        user = (client.welcome or {})["user"]
        made = client._request_for
        leaving: list[asyncio.Future[None]] = []

        def leave_after_the_url_is_made(token: str | None) -> Any:
            request = made(token)
            if client.connections == 1:  # the reconnect: the room is left before the welcome comes
                leaving.append(asyncio.ensure_future(client.leave(drop)))
            return request

        monkeypatch.setattr(client, "_request_for", leave_after_the_url_is_made)
        (session,) = [s for s in server.app.sessions if s.identity.user == user]
        session.close(CloseCode.GOING_AWAY, close_reason(CloseCode.GOING_AWAY, 50))
        await _eventually(lambda: client.connections == 2 and client.status == "open", "the reconnect")
        assert set(client.rooms) == {keep} and leaving and leaving[0].done()
        (session,) = [s for s in server.app.sessions if s.identity.user == (client.welcome or {})["user"]]
        await _eventually(lambda: set(session.rooms) == {keep}, "the leave of the room left while reconnecting")
    finally:
        await client.close()


async def test_the_client_falls_back_to_frames_when_the_server_refuses_url_joins(
        wirehub_server: Start, join_frames: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(OpHandler, "url_join_limit", lambda self: 0)  # every URL join is a 400
    server = await wirehub_server(chat())
    room = unique_room()
    client = Client(server.ws_url(CHAT), **FAST)
    try:
        sub = await client.join(room, lambda m: None)
        assert sub.recovered is False and client.url_joins is False and join_frames == [room]
        assert client.last_close == (None, "HTTP 400")
    finally:
        await client.close()


async def test_the_client_falls_back_to_frames_when_the_server_ignores_url_joins(
        wirehub_server: Start, join_frames: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from wirehub.handler import OpHandler

    monkeypatch.setattr(OpHandler, "give_url_joins", lambda self, session, joins: None)  # as an older server
    server = await wirehub_server(chat())
    room = unique_room()
    client = Client(server.ws_url(CHAT), **FAST)
    try:
        await client.join(room, lambda m: None)
        assert client.url_joins is False and join_frames == [room] and client.connections == 1
    finally:
        await client.close()


@pytest.mark.parametrize("query", ["join=lobby", "join=a&join=b&token=x.y.z", "a=1&a=2&b=&c",
                                   "join=%7B%22room%22%3A1%7D", "x=%ff%fe", "=v&k"])
def test_the_plain_request_with_a_query_is_what_tornado_makes_of_it(query: str) -> None:
    """The lean path's request for a head with a query string (a JWT, joins) equals Tornado's, attribute by
    attribute, query arguments included."""
    from tornado.httputil import HTTPServerRequest

    from wirehub.accept import _HeadConnection, _PeerContext
    from wirehub.head import parse_head
    from wirehub.upgrade import _PlainRequest

    parsed = parse_head(upgrade_head(CHAT + "?" + query))
    assert parsed is not None
    start_line, headers, _ = parsed
    connection = _HeadConnection(None, _PeerContext("10.0.0.1", "http"))  # type: ignore[arg-type]
    ours = vars(_PlainRequest(connection, start_line, headers, "127.0.0.1"))
    tornados = vars(HTTPServerRequest(connection=connection, start_line=start_line, headers=headers))
    assert ours.keys() == tornados.keys()
    assert {k: v for k, v in ours.items() if k != "_start_time"} == {
        k: v for k, v in tornados.items() if k != "_start_time"}
    assert ours["query_arguments"] is not ours["arguments"]


async def test_a_url_join_that_waits_keeps_its_connection_through_the_keepalive(wirehub_server: Start) -> None:
    """No frame (the pong neither) is read while the open hooks wait: the keepalive counts the connection
    as busy then, as while a frame's handler works, instead of dropping it after ping_timeout."""
    server = await wirehub_server(chat(plugins={"load": ["tests.plugins_for_tests.slow_authorize"]},
                                       server={"ping_interval": 0.2, "ping_timeout": 0.1}))
    ws = await open_ws(server, url({"room": "slow-" + unique_room(), "id": "s"}))
    reply = await ws.recv()
    assert reply["op"] == "joined" and reply["id"] == "s"
    assert (await ws.request({"op": "ping"}))["op"] == "pong"
    await asyncio.sleep(0.5)  # pings answered (by the client's library) and read again
    assert (await ws.request({"op": "ping"}))["op"] == "pong"


def test_bench_rooms_join_pairs_url_joins_with_frame_joins(tmp_path: Path) -> None:
    """``bench_rooms join --url-join off,on`` (quick): a frame-join row and a URL-join row per size, the latter
    with its ratios to the former; every URL-join member joined (no figure is asserted)."""
    root = Path(__file__).parent.parent
    out = tmp_path / "rooms.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(root)) if p)}
    proc = subprocess.run([sys.executable, "-m", "bench.bench_rooms", "join", "--quick", "--url-join", "off,on",
                           "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=110, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["join"]
    assert sorted((r["size"], r["url_join"]) for r in rows) == [(100, "off"), (100, "on"), (200, "off"), (200, "on")]
    for r in rows:
        assert r["joined"]["join_failed"] == 0 and r["joined"]["joined"] == r["size"], r
        assert ("member_vs_idle_cpu_vs_frame_join" in r) == (r["url_join"] == "on")


async def test_the_url_joins_come_after_the_session_opened_hooks(wirehub_server: Start) -> None:
    """``wirehub_session_opened`` runs before the URL's joins: a hook that raises closes the session with
    1011, and the room it asked for never had it as a member."""
    server = await wirehub_server(chat(auth={"plugin": "raising"},
                                       plugins={"load": ["tests.plugins_for_tests.raising_hooks"]}))
    room = unique_room()
    ws = await server.ws(url(room), headers={"X-User": "boom-user"})
    assert (await ws.recv())["op"] == "welcome"
    with pytest.raises(ConnectionError, match="closed by the server: 1011"):
        await ws.recv()  # no joined before the close: the join was never made
    fine = await server.ws(url(room), headers={"X-User": "fine-user"})
    assert (await fine.recv())["op"] == "welcome" and (await fine.recv())["op"] == "joined"
