"""The read callback's fast path for the keepalive's answer (``Protocol.on_readable``): a read that is
exactly one empty masked Pong only marks the connection alive; every other read, however close to it,
goes through the frame parser with its exact answers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import pytest

from tests.test_socket_stream import ECHO, _frame, _protocol, _Raw
from wirehub.frames import Protocol
from wirehub.stream import SocketStream
from wirehub.testing import LiveServer

Start = Callable[..., Awaitable[LiveServer]]
#: no keepalive ping of the server's own during a test: only the test's frames move the flag
QUIET = {**ECHO, "server": {"ping_interval": 300, "ping_timeout": 300}}


async def _open(wirehub_server: Start) -> tuple[_Raw, Protocol]:
    server = await wirehub_server(QUIET)
    raw = await _Raw.connect(server)
    started = time.monotonic()
    while len(server.app.sessions) != 1 or not isinstance(_protocol(server).stream, SocketStream):
        assert time.monotonic() - started < 5, "the connection was not taken over"
        await asyncio.sleep(0.01)
    protocol = _protocol(server)
    protocol._received_pong = False
    return raw, protocol


async def _send(raw: _Raw, *parts: bytes) -> None:
    """Send ``parts`` as separate reads of the server (TCP_NODELAY, a pause between them)."""
    for i, part in enumerate(parts):
        if i:
            await asyncio.sleep(0.05)
        raw.writer.write(part)
        await raw.writer.drain()


async def _alive(protocol: Protocol) -> None:
    started = time.monotonic()
    while not protocol._received_pong:
        assert time.monotonic() - started < 5, "the pong was not read"
        await asyncio.sleep(0.01)


async def _echoes(raw: _Raw, protocol: Protocol) -> None:
    """The parser's state is clean: the next frame is read and answered; then the client leaves."""
    raw.writer.write(_frame(0x1, b'{"after":1}'))
    assert await raw.frame() == (0x1, b'{"echo":{"after":1}}')
    assert protocol._rest is None and not protocol.is_closing()
    raw.writer.close()


async def test_an_empty_masked_pong_alone_marks_the_connection_alive(wirehub_server: Start) -> None:
    raw, protocol = await _open(wirehub_server)
    await _send(raw, _frame(0xA, b""))
    await _alive(protocol)
    await _echoes(raw, protocol)


async def test_a_pong_split_across_reads_is_parsed_whole(wirehub_server: Start) -> None:
    raw, protocol = await _open(wirehub_server)
    pong = _frame(0xA, b"")
    await _send(raw, pong[:3], pong[3:])
    await _alive(protocol)
    await _echoes(raw, protocol)


async def test_a_pong_with_a_payload_marks_the_connection_alive(wirehub_server: Start) -> None:
    raw, protocol = await _open(wirehub_server)
    await _send(raw, _frame(0xA, b"abcd"))
    await _alive(protocol)
    await _echoes(raw, protocol)


async def test_a_pong_and_a_data_frame_in_one_read_are_both_handled(wirehub_server: Start) -> None:
    raw, protocol = await _open(wirehub_server)
    await _send(raw, _frame(0xA, b"") + _frame(0x1, b'{"x":1}'))
    assert await raw.frame() == (0x1, b'{"echo":{"x":1}}')
    assert protocol._received_pong
    await _echoes(raw, protocol)


async def test_a_six_byte_pong_lookalike_inside_an_unfinished_frame_is_that_frames_payload(
        wirehub_server: Start) -> None:
    raw, protocol = await _open(wirehub_server)
    payload = b'{   "y":"' + b"z" * 10 + b'"}'
    mask = bytes((0x11, 0x22, 0x8A ^ 0x20, 0x80 ^ 0x20))  # the two spaces at 2 and 3 go out as 8A 80
    text = bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    middle = text[8:14]
    assert middle[:2] == b"\x8a\x80"  # a read of 6 bytes that starts as the lone pong does
    await _send(raw, text[:8], middle, text[14:])
    assert await raw.frame() == (0x1, b'{"echo":' + payload + b"}")
    await _echoes(raw, protocol)


async def test_an_unmasked_empty_pong_is_taken_as_the_parser_takes_it(wirehub_server: Start) -> None:
    # clients must mask; like Tornado's reader the parser does not insist, and the fast path changes nothing
    raw, protocol = await _open(wirehub_server)
    await _send(raw, b"\x8a\x00")
    await _alive(protocol)
    await _echoes(raw, protocol)


@pytest.mark.parametrize("first", [0x0A, 0xCA], ids=["pong-without-fin", "pong-with-rsv1"])
async def test_a_six_byte_lookalike_of_the_pong_gets_the_parsers_1002(wirehub_server: Start, first: int) -> None:
    raw, protocol = await _open(wirehub_server)
    await _send(raw, bytes((first, 0x80)) + os.urandom(4))
    assert await raw.frame() == (0x8, (1002).to_bytes(2, "big") + b"protocol error")
    assert not protocol._received_pong
    raw.writer.close()
