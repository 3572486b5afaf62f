"""Admission control (service/overload.py) on a real server: while its event loop lags (a callback here blocks
it, as handshakes and joins of a reconnect storm would), new connections wait in a queue and are served
afterwards, probes are answered at once, a connection given up on is skipped, one queued too long gets 503
``overloaded``; the keys are validated."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest

from wirehub.accept import EdgeServer
from wirehub.config import ConfigError, config_from_dict
from wirehub.overload import Admission
from wirehub.testing import LiveServer, eventually

Start = Callable[..., Awaitable[LiveServer]]
ECHO = [{"path": "/ws/echo", "handler": "echo"}]


def admission_of(server: LiveServer) -> Admission:
    edge = server.app.server
    assert isinstance(edge, EdgeServer) and edge.admission is not None
    return edge.admission


@contextmanager
def lagging_loop(block: float = 0.05) -> Iterator[None]:
    """Block the running loop for ``block`` s in every pass (a loop busy with work of its own)."""
    loop = asyncio.get_running_loop()
    handle: list[asyncio.Handle] = []

    def hog() -> None:
        time.sleep(block)
        handle[:] = [loop.call_soon(hog)]

    handle.append(loop.call_soon(hog))
    try:
        yield
    finally:
        handle[0].cancel()


async def send_upgrade(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws/echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    mask = os.urandom(4)
    payload = b'{"n":1}'
    writer.write(bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    head = await asyncio.wait_for(reader.readexactly(2), 5)
    return await asyncio.wait_for(reader.readexactly(head[1] & 0x7F), 5)


@asynccontextmanager
async def limiting(server: LiveServer) -> AsyncIterator[Admission]:
    """The server's loop lags until the block ends; admission control has noticed it when the block begins."""
    admission = admission_of(server)
    with lagging_loop():
        await eventually(lambda: _true(admission.limiting), timeout=5)
        yield admission


async def _true(value: bool) -> bool:
    return value


LAGGING = {"admission_lag": 0.02, "admission_slice": 0.0005}


async def upgrades(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return list(await asyncio.gather(*(send_upgrade(port) for _ in range(n))))


async def test_new_connections_wait_while_the_loop_lags_and_are_served_after(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO, "server": LAGGING})
    async with limiting(server) as admission:
        clients = await upgrades(server.port, 150)
        await eventually(lambda: _true(len(admission.queue) >= 10), timeout=5)
        # what waits is not served: a slice per pass of the loop (one connection here)
        assert len(server.app.sessions) < 140
        # probes are never queued: answered while upgrades wait (asked from threads: this loop is the one lagging)
        started = time.monotonic()
        codes = await asyncio.gather(*(asyncio.to_thread(probe, server.port, path)
                                       for path in ("/healthz", "/readyz", "/metrics")))
        assert codes == [200, 200, 200]
        assert time.monotonic() - started < 1.0
        assert admission.queue, "the upgrades were all served before the probes"
        text = (await server.http("/metrics")).body.decode()
        assert metric(text, "wirehub_connections_deferred_total") >= 10
        assert metric(text, "wirehub_connections_deferred_queued") >= 1
        assert metric(text, "wirehub_admission_limiting") == 1
        assert metric(text, "wirehub_loop_lag_seconds_count") > 0
    # the loop is free again: every deferred connection is upgraded and works
    for reader, writer in clients:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert await echo_once(reader, writer) == b'{"echo":{"n":1}}'
    assert len(server.app.sessions) == 150
    await eventually(lambda: _true(not admission.limiting), timeout=5)
    await close_all(clients)


async def test_a_queued_connection_given_up_on_is_skipped(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO, "server": LAGGING})
    async with limiting(server) as admission:
        kept = await upgrades(server.port, 5)
        gone = await upgrades(server.port, 30)
        await eventually(lambda: _true(len(admission.queue) >= 20), timeout=5)
        for _, writer in gone:
            writer.close()
        await asyncio.sleep(0.2)
    for reader, _ in kept:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
    await eventually(lambda: _true(not admission.queue), timeout=5)
    await asyncio.sleep(0.1)
    assert len(server.app.sessions) < 15  # none was opened for the clients that left while queued
    await close_all(kept + gone)


async def _answer(reader: asyncio.StreamReader) -> bytes:
    """The server's answer to an upgrade: a refusal whole (the server closes after its body), or the head of
    the 101 of one served in time (it stays open: reading to the end would wait for good)."""
    head = await reader.readuntil(b"\r\n\r\n")
    return head + await reader.read() if head.startswith(b"HTTP/1.1 503") else head


async def test_a_connection_queued_longer_than_header_timeout_gets_503_overloaded(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO, "server": {**LAGGING, "header_timeout": 0.3}})
    async with limiting(server):
        clients = await upgrades(server.port, 30)
        answers = await asyncio.gather(*(asyncio.wait_for(_answer(reader), 20) for reader, _ in clients[20:]))
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert refused, answers
    assert b"Retry-After: 1" in refused[0] and b'"reason": "overloaded"' in refused[0]
    text = (await server.http("/metrics")).body.decode()
    assert metric(text, 'wirehub_connections_refused_total{reason="overloaded"}') >= len(refused)
    await close_all(clients)


async def test_without_admission_control_nothing_waits(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO, "server": {"admission_lag": 0}})
    edge = server.app.server
    assert isinstance(edge, EdgeServer) and edge.admission is None
    with lagging_loop():
        reader, writer = await send_upgrade(server.port)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    await close_all([(reader, writer)])


@pytest.mark.parametrize(("server", "key", "fragment"), [
    ({"admission_lag": -1}, "server.admission_lag", "at least 0"),
    ({"admission_lag": 0.001}, "server.admission_lag", "below 0.005"),
    ({"admission_lag": "soon"}, "server.admission_lag", "expected a number"),
    ({"admission_slice": 0}, "server.admission_slice", "at least 0.0005"),
    ({"admission_slice": 2}, "server.admission_slice", "at most 1"),
])
def test_bad_admission_keys_name_the_key(server: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"server": server})
    assert info.value.key == key and fragment in str(info.value), str(info.value)


async def close_all(clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in clients:
        writer.close()
    for _, writer in clients:
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def probe(port: int, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        answer = sock.recv(65536)
    return int(answer.split(b" ", 2)[1])


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics")
