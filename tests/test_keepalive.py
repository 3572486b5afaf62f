"""WebSocket pings: one timer for the whole replica (wirehub.keepalive.Keepalive), on a real server.

A connection gets a ping every ``server.ping_interval`` seconds; one that sent nothing within
``server.ping_timeout`` seconds of a ping is dropped; any frame counts as a sign of life.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Awaitable, Callable

import pytest

from wirehub.keepalive import Keepalive
from wirehub.testing import LiveServer

Start = Callable[..., Awaitable[LiveServer]]
ECHO = [{"path": "/ws/echo", "handler": "echo"}]
#: for a loaded machine (other test suites may share it)
SLACK = 1.5


def keepalive_config(interval: float, timeout: float) -> dict[str, object]:
    return {"endpoints": ECHO, "server": {"ping_interval": interval, "ping_timeout": timeout}}


class RawClient:
    """A WebSocket client on a bare stream: it answers pings only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, server: LiveServer, path: str = "/ws/echo") -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, opcode: int, payload: bytes = b"") -> None:
        assert len(payload) < 126
        mask = os.urandom(4)
        self.writer.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask
                          + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next server frame, (opcode, payload); (-1, b"") at the end of the stream; TimeoutError
        when none comes within ``timeout``."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return -1, b""
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return head[0] & 0x0F, await self.reader.readexactly(n)

    def close(self) -> None:
        self.writer.close()


async def wait_for_sessions(server: LiveServer, count: int, timeout: float) -> float:
    """Until the server has ``count`` open sessions; the time it took."""
    start = time.monotonic()
    while len(server.app.sessions) != count:
        assert time.monotonic() - start < timeout, f"{len(server.app.sessions)} sessions, not {count}, after {timeout}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_a_client_that_never_answers_is_dropped_within_interval_plus_timeout(wirehub_server: Start) -> None:
    interval, timeout = 0.6, 0.4
    server = await wirehub_server(keepalive_config(interval, timeout))
    healthy = await server.ws("/ws/echo")
    silent = await RawClient.connect(server)  # completes the handshake, then reads and writes nothing
    await wait_for_sessions(server, 2, 5)
    opened = time.monotonic()
    await wait_for_sessions(server, 1, interval + timeout + SLACK)
    elapsed = time.monotonic() - opened
    assert elapsed >= timeout - 0.05, f"dropped {elapsed:.2f}s after opening, before a ping could time out"
    # what the silent client was sent: pings, then the Close frame, then the end of the stream
    frames = []
    while (frame := await silent.frame()) != (-1, b""):
        frames.append(frame)
    assert frames and frames[0] == (0x9, b""), frames
    assert frames[-1] == (0x8, (1000).to_bytes(2, "big") + b"ping timed out"), frames
    silent.close()
    await healthy.send({"still": "open"})
    assert await healthy.recv() == {"echo": {"still": "open"}}


async def test_clients_that_answer_pings_stay_connected_over_several_intervals(wirehub_server: Start) -> None:
    interval, timeout = 0.4, 0.2
    server = await wirehub_server(keepalive_config(interval, timeout))
    tornado_client = await server.ws("/ws/echo")  # answers pings by itself
    raw = await RawClient.connect(server)
    pings = 0
    deadline = time.monotonic() + 5 * interval
    while time.monotonic() < deadline:
        opcode, payload = await raw.frame(timeout=interval + SLACK)
        assert opcode == 0x9, (opcode, payload)
        pings += 1
        raw.send(0xA, payload)
    assert pings >= 4, f"{pings} pings in {5 * interval}s at an interval of {interval}s"
    assert len(server.app.sessions) == 2
    raw.send(0x1, b'{"raw":1}')
    assert await raw.frame() == (0x1, b'{"echo":{"raw":1}}')
    await tornado_client.send({"tornado": 1})
    assert await tornado_client.recv() == {"echo": {"tornado": 1}}
    raw.close()


async def test_any_frame_from_the_client_counts_as_an_answer(wirehub_server: Start) -> None:
    interval, timeout = 0.4, 0.2
    server = await wirehub_server(keepalive_config(interval, timeout))
    client = await RawClient.connect(server)  # never answers a ping, but keeps sending messages
    pings = 0
    deadline = time.monotonic() + 5 * interval
    while time.monotonic() < deadline:
        client.send(0x1, json.dumps({"n": pings}).encode())
        while True:
            opcode, payload = await client.frame(timeout=interval + SLACK)
            assert opcode in (0x1, 0x9), (opcode, payload)
            if opcode == 0x1:
                break
            pings += 1
        await asyncio.sleep(timeout / 4)
    assert pings >= 3
    assert len(server.app.sessions) == 1
    client.close()


async def test_the_pings_of_an_interval_are_spread_over_its_slices(wirehub_server: Start) -> None:
    """Each connection is pinged once per interval, by one of Keepalive.SLICES timer ticks."""
    server = await wirehub_server(keepalive_config(300, 300))  # the timer's first tick is far away
    keepalive = server.app.keepalive
    assert keepalive is not None
    clients = await asyncio.gather(*(RawClient.connect(server) for _ in range(64)))
    await wait_for_sessions(server, 64, 5)
    per_slice = [keepalive.ping_slice(n) for n in range(Keepalive.SLICES)]
    assert sum(per_slice) == 64
    assert max(per_slice) <= 32, per_slice
    for client in clients:
        assert await client.frame() == (0x9, b"")
        client.close()


async def test_ping_timeout_zero_means_the_interval_and_interval_zero_means_no_pings(wirehub_server: Start) -> None:
    server = await wirehub_server(keepalive_config(7, 0))
    assert server.app.keepalive is not None and server.app.keepalive.timeout == 7
    off = await wirehub_server({"endpoints": ECHO, "server": {"ping_interval": 0}})
    assert off.app.keepalive is None
    client = await RawClient.connect(off)
    with pytest.raises(TimeoutError):  # nothing is sent to an idle client
        await client.frame(timeout=0.5)
    assert len(off.app.sessions) == 1
    client.close()


@pytest.mark.timeout(60)
async def test_a_connection_whose_handler_is_suspended_for_20s_is_kept(wirehub_server: Start) -> None:
    """Issue 11's bug: while an op is pending the next frame, the pong too, is not read; the keepalive
    took that for a dead client and dropped it after interval + timeout. A busy connection is alive."""
    from tests.plugins_for_tests.slow_op import MODULE

    interval, timeout, wait = 0.5, 0.5, 20.0
    server = await wirehub_server({"endpoints": [{"path": "/ws/slow", "handler": "slow"}],
                                   "plugins": {"load": [MODULE]},
                                   "server": {"ping_interval": interval, "ping_timeout": timeout}})
    client = await RawClient.connect(server, "/ws/slow")
    assert (await client.frame())[0] == 0x1  # welcome
    client.send(0x1, json.dumps({"op": "wait", "seconds": wait, "id": 1}).encode())
    started = time.monotonic()
    pings = 0
    while True:  # answer every ping, as a live client does; the server reads the pongs only after the op
        opcode, payload = await client.frame(timeout=wait + SLACK)
        if opcode == 0x9:
            pings += 1
            client.send(0xA, payload)
            continue
        break
    assert opcode == 0x1, (opcode, payload)
    assert json.loads(payload) == {"op": "waited", "id": 1}
    assert time.monotonic() - started >= wait - 0.1
    assert pings >= wait / interval / 2, f"only {pings} pings while the op was pending"
    assert len(server.app.sessions) == 1
    # and it stays alive afterwards: the pongs that waited are read now
    client.send(0x1, b'{"op":"ping","id":2}')
    while (frame := await client.frame())[0] == 0x9:
        client.send(0xA, frame[1])
    assert json.loads(frame[1])["op"] == "pong"
    client.close()


def test_the_default_interval_is_25_s_in_the_code_the_shipped_config_and_the_overlays() -> None:
    """25 s between pings (Socket.IO's pingInterval, Centrifugo), 15 s to answer: the dataclass default,
    config/wirehub.yaml and every Kubernetes overlay say the same."""
    from pathlib import Path

    import yaml

    from wirehub.config import ServerConfig, load_config

    root = Path(__file__).resolve().parent.parent
    assert (ServerConfig().ping_interval, ServerConfig().ping_timeout) == (25.0, 15.0)
    shipped = load_config(root / "config" / "wirehub.yaml").server
    assert (shipped.ping_interval, shipped.ping_timeout) == (25.0, 15.0)
    overlays = sorted((root / "deploy" / "kubernetes" / "overlays").glob("*/wirehub.yaml"))
    assert overlays
    for path in overlays:
        server = yaml.safe_load(path.read_text())["server"]
        assert (server["ping_interval"], server["ping_timeout"]) == (25, 15), path
