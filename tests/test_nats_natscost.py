"""What a followed room costs a NATS replica (issue 15): a room's live subscription and its presence copy are lanes
of one dispatcher per connection (nats_acks.Lanes), not nats-py subscriptions with a task and a queue each, and a
room's history tail holds no deque until it holds a message. The guarantees stay: per-room order, a full lane
drops and reports itself alone (the room is read again), an unsubscribe frees the room's state."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import pytest

from tests.helpers import bus_options, nats_replicas, started_nats
from wirehub import PresenceCount, PresenceEntry
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus import nats_acks
from wirehub.builtins.bus.nats_acks import Lane, Lanes
from wirehub.builtins.bus.nats_presence import NatsPresence
from wirehub.builtins.bus.nats_tail import Tails
from wirehub.testing import eventually, unique_room

Make = Callable[..., Any]


@pytest.fixture
async def make(nats_server: BrokerProcess) -> AsyncIterator[Make]:
    async with started_nats() as start:
        yield lambda prefix, **extra: start(bus_options("nats", nats_server, prefix, **extra))


async def _until(check: Callable[[], bool]) -> None:
    async def done() -> bool:
        return check()
    await eventually(done)


def _prefix() -> str:
    return f"nc{uuid.uuid4().hex[:8]}"


async def test_followed_rooms_and_presence_copies_start_no_task_per_room(nats_server: BrokerProcess) -> None:
    """40 rooms followed, each with a presence copy: no asyncio task per room (before: one per subscription,
    two per room), and messages still reach every room in order."""
    async with nats_replicas(nats_server, _prefix()) as replica:
        a = await replica()
        rooms = [unique_room() for _ in range(40)]
        await a.bus.subscribe(rooms[0])
        assert await a.presence.join(rooms[0], PresenceEntry("u0", "s0", "node-a"))
        assert await a.presence.count(rooms[0]) == PresenceCount(1, 1)
        tasks = len(asyncio.all_tasks())
        subs = len(a.bus.nc._subs)
        for i, room in enumerate(rooms[1:], 1):
            await a.bus.subscribe(room)
            assert await a.presence.join(room, PresenceEntry(f"u{i}", f"s{i}", "node-a"))
            assert await a.presence.count(room) == PresenceCount(1, 1)
        await asyncio.sleep(0.1)
        assert len(a.bus.nc._subs) == subs + 2 * 39  # still one interest per room and kind on the server
        assert len(asyncio.all_tasks()) < tasks + 10
        received: list[tuple[str, bytes]] = []
        real = a.bus._deliver
        a.bus._deliver = lambda room, data, offset: (received.append((room, data)), real(room, data, offset))
        for i in range(3):
            for room in rooms:
                await a.bus.publish(room, b"m%d" % i)
        await _until(lambda: len(received) == 3 * len(rooms))
        for room in rooms:
            assert [d for r, d in received if r == room] == [b"m0", b"m1", b"m2"]


async def test_a_full_lane_drops_and_reports_that_lane_alone(nats_server: BrokerProcess) -> None:
    """A lane past its pending limit: nats-py drops the rest and reports a slow consumer naming that lane's sid
    (and the lane); another lane of the same dispatcher gets all of its messages; the queued ones are delivered
    in order and the pending counts go back to 0."""
    sub_nc = await nats.connect(nats_server.url)
    pub_nc = await nats.connect(nats_server.url)
    slow: list[tuple[int, Any]] = []

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            slow.append((exc.sid, exc.sub))

    sub_nc._error_cb = on_error
    try:
        lanes = Lanes(sub_nc)
        assert lanes.native
        got: dict[str, list[bytes]] = {"a": [], "b": []}
        a = await lanes.subscribe("nc.a", lambda msg: got["a"].append(msg.data), pending_msgs_limit=3)
        b = await lanes.subscribe("nc.b", lambda msg: got["b"].append(msg.data), pending_msgs_limit=3)
        await sub_nc.flush()
        assert isinstance(a, Lane) and a._id != b._id
        # 20 messages of nc.a parsed in one read (as nats-py's parser hands them over: no drain in between)
        for i in range(20):
            await sub_nc._process_msg(a._id, b"nc.a", b"", b"a%02d" % i, b"")
        await pub_nc.publish("nc.b", b"b0")
        await pub_nc.flush()
        await _until(lambda: got["b"] == [b"b0"])
        assert slow and {sid for sid, _ in slow} == {a._id} and all(s is a for _, s in slow)
        assert got["a"] == [b"a%02d" % i for i in range(3)]  # the queued prefix, in order
        assert a.pending_msgs == a._pending_queue.qsize() == 0 and a._pending_size == 0
        # the lane goes on once drained
        await pub_nc.publish("nc.a", b"later")
        await pub_nc.flush()
        await _until(lambda: got["a"][-1:] == [b"later"])
        await a.unsubscribe()
        assert a._id not in sub_nc._subs and b._id in sub_nc._subs
        await pub_nc.publish("nc.a", b"gone")
        await pub_nc.publish("nc.b", b"b1")
        await pub_nc.flush()
        await _until(lambda: got["b"] == [b"b0", b"b1"])
        assert got["a"][-1] == b"later"
    finally:
        await pub_nc.close()
        await sub_nc.close()


async def test_a_full_room_is_read_again_and_the_other_rooms_are_not(make: Make) -> None:
    """Through the bus: the room whose lane overflowed is read from the stream (every message once, in order);
    a room beside it that never overflowed needs no read."""
    prefix = _prefix()
    reader, recorder = await make(prefix)
    writer, _ = await make(prefix)
    reader.pending_msgs_limit = 2
    busy, quiet = unique_room(), unique_room()
    await reader.subscribe(busy)
    await reader.subscribe(quiet)
    slowed: list[str] = []
    real_slow = reader._slow

    def spy(sid: int) -> None:
        slowed.append(reader._by_sid[sid])
        real_slow(sid)

    reader._slow = spy
    sent = await asyncio.gather(*(writer.publish(busy, b"m%03d" % i) for i in range(300)))
    assert sent == [None] * 300
    await writer.publish(quiet, b"q0")
    assert await recorder.wait_for(busy, 300, timeout=10) == [b"m%03d" % i for i in range(300)]
    assert await recorder.wait_for(quiet, 1) == [b"q0"]
    assert slowed and set(slowed) == {busy}
    assert reader.gap_fills >= 1


async def test_unsubscribing_frees_the_rooms_state(nats_server: BrokerProcess) -> None:
    """Rooms followed with presence copies, then left: the server interests, the lanes, the live and tail
    state and the presence copies of those rooms are all gone, and nothing stays queued."""
    async with nats_replicas(nats_server, _prefix()) as replica:
        a = await replica()
        p = a.presence
        assert isinstance(p, NatsPresence)
        bus = a.bus
        subs, tasks = len(bus.nc._subs), len(asyncio.all_tasks())
        rooms = [unique_room() for _ in range(20)]
        for i, room in enumerate(rooms):
            await bus.subscribe(room)
            await bus.publish(room, b"h", history=True)
            assert await p.join(room, PresenceEntry(f"u{i}", f"s{i}", "node-a"))
            assert await p.count(room) == PresenceCount(1, 1)
        assert len(bus.nc._subs) == subs + 40
        for i, room in enumerate(rooms):
            await p.leave(room, f"s{i}")
            await bus.unsubscribe(room)
        await _until(lambda: len(bus.nc._subs) == subs)
        assert not any(room in bus._followed or room in bus._subs or bus.tails.get(room) for room in rooms)
        assert not bus._by_sid
        assert not p._subs and not any(room in p._rooms for room in rooms)
        assert not bus.lanes._queue
        assert len(asyncio.all_tasks()) < tasks + 10  # none left per room


def test_a_tail_without_history_holds_no_deque() -> None:
    """Most followed rooms hold no history message: their tails cost no deque (about 760 bytes each)."""
    tails = Tails(history_size=100, history_ttl=3600)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        started = [tails.start(f"room-{i}") for i in range(1000)]
        per_room = (tracemalloc.get_traced_memory()[0] - before) / 1000
    finally:
        tracemalloc.stop()
    assert per_room < 400, per_room
    tail = started[0]
    assert tail is not None and tail.range(0, 1) is None
    tails.add("room-0", 5, 1, b"x", False, time.time())
    tails.add("room-0", 6, 2, b"y", False, time.time())
    assert tail.range(0, 2) == [e for e in tail.entries] and len(tail.entries) == 2


async def test_without_nats_py_internals_a_lane_is_a_subscription(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """A nats-py without the internals a lane relies on: each room gets a nats-py subscription of its own (the
    old cost), and delivery and the slow-consumer path are as before."""
    monkeypatch.setattr(nats_acks, "_native", lambda nc: False)
    prefix = _prefix()
    reader, recorder = await make(prefix)
    writer, _ = await make(prefix)
    assert reader.lanes is not None and not reader.lanes.native
    reader.pending_msgs_limit = 2
    slowed: list[int] = []
    real_slow = reader._slow

    def spy(sid: int) -> None:
        slowed.append(sid)
        real_slow(sid)

    reader._slow = spy
    room = unique_room()
    await reader.subscribe(room)
    assert not isinstance(reader._followed[room].sub, Lane)
    await asyncio.gather(*(writer.publish(room, b"m%03d" % i) for i in range(200)))
    assert await recorder.wait_for(room, 200, timeout=10) == [b"m%03d" % i for i in range(200)]
    assert slowed, "the nats-py subscription kept its pending limit: a full one is read again"


async def test_a_lane_s_failure_unsubscribe_close_drain_and_unlimited_pending(nats_server: BrokerProcess) -> None:
    """The dispatcher's guards, on a real connection: a handler that raises costs its own message only (the
    other lanes' go on); an unsubscribe drops what of it is still queued, and so does the dispatcher's close;
    a pending limit of 0 is no limit (as a nats-py subscription's); nats-py's ``drain`` delivers what is queued
    and then ends the lane."""
    sub_nc = await nats.connect(nats_server.url)
    try:
        lanes = Lanes(sub_nc)
        got: dict[str, list[bytes]] = {"bad": [], "good": [], "gone": [], "free": []}

        def bad(msg: Any) -> None:
            got["bad"].append(msg.data)
            raise RuntimeError("a handler's bug")

        lane_bad = await lanes.subscribe("nc.bad", bad, pending_msgs_limit=10)
        lane_good = await lanes.subscribe("nc.good", lambda m: got["good"].append(m.data), pending_msgs_limit=10)
        lane_gone = await lanes.subscribe("nc.gone", lambda m: got["gone"].append(m.data), pending_msgs_limit=10)
        free = await lanes.subscribe("nc.free", lambda m: got["free"].append(m.data), pending_msgs_limit=0)
        for i in range(3):  # interleaved in one read: no dispatch in between
            await sub_nc._process_msg(lane_bad._id, b"nc.bad", b"", b"x%d" % i, b"")
            await sub_nc._process_msg(lane_good._id, b"nc.good", b"", b"g%d" % i, b"")
            await sub_nc._process_msg(lane_gone._id, b"nc.gone", b"", b"q%d" % i, b"")
        for i in range(50):
            await sub_nc._process_msg(free._id, b"nc.free", b"", b"f%d" % i, b"")
        await lane_gone.unsubscribe()  # its three are still queued: dropped
        await _until(lambda: len(got["good"]) == 3)
        assert got["bad"] == [b"x0", b"x1", b"x2"] and got["good"] == [b"g0", b"g1", b"g2"]
        assert got["gone"] == [] and lane_gone.pending_msgs == 0
        assert got["free"] == [b"f%d" % i for i in range(50)]
        # the connection goes: what is queued is not delivered
        await sub_nc._process_msg(lane_good._id, b"nc.good", b"", b"late", b"")
        lanes.close()
        await asyncio.sleep(0.05)
        assert got["good"] == [b"g0", b"g1", b"g2"] and not lanes._queue
    finally:
        await sub_nc.close()
    drained_nc = await nats.connect(nats_server.url)
    lanes = Lanes(drained_nc)
    seen: list[bytes] = []
    lane = await lanes.subscribe("nc.drain", lambda m: seen.append(m.data), pending_msgs_limit=10)
    for i in range(3):
        await drained_nc._process_msg(lane._id, b"nc.drain", b"", b"d%d" % i, b"")
    await asyncio.wait_for(drained_nc.drain(), 5)  # raised AttributeError with a lane before
    assert seen == [b"d0", b"d1", b"d2"] and drained_nc.is_closed and lane._id not in drained_nc._subs
