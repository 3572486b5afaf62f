"""Write coalescing under saturation (``server.write_coalesce_ms``, wirehub.transport): a connection whose frames
left in a flush round that ended less than its own duration ago is held until the round's end plus that
duration, at most the cap; every other write leaves after one loop pass as before. Order, the send-queue cap
(4008) and Close after queued data hold for held frames too.

A slow round is made with a socket whose ``send`` spins for a while (the real socket underneath, so the bytes
are real): that is what a saturated replica looks like to the flusher, a flush round of milliseconds of CPU."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from tornado.iostream import IOStream

from wirehub.auth import Identity
from wirehub.session import OutFrame, Session
from wirehub.stream import SocketStream
from wirehub.testing import LiveServer
from wirehub.transport import StreamTransport

Start = Callable[..., Awaitable[LiveServer]]


class SlowSocket:
    """A socket whose ``send`` takes ``delay`` CPU seconds (the loop busy in ``send``) and records when each
    send happened and what it carried."""

    def __init__(self, sock: Any, delay: float = 0.0) -> None:
        self.sock = sock
        self.delay = delay
        self.sends: list[tuple[float, bytes]] = []

    def send(self, data: Any, *args: Any) -> int:
        if self.delay:  # CPU work, as the kernel's part of a send is (the flusher measures CPU time)
            until = time.perf_counter() + self.delay
            while time.perf_counter() < until:
                pass
        self.sends.append((asyncio.get_running_loop().time(), bytes(data)))
        return int(self.sock.send(data, *args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class Conn:
    """A StreamTransport over one end of a socketpair, the peer at the other end."""

    def __init__(self, coalesce_ms: float, delay: float = 0.0) -> None:
        a, self.peer = socket.socketpair()
        self.peer.setblocking(False)

        class Owner:
            def on_readable(self) -> None: ...
            def on_stream_closed(self) -> None: ...

        self.stream = SocketStream(IOStream(a), Owner())
        self.socket = SlowSocket(self.stream.socket, delay)
        self.stream.socket = self.socket  # type: ignore[assignment]
        self.protocol = SimpleNamespace(stream=self.stream, server_terminated=False)
        self.closed_with: tuple[int, str] | None = None
        self.transport = StreamTransport(self.protocol, self._close, coalesce_ms)  # type: ignore[arg-type]

    def _close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)
        self.protocol.server_terminated = True

    def read(self) -> bytes:
        try:
            return self.peer.recv(1 << 20)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        self.stream.close()
        self.peer.close()


@pytest.fixture
async def conns() -> AsyncIterator[Callable[..., Conn]]:
    made: list[Conn] = []

    def make(coalesce_ms: float = 10.0, delay: float = 0.0) -> Conn:
        c = Conn(coalesce_ms, delay)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


async def passes(n: int = 2) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def slow_round(*conns: Conn) -> None:
    """One flush round carrying a frame for each of ``conns`` (the slow ones make it take long)."""
    for c in conns:
        c.transport.send_frame(OutFrame(b"round"))
    await passes(3)  # the round runs in the second pass: it is over when this coroutine resumes
    assert all(c.socket.sends for c in conns)
    for c in conns:
        c.socket.sends.clear()
        c.socket.delay = 0.0
        assert c.read() == OutFrame(b"round").wire


async def test_frames_after_a_slow_round_are_held_and_leave_in_one_send_in_order(
    conns: Callable[..., Conn],
) -> None:
    slow = conns(10.0, delay=0.03)  # the round takes 30 ms: writes fill the loop
    c = conns(10.0)
    await slow_round(slow, c)
    frames = [OutFrame(b"m%d" % i) for i in range(4)]
    c.transport.offer(frames[0], 1 << 20)
    await passes()
    assert c.socket.sends == []  # held, where an unsaturated loop would have sent it by now
    c.transport.offer(frames[1], 1 << 20)
    await passes()
    c.transport.send_frame(frames[2])  # a reply joins the same cork
    c.transport.offer(frames[3], 1 << 20)
    await asyncio.sleep(0.05)
    assert [data for _, data in c.socket.sends] == [b"".join(f.wire for f in frames)]
    assert c.read() == b"".join(f.wire for f in frames)


async def test_the_added_delay_is_at_most_the_cap(conns: Callable[..., Conn]) -> None:
    slow = conns(5.0, delay=0.05)  # a 50 ms round: held for min(5 ms cap, 50 ms)
    c = conns(5.0)
    await slow_round(slow, c)
    end = c.transport._last.end  # type: ignore[union-attr]
    c.transport.offer(OutFrame(b"x"), 1 << 20)
    await asyncio.sleep(0.06)
    ((sent, _),) = c.socket.sends
    assert 0.004 <= sent - end < 0.025, sent - end  # the cap (5 ms) plus a loaded machine's timer lag


async def test_a_short_round_holds_no_longer_than_it_took(conns: Callable[..., Conn]) -> None:
    slow = conns(100.0, delay=0.01)  # a 10 ms round with a 100 ms cap: held for at most 10 ms
    c = conns(100.0)
    await slow_round(slow, c)
    end = c.transport._last.end  # type: ignore[union-attr]
    c.transport.offer(OutFrame(b"x"), 1 << 20)
    await asyncio.sleep(0.05)
    ((sent, _),) = c.socket.sends
    assert sent - end < 0.03, sent - end


async def test_a_lone_message_to_an_idle_connection_goes_out_after_one_pass(conns: Callable[..., Conn]) -> None:
    slow = conns(10.0, delay=0.01)
    c = conns(10.0)
    await slow_round(slow, c)
    await asyncio.sleep(0.03)  # the round ended longer ago than it took: the loop keeps up
    c.transport.offer(OutFrame(b"lone"), 1 << 20)
    await passes()
    assert c.read() == OutFrame(b"lone").wire
    # and with no round before it at all
    fresh = conns(10.0)
    fresh.transport.send_frame(OutFrame(b"first"))
    await passes()
    assert fresh.read() == OutFrame(b"first").wire


async def test_a_connection_that_was_not_in_the_slow_round_is_not_held(conns: Callable[..., Conn]) -> None:
    slow = conns(10.0, delay=0.03)
    await slow_round(slow)
    other = conns(10.0)  # saturated loop, but this connection is not receiving a stream
    other.transport.offer(OutFrame(b"dm"), 1 << 20)
    await passes()
    assert other.read() == OutFrame(b"dm").wire


async def test_write_coalesce_0_never_holds(conns: Callable[..., Conn]) -> None:
    slow = conns(0.0, delay=0.03)
    c = conns(0.0)
    await slow_round(slow, c)
    c.transport.offer(OutFrame(b"now"), 1 << 20)
    await passes()
    assert c.read() == OutFrame(b"now").wire


async def test_held_frames_count_against_the_send_queue_cap_and_close_follows_them(
    conns: Callable[..., Conn],
) -> None:
    slow = conns(10.0, delay=0.03)
    c = conns(10.0)
    await slow_round(slow, c)
    session = Session(c.transport, Identity(user="u"), endpoint="/ws/test", node="n1", max_queue_bytes=100)
    deliver = session.receiver()
    frames = [OutFrame(b"%02d" % i + b"y" * 30) for i in range(4)]  # 32-byte payloads: 3 fit under 100
    for f in frames[:3]:
        deliver("r", f, None)
    await passes()
    assert c.socket.sends == [] and c.transport.buffered() == 3 * len(frames[0].wire)  # held, and counted
    assert c.closed_with is None
    deliver("r", frames[3], None)  # 96 + 32 > 100: slow consumer
    assert c.closed_with is not None and c.closed_with[0] == 4008
    # the close flushed what was held before it, in order, and nothing after
    assert c.read() == b"".join(f.wire for f in frames[:3])
    await asyncio.sleep(0.03)
    assert c.read() == b""


async def test_the_option_reaches_each_connection(wirehub_server: Start) -> None:
    server = await wirehub_server({"server": {"write_coalesce_ms": 2.5},
                                   "endpoints": [{"path": "/ws/raw", "handler": "echo", "options": {"raw": True}}]})
    client = await server.ws("/ws/raw")
    await client.send("hi")
    assert await client.recv_raw() == "hi"
    (session,) = list(server.app.sessions)
    assert session.transport._coalesce == 0.0025  # type: ignore[attr-defined]
