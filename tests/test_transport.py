"""The transport and the socket takeover (wirehub.stream) read Tornado internals: fail loudly if they change;
and the takeover's own write path (partial sends, a peer that stops reading)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from tornado.iostream import IOStream

from wirehub.session import OutFrame
from wirehub.stream import SocketStream
from wirehub.testing import LiveServer

Start = Callable[..., Awaitable[LiveServer]]


async def test_tornado_internals_the_takeover_relies_on(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": [{"path": "/ws/echo", "handler": "echo"}]})
    fresh = IOStream(socket.socket())
    try:  # what wirehub.stream reads of a Tornado stream before it takes the socket over
        assert len(fresh._write_buffer) == 0 and fresh._connecting is False and fresh._read_future is None
        assert fresh._state is None and fresh._close_callback is None
        assert fresh._read_buffer == bytearray() and fresh._read_buffer_size == 0
    finally:
        fresh.close()
    client = await server.ws("/ws/echo")
    await client.send({"x": 1})
    await client.recv()
    (session,) = list(server.app.sessions)
    stream = session.transport._stream  # type: ignore[attr-defined]
    assert session.transport._protocol.server_terminated is False  # type: ignore[attr-defined]
    assert isinstance(stream, SocketStream) and not stream.closed()
    assert session.buffered == 0


async def test_large_frames_cross_the_fast_path_intact(wirehub_server: Start) -> None:
    # A frame larger than the send-queue cap could never be queued: raise the cap with the size.
    server = await wirehub_server({"server": {"send_queue_bytes": 16 << 20},
                                   "endpoints": [{"path": "/ws/raw", "handler": "echo",
                                                  "options": {"raw": True, "max_message_size": 8 << 20}}]})
    client = await server.ws("/ws/raw")
    for size in (0, 1, 125, 126, 65535, 65536, 5 << 20):
        payload = "x" * size
        await client.send(payload)
        assert await client.recv_raw(10) == payload
    await client.send(b"\x00\xff" * 70000)
    assert await client.recv_raw() == b"\x00\xff" * 70000


class _CountingSocket:
    """Wraps a socket to record each send() call."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.sends: list[bytes] = []

    def send(self, data: Any, *args: Any) -> int:
        self.sends.append(bytes(data))
        return int(self.sock.send(data, *args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


async def test_frames_of_one_loop_iteration_leave_in_one_send_and_close_flushes_them_first(
    wirehub_server: Start,
) -> None:
    server = await wirehub_server({"endpoints": [{"path": "/ws/raw", "handler": "echo", "options": {"raw": True}}]})
    client = await server.ws("/ws/raw")
    await client.send("hi")
    assert await client.recv_raw() == "hi"
    (session,) = list(server.app.sessions)
    stream = session.transport._stream  # type: ignore[attr-defined]
    counting = _CountingSocket(stream.socket)
    stream.socket = counting
    for i in range(3):
        session.send_frame(OutFrame(b"m%d" % i))
    assert counting.sends == [] and session.buffered == 3 * 4  # corked, and counted against the cap
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(counting.sends) == 1, counting.sends
    assert [await client.recv_raw() for _ in range(3)] == ["m0", "m1", "m2"]
    session.send_frame(OutFrame(b"last"))
    session.close(1000)
    assert await client.recv_raw() == "last"
    assert await client.recv_raw() is None and client.close_code == 1000
