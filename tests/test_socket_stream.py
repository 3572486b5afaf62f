"""The read and write path of established connections (wirehub.stream.SocketStream and the frame reader's
read callback in wirehub.frames): partial sends and EAGAIN, a peer that stops reading, the close, frames
split across reads, input that came with the handshake, backpressure while a handler works, and the pong
bookkeeping of the keepalive."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from tornado.iostream import IOStream, StreamClosedError

from wirehub.frames import Protocol
from wirehub.stream import SocketStream
from wirehub.testing import LiveServer

Start = Callable[..., Awaitable[LiveServer]]
ECHO = {"endpoints": [{"path": "/ws/echo", "handler": "echo"}]}


class _Calls:
    """A SocketStream's owner that counts what the stream calls."""

    def __init__(self) -> None:
        self.readable = 0
        self.closed = 0

    def on_readable(self) -> None:
        self.readable += 1

    def on_stream_closed(self) -> None:
        self.closed += 1


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return ours, peer


async def _drain(peer: socket.socket, size: int) -> bytes:
    """Read ``size`` bytes from the peer end, without blocking the loop."""
    peer.setblocking(False)
    got = bytearray()
    loop = asyncio.get_running_loop()
    while len(got) < size:
        got += await asyncio.wait_for(loop.sock_recv(peer, 65536), 5)
    return bytes(got)


async def test_what_the_kernel_does_not_take_is_queued_counted_and_sent_in_order_when_writable() -> None:
    ours, peer = _pair()
    calls = _Calls()
    stream = SocketStream(IOStream(ours), calls)
    chunks = [bytes([i]) * 1000 for i in range(256)]  # far more than the two socket buffers hold
    for chunk in chunks:
        stream.send(chunk)
    queued = stream.buffered()
    assert 0 < queued < len(chunks) * 1000  # part went to the kernel (a partial send), the rest is queued
    waiter = stream.write(b"end")  # a Tornado-style write behind the queue: done once the kernel has it
    assert not waiter.done()
    assert await _drain(peer, 256 * 1000 + 3) == b"".join(chunks) + b"end"
    await asyncio.wait_for(waiter, 5)
    assert stream.buffered() == 0 and not stream.closed() and calls.closed == 0
    stream.close()
    peer.close()


async def test_a_send_to_a_reset_peer_closes_the_stream_and_its_socket_and_calls_back_once() -> None:
    ours, peer = _pair()
    calls = _Calls()
    edge = IOStream(ours)
    stream = SocketStream(edge, calls)
    peer.close()
    for _ in range(3):  # EPIPE / ECONNRESET: the first send may still be taken
        stream.send(b"x" * 100)
    assert stream.closed() and edge.closed() and ours.fileno() == -1
    assert calls.closed == 0  # not from inside the send that failed
    await asyncio.sleep(0)
    assert calls.closed == 1
    stream.close()
    stream.send(b"after")  # harmless
    await asyncio.sleep(0)
    assert calls.closed == 1
    with pytest.raises(StreamClosedError):
        stream.write(b"after")


async def test_closing_with_a_queue_fails_its_write_futures_and_stops_writing() -> None:
    ours, peer = _pair()
    calls = _Calls()
    stream = SocketStream(IOStream(ours), calls)
    stream.send(b"y" * 500_000)
    waiter = stream.write(b"z")
    assert stream.buffered() > 0 and not waiter.done()
    stream.close()
    assert waiter.done() and isinstance(waiter.exception(), StreamClosedError)
    assert stream.buffered() == 0
    await asyncio.sleep(0)
    assert calls.closed == 1
    peer.close()


async def test_reading_is_switched_on_and_off_and_input_waits_in_the_kernel_meanwhile() -> None:
    ours, peer = _pair()
    calls = _Calls()
    stream = SocketStream(IOStream(ours), calls)
    peer.send(b"hello")
    await asyncio.sleep(0.05)
    assert calls.readable == 0  # reading is off until switched on
    stream.reading(True)
    for _ in range(20):
        await asyncio.sleep(0.01)
        if calls.readable:
            break
    assert calls.readable  # level-triggered: called while the input stays unread
    stream.reading(False)
    seen = calls.readable
    await asyncio.sleep(0.05)
    assert calls.readable == seen
    assert ours.recv(10) == b"hello"
    stream.close()
    peer.close()


# -- on a live server ---------------------------------------------------------------------------------------------


def _upgrade_request(port: int, path: str = "/ws/echo") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def _frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class _Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, server: LiveServer, first: bytes = b"", path: str = "/ws/echo") -> _Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(_upgrade_request(server.port, path) + first)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return head[0] & 0x0F, await asyncio.wait_for(self.reader.readexactly(n), timeout)


def _protocol(server: LiveServer) -> Protocol:
    (side,) = list(server.app.sessions.values())
    assert isinstance(side._protocol, Protocol)
    return side._protocol


async def test_a_frame_sent_with_the_handshake_is_read(wirehub_server: Start) -> None:
    server = await wirehub_server(ECHO)
    raw = await _Raw.connect(server, first=_frame(0x1, b'{"early":1}'))
    assert await raw.frame() == (0x1, b'{"echo":{"early":1}}')
    raw.writer.close()


async def test_frames_split_at_every_byte_and_big_frames_in_pieces_arrive_whole(wirehub_server: Start) -> None:
    server = await wirehub_server({"server": {"send_queue_bytes": 4 << 20},
                                   "endpoints": [{"path": "/ws/raw", "handler": "echo",
                                                  "options": {"raw": True, "max_message_size": 2 << 20}}]})
    raw = await _Raw.connect(server, path="/ws/raw")
    small = _frame(0x1, b"x" * 200)  # 16-bit length: the header itself is split
    for i in range(len(small)):
        raw.writer.write(small[i:i + 1])
        await raw.writer.drain()
        await asyncio.sleep(0.002)
    assert await raw.frame() == (0x1, b"x" * 200)
    big_payload = bytes(range(256)) * 4096  # 1 MiB, binary
    big = _frame(0x2, big_payload) + _frame(0x1, b"after")  # two frames, the second right behind
    for i in range(0, len(big), 70_001):
        raw.writer.write(big[i:i + 70_001])
        await raw.writer.drain()
    assert await raw.frame() == (0x2, big_payload)
    assert await raw.frame() == (0x1, b"after")
    raw.writer.close()


async def test_an_idle_connection_has_no_task_waiting_and_a_spurious_wakeup_is_harmless(
        wirehub_server: Start) -> None:
    server = await wirehub_server(ECHO)
    client = await server.ws("/ws/echo")
    await client.send({"x": 1})
    assert await client.recv() == {"echo": {"x": 1}}
    protocol = _protocol(server)
    assert isinstance(protocol.stream, SocketStream)
    waiting = [t for t in asyncio.all_tasks()
               if getattr(t.get_coro(), "cr_frame", None) is not None
               and t.get_coro().cr_frame.f_locals.get("self") is protocol]  # type: ignore[union-attr]
    assert waiting == []  # read by a callback: no coroutine frame, Task or Future per idle connection
    (side,) = list(server.app.sessions.values())
    task = getattr(side, "task", None)  # what the lean upgrade path keeps of the reader's start: nothing of its own
    assert task is None or (task.done() and not isinstance(task, asyncio.Task))
    protocol.on_readable()  # nothing to read: EAGAIN
    await client.send({"x": 2})
    assert await client.recv() == {"echo": {"x": 2}}


async def test_input_waits_in_the_kernel_while_the_handler_works_and_is_read_in_order_after(
        wirehub_server: Start) -> None:
    from tests.plugins_for_tests.slow_op import MODULE

    server = await wirehub_server({"endpoints": [{"path": "/ws/slow", "handler": "slow"}],
                                   "plugins": {"load": [MODULE]}})
    raw = await _Raw.connect(server, path="/ws/slow")
    assert (await raw.frame())[0] == 0x1  # welcome
    raw.writer.write(_frame(0x1, json.dumps({"op": "wait", "seconds": 0.3, "id": 1}).encode()))
    await raw.writer.drain()
    await asyncio.sleep(0.05)
    protocol = _protocol(server)
    assert protocol.busy
    raw.writer.write(b"".join(_frame(0x1, json.dumps({"op": "ping", "id": i}).encode()) for i in range(2, 6)))
    await raw.writer.drain()
    await asyncio.sleep(0.05)
    assert protocol.busy and protocol._rest is None  # not read: left in the kernel
    replies = [json.loads((await raw.frame())[1]) for _ in range(5)]
    assert [(r["op"], r["id"]) for r in replies] == [("waited", 1)] + [("pong", i) for i in range(2, 6)]
    assert not protocol.busy
    raw.writer.close()


async def test_pong_bookkeeping_a_pong_marks_the_connection_alive_and_a_silent_one_is_dropped(
        wirehub_server: Start) -> None:
    server = await wirehub_server({**ECHO, "server": {"ping_interval": 300, "ping_timeout": 300}})
    keepalive = server.app.keepalive
    assert keepalive is not None
    answering = await _Raw.connect(server)
    silent = await _Raw.connect(server)
    for _ in range(100):
        if len(server.app.sessions) == 2:
            break
        await asyncio.sleep(0.02)
    sides = list(server.app.sessions.values())
    protocols: dict[Any, Protocol] = {}
    for side in sides:
        assert isinstance(side._protocol, Protocol)
        protocols[side._protocol.keepalive_slice] = side._protocol
    assert len(protocols) == 2  # dealt into two slices
    for n in protocols:
        assert keepalive.ping_slice(n) == 1
    assert all(not p._received_pong for p in protocols.values())
    for raw in (answering, silent):
        assert await raw.frame() == (0x9, b"")
    answering.writer.write(_frame(0xA, b""))
    await answering.writer.drain()
    started = time.monotonic()
    while not any(p._received_pong for p in protocols.values()):
        assert time.monotonic() - started < 5, "the pong was not read"
        await asyncio.sleep(0.01)
    alive = [n for n, p in protocols.items() if p._received_pong]
    dead = [n for n, p in protocols.items() if not p._received_pong]
    assert len(alive) == 1 and len(dead) == 1
    for n in protocols:
        keepalive._check(n)
    assert protocols[dead[0]].server_terminated and not protocols[alive[0]].is_closing()
    frames = []
    while True:
        opcode, payload = await silent.frame()
        frames.append((opcode, payload))
        if opcode == 0x8:
            break
    assert frames[-1] == (0x8, (1000).to_bytes(2, "big") + b"ping timed out")
    while len(server.app.sessions) != 1:
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.01)
    answering.writer.write(_frame(0x1, b'{"still":1}'))
    assert await answering.frame() == (0x1, b'{"echo":{"still":1}}')
    answering.writer.close()
    silent.writer.close()
