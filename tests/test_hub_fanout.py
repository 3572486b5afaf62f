"""The fan-out's one-call path (``Session.receiver`` -> ``transport.offer``) and the hub's per-room snapshot of
receivers: the same semantics as ``Session.deliver`` -> ``send_frame`` (the origin skipped, join holds and
duplicate floors, the byte cap's 4008, closed members), and membership changes between and during fan-outs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from tornado.iostream import IOStream

from wirehub.auth import Identity
from wirehub.builtins.bus.memory import create_backend
from wirehub.hub import Hub, envelope
from wirehub.metrics import Metrics
from wirehub.session import OutFrame, Session
from wirehub.stream import SocketStream
from wirehub.testing import FakeTransport
from wirehub.transport import StreamTransport


class OfferTransport(FakeTransport):
    """A FakeTransport with ``offer``: counts how each frame came in."""

    def __init__(self) -> None:
        super().__init__()
        self.offers = 0
        self.sends = 0

    def send_frame(self, frame: OutFrame) -> None:
        self.sends += 1
        super().send_frame(frame)

    def offer(self, frame: OutFrame, cap: int) -> int:
        self.offers += 1
        if self.closed:
            return 0
        if self.queued + len(frame.payload) > cap:
            return -1
        super().send_frame(frame)
        return 1


async def make_hub() -> Hub:
    backend = create_backend({}, "bus.memory")
    hub = Hub(backend, Metrics())
    await backend.bus.start(hub)
    hub.on_bus_state(True)
    return hub


def member(hub: Hub, cap: int = 1 << 20) -> tuple[Session, OfferTransport]:
    t = OfferTransport()
    return Session(t, Identity(user="u"), endpoint="/ws/test", node="n1", max_queue_bytes=cap,
                   metrics=hub.metrics), t


def msg(n: int, origin: Session | None = None) -> bytes:
    return envelope(b'{"n":%d}' % n, origin)


async def test_each_member_gets_a_message_in_one_offer_and_the_origin_none() -> None:
    hub = await make_hub()
    (a, ta), (b, tb), (c, tc) = member(hub), member(hub), member(hub)
    for s in (a, b, c):
        await hub.join("r", s)
    hub.on_bus_message("r", msg(1, origin=a), None)
    hub.on_bus_message("r", msg(2), None)
    assert ta.texts() == [b'{"n":2}']
    assert tb.texts() == tc.texts() == [b'{"n":1}', b'{"n":2}']
    assert tb.frames[0] is tc.frames[0]
    assert (tb.offers, tb.sends) == (2, 0)
    assert hub.metrics.sent.n == 5  # frames queued, counted per member as before


async def test_a_member_over_the_cap_is_closed_with_4008_and_offered_nothing_more() -> None:
    hub = await make_hub()
    (a, ta), (b, tb) = member(hub, cap=2048), member(hub)
    for s in (a, b):
        await hub.join("r", s)
    big = envelope(b'{"x":"' + b"x" * 900 + b'"}')
    for _ in range(3):
        hub.on_bus_message("r", big, None)
    assert ta.closed_with is not None and ta.closed_with[0] == 4008
    assert len(ta.frames) == 2 and len(tb.frames) == 3
    hub.on_bus_message("r", msg(4), None)
    assert ta.offers == 3  # closed: the session drops it without asking the transport
    assert hub.metrics.sent.n == 2 + 4


def fan_out_in(hub: Hub, room: str, *sessions: Session) -> None:
    """Make the room's next fan-out take its members in this order (its own is by address: see the test of
    it below), for the tests of what one member's delivery does to the ones after it."""
    r = hub._rooms[room]
    assert set(sessions) == set(r.members.values())
    r._receivers = tuple((s, s.receiver()) for s in sessions)


async def test_a_member_closed_during_a_fan_out_gets_nothing_of_it() -> None:
    hub = await make_hub()
    (a, ta), (b, tb), (c, tc) = member(hub, cap=100), member(hub), member(hub)
    for s in (a, b, c):
        await hub.join("r", s)
    ta.close = lambda code, reason: (FakeTransport.close(ta, code, reason), b.close(1001))  # type: ignore[method-assign]
    fan_out_in(hub, "r", a, b, c)
    hub.on_bus_message("r", envelope(b'{"x":"' + b"x" * 200 + b'"}'), None)  # a goes over its cap, closing b too
    assert ta.closed_with is not None and ta.closed_with[0] == 4008
    assert b.close_code == 1001 and tb.frames == [] and tb.offers == 0
    assert len(tc.frames) == 1


async def test_a_member_that_leaves_during_a_fan_out_gets_that_message_and_no_later_one() -> None:
    hub = await make_hub()
    (b, tb), (c, tc) = member(hub), member(hub)

    class Leaver(Session):
        def deliver(self, room: str, frame: OutFrame, offset: int | None) -> None:
            super().deliver(room, frame, offset)
            with contextlib.suppress(StopIteration):  # not the last member: leave() completes without waiting
                hub.leave(room, b).send(None)

    ta = OfferTransport()
    a = Leaver(ta, Identity(user="u"), endpoint="/ws/test", node="n1", max_queue_bytes=1 << 20)
    for s in (a, b, c):
        await hub.join("r", s)
    fan_out_in(hub, "r", a, b, c)
    hub.on_bus_message("r", msg(1), None)
    assert [m.id for m in hub.members("r")] == [a.id, c.id]
    assert tb.texts() == [b'{"n":1}']  # the message was on its way to every member of the moment
    hub.on_bus_message("r", msg(2), None)
    assert tb.texts() == [b'{"n":1}'] and tc.texts() == [b'{"n":1}', b'{"n":2}']
    assert ta.sends == 2 and ta.offers == 0  # a subclass's own deliver() is what the hub calls


async def test_joins_and_leaves_between_messages_change_who_gets_the_next_one() -> None:
    hub = await make_hub()
    (a, ta), (b, tb), (c, tc) = member(hub), member(hub), member(hub)
    await hub.join("r", a)
    hub.on_bus_message("r", msg(1), None)
    await hub.join("r", b)
    hub.on_bus_message("r", msg(2), None)
    await hub.leave("r", a)
    await hub.join("r", c)
    hub.on_bus_message("r", msg(3), None)
    assert ta.texts() == [b'{"n":1}', b'{"n":2}']
    assert tb.texts() == [b'{"n":2}', b'{"n":3}']
    assert tc.texts() == [b'{"n":3}']


async def test_the_fan_out_walks_the_members_in_the_order_of_their_sessions_in_memory() -> None:
    """Not in join order: members who joined in another order than they connected (any long-lived room) would
    send the fan-out back and forth through memory, 1.5x the CPU per delivery in cache and TLB misses. Joins
    and leaves between messages keep the order."""
    import random

    hub = await make_hub()
    members = [member(hub) for _ in range(64)]
    joined = random.Random(7).sample(members, len(members))
    for s, _ in joined:
        await hub.join("r", s)
    order: list[int] = []
    for s, t in members:
        t.offer = lambda frame, cap, s=s, t=t: order.append(id(s)) or OfferTransport.offer(t, frame, cap)
    hub.on_bus_message("r", msg(1), None)
    assert order == sorted(order) and len(order) == 64
    await hub.leave("r", joined[0][0])
    late, _ = member(hub)
    await hub.join("r", late)
    order.clear()
    hub.on_bus_message("r", msg(2), None)
    assert order == sorted(order) and len(order) == 63  # the late one's transport records nothing
    assert [s for s, _ in hub._rooms["r"].receivers()] == sorted(hub.members("r"), key=id)


async def test_holds_and_duplicate_floors_apply_on_the_offer_path() -> None:
    hub = await make_hub()
    (a, ta), (b, tb) = member(hub), member(hub)
    for s in (a, b):
        await hub.join("r", s)
    b.hold("r")
    for n in (1, 2, 3):
        hub.on_bus_message("r", msg(n), n)
    assert tb.frames == [] and len(ta.frames) == 3
    assert b.release("r", after=2) == 1  # 1 and 2 were replayed; 3 is sent from the hold
    hub.on_bus_message("r", msg(2), 2)  # a late live copy at the floor: dropped
    hub.on_bus_message("r", msg(4), 4)
    assert tb.texts() == [b'{"n":3,"offset":3}', b'{"n":4,"offset":4}']
    hub.on_bus_message("r", msg(5), 5)
    # 3 (the release) and 4 (past the floor) through send_frame; the floor is gone after 4: 5 in one offer
    assert (tb.sends, tb.offers) == (2, 1) and tb.texts()[-1] == b'{"n":5,"offset":5}'


async def test_a_transport_without_offer_gets_send_frame() -> None:
    hub = await make_hub()
    t = FakeTransport()
    s = Session(t, Identity(user="u"), endpoint="/ws/test", node="n1", max_queue_bytes=1 << 20)
    assert s.receiver() == s.deliver
    await hub.join("r", s)
    hub.on_bus_message("r", msg(1), None)
    assert t.texts() == [b'{"n":1}']


@pytest.fixture
async def stream_transport() -> AsyncIterator[tuple[StreamTransport, Any, socket.socket]]:
    a, b = socket.socketpair()
    b.setblocking(False)

    class Owner:
        def on_readable(self) -> None: ...
        def on_stream_closed(self) -> None: ...

    stream = SocketStream(IOStream(a), Owner())
    protocol = SimpleNamespace(stream=stream, server_terminated=False)
    yield StreamTransport(protocol, lambda code, reason: None), protocol, b  # type: ignore[arg-type]
    stream.close()
    b.close()


async def test_stream_transport_offer_corks_checks_the_cap_and_drops_when_closed(
    stream_transport: tuple[StreamTransport, Any, socket.socket],
) -> None:
    transport, protocol, peer = stream_transport
    one, two = OutFrame(b"a" * 10), OutFrame(b"b" * 10)
    assert transport.offer(one, 64) == 1 and transport.offer(two, 64) == 1
    assert transport.buffered() == 24  # corked: two 12-byte wire frames, none sent yet
    assert transport.offer(OutFrame(b"c" * 41), 64) == -1  # 24 + 41 > 64: nothing queued
    assert transport.buffered() == 24
    await asyncio.sleep(0.01)  # the flusher runs after one more loop pass
    assert peer.recv(100) == one.wire + two.wire and transport.buffered() == 0
    protocol.server_terminated = True  # our Close frame is out: no data frame may follow it
    assert transport.offer(one, 64) == 0 and transport.buffered() == 0
    protocol.server_terminated = False
    protocol.stream.close()
    assert transport.offer(one, 64) == 0 and transport.buffered() == 0
