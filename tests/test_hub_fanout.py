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
    """Make the room's next fan-out take its members in this order (its own is by address, newcomers last: see
    the test of it below), for the tests of what one member's delivery does to the ones after it."""
    r = hub._rooms[room]
    assert set(sessions) == set(r.members.values())
    r._receivers, r._n_settled, r.stale = tuple((s, s.receiver()) for s in sessions), 0, False


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


async def test_the_fan_out_takes_settled_members_in_memory_order_then_newcomers_in_join_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Settled members in the order of their sessions in memory, not in join order: members who joined in another
    order than they connected (members who come and go) would send the fan-out back and forth through memory, 1.7x
    the CPU per delivery. Members who joined less than ``SETTLE`` seconds ago come after them, in join order, so
    that a storm of rejoins does not delay the members who were there; the order is rebuilt when they settle."""
    import random

    from wirehub import hub as hub_module

    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(hub_module, "time", SimpleNamespace(monotonic=lambda: clock.now, time=hub_module.time.time))
    hub = await make_hub()
    members = [member(hub) for _ in range(64)]
    joined = random.Random(7).sample(members, len(members))
    for s, _ in joined:
        await hub.join("r", s)
    order: list[Session] = []
    for s, t in members:
        t.offer = lambda frame, cap, s=s, t=t: order.append(s) or OfferTransport.offer(t, frame, cap)

    def fan_out(n: int) -> list[Session]:
        order.clear()
        hub.on_bus_message("r", msg(n), None)
        return list(order)

    newcomers = [s for s, _ in joined]
    assert fan_out(1) == newcomers  # all newcomers: join order
    clock.now += hub_module.SETTLE - 0.5
    assert fan_out(2) == newcomers
    clock.now += 0.5  # they settle: the next message rebuilds the order, with no membership change
    by_address = sorted(newcomers, key=id)
    assert fan_out(3) == by_address
    late = [member(hub) for _ in range(5)]
    for s, t in late:
        t.offer = lambda frame, cap, s=s, t=t: order.append(s) or OfferTransport.offer(t, frame, cap)
        await hub.join("r", s)
    await hub.leave("r", by_address.pop(10))  # a settled member leaves
    await hub.leave("r", late.pop(2)[0])  # and a newcomer
    newcomers = [s for s, _ in late]
    assert fan_out(4) == by_address + newcomers
    again = by_address.pop(0)  # leaves and joins again: a newcomer, the last one
    await hub.leave("r", again)
    await hub.join("r", again)
    assert fan_out(5) == by_address + newcomers + [again]
    clock.now += hub_module.SETTLE
    assert fan_out(6) == sorted(by_address + newcomers + [again], key=id)
    room = hub._rooms["r"]
    assert room.newcomers is None and room.settle_at == 0.0  # no dict kept once none is left
    lone, _ = member(hub)  # the last newcomer leaves before it settles: nothing is left to wait for either
    await hub.join("r", lone)
    fan_out(7)
    await hub.leave("r", lone)
    fan_out(8)
    assert room.newcomers is None and room.settle_at == 0.0
    clock.now += hub_module.SETTLE
    rebuilt = room._receivers
    assert fan_out(9) == sorted(by_address + newcomers + [again], key=id) and room._receivers is rebuilt


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
