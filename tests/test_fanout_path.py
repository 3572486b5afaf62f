"""The fan-out's fast path in ``StreamTransport.offer``/``flush`` (the taken-over socket kept on the transport, its
queue read directly): the cap counts what the kernel did not take plus what is corked, order holds across
``offer``/``send_frame`` and the takeover, and a Close follows everything queued before it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from tornado.iostream import IOStream

from wirehub.session import OutFrame
from wirehub.stream import SocketStream
from wirehub.transport import StreamTransport


class _Owner:
    def on_readable(self) -> None: ...
    def on_stream_closed(self) -> None: ...


@pytest.fixture
async def pair() -> AsyncIterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _drain(peer: socket.socket) -> bytes:
    got = bytearray()
    while True:
        try:
            chunk = peer.recv(1 << 16)
        except BlockingIOError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


def _taken_over(sock: socket.socket, close: Any = None) -> tuple[SocketStream, Any, StreamTransport]:
    """A taken-over stream on ``sock``, the protocol stand-in the transport sees, and the transport."""
    stream = SocketStream(IOStream(sock), _Owner())
    protocol: Any = SimpleNamespace(stream=stream, server_terminated=False)
    return stream, protocol, StreamTransport(protocol, close or (lambda code, reason: None))


async def test_offer_before_and_after_the_takeover_keeps_order_and_the_cap(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, peer = pair
    edge = IOStream(a)
    closes: list[tuple[int, str]] = []
    protocol: Any = SimpleNamespace(stream=edge, server_terminated=False)
    transport = StreamTransport(protocol, lambda code, reason: closes.append((code, reason)))
    f1, f2, f3 = OutFrame(b"1" * 10), OutFrame(b"2" * 10), OutFrame(b"3" * 10)
    assert transport.offer(f1, 64) == 1  # Tornado's stream: the edge path
    assert transport.offer(OutFrame(b"x" * 60), 64) == -1  # 12 corked + 60 > 64
    await asyncio.sleep(0.01)
    protocol.stream = SocketStream(edge, _Owner())  # the frame reader takes the socket over
    transport.send_frame(f2)
    assert transport.offer(f3, 64) == 1 and transport.buffered() == 24
    await asyncio.sleep(0.01)
    assert _drain(peer) == f1.wire + f2.wire + f3.wire
    protocol.stream.close()


async def test_what_the_kernel_did_not_take_counts_against_the_cap_with_what_is_corked(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, peer = pair
    stream, _, transport = _taken_over(a)
    big = OutFrame(b"z" * 60000)
    sent = [big]
    while stream.buffered() == 0:  # the peer does not read: fill the kernel until the stream queues
        assert transport.offer(big, 1 << 30) == 1
        transport.flush()
        sent.append(big)
    sent.pop()
    queued = stream.buffered()
    cap = queued + 12 + 10  # room for one 10-byte payload corked (a 12-byte wire frame) and one more payload
    assert transport.offer(OutFrame(b"a" * 10), cap) == 1 and transport.buffered() == queued + 12
    assert transport.offer(OutFrame(b"b" * 10), cap) == 1  # queued + 12 + 10 is not over the cap
    assert transport.offer(OutFrame(b"c"), cap) == -1  # one byte more is, and nothing was queued
    assert transport.buffered() == queued + 24
    transport.flush()  # behind a queue: appended to it, in order
    assert stream.buffered() == queued + 24
    got = bytearray()
    expected = b"".join(f.wire for f in sent) + OutFrame(b"a" * 10).wire + OutFrame(b"b" * 10).wire
    for _ in range(500):
        got += _drain(peer)
        if len(got) >= len(expected):
            break
        await asyncio.sleep(0.005)
    assert bytes(got) == expected and stream.buffered() == 0
    stream.close()
    assert transport.offer(big, 1 << 30) == 0


async def test_a_close_follows_the_corked_frames_and_nothing_follows_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, peer = pair
    def close(code: int, reason: str) -> None:
        stream.send(b"CLOSE")
        protocol.server_terminated = True

    stream, protocol, transport = _taken_over(a, close)
    frames = [OutFrame(b"m%d" % i) for i in range(3)]
    for f in frames:
        assert transport.offer(f, 1 << 20) == 1
    transport.close(1000, "")
    assert transport.offer(frames[0], 1 << 20) == 0
    transport.send_frame(frames[1])
    await asyncio.sleep(0.01)
    assert _drain(peer) == b"".join(f.wire for f in frames) + b"CLOSE"
    stream.close()


async def test_corked_frames_of_send_frame_and_offer_small_and_big_leave_whole_and_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, peer = pair
    stream, _, transport = _taken_over(a)
    frames = [OutFrame(b"s1"), OutFrame(b"s2"), OutFrame(b"L" * 3000), OutFrame(b"M" * 2000), OutFrame(b"s3")]
    for i, f in enumerate(frames):
        (transport.send_frame if i % 2 else lambda f: transport.offer(f, 1 << 20))(f)
    assert transport.buffered() == sum(len(f.wire) for f in frames)
    await asyncio.sleep(0.01)
    assert _drain(peer) == b"".join(f.wire for f in frames) and transport.buffered() == 0
    stream.close()


async def test_a_fan_out_allocates_no_collected_object_per_delivery() -> None:
    """A message to a room corks one frame per member without a GC-tracked allocation per member (a list per
    cork did: 18,000 of them alive until the flush drove collections through the whole heap), and the
    frames still leave whole, in order, once per member and connection."""
    import gc

    from wirehub.auth import Identity
    from wirehub.builtins.bus.memory import create_backend
    from wirehub.hub import Hub, envelope
    from wirehub.metrics import Metrics
    from wirehub.session import Session
    from wirehub.transport import _flusher

    backend = create_backend({}, "bus.memory")
    hub = Hub(backend, Metrics())
    await backend.bus.start(hub)
    hub.on_bus_state(True)
    peers: list[socket.socket] = []
    streams: list[SocketStream] = []
    for _ in range(200):
        a, b = socket.socketpair()
        b.setblocking(False)
        stream, _, transport = _taken_over(a)
        streams.append(stream)
        await hub.join("room", Session(transport, Identity(user="u"), endpoint="/ws/chat", node="n1",
                                       max_queue_bytes=1 << 20, metrics=hub.metrics))
        peers.append(b)
    first, second = (envelope(b'{"type":"message","room":"room","n":%d}' % i) for i in (1, 2))
    hub.on_bus_message("room", first, None)  # the room's receivers are built on the first message
    _flusher()._run()
    for peer in peers:
        _drain(peer)
    gc.disable()
    try:
        before = gc.get_count()[0]
        hub.on_bus_message("room", first, None)
        hub.on_bus_message("room", second, None)
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert grown < 20, f"{grown} GC-tracked objects for 2 messages to 200 members"
    _flusher()._run()
    for peer in peers:
        got = _drain(peer)
        assert got.index(b'"n":1') < got.index(b'"n":2') and got.count(b"\x81") == 2
    for stream, peer in zip(streams, peers, strict=True):
        stream.close()
        peer.close()
    await backend.bus.close()
