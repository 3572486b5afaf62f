"""The join path's shortcuts of branch joincut (issue 11) answer as the general paths do:

- the frame reader's path for one whole small masked text frame in a read: every read around its bounds (a
  frame of 125 and 126 bytes, two frames, a frame and part of the next, reserved bits, a fragment, an empty
  text frame) is answered as the general loop answers it;
- ``authorize_now`` with one implementation in argument order (the built-in policy alone) called without the
  loop: its answers (None, a non-bool, an awaitable, an exception) mean what they mean through the loop, and a
  plugin registered later is asked;
- ``Session.send_frame`` over a WebSocket's transport (its ``send_capped``, one call) answers, queues, counts
  and closes (4008) as the general path (``closed``, ``buffered``, ``send_frame``) does over the same transport.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from tornado.iostream import IOStream

from tests.test_socket_stream import ECHO, _frame, _Raw
from wirehub import Identity, OutFrame, Session, hookimpl
from wirehub.config import PluginsConfig
from wirehub.metrics import Metrics
from wirehub.plugins import PluginFailed, PluginHost, build_plugin_manager
from wirehub.protocol import CloseCode
from wirehub.stream import SocketStream
from wirehub.testing import LiveServer
from wirehub.transport import StreamTransport

Start = Callable[..., Awaitable[LiveServer]]


def _payload(n: int) -> bytes:
    """A JSON object of exactly ``n`` bytes (n >= 9)."""
    return b'{"a":"' + b"x" * (n - 8) + b'"}'


async def _echo(raw: _Raw, payload: bytes) -> None:
    assert await raw.frame() == (0x1, b'{"echo":' + payload + b"}")


@pytest.mark.parametrize("n", [9, 100, 124, 125, 126, 127])
async def test_one_frame_in_a_read_is_answered_at_every_length(wirehub_server: Start, n: int) -> None:
    raw = await _Raw.connect(await wirehub_server(ECHO))
    for _ in range(3):
        raw.writer.write(_frame(0x1, _payload(n)))
        await _echo(raw, _payload(n))
    raw.writer.close()


async def test_two_frames_and_a_frame_split_across_reads(wirehub_server: Start) -> None:
    raw = await _Raw.connect(await wirehub_server(ECHO))
    a, b, c = _payload(20), _payload(30), _payload(40)
    raw.writer.write(_frame(0x1, a) + _frame(0x1, b))
    await _echo(raw, a)
    await _echo(raw, b)
    whole = _frame(0x1, c)
    for cut in (1, 2, 5, 6, len(whole) - 1):
        raw.writer.write(whole[:cut])
        await raw.writer.drain()
        await asyncio.sleep(0.05)
        raw.writer.write(whole[cut:])
        await _echo(raw, c)
    raw.writer.write(_frame(0x1, a) + whole[:7])  # a whole frame, then the start of the next in the same read
    await _echo(raw, a)
    await asyncio.sleep(0.05)
    raw.writer.write(whole[7:])
    await _echo(raw, c)
    raw.writer.close()


async def test_a_fragmented_message_of_small_frames(wirehub_server: Start) -> None:
    raw = await _Raw.connect(await wirehub_server(ECHO))
    text = _payload(60)
    first, last = _frame(0x1, text[:25]), _frame(0x0, text[25:])
    first = bytes((0x01,)) + first[1:]  # not final
    raw.writer.write(first)
    await raw.writer.drain()
    await asyncio.sleep(0.05)
    raw.writer.write(last)
    await _echo(raw, text)
    raw.writer.close()


@pytest.mark.parametrize("first", [0xC1, 0x91, 0xA1])
async def test_reserved_bits_on_a_small_text_frame_fail_with_1002(wirehub_server: Start, first: int) -> None:
    raw = await _Raw.connect(await wirehub_server(ECHO))
    frame = _frame(0x1, _payload(20))
    raw.writer.write(bytes((first,)) + frame[1:])
    opcode, data = await raw.frame()
    assert (opcode, int.from_bytes(data[:2], "big")) == (0x8, 1002)
    raw.writer.close()


async def test_an_empty_text_frame_is_a_request_like_any_other(wirehub_server: Start) -> None:
    raw = await _Raw.connect(await wirehub_server(ECHO))
    raw.writer.write(_frame(0x1, b""))
    raw.writer.write(_frame(0x1, _payload(12)))  # still open and reading
    for _ in range(2):
        opcode, data = await raw.frame()
        if data == b'{"echo":' + _payload(12) + b"}":
            break
        assert opcode == 0x1 and json.loads(data)["op"] == "error"  # the echo's answer to non-JSON
    raw.writer.close()


# -- authorize_now with one implementation -----------------------------------------------------------------------


class Answers:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    @hookimpl
    def wirehub_authorize(self, identity: Identity, action: str, room: str) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        if self.answer == "later":
            async def later() -> bool:
                return room == "granted"

            return later()
        return self.answer


def alone(plugin: object) -> PluginHost:
    host = build_plugin_manager(PluginsConfig(block=("wirehub.builtins.policy",)))
    host.pm.register(plugin, name="only")
    return host


@pytest.mark.parametrize(("answer", "expected"), [(True, True), (False, False), (None, False), (1, True),
                                                  (0, False), ("yes", True)])
async def test_one_implementation_answers_as_through_the_loop(answer: Any, expected: bool) -> None:
    host, who = alone(Answers(answer)), Identity(user="a")
    for _ in range(3):  # the first call works the plan out, the next ones take the shortcut
        got = host.authorize_now(who, "join", "r")
        assert got is expected
        assert await host.authorize(who, "join", "r") is expected
    assert host._authorize_only is not None


async def test_one_implementation_answering_later_or_raising() -> None:
    host = alone(Answers("later"))
    for room in ("granted", "other", "granted"):
        pending = host.authorize_now(Identity(user="a"), "join", room)
        assert not isinstance(pending, bool) and await pending is (room == "granted")
    failing = alone(Answers(RuntimeError("down")))
    for _ in range(2):
        with pytest.raises(PluginFailed):
            failing.authorize_now(Identity(user="a"), "join", "r")


async def test_a_plugin_registered_later_is_asked_first() -> None:
    host = build_plugin_manager()  # the built-in policy alone: the shortcut
    guest = Identity(user="g", rooms=("*",))
    assert host.authorize_now(guest, "join", "r") is True and host._authorize_only is not None
    host.pm.register(Answers(False), name="closed")
    assert host.authorize_now(guest, "join", "r") is False and host._authorize_only is None
    host.pm.unregister(name="closed")
    assert host.authorize_now(guest, "join", "r") is True


# -- Session.send_frame over a StreamTransport -------------------------------------------------------------------


class _Plain:
    """A StreamTransport seen without ``send_capped``: the general path of ``Session.send_frame``."""

    def __init__(self, inner: StreamTransport) -> None:
        self.inner = inner

    def send_frame(self, frame: OutFrame) -> None:
        self.inner.send_frame(frame)

    def buffered(self) -> int:
        return self.inner.buffered()

    def close(self, code: int, reason: str) -> None:
        self.inner.close(code, reason)

    @property
    def closed(self) -> bool:
        return self.inner.closed


async def _session_over_a_socket(plain: bool) -> tuple[Session, Any, socket.socket, list[int]]:
    a, b = socket.socketpair()
    b.setblocking(False)

    class Owner:
        def on_readable(self) -> None: ...
        def on_stream_closed(self) -> None: ...

    protocol = SimpleNamespace(stream=SocketStream(IOStream(a), Owner()), server_terminated=False)
    codes: list[int] = []
    inner = StreamTransport(protocol, lambda code, reason: codes.append(code))  # type: ignore[arg-type]
    transport: Any = _Plain(inner) if plain else inner
    session = Session(transport, Identity(user="u"), endpoint="/ws/chat", node="n1", max_queue_bytes=64,
                      metrics=Metrics())
    return session, protocol, b, codes


@pytest.mark.parametrize("sizes", [(10, 10, 41, 5), (60, 1, 1), (62,), (63,), (30, 30)])
async def test_send_frame_in_one_call_answers_as_the_general_path(sizes: tuple[int, ...]) -> None:
    seen = []
    for plain in (False, True):
        session, protocol, peer, codes = await _session_over_a_socket(plain)
        answers = [session.send_frame(OutFrame(b"x" * n)) for n in sizes]
        await asyncio.sleep(0.01)
        got = peer.recv(1000) if session.close_code is None else b""
        seen.append((answers, got, session.close_code, codes, session.metrics.sent.n))  # type: ignore[union-attr]
        protocol.stream.close()
        peer.close()
    assert seen[0] == seen[1]


async def test_send_frame_in_one_call_drops_when_closed() -> None:
    for plain in (False, True):
        session, protocol, peer, codes = await _session_over_a_socket(plain)
        protocol.server_terminated = True
        assert session.send_frame(OutFrame(b"a")) is False and session.close_code is None
        protocol.server_terminated = False
        protocol.stream.close()
        assert session.send_frame(OutFrame(b"a")) is False and session.close_code is None
        assert session.metrics.sent.n == 0  # type: ignore[union-attr]
        peer.close()
    session, protocol, peer, codes = await _session_over_a_socket(False)
    assert session.send_frame(OutFrame(b"a" * 70)) is False and session.close_code == CloseCode.SLOW_CONSUMER
    assert session.send_frame(OutFrame(b"a")) is False and codes == [CloseCode.SLOW_CONSUMER]
    protocol.stream.close()
    peer.close()
