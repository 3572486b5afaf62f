"""pytest plugin for wirehub and its plugin authors: live servers, a WebSocket client, contract suites.

Installing wirehub registers it (the ``pytest11`` entry point): no conftest needed. Tests are
asyncio tests (pytest-asyncio, ``asyncio_mode = auto``). docs/plugins.md lists every fixture and
contract suite with its shape.

- ``wirehub_server``: a factory fixture; ``await wirehub_server({...config...})`` starts a real
  Tornado server on a free port in this process and returns a :class:`LiveServer`.
- :func:`ws_connect`: a real WebSocket client with JSON helpers.
- Contract suites: subclass :class:`BusContract`, :class:`HistoryContract`,
  :class:`PresenceContract` or :class:`StateStoreContract` in a ``Test*`` class and provide an
  async ``backend`` fixture yielding a started :class:`wirehub.bus.Backend` (or a pair of them
  on one broker through ``backend_pair``, for the cross-replica cases). Buses whose replicas can
  die add :class:`PresenceExpiryContract` (fixtures ``presence_replica`` and ``broker_ops``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.netutil import bind_sockets
from tornado.websocket import WebSocketClientConnection, websocket_connect

from wirehub.app import Wirehub
from wirehub.bus import (
    Backend,
    BusHandler,
    BusUnavailable,
    Presence,
    PresenceCount,
    PresenceEntry,
    PresenceMember,
    PresencePage,
    StateConflict,
)
from wirehub.config import config_from_dict
from wirehub.session import OutFrame

# -- helpers ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_room(prefix: str = "room") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class FakeTransport:
    """A :class:`wirehub.session.Transport` without a socket, to unit-test handlers, the hub and sessions.

    Pass it to :class:`wirehub.session.Session`. It keeps every frame it is given (``frames``; their
    payloads with :meth:`texts`) and never sends any: ``buffered()`` is the wire size of all of them, as
    for a client that reads nothing (the session's byte cap then applies). ``close()`` records the code and
    reason in ``closed_with``.
    """

    def __init__(self) -> None:
        self.frames: list[OutFrame] = []
        self.queued = 0
        self.closed_with: tuple[int, str] | None = None

    def send_frame(self, frame: OutFrame) -> None:
        self.frames.append(frame)
        self.queued += len(frame.wire)

    def buffered(self) -> int:
        return self.queued

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    @property
    def closed(self) -> bool:
        return self.closed_with is not None

    def texts(self) -> list[bytes]:
        """The payloads of the frames sent, in order."""
        return [f.payload for f in self.frames]


class WsClient:
    """A real WebSocket client (Tornado's) with JSON helpers and timeouts on every read."""

    def __init__(self, conn: WebSocketClientConnection) -> None:
        self.conn = conn

    async def send(self, obj: Any) -> None:
        await self.conn.write_message(obj if isinstance(obj, str | bytes) else json.dumps(obj),
                                      binary=isinstance(obj, bytes))

    async def recv_raw(self, timeout: float = 5.0) -> str | bytes | None:
        """The next frame; None when the server closed the connection."""
        return await asyncio.wait_for(self.conn.read_message(), timeout)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await self.recv_raw(timeout)
        if msg is None:
            raise ConnectionError(f"closed by the server: {self.close_code} {self.close_reason}")
        result: dict[str, Any] = json.loads(msg)
        return result

    async def recv_op(self, op: str, timeout: float = 5.0) -> dict[str, Any]:
        """Skip frames until one with ``"op": op`` (returns it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            if msg.get("op") == op:
                return msg

    async def request(self, obj: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send ``obj`` with a fresh ``id`` and return the reply carrying that id."""
        obj = {**obj, "id": obj.get("id", uuid.uuid4().hex[:8])}
        await self.send(obj)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            if msg.get("id") == obj["id"]:
                return msg

    async def expect_nothing(self, within: float = 0.3) -> None:
        try:
            msg = await asyncio.wait_for(self.conn.read_message(), within)
        except TimeoutError:
            return
        raise AssertionError(f"expected no frame, got {msg!r}")

    async def wait_closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Read until the server closes; returns (close_code, close_reason)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await asyncio.wait_for(self.conn.read_message(), max(0.01, deadline - loop.time())) is not None:
            pass
        return self.close_code, self.close_reason

    @property
    def close_code(self) -> int | None:
        return self.conn.close_code

    @property
    def close_reason(self) -> str | None:
        return self.conn.close_reason

    def close(self, code: int | None = None) -> None:
        self.conn.close(code)


async def ws_connect(url: str, *, headers: dict[str, str] | None = None, subprotocols: list[str] | None = None,
                     welcome: bool = False, timeout: float = 5.0, **kwargs: Any) -> WsClient:
    """Connect a real client; with ``welcome=True`` the welcome frame is read and checked."""
    request = HTTPRequest(url, headers=headers or {}, connect_timeout=timeout, request_timeout=timeout)
    conn = await websocket_connect(request, subprotocols=subprotocols, **kwargs)
    client = WsClient(conn)
    if welcome:
        first = await client.recv(timeout)
        assert first.get("op") == "welcome", first
    return client


@dataclass
class LiveServer:
    """A running wirehub app on a free port in this process."""

    app: Wirehub
    port: int
    clients: list[WsClient] = field(default_factory=list)

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def ws_url(self, path: str) -> str:
        return self.url(path, "ws")

    async def ws(self, path: str, **kwargs: Any) -> WsClient:
        client = await ws_connect(self.ws_url(path), **kwargs)
        self.clients.append(client)
        return client

    async def http(self, path: str, method: str = "GET", body: Any = None,
                   headers: dict[str, str] | None = None) -> HTTPResponse:
        """An HTTP request that returns error responses instead of raising."""
        if body is not None and not isinstance(body, str | bytes):
            body = json.dumps(body)
        req = HTTPRequest(self.url(path), method=method, body=body, headers=headers or {},
                          allow_nonstandard_methods=True)
        try:
            return await AsyncHTTPClient().fetch(req, raise_error=False)
        except HTTPClientError as exc:  # pragma: no cover - raise_error=False returns instead
            assert exc.response is not None
            return exc.response


def config_for_tests(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config tests start from: defaults, port 0, no pings, quiet logs."""
    base: dict[str, Any] = {"server": {"port": 0, "host": "127.0.0.1", "ping_interval": 0}}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


@pytest.fixture
async def wirehub_server() -> AsyncIterator[Callable[..., Awaitable[LiveServer]]]:
    """Factory: ``server = await wirehub_server({"endpoints": [...]})`` (merged over config_for_tests)."""
    started: list[LiveServer] = []

    async def start(overrides: dict[str, Any] | None = None) -> LiveServer:
        config = config_from_dict(config_for_tests(overrides), source="<test>")
        app = Wirehub.build(config)
        sockets = bind_sockets(0, "127.0.0.1", backlog=config.server.backlog)
        await app.start(sockets)
        assert app.port is not None
        server = LiveServer(app, app.port)
        started.append(server)
        return server

    yield start
    for server in started:
        for client in server.clients:
            client.close()
        # Finish the close handshakes while the loop runs: a socket left to the garbage collector
        # is a ResourceWarning, an error under filterwarnings=error in whichever test comes next.
        for client in server.clients:
            try:
                if client.close_code is None:  # else its end was read already
                    await client.wait_closed(timeout=2.0)
            except (TimeoutError, OSError):
                pass
            if client.conn.stream is not None:
                client.conn.stream.close()
        await server.app.stop()


# -- contract suites -------------------------------------------------------------------------------------------


class Recorder(BusHandler):
    """A BusHandler that records what the bus pushes."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, int | None]] = []
        self.states: list[bool] = []
        self._event = asyncio.Event()

    def on_bus_message(self, room: str, payload: bytes, offset: int | None) -> None:
        self.messages.append((room, payload, offset))
        self._event.set()

    def on_bus_state(self, healthy: bool) -> None:
        self.states.append(healthy)

    def of(self, room: str) -> list[bytes]:
        return [p for r, p, _ in self.messages if r == room]

    async def wait_for(self, room: str, count: int, timeout: float = 5.0) -> list[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.of(room)) < count:
            self._event.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"got {len(self.of(room))} of {count} messages in {room}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), remaining)
        return self.of(room)


BackendPair = tuple[tuple[Backend, Recorder], tuple[Backend, Recorder]]


class BusContract:
    """Every bus keeps these. Provide ``backend_pair``: two started backends on one broker, each
    with its Recorder (two replicas); for the memory bus both may be the same backend."""

    async def test_publish_reaches_subscribers_on_every_replica(self, backend_pair: BackendPair) -> None:
        (a, ra), (b, rb) = backend_pair
        room = unique_room()
        await a.bus.subscribe(room)
        await b.bus.subscribe(room)
        await a.bus.publish(room, b"hello")
        assert await ra.wait_for(room, 1) == [b"hello"]
        assert await rb.wait_for(room, 1) == [b"hello"]

    async def test_one_order_per_room_for_every_replica(self, backend_pair: BackendPair) -> None:
        (a, ra), (b, rb) = backend_pair
        room = unique_room()
        await a.bus.subscribe(room)
        await b.bus.subscribe(room)
        sent = [f"m{i}".encode() for i in range(50)]
        await asyncio.gather(*(
            (a if i % 2 else b).bus.publish(room, payload, history=True) for i, payload in enumerate(sent)
        ))
        got_a, got_b = await ra.wait_for(room, 50), await rb.wait_for(room, 50)
        assert got_a == got_b
        assert sorted(got_a) == sorted(sent)
        offsets = [o for r, _, o in ra.messages if r == room and o is not None]
        assert offsets == sorted(offsets) and len(set(offsets)) == 50

    async def test_history_offsets_follow_publish_order(self, backend_pair: BackendPair) -> None:
        (a, ra), _ = backend_pair
        room = unique_room()
        await a.bus.subscribe(room)
        first = await a.bus.publish(room, b"1", history=True)
        second = await a.bus.publish(room, b"2", history=True)
        plain = await a.bus.publish(room, b"3")
        assert isinstance(first, int) and isinstance(second, int) and second > first
        assert plain is None
        await ra.wait_for(room, 3)
        assert [(p, o) for r, p, o in ra.messages if r == room] == [(b"1", first), (b"2", second), (b"3", None)]

    async def test_unsubscribed_rooms_are_not_delivered(self, backend_pair: BackendPair) -> None:
        (a, ra), (b, _) = backend_pair
        room, other = unique_room(), unique_room()
        await a.bus.subscribe(room)
        await a.bus.subscribe(other)
        await a.bus.unsubscribe(other)
        await b.bus.publish(other, b"nobody")
        await b.bus.publish(room, b"somebody")
        await ra.wait_for(room, 1)
        await asyncio.sleep(0.1)
        assert ra.of(other) == []

    async def test_healthy_while_connected(self, backend_pair: BackendPair) -> None:
        (a, _), _ = backend_pair
        assert a.bus.healthy is True

    async def test_a_dedupe_key_is_published_once_across_replicas(self, backend_pair: BackendPair) -> None:
        (a, ra), (b, rb) = backend_pair
        room, other = unique_room(), unique_room()
        for bus in (a.bus, b.bus):
            await bus.subscribe(room)
            await bus.subscribe(other)
        first = await a.bus.publish(room, b"once", history=True, dedupe_key="k-1", dedupe_window=60)
        # the retry, on the other replica and on the same one: the first offset, nothing delivered
        assert await b.bus.publish(room, b"once", history=True, dedupe_key="k-1", dedupe_window=60) == first
        assert await a.bus.publish(room, b"once", history=True, dedupe_key="k-1", dedupe_window=60) == first
        # keys are per room, and other keys (or none) publish as usual
        elsewhere = await b.bus.publish(other, b"same key", history=True, dedupe_key="k-1", dedupe_window=60)
        second = await b.bus.publish(room, b"twice", history=True, dedupe_key="k-2", dedupe_window=60)
        third = await a.bus.publish(room, b"plain", history=True)
        assert isinstance(first, int) and isinstance(second, int) and isinstance(third, int)
        assert first < second < third and isinstance(elsewhere, int)
        for rec in (ra, rb):
            assert await rec.wait_for(room, 3) == [b"once", b"twice", b"plain"]
            assert await rec.wait_for(other, 1) == [b"same key"]
        await asyncio.sleep(0.1)
        assert ra.of(room) == [b"once", b"twice", b"plain"] and rb.of(room) == ra.of(room)
        page = await a.history.read(room, None, 10)
        assert [p for _, p in page.messages] == [b"once", b"twice", b"plain"]

    async def test_concurrent_publishes_with_one_dedupe_key_store_one(self, backend_pair: BackendPair) -> None:
        (a, ra), (b, _) = backend_pair
        room = unique_room()
        await a.bus.subscribe(room)
        offsets = await asyncio.gather(*(
            (a if i % 2 else b).bus.publish(room, b"racing", history=True, dedupe_key="same", dedupe_window=60)
            for i in range(10)
        ))
        assert len(set(offsets)) == 1 and isinstance(offsets[0], int)
        await ra.wait_for(room, 1)
        await asyncio.sleep(0.1)
        assert ra.of(room) == [b"racing"]


#: ``footprint()``: what the backend stores (broker keys, stream subjects, in-memory logs), as a sorted
#: list of names; equal before and after operations that must store nothing.
Footprint = Callable[[], Awaitable[list[str]]]


class HistoryContract:
    """Provide ``backend``: a started Backend, and ``footprint`` (see :data:`Footprint`). History is
    bounded and epoch-tagged."""

    async def test_read_after_an_offset_returns_the_rest_in_order(self, backend: Backend) -> None:
        room = unique_room()
        offsets = [await backend.bus.publish(room, f"m{i}".encode(), history=True) for i in range(5)]
        page = await backend.history.read(room, offsets[1], 100)
        assert page.complete
        assert [p for _, p in page.messages] == [b"m2", b"m3", b"m4"]
        assert [o for o, _ in page.messages] == offsets[2:]
        assert page.top == offsets[-1]

    async def test_read_without_after_returns_the_newest(self, backend: Backend) -> None:
        room = unique_room()
        for i in range(5):
            await backend.bus.publish(room, f"m{i}".encode(), history=True)
        page = await backend.history.read(room, None, 2)
        assert page.complete and [p for _, p in page.messages] == [b"m3", b"m4"]

    async def test_limit_bounds_the_page(self, backend: Backend) -> None:
        room = unique_room()
        first = await backend.bus.publish(room, b"a", history=True)
        for i in range(5):
            await backend.bus.publish(room, f"m{i}".encode(), history=True)
        page = await backend.history.read(room, first, 2)
        assert page.complete and [p for _, p in page.messages] == [b"m0", b"m1"]

    async def test_position_of_a_new_room_is_zero_with_a_stable_epoch(self, backend: Backend) -> None:
        room = unique_room()
        top, epoch = await backend.history.position(room)
        assert top == 0 and isinstance(epoch, str) and epoch
        offset = await backend.bus.publish(room, b"x", history=True)
        top2, epoch2 = await backend.history.position(room)
        assert (top2, epoch2) == (offset, epoch)
        page = await backend.history.read(room, 0, 10)
        assert page.complete and page.epoch == epoch and [p for _, p in page.messages] == [b"x"]

    async def test_an_offset_beyond_the_top_is_not_recoverable(self, backend: Backend) -> None:
        room = unique_room()
        await backend.bus.publish(room, b"x", history=True)
        page = await backend.history.read(room, 10_000, 10)
        assert page.complete is False and page.messages == []

    async def test_up_to_date_is_complete_and_empty(self, backend: Backend) -> None:
        room = unique_room()
        offset = await backend.bus.publish(room, b"x", history=True)
        page = await backend.history.read(room, offset, 10)
        assert page.complete is True and list(page.messages) == []

    async def test_trimmed_history_is_not_recoverable(self, small_history_backend: Backend) -> None:
        """``small_history_backend`` keeps at most 3 messages per room."""
        backend = small_history_backend
        room = unique_room()
        offsets = [await backend.bus.publish(room, f"m{i}".encode(), history=True) for i in range(10)]
        page = await backend.history.read(room, offsets[1], 100)
        assert page.complete is False
        recent = await backend.history.read(room, offsets[6], 100)
        assert recent.complete and [p for _, p in recent.messages] == [b"m7", b"m8", b"m9"]

    async def test_trimming_keeps_the_position(self, small_history_backend: Backend) -> None:
        """Chat clients store (offset, epoch): trimming must neither reuse offsets nor change the epoch."""
        backend = small_history_backend
        room = unique_room()
        _, epoch = await backend.history.position(room)
        offsets = [await backend.bus.publish(room, f"m{i}".encode(), history=True) for i in range(10)]
        assert await backend.history.position(room) == (offsets[-1], epoch)
        newest = await backend.history.read(room, None, 100)
        assert newest.epoch == epoch and newest.top == offsets[-1]
        assert [(o, p) for o, p in newest.messages] == [(offsets[i], f"m{i}".encode()) for i in (7, 8, 9)]
        after = await backend.bus.publish(room, b"m10", history=True)
        assert isinstance(after, int) and after > offsets[-1]


    async def test_reading_an_unknown_room_creates_nothing(self, backend: Backend, footprint: Footprint) -> None:
        """A client can name any number of rooms: reading one without messages must store nothing
        (no key, log or stream entry), yet report a stable epoch, the one its first message gets."""
        before = await footprint()
        rooms = [unique_room("unread") for _ in range(20)]
        epochs = {}
        for room in rooms:
            top, epoch = await backend.history.position(room)
            newest = await backend.history.read(room, None, 10)
            from_zero = await backend.history.read(room, 0, 10)
            beyond = await backend.history.read(room, 5, 10)
            assert (top, newest.top, from_zero.top) == (0, 0, 0) and epoch
            assert newest.complete and from_zero.complete and not beyond.complete
            assert newest.messages == [] and from_zero.messages == [] and beyond.messages == []
            assert newest.epoch == from_zero.epoch == beyond.epoch == epoch
            assert await backend.history.position(room) == (0, epoch)
            epochs[room] = epoch
        assert await footprint() == before
        room = rooms[0]
        offset = await backend.bus.publish(room, b"first", history=True)
        page = await backend.history.read(room, 0, 10)  # a client that joined the empty room recovers
        assert page.epoch == epochs[room] and page.complete and page.messages == [(offset, b"first")]


@runtime_checkable
class InspectablePresence(Protocol):
    """A presence store that can list what it keeps in the broker for a room (all built-in ones)."""

    async def stored_keys(self, room: str) -> list[str]: ...


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.02) -> None:
    """Until ``check()`` is true; AssertionError after ``timeout`` seconds (a replica reads another's
    writes once they reached the broker, not at the same instant)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout}s: {check}")
        await asyncio.sleep(interval)


async def _scan_pages(p: Presence, room: str, limit: int) -> tuple[list[PresenceMember], list[PresencePage]]:
    members: list[PresenceMember] = []
    pages: list[PresencePage] = []
    after: str | None = None
    while True:
        page = await p.page(room, after, limit)
        pages.append(page)
        members += page.members
        assert len(page.members) <= limit
        if page.cursor is None:
            return members, pages
        assert page.cursor == page.members[-1].user
        after = page.cursor
        assert len(pages) < 10_000, "the cursor does not advance"


async def _join_many(p: Presence, room: str, entries: list[PresenceEntry]) -> None:
    for i in range(0, len(entries), 50):  # a few concurrent joins, as from many clients
        await asyncio.gather(*(p.join(room, e) for e in entries[i:i + 50]))


class PresenceContract:
    """Provide ``backend`` and ``backend_pair`` (two replicas on one broker; one shared backend
    for a single-process store). Presence is per connection; a user leaves with their last
    connection; counts and pages are exact across replicas. With ``footprint`` (see :data:`Footprint`)
    it also checks that join/leave churn stores nothing."""

    async def test_join_and_leave_churn_leaves_nothing(self, backend: Backend, footprint: Footprint) -> None:
        before = await footprint()
        p = backend.presence
        for i in range(10):
            room = unique_room("churn")
            assert await p.members(room) == []
            assert await p.join(room, PresenceEntry("alice", f"s{i}a", "n1")) is True
            assert await p.join(room, PresenceEntry("bob", f"s{i}b", "n2")) is True
            assert len(await p.members(room)) == 2
            assert await p.leave(room, f"s{i}a") == "alice"
            assert await p.leave(room, f"s{i}b") == "bob"
            assert await p.leave(room, "never-joined") is None
            assert await p.members(room) == []
        assert await footprint() == before

    async def test_join_and_leave_per_user(self, backend: Backend) -> None:
        room = unique_room()
        p = backend.presence
        assert await p.join(room, PresenceEntry("alice", "s1", "n1")) is True
        assert await p.join(room, PresenceEntry("alice", "s2", "n1")) is False  # second tab
        assert await p.join(room, PresenceEntry("bob", "s3", "n2", {"name": "Bob"})) is True
        members = await p.members(room)
        assert sorted((m.user, m.session) for m in members) == [("alice", "s1"), ("alice", "s2"), ("bob", "s3")]
        assert next(m for m in members if m.user == "bob").info == {"name": "Bob"}
        assert await p.leave(room, "s1") is None  # alice still has s2
        assert await p.leave(room, "s2") == "alice"
        assert await p.leave(room, "s2") is None  # idempotent
        assert [m.user for m in await p.members(room)] == ["bob"]

    async def test_rooms_are_separate(self, backend: Backend) -> None:
        a, b = unique_room(), unique_room()
        await backend.presence.join(a, PresenceEntry("alice", "s1", "n1"))
        assert await backend.presence.members(b) == []
        assert await backend.presence.count(b) == PresenceCount(0, 0)
        assert await backend.presence.page(b, None, 10) == PresencePage([], None, PresenceCount(0, 0))

    async def test_two_connections_of_a_user_count_once(self, backend_pair: BackendPair) -> None:
        (a, _), (b, _) = backend_pair
        room = unique_room()
        assert await a.presence.join(room, PresenceEntry("alice", "s1", "na", {"name": "Alice"})) is True
        assert await b.presence.join(room, PresenceEntry("alice", "s2", "nb", {"name": "Alice"})) is False
        assert await a.presence.join(room, PresenceEntry("bob", "s3", "na")) is True
        for p in (a.presence, b.presence):
            async def both_seen(p: Presence = p) -> bool:
                return await p.count(room) == PresenceCount(users=2, connections=3)

            await eventually(both_seen)
            page = await p.page(room, None, 10)
            assert page.members == [PresenceMember("alice", 2, {"name": "Alice"}), PresenceMember("bob", 1, {})]
            assert page.cursor is None and page.count == PresenceCount(2, 3)
        assert await b.presence.leave(room, "s2") is None
        assert await a.presence.count(room) == PresenceCount(2, 2)  # read your writes: a wrote s1, s3

    async def test_count_and_pages_exact_across_replicas(self, backend_pair: BackendPair) -> None:
        """1,000 members, half joined on each replica: pages of 37 from either replica list every
        member once, in user id order; the counts agree."""
        (a, _), (b, _) = backend_pair
        room = unique_room()
        users = [f"user-{i:04d}-{uuid.uuid4().hex[:4]}" for i in range(1000)]
        entries = [PresenceEntry(u, f"s-{u}", ("na", "nb")[i % 2], {"name": u.upper()}) for i, u in enumerate(users)]
        await asyncio.gather(_join_many(a.presence, room, entries[0::2]), _join_many(b.presence, room, entries[1::2]))
        for p in (a.presence, b.presence):
            async def all_seen(p: Presence = p) -> bool:
                return await p.count(room) == PresenceCount(1000, 1000)

            await eventually(all_seen)
            members, pages = await _scan_pages(p, room, 37)
            assert [m.user for m in members] == sorted(users)
            assert all(m.connections == 1 and m.info == {"name": m.user.upper()} for m in members)
            assert len(pages) == 28 and all(pg.count == PresenceCount(1000, 1000) for pg in pages)
        # a user who stays for the whole scan is seen once, while others come and go between pages
        first = await a.presence.page(room, None, 37)
        await b.presence.leave(room, entries[1].session)
        await b.presence.join(room, PresenceEntry("user-0000-aaaa", "late", "nb"))  # sorts before the cursor
        after: str | None = first.cursor
        seen = [m.user for m in first.members]
        while after is not None:
            page = await a.presence.page(room, after, 37)
            seen += [m.user for m in page.members]
            after = page.cursor
        assert len(seen) == len(set(seen)) and seen == sorted(seen)
        stayed = set(users) - {entries[1].user}
        assert stayed <= set(seen)

    async def test_the_last_leave_leaves_nothing_in_the_broker(self, backend_pair: BackendPair) -> None:
        (a, _), (b, _) = backend_pair
        room = unique_room()
        assert isinstance(a.presence, InspectablePresence)
        await a.presence.join(room, PresenceEntry("alice", "s1", "na", {"name": "A"}))
        await b.presence.join(room, PresenceEntry("alice", "s2", "nb"))
        await b.presence.join(room, PresenceEntry("bob", "s3", "nb"))
        assert await a.presence.stored_keys(room) != []
        assert await a.presence.leave(room, "s1") is None
        assert await b.presence.leave(room, "s2") == "alice"
        assert await b.presence.leave(room, "s3") == "bob"
        assert await a.presence.stored_keys(room) == []
        assert await b.presence.count(room) == PresenceCount(0, 0)


#: ``await replica(**options)``: a new started backend on the shared broker (same key prefix)
ReplicaFactory = Callable[..., Awaitable[Backend]]


class PresenceExpiryContract:
    """Provide ``presence_replica`` (a :data:`ReplicaFactory`; the fixture closes what it made) and
    ``broker_ops`` (``await broker_ops()``: how many operations the broker has executed so far).
    For the broker backends, whose replicas can die: upkeep cost and the expiry of a dead replica."""

    #: presence_ttl and presence_interval of the replicas in these tests
    ttl = 1.0
    interval = 0.25

    async def test_a_dead_replica_leaves_within_ttl_and_is_reported_once(
        self, presence_replica: ReplicaFactory,
    ) -> None:
        opts = {"presence_ttl": self.ttl, "presence_interval": self.interval}
        a = await presence_replica(**opts)
        c = await presence_replica(**opts)
        dead = await presence_replica(**opts)
        room, other = unique_room(), unique_room()
        node = f"dead-{uuid.uuid4().hex[:6]}"
        calls: list[tuple[str, str, list[str]]] = []
        a.presence.on_departed(lambda r, users: calls.append(("a", r, sorted(users))))

        async def on_c(r: str, users: Sequence[str]) -> None:  # an async listener works too
            calls.append(("c", r, sorted(users)))

        c.presence.on_departed(on_c)
        await a.presence.join(room, PresenceEntry("anna", "sa", "node-a"))
        await a.presence.join(room, PresenceEntry("shared", "sa2", "node-a"))
        doomed = [f"d{i}" for i in range(30)]
        for u in doomed:
            await dead.presence.join(room, PresenceEntry(u, f"s-{u}", node))
        await dead.presence.join(room, PresenceEntry("shared", "sd2", node))  # stays: also on a
        await dead.presence.join(other, PresenceEntry("d0", "s-other", node))

        async def before() -> bool:
            return await a.presence.count(room) == PresenceCount(32, 33)

        await eventually(before)
        await dead.bus.close()  # upkeep stops; nothing is left: as a SIGKILL looks to the broker
        started = asyncio.get_running_loop().time()

        async def gone() -> bool:
            return (await a.presence.count(room) == PresenceCount(2, 2)
                    and await c.presence.count(other) == PresenceCount(0, 0))

        await eventually(gone, timeout=self.ttl + self.interval + 3.0)
        took = asyncio.get_running_loop().time() - started
        assert took < self.ttl + self.interval + 3.0
        await eventually(lambda: _true(len(calls) >= 2))
        await asyncio.sleep(self.ttl + 2 * self.interval)  # no second report from another replica
        assert len({who for who, _, _ in calls}) == 1, calls
        assert sorted((r, users) for _, r, users in calls) == sorted([(room, sorted(doomed)), (other, ["d0"])])
        assert isinstance(a.presence, InspectablePresence)
        assert await a.presence.stored_keys(other) == []
        page = await c.presence.page(room, None, 10)
        assert [(m.user, m.connections) for m in page.members] == [("anna", 1), ("shared", 1)]

    async def test_upkeep_round_trips_do_not_grow_with_entries(
        self, presence_replica: ReplicaFactory, broker_ops: Callable[[], Awaitable[int]],
    ) -> None:
        """Idle replicas cost the same broker operations per interval with 2 entries and with 600
        entries in 120 rooms (no per-entry or per-room refresh)."""
        opts = {"presence_ttl": self.ttl, "presence_interval": self.interval}
        a = await presence_replica(**opts)
        b = await presence_replica(**opts)
        await a.presence.join(unique_room(), PresenceEntry("u", "s0", "node-a"))
        await b.presence.join(unique_room(), PresenceEntry("v", "s1", "node-b"))
        window = 8 * self.interval

        async def ops_in_window() -> int:
            start = await broker_ops()
            await asyncio.sleep(window)
            return await broker_ops() - start

        few = await ops_in_window()
        rooms = [unique_room() for _ in range(120)]
        for i in range(600):
            replica = (a, b)[i % 2]
            await replica.presence.join(rooms[i % 120], PresenceEntry(f"u{i}", f"s-{i}", f"node-{'ab'[i % 2]}"))
        many = await ops_in_window()
        assert few > 0  # the counter sees upkeep
        # jitter: one interval more or less of each replica's heartbeat and watchdog in the window
        assert many <= few * 1.5 + 4, (few, many)


async def _true(value: bool) -> bool:
    return value


class StateStoreContract:
    """Provide ``backend``. Compare-and-set never loses a write."""

    async def test_versions_start_at_one_and_increase(self, backend: Backend) -> None:
        room = unique_room()
        assert await backend.state.get(room) is None
        assert await backend.state.compare_and_set(room, 0, {"a": 1}) == 1
        assert await backend.state.get(room) == (1, {"a": 1})
        assert await backend.state.compare_and_set(room, 1, {"a": 2}) == 2
        assert await backend.state.get(room) == (2, {"a": 2})

    async def test_a_stale_version_conflicts_and_changes_nothing(self, backend: Backend) -> None:
        room = unique_room()
        await backend.state.compare_and_set(room, 0, {"n": 0})
        with pytest.raises(StateConflict):
            await backend.state.compare_and_set(room, 0, {"n": 99})
        assert await backend.state.get(room) == (1, {"n": 0})

    async def test_concurrent_increments_lose_nothing(self, backend: Backend) -> None:
        room = unique_room()
        await backend.state.compare_and_set(room, 0, {"n": 0})

        async def increment() -> None:
            while True:
                found = await backend.state.get(room)
                assert found is not None
                version, doc = found
                try:
                    await backend.state.compare_and_set(room, version, {"n": doc["n"] + 1})
                    return
                except StateConflict:
                    await asyncio.sleep(0)

        await asyncio.gather(*(increment() for _ in range(20)))
        assert await backend.state.get(room) == (21, {"n": 20})

    async def test_returned_documents_are_copies(self, backend: Backend) -> None:
        room = unique_room()
        doc = {"list": [1]}
        await backend.state.compare_and_set(room, 0, doc)
        doc["list"].append(2)
        found = await backend.state.get(room)
        assert found is not None and found[1] == {"list": [1]}

    async def test_delete_forgets_the_room(self, backend: Backend) -> None:
        room = unique_room()
        await backend.state.compare_and_set(room, 0, {"x": 1})
        await backend.state.delete(room)
        assert await backend.state.get(room) is None


async def memory_footprint(backend: Backend) -> list[str]:
    """The :data:`Footprint` of a backend whose history and presence are the built-in memory ones
    (:func:`wirehub.memory_backend`, or a bus plugin wrapping it): the rooms with a log or a roster."""
    from wirehub.builtins.bus.memory import MemoryHistory, MemoryPresence

    history, presence = backend.history, backend.presence
    assert isinstance(history, MemoryHistory) and isinstance(presence, MemoryPresence), backend
    return sorted([f"h:{r}" for r in history._rooms] + [f"p:{r}" for r in presence._rooms])


__all__ = [
    "BackendPair",
    "BrokerFactory",
    "BusContract",
    "BusUnavailable",
    "FakeTransport",
    "Footprint",
    "HistoryContract",
    "LiveServer",
    "PresenceContract",
    "PresenceExpiryContract",
    "Recorder",
    "ReplicaFactory",
    "StateStoreContract",
    "WsClient",
    "config_for_tests",
    "eventually",
    "free_port",
    "memory_footprint",
    "nats_server",
    "nats_server_factory",
    "redis_server",
    "redis_server_factory",
    "unique_room",
    "ws_connect",
]


# -- brokers (issue 5: Redis and NATS buses) -------------------------------------------------------------------
#
# ``redis_server`` / ``nats_server``: one broker per test session, shared; never kill or pause it.
# ``redis_server_factory`` / ``nats_server_factory``: ``factory(**kwargs)`` starts a broker of the
# test's own (a :class:`wirehub.brokers.RedisServer` / ``NatsServer``), closed after the test; use
# these to kill, stop, restart, pause or resume a broker.

from collections.abc import Iterator  # noqa: E402

from wirehub.brokers import BrokerProcess, NatsServer, RedisServer  # noqa: E402

BrokerFactory = Callable[..., BrokerProcess]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server on a free port, shared by the test session (do not kill or pause it)."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A nats-server -js on a free port, shared by the test session (do not kill or pause it)."""
    server = NatsServer()
    server.start()
    yield server
    server.close()


def _factory(cls: type[BrokerProcess]) -> Iterator[Callable[..., BrokerProcess]]:
    started: list[BrokerProcess] = []

    def make(**kwargs: Any) -> BrokerProcess:
        server = cls(**kwargs)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.close()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., BrokerProcess]]:
    """``redis_server_factory(appendonly=True)``: a Redis of this test's own, closed after it."""
    yield from _factory(RedisServer)


@pytest.fixture
def nats_server_factory() -> Iterator[Callable[..., BrokerProcess]]:
    """``nats_server_factory()``: a NATS (JetStream) of this test's own, closed after it."""
    yield from _factory(NatsServer)
