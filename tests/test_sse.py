"""GET /sse: room messages as Server-Sent Events, with the upgrade's auth and Last-Event-ID recovery.

The stream is read by a raw HTTP/1.1 client (chunked decoding, no library between the test and the
bytes), against a real server; messages come from real chat clients or the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import jwt
import pytest

from wirehub import sse
from wirehub.rooms import message_frame
from wirehub.sse import close_streams, decode_position, encode_position, open_streams
from wirehub.testing import LiveServer, unique_room

Start = Callable[..., Awaitable[LiveServer]]
SECRET = "s" * 40


@dataclass
class Event:
    event: str
    data: str
    id: str | None

    @property
    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.data)
        return result


@dataclass
class SseStream:
    """A raw SSE reader: status, headers, then events as they arrive."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    _buf: bytes = b""
    last_id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    ended: bool = False

    async def _chunk(self) -> bytes:
        size_line = await self.reader.readline()
        if not size_line:
            self.ended = True
            return b""
        size = int(size_line.strip() or b"0", 16)
        if size == 0:
            await self.reader.readline()
            self.ended = True
            return b""
        data = await self.reader.readexactly(size)
        await self.reader.readexactly(2)
        return data

    async def next(self, timeout: float = 5.0) -> Event:
        """The next event (comments and retry lines are recorded, not returned)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            while b"\n\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n\n", 1)
                ev = self._parse(raw.decode())
                if ev is not None:
                    return ev
            if self.ended:
                raise EOFError("the stream ended")
            self._buf += await asyncio.wait_for(self._chunk(), max(0.01, deadline - loop.time()))

    def _parse(self, raw: str) -> Event | None:
        name, data, ev_id = "message", [], None
        for line in raw.split("\n"):
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
            elif key == "id":
                ev_id = value
            elif key == "retry":
                self.retry = int(value)
        if ev_id is not None:
            self.last_id = ev_id
        if not data:
            return None
        return Event(name, "\n".join(data), ev_id)

    async def events(self, count: int, timeout: float = 5.0, *, only: str | None = None) -> list[Event]:
        out: list[Event] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < count:
            ev = await self.next(max(0.01, deadline - loop.time()))
            if only is None or ev.event == only:
                out.append(ev)
        return out

    async def expect_no_message(self, within: float = 0.3) -> None:
        with contextlib.suppress(TimeoutError):
            while True:
                ev = await self.next(within)
                assert ev.event != "message", f"unexpected {ev}"

    async def wait_end(self, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with contextlib.suppress(EOFError):
            while True:
                await self.next(max(0.01, deadline - loop.time()))

    def close(self) -> None:
        self.writer.close()


_OPENED: list[SseStream] = []


@pytest.fixture(autouse=True)
async def _close_streams() -> Any:
    yield
    while _OPENED:
        stream = _OPENED.pop()
        stream.close()
        with contextlib.suppress(Exception):
            await stream.writer.wait_closed()


async def sse_open(server: LiveServer, rooms: str, *, last_id: str | None = None, query: str = "",
                   headers: dict[str, str] | None = None, rcvbuf: int | None = None) -> SseStream:
    sock_kwargs: dict[str, Any] = {}
    if rcvbuf is not None:
        import socket

        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(("127.0.0.1", server.port))
        s.setblocking(False)
        sock_kwargs["sock"] = s
        reader, writer = await asyncio.open_connection(**sock_kwargs)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    lines = [f"GET /sse?rooms={quote(rooms, safe=',')}{query} HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
             "Accept: text/event-stream"]
    if last_id is not None:
        lines.append(f"Last-Event-ID: {last_id}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    stream = SseStream(reader, writer)
    _OPENED.append(stream)
    status_line = await asyncio.wait_for(reader.readline(), 5)
    stream.status = int(status_line.split()[1])
    while True:
        line = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
        if not line:
            break
        k, _, v = line.partition(":")
        stream.headers[k.strip().lower()] = v.strip()
    if stream.headers.get("transfer-encoding") != "chunked":
        length = int(stream.headers.get("content-length", "0"))
        stream.body = await asyncio.wait_for(reader.readexactly(length), 5)
        stream.ended = True
    return stream


async def chat_member(server: LiveServer, room: str, **kwargs: Any) -> Any:
    ws = await server.ws("/ws/chat", welcome=True, **kwargs)
    joined = await ws.request({"op": "join", "room": room})
    assert joined["op"] == "joined", joined
    return ws


async def publish(ws: Any, room: str, data: Any) -> int:
    ack = await ws.request({"op": "publish", "room": room, "data": data})
    assert ack["op"] == "ack", ack
    return int(ack["offset"])


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- the event format ------------------------------------------------------------------------------------------


def test_position_ids_round_trip() -> None:
    positions = {"lobby": (12, "ab.1"), "odd room/&=": (3, "x_y")}
    text = encode_position(positions)
    assert "\n" not in text
    decoded = decode_position(text)
    assert {r: (s.offset, s.epoch) for r, s in decoded.items()} == positions
    assert decode_position("garbage") == {}
    assert decode_position("a=x_1&b=5") == {}


async def test_stream_carries_the_same_frames_as_chat_members(wirehub_server: Start) -> None:
    server = await wirehub_server()
    room = unique_room()
    stream = await sse_open(server, room)
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-store"
    joined = await stream.next()
    assert joined.event == "joined"
    assert joined.json == {"op": "joined", "room": room, "offset": 0, "epoch": joined.json["epoch"],
                           "recovered": False}
    assert joined.id is not None and room in decode_position(joined.id)

    sender, member = await chat_member(server, room), await chat_member(server, room)
    offset = await publish(sender, room, {"text": "hi"})
    frame = await member.recv_op("message")
    (ev,) = await stream.events(1, only="message")
    assert ev.json == frame  # byte-for-byte the same frame, offset included
    assert ev.json["offset"] == offset
    assert ev.id is not None
    pos = decode_position(ev.id)[room]
    assert (pos.offset, pos.epoch) == (offset, joined.json["epoch"])
    assert stream.retry == 1000
    stream.close()


async def test_one_id_carries_every_room(wirehub_server: Start) -> None:
    server = await wirehub_server()
    a, b = unique_room("a"), unique_room("b")
    stream = await sse_open(server, f"{a},{b}")
    await stream.events(2, only="joined")
    ws_a, ws_b = await chat_member(server, a), await chat_member(server, b)
    oa = await publish(ws_a, a, 1)
    ob = await publish(ws_b, b, 2)
    evs = await stream.events(2, only="message")
    assert [e.json["room"] for e in evs] == [a, b]
    assert evs[1].id is not None
    last = decode_position(evs[1].id)
    assert (last[a].offset, last[b].offset) == (oa, ob)
    stream.close()


async def test_keepalive_comments(wirehub_server: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "KEEPALIVE", 0.05)
    server = await wirehub_server()
    stream = await sse_open(server, unique_room())
    await stream.next()
    await stream.expect_no_message(0.3)
    assert stream.comments.count("keepalive") >= 2
    stream.close()


# -- recovery ------------------------------------------------------------------------------------------------


async def test_last_event_id_replays_the_missed_messages_exactly_once(wirehub_server: Start) -> None:
    server = await wirehub_server()
    a, b = unique_room("a"), unique_room("b")
    ws_a, ws_b = await chat_member(server, a), await chat_member(server, b)
    stream = await sse_open(server, f"{a},{b}")
    await stream.events(2, only="joined")
    await publish(ws_a, a, "a1")
    await publish(ws_b, b, "b1")
    await stream.events(2, only="message")
    last_id = stream.last_id
    assert last_id is not None
    stream.close()
    await wait_until(lambda: not open_streams(server.app))

    missed = [await publish(ws_a, a, "a2"), await publish(ws_b, b, "b2"), await publish(ws_a, a, "a3")]
    again = await sse_open(server, f"{a},{b}", last_id=last_id)
    evs = await again.events(5)  # per room: joined, then its replay
    assert [e.event for e in evs] == ["joined", "message", "message", "joined", "message"]
    joined = [e for e in evs if e.event == "joined"]
    assert [j.json["recovered"] for j in joined] == [True, True]
    replay = [e for e in evs if e.event == "message"]
    assert sorted((e.json["room"], e.json["data"]) for e in replay) == [(a, "a2"), (a, "a3"), (b, "b2")]
    assert sorted(e.json["offset"] for e in replay) == sorted(missed)
    await again.expect_no_message(0.3)  # nothing twice
    live = await publish(ws_b, b, "b3")
    (ev,) = await again.events(1, only="message")
    assert (ev.json["data"], ev.json["offset"]) == ("b3", live)
    await again.expect_no_message(0.2)
    again.close()


async def test_recovery_is_gap_free_while_others_keep_publishing(wirehub_server: Start) -> None:
    """Publishing never stops while the stream drops and resumes: every offset arrives once."""
    server = await wirehub_server()
    room = unique_room()
    publisher = await chat_member(server, room)
    sent: list[int] = []
    stop = asyncio.Event()

    async def publish_loop() -> None:
        i = 0
        while not stop.is_set():
            sent.append(await publish(publisher, room, i))
            i += 1
            await asyncio.sleep(0.005)

    stream = await sse_open(server, room)
    await stream.next()
    task = asyncio.ensure_future(publish_loop())
    try:
        got = [e.json["offset"] for e in await stream.events(10, only="message")]
        stream.close()
        await asyncio.sleep(0.1)  # messages go by while nobody listens
        again = await sse_open(server, room, last_id=stream.last_id)
        (joined,) = await again.events(1, only="joined")
        assert joined.json["recovered"] is True
        got += [e.json["offset"] for e in await again.events(25, only="message")]
    finally:
        stop.set()
        await task
    assert got == sorted(set(got)), "duplicates or disorder"
    assert got == sent[: len(got)], "a gap: some offset never arrived"
    again.close()


async def test_an_unknown_epoch_is_not_recovered(wirehub_server: Start) -> None:
    server = await wirehub_server()
    room = unique_room()
    ws = await chat_member(server, room)
    await publish(ws, room, "old")
    stream = await sse_open(server, room, last_id=encode_position({room: (1, "another-epoch")}))
    (joined,) = await stream.events(1, only="joined")
    assert joined.json["recovered"] is False
    await stream.expect_no_message(0.2)
    stream.close()


async def test_a_replay_too_big_for_the_send_queue_is_not_recovered(wirehub_server: Start) -> None:
    """As for chat joins: a replay over half of server.send_queue_bytes would end the stream as a
    slow consumer again and again; it is refused (recovered false) instead."""
    server = await wirehub_server({"server": {"send_queue_bytes": 65536},
                                   "endpoints": [{"path": "/ws/chat", "handler": "chat"}]})
    room = unique_room()
    stream = await sse_open(server, room)
    await stream.next()
    last_id = stream.last_id
    stream.close()
    for _ in range(10):  # 10 x 8 KB > 32 KB
        await server.app.hub.publish(room, message_frame(room, "load", json.dumps("x" * 8000).encode(), 0.0),
                                     history=True)
    again = await sse_open(server, room, last_id=last_id)
    (joined,) = await again.events(1)
    assert joined.event == "joined" and joined.json["recovered"] is False and joined.json["offset"] == 10
    await again.expect_no_message(0.3)
    assert decode_position(again.last_id or "")[room].offset == 10  # it continues from now


async def test_last_event_id_as_a_query_parameter(wirehub_server: Start) -> None:
    server = await wirehub_server()
    room = unique_room()
    ws = await chat_member(server, room)
    first = await publish(ws, room, "x")
    _, epoch = await server.app.backend.history.position(room)
    await publish(ws, room, "y")
    position = encode_position({room: (first, epoch)})
    stream = await sse_open(server, room, query="&last_event_id=" + quote(position))
    assert (await stream.next()).json["recovered"] is True
    (ev,) = await stream.events(1, only="message")
    assert ev.json["data"] == "y"
    stream.close()


# -- refusals ---------------------------------------------------------------------------------------------------


JWT_CONFIG = {"auth": {"plugin": "jwt", "jwt": {"algorithms": ["HS256"], "secret": SECRET}}}


def token(sub: str = "ann", rooms: list[str] | None = None) -> str:
    claims = {"sub": sub, "rooms": rooms or ["*"], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_same_auth_as_the_upgrade(wirehub_server: Start) -> None:
    server = await wirehub_server(JWT_CONFIG)
    room = unique_room()
    refused = await sse_open(server, room)
    assert refused.status == 401
    body = json.loads(refused.body)
    assert body["reason"] == "missing" and "error" in body
    bad = await sse_open(server, room, query="&token=not.a.token")
    assert bad.status == 401 and json.loads(bad.body)["reason"] == "malformed"
    ok = await sse_open(server, room, query="&token=" + token())
    assert ok.status == 200 and (await ok.next()).event == "joined"
    by_header = await sse_open(server, room, headers={"Authorization": "Bearer " + token("bob")})
    assert by_header.status == 200
    by_cookie = await sse_open(server, room, headers={"Cookie": "wirehub_token=" + token("cy")})
    assert by_cookie.status == 200
    for s in (ok, by_header, by_cookie):
        s.close()


async def test_rooms_outside_the_token_are_forbidden(wirehub_server: Start) -> None:
    server = await wirehub_server(JWT_CONFIG)
    stream = await sse_open(server, "team-a,secret", query="&token=" + token(rooms=["team-*"]))
    assert stream.status == 403
    assert json.loads(stream.body) == {"error": "forbidden", "reason": "not_allowed", "room": "secret"}
    assert not open_streams(server.app)


@pytest.mark.parametrize("rooms, reason", [("", "give the rooms"), ("a b", "invalid room name"),
                                           (",".join(f"r{i}" for i in range(101)), "at most 100")])
async def test_bad_room_lists(wirehub_server: Start, rooms: str, reason: str) -> None:
    server = await wirehub_server()
    stream = await sse_open(server, rooms)
    assert stream.status == 400
    body = json.loads(stream.body)
    assert body["error"] == "bad_request" and reason in body["reason"]


# -- ending streams ----------------------------------------------------------------------------------------------


async def test_a_closed_stream_leaves_its_rooms(wirehub_server: Start) -> None:
    server = await wirehub_server()
    room = unique_room()
    stream = await sse_open(server, room)
    await stream.next()
    assert len(server.app.hub.members(room)) == 1
    stream.close()
    await wait_until(lambda: not server.app.hub.members(room) and not open_streams(server.app))
    other = await chat_member(server, room)  # the server goes on
    await publish(other, room, "still here")


async def test_a_stream_that_stops_reading_is_ended(wirehub_server: Start) -> None:
    """Past server.send_queue_bytes the stream ends (WebSocket's 4008) instead of buffering."""
    server = await wirehub_server({"server": {"send_queue_bytes": 65536},
                                   "endpoints": [{"path": "/ws/chat", "handler": "chat"}]})
    room = unique_room()
    stream = await sse_open(server, room, rcvbuf=4096)
    await stream.next()
    reader = await sse_open(server, room)  # a healthy stream in the same room
    await reader.next()
    session_id = stream.comments[0].split()[1]  # ": wirehub <session id>"
    (handler,) = [h for h in open_streams(server.app) if h.session is not None and h.session.id == session_id]
    big = "x" * 8000
    sent = 0
    while handler.session is not None and not handler.session.closed and sent < 3000:
        frame = message_frame(room, "load", json.dumps(big).encode(), time.time())
        await server.app.hub.publish(room, frame, history=True)
        sent += 1
        if sent % 20 == 0:
            await asyncio.sleep(0)
            with contextlib.suppress(TimeoutError):
                await reader.events(20, timeout=2, only="message")
    assert handler.session is not None and handler.session.closed, f"not ended after {sent} messages"
    assert handler.session.close_code == 4008
    await wait_until(lambda: len(server.app.hub.members(room)) == 1 and len(open_streams(server.app)) == 1)
    metrics = server.app.metrics.render().decode()
    assert "wirehub_slow_consumer_closes_total 1.0" in metrics
    assert 'wirehub_sessions_closed_total{code="4008",endpoint="/sse"} 1.0' in metrics
    stream.close()
    reader.close()


async def test_draining_refuses_and_ends_streams(wirehub_server: Start) -> None:
    server = await wirehub_server()
    room = unique_room()
    stream = await sse_open(server, room)
    await stream.next()
    assert close_streams(server.app, reconnect_jitter=0.5) == 1
    await stream.wait_end()
    assert stream.retry is not None and 1 <= stream.retry <= 500
    await wait_until(lambda: not open_streams(server.app) and not server.app.hub.members(room))

    # While draining, new streams are refused ...
    server.app.draining = True
    try:
        refused = await sse_open(server, room)
        assert refused.status == 503 and refused.headers.get("retry-after") == "1"
    finally:
        server.app.draining = False
    # ... and a drain (what SIGTERM runs) ends the open ones with a jittered retry, then stops.
    second = await sse_open(server, room)
    await second.next()
    started = time.monotonic()
    await server.app.drain()
    await second.wait_end(3)
    assert time.monotonic() - started < 2.0
    assert second.retry is not None and 1 <= second.retry <= 5000  # drain.reconnect_jitter: 5 s
    assert not open_streams(server.app)


class _Writer:
    """What SseTransport writes to: a response that is open and records its raw writes."""

    def __init__(self) -> None:
        self.request = type("Request", (), {"connection": object()})()
        self.finished_stream = False
        self.chunks: list[bytes] = []

    def write_raw(self, data: bytes) -> None:
        self.chunks.append(data)


def test_a_gap_event_carries_the_position_the_stream_continues_from() -> None:
    from wirehub.sse import RoomFrame, SseTransport, decode_position

    writer = _Writer()
    transport = SseTransport(writer)  # type: ignore[arg-type]
    transport.epochs["r"] = "e1"
    transport.send_frame(RoomFrame(b'{"op":"message","room":"r","offset":7}', "r", 7))
    transport.send_frame(RoomFrame(b'{"op":"gap","room":"r","epoch":"e2","offset":0}', "r", None, op="gap"))
    gap_event = writer.chunks[-1].decode()
    assert gap_event.startswith("id: r=0_e2\nevent: gap\n"), gap_event
    assert decode_position("r=0_e2")["r"].epoch == "e2"
    transport.send_frame(RoomFrame(b'{"op":"message","room":"r","offset":1}', "r", 1))
    assert writer.chunks[-1].decode().startswith("id: r=1_e2\n")
    # a gap without an offset (an older hub) forgets the position: no id until the next message
    transport.send_frame(RoomFrame(b'{"op":"gap","room":"r","epoch":"e3"}', "r", None, op="gap"))
    assert writer.chunks[-1].decode().startswith("event: gap\n")
    assert transport.positions == {}
