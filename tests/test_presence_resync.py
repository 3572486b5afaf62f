"""Members' presence lists after what the bus could not tell them (issue 11: "counts and pages are correct across
replicas"), on real Redis and NATS with in-process replicas:

- a replica whose own link to the bus was cut missed the presence events sent meanwhile (they are not in
  history): once it is back its members get a ``presence.diff`` that says ``truncated`` and reload;
- a replica declared dead in a stall (its members were told its users left) writes its entries again once it
  heartbeats, and the members are told those users are back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import pytest

from tests.test_presence import chat_config
from wirehub import BusUnavailable, PresenceCount
from wirehub.builtins.bus.memory import MemoryPresence
from wirehub.builtins.handlers import chat_events
from wirehub.builtins.handlers.chat_presence import ChatPresence, PresenceRule, PresenceRules
from wirehub.client import Client
from wirehub.rooms import RoomRules
from wirehub.testing import LiveServer, WsClient, eventually, unique_room

CHAT = "/ws/chat"
ServerFactory = Callable[..., Awaitable[LiveServer]]
TIMINGS = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0, "op_timeout": 1.0, "connect_timeout": 1.0,
           "max_backoff": 0.3}


class LinkProxy:
    """A TCP proxy in front of a broker for one replica: :meth:`cut` resets its connections and refuses new ones
    (a partition of that replica alone), :meth:`restore` lets them through again."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.scheme, self.target = parts.scheme, (parts.hostname or "127.0.0.1", parts.port or 0)
        self.down = False
        self._links: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """The URL to give the replica."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"{self.scheme}://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
        self._links.discard(writer)

    def cut(self) -> None:
        self.down = True
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        self.down = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def replicas(request: pytest.FixtureRequest, wirehub_server: ServerFactory, kind: str, urls: list[str],
                   **bus: Any) -> list[LiveServer]:
    """One in-process replica per broker URL (the session's broker, or a proxy in front of it), one key prefix."""
    prefix = f"rs{uuid.uuid4().hex[:8]}"
    made = []
    for i, url in enumerate(urls):
        if kind == "redis":
            block: dict[str, Any] = {"plugin": "redis", "redis": {"url": url, "key_prefix": prefix, **TIMINGS, **bus}}
        else:
            block = {"plugin": "nats", "nats": {"servers": [url], "subject_prefix": prefix, "storage": "memory",
                                                **TIMINGS, **bus}}
        config = {**chat_config(block), "server": {"node_id": f"r{i}"}}
        del config["auth"]  # guests (the default): the Python client connects as one too
        made.append(await wirehub_server(config))
    return made


async def guest(server: LiveServer, *rooms: str) -> tuple[WsClient, str]:
    """A guest who joined ``rooms``, and their user id."""
    ws = await server.ws(CHAT)
    user = (await ws.recv())["user"]
    for room in rooms:
        assert (await ws.request({"op": "join", "room": room}))["op"] == "joined"
    return ws, user


class Frames:
    """The presence frames a client gets, taken by what they are whatever their order across rooms."""

    def __init__(self, ws: WsClient) -> None:
        self.ws = ws
        self.kept: list[dict[str, Any]] = []

    async def take(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The first frame (kept, or the next ones) for which ``match`` is true; the others are kept."""
        for i, frame in enumerate(self.kept):
            if match(frame):
                return self.kept.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                frame = await self.ws.recv(max(0.01, deadline - loop.time()))
            except TimeoutError:
                raise AssertionError(f"no such frame within {timeout}s; got {self.kept}") from None
            if match(frame):
                return frame
            self.kept.append(frame)

    async def none(self, match: Callable[[dict[str, Any]], bool], quiet: float) -> None:
        """No frame for which ``match`` is true comes within ``quiet`` s (nor was kept)."""
        try:
            frame = await self.take(match, quiet)
        except AssertionError:
            return
        raise AssertionError(f"unexpected frame {frame}")


def diff_in(room: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("op") == "presence.diff" and f.get("room") == room and all(
        f.get(k) == v for k, v in fields.items())


def event(op: str, room: str, user: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("op") == op and f.get("room") == room and f.get("user") == user


def broker_url(request: pytest.FixtureRequest, kind: str) -> str:
    return str(request.getfixturevalue("redis_server" if kind == "redis" else "nats_server").url)


async def listed(ws: WsClient, room: str) -> set[str]:
    reply = await ws.request({"op": "presence", "room": room})
    assert reply["op"] == "presence", reply
    return {m["user"] for m in reply["members"]}


async def test_members_of_a_replica_whose_bus_link_was_cut_are_told_to_reload(
    request: pytest.FixtureRequest, kind: str, wirehub_server: ServerFactory,
) -> None:
    """B's link to the broker alone is cut; v joins through A meanwhile, so B's members miss the presence.join
    (each) and the presence.diff (batched) about v. Once B is back they get a truncated presence.diff (with the
    count) in those rooms, none where events are off, and the Python client reloads its list."""
    direct = broker_url(request, kind)
    proxy = LinkProxy(direct)
    try:
        a, b = await replicas(request, wirehub_server, kind, [direct, await proxy.start()], presence_ttl=5.0)
        each, batched, quiet = unique_room(), unique_room("big"), unique_room("quiet")
        watcher, w = await guest(b, each, batched, quiet)
        seen = Frames(watcher)
        client = Client(b.ws_url(CHAT), ping_interval=0)
        sub = await client.join(each, lambda message: None)
        me = (client.welcome or {})["user"]
        await seen.take(event("presence.join", each, me))
        assert set(sub.members) == {w, me}

        proxy.cut()
        await eventually(lambda: _true(not b.app.hub.healthy))
        _, v = await guest(a, each, batched, quiet)
        await asyncio.sleep(0.6)  # the batched room's diff about v went out (interval 0.2 s)
        assert b.app.hub.healthy is False
        proxy.restore()

        assert await seen.take(diff_in(each, truncated=True)) == {
            "op": "presence.diff", "room": each, "joins": [], "leaves": [], "truncated": True,
            "count": {"users": 3, "connections": 3}}
        assert await seen.take(diff_in(batched, truncated=True)) == {
            "op": "presence.diff", "room": batched, "joins": [], "leaves": [], "truncated": True,
            "count": {"users": 2, "connections": 2}}
        await seen.none(lambda f: f.get("room") == quiet, 0.5)  # its events are off
        assert not any(f.get("user") == v for f in seen.kept), seen.kept  # v's events were missed indeed
        assert await listed(watcher, each) == {w, me, v}
        await eventually(lambda: _true(set(sub.members) == {w, me, v}))
        assert sub.count == {"users": 3, "connections": 3}
        await client.close()
    finally:
        await proxy.close()


async def test_members_are_told_that_the_users_of_a_replica_declared_dead_in_a_stall_are_back(
    request: pytest.FixtureRequest, kind: str, wirehub_server: ServerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B stops heartbeating for longer than presence_ttl (a stall: its upkeep waits here); A declares it dead,
    removes its entries and tells the members that u left. B's next heartbeat finds its entries gone and writes
    them again: the members are told u is back (presence.join with each, presence.diff naming u with batched)."""
    direct = broker_url(request, kind)
    a, b = await replicas(request, wirehub_server, kind, [direct, direct], presence_ttl=1.5, presence_interval=0.25)
    each, batched = unique_room(), unique_room("big")
    watcher, w = await guest(a, each, batched)
    seen = Frames(watcher)
    _, u = await guest(b, each, batched)
    await seen.take(event("presence.join", each, u))
    await seen.take(diff_in(batched, joins=[{"user": u, "name": u}]))

    presence: Any = b.app.backend.presence
    upkeep = presence.upkeep
    stalled = asyncio.Event()

    async def stalled_upkeep() -> None:
        await stalled.wait()
        await upkeep()

    monkeypatch.setattr(presence, "upkeep", stalled_upkeep)
    alone, both = {"users": 1, "connections": 1}, {"users": 2, "connections": 2}
    assert await seen.take(event("presence.leave", each, u)) == {"op": "presence.leave", "room": each, "user": u}
    await seen.take(diff_in(each, truncated=True, count=alone))  # what B had not told is lost: reload
    await seen.take(diff_in(batched, joins=[], leaves=[u]))
    assert await listed(watcher, each) == {w}

    stalled.set()
    # each: one notice per room (not a presence.join per user: a broker that lost every entry has every replica
    # write them all again), and the list reloaded has u
    await seen.take(diff_in(each, joins=[], leaves=[], truncated=True, count=both))
    back = await seen.take(diff_in(batched, joins=[{"user": u, "name": u}]))
    assert back["leaves"] == [] and back["count"] == {"users": 2, "connections": 2}, back
    assert await listed(watcher, each) == {w, u}
    assert await listed(watcher, batched) == {w, u}
    await seen.none(lambda f: f.get("user") == u or u in str(f.get("leaves")), 1.0)


class NoticeHub:
    """What ``ChatPresence`` needs of the hub to tell members (``deliver_here``, ``publish``), recorded."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, dict[str, Any]]] = []
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.healthy = True

    def deliver_here(self, room: str, frame: bytes) -> None:
        self.delivered.append((room, json.loads(frame)))

    async def publish(self, room: str, frame: bytes, *, origin: Any = None) -> None:
        self.published.append((room, json.loads(frame)))

    def is_member(self, room: str, session: Any) -> bool:
        return False


class FailingCounts(MemoryPresence):
    """The first count of room ``down`` finds the bus unavailable, every count of ``bug`` fails otherwise;
    ``failures``: room -> the reads that failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: dict[str, int] = {}

    async def count(self, room: str) -> PresenceCount:
        if room == "bug" or (room == "down" and not self.failures.get(room)):
            self.failures[room] = self.failures.get(room, 0) + 1
            raise BusUnavailable("unavailable") if room == "down" else RuntimeError("a bug")
        return await super().count(room)


async def test_a_notice_whose_count_failed_is_tried_again_and_none_is_sent_where_events_are_off(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A room whose count read finds the bus unavailable while the hub has it up (one room's shard failing over)
    is tried again and its members are told; one whose read keeps failing otherwise is given up after GIVE_UP
    tries, logged; rooms whose events or presence are off get nothing. With the bus down, the rooms left are
    dropped: the resumption that comes once it is back tells them."""
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 0.01)
    hub, presence = NoticeHub(), FailingCounts()
    rules = PresenceRules([PresenceRule("quiet-*", events="off"), PresenceRule("ticker-*", presence=False)],
                          "each", 100)
    chat = ChatPresence(rules, 1000, cast(Any, hub), presence)
    caplog.set_level(logging.INFO, "wirehub.chat.presence")
    chat.resumed(["down", "bug", "ok", "quiet-1", "ticker-1"])
    await asyncio.sleep(0.2)
    told = {"op": "presence.diff", "joins": [], "leaves": [], "count": {"users": 0, "connections": 0},
            "truncated": True}
    assert sorted(hub.delivered, key=str) == [("down", {**told, "room": "down"}), ("ok", {**told, "room": "ok"})]
    assert presence.failures == {"down": 1, "bug": chat_events.GIVE_UP}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["1 rooms: gave up telling members their presence lists may be stale after 3 tries"]

    hub.delivered.clear()
    hub.healthy = False  # down again: nothing is retried, the next resumption tells them
    presence.failures.clear()
    chat.resumed(["down"])
    await asyncio.sleep(0.1)
    assert hub.delivered == [] and presence.failures == {"down": 1}
    assert "1 rooms: members who may hold stale presence lists are told once the bus is back" in caplog.text
    await chat.close()


async def test_the_rooms_of_other_endpoints_get_no_chat_presence_event() -> None:
    """The backend reports every endpoint's rooms (a game's ``namespace/room`` too) and the hub resumes them all:
    the chat tells only the members of its own rooms (names its pattern accepts)."""
    hub = NoticeHub()
    chat = ChatPresence(PresenceRules([], "each", 100), 1000, cast(Any, hub), MemoryPresence(), owns=RoomRules().owns)
    await chat.departed("game/table-1", ["u"])
    chat.restored("game/table-1", ["u"])
    chat.resumed(["game/table-1"])
    await asyncio.sleep(0.05)
    assert hub.delivered == [] and hub.published == []
    await chat.departed("lobby", ["u"])  # one of its own
    chat.resumed(["lobby"])
    await asyncio.sleep(0.05)
    assert [(room, frame["op"]) for room, frame in hub.published] == [("lobby", "presence.leave"),
                                                                      ("lobby", "presence.diff")]
    assert [room for room, _ in hub.delivered] == ["lobby"]
    await chat.close()


async def _true(value: bool) -> bool:
    return value
