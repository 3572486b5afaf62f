"""The transport reads Tornado internals (IOStream._write_buffer, _connecting): fail loudly if they change."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tornado.iostream import IOStream

from service.testing import LiveServer

Start = Callable[..., Awaitable[LiveServer]]


async def test_tornado_internals_the_transport_relies_on(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": [{"path": "/ws/echo", "handler": "echo"}]})
    client = await server.ws("/ws/echo")
    await client.send({"x": 1})
    await client.recv()
    (session,) = list(server.app.sessions)
    stream = session.transport._stream  # type: ignore[attr-defined]
    assert session.transport._protocol.server_terminated is False  # type: ignore[attr-defined]
    assert type(stream) is IOStream
    assert len(stream._write_buffer) == 0 and stream._connecting is False
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
