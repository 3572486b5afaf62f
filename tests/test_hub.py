"""The hub and sessions without sockets: subscriptions, encode-once fan-out, the byte cap, recovery gates."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from wirehub.auth import Identity
from wirehub.builtins.bus.memory import create_backend
from wirehub.bus import Backend, BusUnavailable, HistoryPage
from wirehub.hub import Hub, envelope, split_envelope
from wirehub.metrics import Metrics
from wirehub.session import OutFrame, Session
from wirehub.testing import FakeTransport


class CountingBus:
    """Wraps the memory bus to count subscribe/unsubscribe calls."""

    def __init__(self, backend: Backend) -> None:
        self.inner = backend.bus
        self.calls: list[tuple[str, str]] = []

    @property
    def healthy(self) -> bool:
        return self.inner.healthy

    async def start(self, handler: Any) -> None:
        await self.inner.start(handler)

    async def close(self) -> None:
        await self.inner.close()

    async def publish(self, room: str, payload: bytes, *, history: bool = False) -> int | None:
        return await self.inner.publish(room, payload, history=history)

    async def subscribe(self, room: str) -> None:
        self.calls.append(("subscribe", room))
        await asyncio.sleep(0.01)  # let concurrent joins overlap
        await self.inner.subscribe(room)

    async def unsubscribe(self, room: str) -> None:
        self.calls.append(("unsubscribe", room))
        await self.inner.unsubscribe(room)


async def make_hub() -> tuple[Hub, CountingBus]:
    backend = create_backend({}, "bus.memory")
    counting = CountingBus(backend)
    backend.bus = counting
    hub = Hub(backend, Metrics())
    await counting.start(hub)
    hub.on_bus_state(True)
    return hub, counting


def session(cap: int = 1 << 20, user: str = "u") -> tuple[Session, FakeTransport]:
    t = FakeTransport()
    return Session(t, Identity(user=user), endpoint="/ws/test", node="n1", max_queue_bytes=cap), t


async def test_subscribes_once_per_room_and_unsubscribes_after_the_last_member() -> None:
    hub, bus = await make_hub()
    members = [session()[0] for _ in range(5)]
    await asyncio.gather(*(hub.join("lobby", s) for s in members))
    assert bus.calls == [("subscribe", "lobby")]
    for s in members[:-1]:
        await hub.leave("lobby", s)
    assert bus.calls == [("subscribe", "lobby")]
    await hub.leave_all(members[-1])
    assert bus.calls == [("subscribe", "lobby"), ("unsubscribe", "lobby")]
    assert hub.rooms() == []
    await hub.join("lobby", members[0])
    assert bus.calls[-1] == ("subscribe", "lobby")


async def test_fan_out_writes_one_encoded_frame_to_every_member_but_the_origin() -> None:
    hub, _ = await make_hub()
    (a, ta), (b, tb), (c, tc) = session(), session(), session()
    for s in (a, b, c):
        await hub.join("r", s)
    offset = await hub.publish("r", b'{"op":"message","data":1}', origin=a, history=True)
    assert ta.frames == []
    assert tb.texts() == [b'{"op":"message","data":1,"offset":%d}' % offset]
    assert tb.frames[0] is tc.frames[0]  # the same OutFrame object: encoded and framed once


async def test_send_queue_over_the_cap_closes_with_4008_and_stops_queueing() -> None:
    s, t = session(cap=2048)
    frame = OutFrame(b"x" * 1000)
    assert s.send_frame(frame) and s.send_frame(frame)
    assert not s.send_frame(frame)
    assert t.closed_with is not None and t.closed_with[0] == 4008
    assert "retry_ms=" in t.closed_with[1]
    assert not s.send_frame(frame)
    assert len(t.frames) == 2 and t.queued <= 2048 + 20


async def test_hold_and_release_replay_without_duplicates() -> None:
    s, t = session()
    s.hold("r")
    for offset in (4, 5, 6):
        s.deliver("r", OutFrame(b"%d" % offset), offset)
    s.deliver("other", OutFrame(b"other"), None)
    assert t.texts() == [b"other"]
    s.send_frame(OutFrame(b"replayed 4 and 5"))
    assert s.release("r", after=5) == 1
    assert t.texts() == [b"other", b"replayed 4 and 5", b"6"]
    s.deliver("r", OutFrame(b"7"), 7)
    assert t.texts()[-1] == b"7"


def test_envelope_round_trip() -> None:
    s, _ = session()
    origin, ts, frame = split_envelope(envelope(b'{"a":"x\\ny"}', s, ts=12.5))
    assert (origin, ts, frame) == (s.id_bytes, 12500, b'{"a":"x\\ny"}')
    assert split_envelope(envelope(b"{}"))[0] == b""


async def test_bus_messages_are_parsed_as_the_envelope_says_and_malformed_ones_dropped() -> None:
    """The fan-out parses the envelope inline (once per bus message): what split_envelope and with_offset
    define is what members get; a payload without the header line or with a bad timestamp is dropped and
    counted, without moving the room's offset, and the room goes on."""
    hub, _ = await make_hub()
    (a, ta), (b, tb) = session(), session()
    for s in (a, b):
        await hub.join("r", s)
    hub.on_bus_message("r", b"no header line", 7)
    hub.on_bus_message("r", b"x notatime\n{}", 8)
    assert ta.frames == [] and tb.frames == []
    assert hub.metrics.dropped.labels("malformed")._value.get() == 2
    assert hub.position("r") == (0, hub._rooms["r"].epoch)
    hub.on_bus_message("r", envelope(b'{"op":"message","d":"a\nb"}', a, ts=1.0), 9)  # a raw newline in the frame
    hub.on_bus_message("r", b" 0\n" + b'{"op":"x"}', None)  # no timestamp, no offset: no latency, as it is
    hub.on_bus_message("r", b"\n\x00binary", 10)  # not a JSON object: no offset spliced in
    assert ta.texts() == [b'{"op":"x"}', b"\x00binary"]
    assert tb.texts() == [b'{"op":"message","d":"a\nb","offset":9}', b'{"op":"x"}', b"\x00binary"]
    assert hub.position("r") == (10, hub._rooms["r"].epoch)
    assert hub.metrics.latency.counts[-1] + sum(hub.metrics.latency.counts[:-1]) == 1  # only the one with a ts


async def test_join_fails_cleanly_when_the_bus_is_down() -> None:
    hub, bus = await make_hub()

    async def down(room: str) -> None:
        raise BusUnavailable("down")

    bus.subscribe = down  # type: ignore[method-assign]
    s, _ = session()
    try:
        await hub.join("r", s)
    except BusUnavailable:
        pass
    else:
        raise AssertionError("join must raise BusUnavailable")
    assert s.rooms == set() and hub.members("r") == []


async def test_repair_after_an_outage_replays_missed_messages_in_order() -> None:
    hub, bus = await make_hub()
    s, t = session()
    await hub.join("r", s)
    await hub.publish("r", b'{"n":1}', history=True)
    hub.on_bus_state(False)
    # While "down", two messages reach history but not this replica.
    await bus.inner.unsubscribe("r")
    await hub.publish("r", b'{"n":2}', history=True)
    await hub.publish("r", b'{"n":3}', history=True)
    await bus.inner.subscribe("r")
    hub.on_bus_state(True)
    await hub.publish("r", b'{"n":4}', history=True)  # live, arrives while the repair runs
    await asyncio.sleep(0.05)
    assert t.texts() == [b'{"n":1,"offset":1}', b'{"n":2,"offset":2}', b'{"n":3,"offset":3}', b'{"n":4,"offset":4}']


async def test_repair_that_history_cannot_cover_sends_gap() -> None:
    hub, _ = await make_hub()
    s, t = session()
    await hub.join("r", s)
    await hub.publish("r", b'{"n":1}', history=True)

    async def lost(room: str, after: int | None, limit: int) -> HistoryPage:
        return HistoryPage("new-epoch", 5, [], False)  # even the new epoch's start was trimmed

    hub.backend.history.read = lost  # type: ignore[method-assign]
    hub.on_bus_state(False)
    hub.on_bus_state(True)
    await asyncio.sleep(0.05)
    assert t.texts()[-1] == b'{"op":"gap","room":"r","epoch":"new-epoch","offset":5}'


async def test_repair_across_a_lost_history_replays_the_new_epoch_from_its_start() -> None:
    """A broker restarted without persistence: new epoch, offsets counting again (here from 2). The
    old epoch's tail is a gap; the new epoch's messages, all in its history, follow the gap."""
    hub, _ = await make_hub()
    s, t = session()
    s.hold("r")
    await hub.join("r", s)
    await hub.publish("r", b'{"n":1}', history=True)
    s.release("r", 1)  # a join's duplicate floor at offset 1: it must not drop the new epoch's offsets
    reads: list[int | None] = []

    async def new_epoch(room: str, after: int | None, limit: int) -> HistoryPage:
        reads.append(after)
        msgs = [(2, b' 0\n{"n":"new2"}'), (3, b' 0\n{"n":"new3"}')]
        return HistoryPage("after-restart", 3, [m for m in msgs if m[0] > (after or 0)], True)

    hub.backend.history.read = new_epoch  # type: ignore[method-assign]
    hub.on_bus_state(False)
    hub.on_bus_state(True)
    await asyncio.sleep(0.05)
    assert reads == [1, 0]
    assert t.texts()[-3:] == [b'{"op":"gap","room":"r","epoch":"after-restart","offset":0}',
                              b'{"n":"new2","offset":2}', b'{"n":"new3","offset":3}']


async def test_a_repair_interrupted_by_another_outage_starts_over_from_what_was_delivered() -> None:
    hub, bus = await make_hub()
    s, t = session()
    await hub.join("r", s)
    await hub.publish("r", b'{"n":1}', history=True)
    hub.on_bus_state(False)
    await bus.inner.unsubscribe("r")
    await hub.publish("r", b'{"n":2}', history=True)  # missed: only history has it
    await bus.inner.subscribe("r")
    original = hub.backend.history.read
    calls = 0

    async def failing_once(room: str, after: int | None, limit: int) -> HistoryPage:
        nonlocal calls
        calls += 1
        if calls == 1:
            hub.on_bus_state(False)  # the broker went away again during the read
            raise BusUnavailable("down again")
        return await original(room, after, limit)

    hub.backend.history.read = failing_once  # type: ignore[method-assign]
    hub.on_bus_state(True)
    await asyncio.sleep(0.05)
    assert t.texts() == [b'{"n":1,"offset":1}']  # held back while the bus is down
    await hub.publish("r", b'{"n":3}', history=True)  # reaches the backlog, then history again
    hub.on_bus_state(True)
    await asyncio.sleep(0.4)
    assert t.texts() == [b'{"n":1,"offset":1}', b'{"n":2,"offset":2}', b'{"n":3,"offset":3}']


async def test_late_live_copies_of_replayed_messages_are_not_delivered_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """History reads and pub/sub are different broker connections: the repair may read (and replay) a message
    whose live copy arrives only after the repair ended (seen on Redis after a restart: one message twice)."""
    hub, _ = await make_hub()
    s, t = session()
    await hub.join("r", s)
    await hub.publish("r", b'{"n":1}', history=True)
    new = [(1, b' 0\n{"n":"new1"}'), (2, b' 0\n{"n":"new2"}')]

    async def new_epoch(room: str, after: int | None, limit: int) -> HistoryPage:
        return HistoryPage("after-restart", 2, [m for m in new if m[0] > (after or 0)], True)

    hub.backend.history.read = new_epoch  # type: ignore[method-assign]
    hub.on_bus_state(False)
    hub.on_bus_state(True)
    await asyncio.sleep(0.05)  # the repair is over: gap, new1, new2
    for offset, payload in new:  # their live copies, late
        hub.on_bus_message("r", payload, offset)
    hub.on_bus_message("r", b' 0\n{"n":"new3"}', 3)
    hub.on_bus_message("r", b' 0\n{"n":"new4"}', 4)
    assert t.texts()[1:] == [b'{"op":"gap","room":"r","epoch":"after-restart","offset":0}',
                             b'{"n":"new1","offset":1}', b'{"n":"new2","offset":2}',
                             b'{"n":"new3","offset":3}', b'{"n":"new4","offset":4}']
    # the floor lasts only until a newer message passed it, or for REPAIR_FLOOR seconds
    hub.on_bus_message("r", b' 0\n{"n":"restarted1"}', 1)
    assert t.texts()[-1] == b'{"n":"restarted1","offset":1}'
    monkeypatch.setattr("wirehub.hub.REPAIR_FLOOR", 0.0)
    hub.on_bus_state(False)
    hub.on_bus_state(True)
    await asyncio.sleep(0.05)
    hub.on_bus_message("r", b' 0\n{"n":"again1"}', 1)
    assert t.texts()[-1] == b'{"n":"again1","offset":1}'


async def test_a_join_waiting_on_a_retiring_room_subscribes_the_new_one() -> None:
    """Last member leaves (unsubscribing) while another joins: the bus ends up subscribed."""
    hub, bus = await make_hub()
    a, _ = session()
    await hub.join("x", a)
    leaving = asyncio.ensure_future(hub.leave("x", a))
    await asyncio.sleep(0)  # a's leave holds the room's lock, unsubscribing
    b, tb = session()
    joining = asyncio.ensure_future(hub.join("x", b))
    await asyncio.gather(leaving, joining)
    assert "x" in bus.inner._rooms  # type: ignore[attr-defined]
    await hub.publish("x", b'{"n":1}')
    assert tb.texts() == [b'{"n":1}']


async def test_a_failing_position_leaves_the_room_unsubscribed() -> None:
    hub, bus = await make_hub()

    async def down(room: str) -> tuple[int, str]:
        raise BusUnavailable("down")

    original = hub.backend.history.position
    hub.backend.history.position = down  # type: ignore[method-assign]
    s, _ = session()
    with pytest.raises(BusUnavailable):
        await hub.join("r", s)
    assert ("subscribe", "r") not in bus.calls and hub.rooms() == [] and s.rooms == set()
    hub.backend.history.position = original  # type: ignore[method-assign]
    await hub.join("r", s)
    assert bus.calls[-1] == ("subscribe", "r")


async def test_a_live_copy_of_a_replayed_message_is_dropped() -> None:
    s, t = session()
    s.hold("r")
    assert s.release("r", after=5) == 0
    for offset in (4, 5, 6):  # 4 and 5 came late over the bus after the replay had sent them
        s.deliver("r", OutFrame(b"%d" % offset), offset)
    assert t.texts() == [b"6"]


async def test_held_messages_count_against_the_cap() -> None:
    s, t = session(cap=2048)
    s.hold("r")
    for i in range(3):
        s.deliver("r", OutFrame(b"x" * 1000), i + 1)
    assert t.closed_with is not None and t.closed_with[0] == 4008


async def test_leave_all_goes_on_after_a_failing_room() -> None:
    hub, bus = await make_hub()
    s, _ = session()
    await hub.join("a", s)
    await hub.join("b", s)

    async def broken(room: str) -> None:
        if room == "a":
            raise RuntimeError("broken unsubscribe")
        await bus.inner.unsubscribe(room)

    bus.unsubscribe = broken  # type: ignore[method-assign]
    await hub.leave_all(s)
    assert hub.members("b") == [] and s.rooms == set()


async def test_a_trimmed_history_gap_leaves_members_just_before_the_first_live_message_held() -> None:
    """Same epoch, but the missed messages were trimmed: gap, placed so that no live message kept
    back during the repair is dropped and none is delivered below the gap's offset."""
    hub, _ = await make_hub()
    s, t = session()
    await hub.join("r", s)
    await hub.publish("r", b'{"n":1}', history=True)
    epoch = (await hub.backend.history.position("r"))[1]

    async def trimmed(room: str, after: int | None, limit: int) -> HistoryPage:
        # while the read runs, offsets 8 and 9 arrive live (7 and below were published during the outage)
        hub.on_bus_message("r", envelope(b'{"n":8}'), 8)
        hub.on_bus_message("r", envelope(b'{"n":9}'), 9)
        return HistoryPage(epoch, 9, [], False)

    hub.backend.history.read = trimmed  # type: ignore[method-assign]
    hub.on_bus_state(False)
    hub.on_bus_state(True)
    await asyncio.sleep(0.05)
    assert t.texts()[1:] == [b'{"op":"gap","room":"r","epoch":"%s","offset":7}' % epoch.encode(),
                             b'{"n":8,"offset":8}', b'{"n":9,"offset":9}']


async def test_a_session_in_one_room_keeps_the_name_and_a_set_only_for_two() -> None:
    hub, _ = await make_hub()
    s, _ = session()
    await hub.join("a", s)
    assert s.rooms == {"a"} and s._rooms == "a"  # a set would cost 216 bytes per member of a big room
    await hub.join("b", s)
    assert s.rooms == {"a", "b"}
    await hub.leave("a", s)
    assert s.rooms == {"b"} and s._rooms == "b"
    await hub.leave("b", s)
    assert s.rooms == set() and s._rooms is None


async def test_a_join_the_hub_has_fanned_out_past_needs_no_duplicate_floor() -> None:
    hub, _ = await make_hub()
    s, t = session()
    await hub.publish("r", b'{"n":1}', history=True)
    s.hold("r")
    await hub.join("r", s)
    top, epoch = await hub.backend.history.position("r")
    assert not hub.behind("r", epoch, top)
    assert hub.behind("r", "another epoch", top) and hub.behind("other room", epoch, 0)
    s.release("r", top, floor=hub.behind("r", epoch, top))
    assert s._floor is None and s._held is None  # no dict per member of a big room
    await hub.publish("r", b'{"n":2}', history=True)
    assert t.texts() == [b'{"n":2,"offset":2}']


async def test_a_floor_drops_late_live_copies_until_a_newer_message_passes_it() -> None:
    """The bus delivers to this replica later than the joiner read history (a Redis or NATS
    subscription lags): copies of what the join replayed come after it, and are dropped."""
    hub, _ = await make_hub()
    first, _ = session()
    await hub.join("r", first)
    history = hub.backend.history
    stored = [envelope(b'{"n":%d}' % n) for n in (1, 2, 3)]
    for payload in stored:  # stored, not yet delivered here
        history.append("r", payload)  # type: ignore[attr-defined]
    s, t = session()
    s.hold("r")
    await hub.join("r", s)
    top, epoch = await history.position("r")
    assert top == 3 and hub.behind("r", epoch, top)
    s.release("r", top, floor=hub.behind("r", epoch, top))
    for offset, payload in enumerate(stored, 1):
        hub.on_bus_message("r", payload, offset)
    assert t.texts() == [] and s._floor == {"r": 3}
    hub.on_bus_message("r", envelope(b'{"n":4}'), 4)
    assert t.texts() == [b'{"n":4,"offset":4}'] and s._floor is None
    assert not hub.behind("r", epoch, 4)


async def test_resumed_listeners_get_the_rooms_with_members_here_after_an_outage_or_a_rooms_resumption(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the bus carried without history during an outage is lost: on_resumed listeners learn which rooms
    (those with members here) missed it, after a whole outage and after some rooms' subscriptions only."""
    hub, _ = await make_hub()
    a, b = session()[0], session()[0]
    await hub.join("r1", a)
    await hub.join("r2", b)
    await hub.join("emptied", a)
    await hub.leave("emptied", a)
    calls: list[list[str]] = []

    def broken(rooms: Any) -> None:
        raise RuntimeError("a broken listener")

    hub.on_resumed(broken)
    hub.on_resumed(lambda rooms: calls.append(sorted(rooms)))
    hub.on_bus_state(True)  # up without an outage: nothing was missed
    assert calls == []
    hub.on_bus_state(False)
    assert calls == []
    hub.on_bus_state(True)
    assert calls == [["r1", "r2"]]
    assert "an on_resumed listener failed" in caplog.text  # and the next one was called all the same
    hub.on_bus_rooms_resumed(["r2", "unknown", "emptied"])
    assert calls[-1] == ["r2"]
    hub.on_bus_rooms_resumed(["unknown"])
    assert len(calls) == 2  # no room with members: no call
    await asyncio.sleep(0.05)  # the repairs


async def test_deliver_here_reaches_this_replica_s_members_only_not_the_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    hub, bus = await make_hub()
    (a, ta), (b, tb), (c, tc) = session(), session(), session()
    await hub.join("r", a)
    await hub.join("r", b)
    await hub.join("other", c)

    async def no_publish(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("published")

    monkeypatch.setattr(bus, "publish", no_publish)
    hub.deliver_here("r", b'{"op":"notice"}')
    hub.deliver_here("nobody-here", b'{"op":"notice"}')
    assert ta.texts() == tb.texts() == [b'{"op":"notice"}']
    assert tc.texts() == []
    assert (await hub.backend.history.read("r", None, 10)).messages == []
