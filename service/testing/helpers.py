"""Test helpers: free ports and room names, a transport without a socket, a WebSocket client with JSON
helpers, a live server handle and the config tests start from. Import them from :mod:`wirehub.testing`."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from wirehub.app import Wirehub
from wirehub.session import OutFrame


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_room(prefix: str = "room") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class FakeTransport:
    """A :class:`wirehub.session.Transport` without a socket, to unit-test handlers, the hub and sessions.

    Pass it to :class:`wirehub.session.Session`. It keeps every frame it is given (``frames``; their
    payloads with :meth:`texts`) and never sends any: ``buffered()`` is the wire size of all of them, as
    for a client that reads nothing (the session's byte cap then applies). ``close()`` records the code and
    reason in ``closed_with``.
    """

    def __init__(self) -> None:
        self.frames: list[OutFrame] = []
        self.queued = 0
        self.closed_with: tuple[int, str] | None = None

    def send_frame(self, frame: OutFrame) -> None:
        self.frames.append(frame)
        self.queued += len(frame.wire)

    def buffered(self) -> int:
        return self.queued

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    @property
    def closed(self) -> bool:
        return self.closed_with is not None

    def texts(self) -> list[bytes]:
        """The payloads of the frames sent, in order."""
        return [f.payload for f in self.frames]


class WsClient:
    """A real WebSocket client (Tornado's) with JSON helpers and timeouts on every read."""

    def __init__(self, conn: WebSocketClientConnection) -> None:
        self.conn = conn
        #: the end of the connection was read (Tornado gives it once: a read after it waits for good)
        self.ended = False

    async def send(self, obj: Any) -> None:
        await self.conn.write_message(obj if isinstance(obj, str | bytes) else json.dumps(obj),
                                      binary=isinstance(obj, bytes))

    async def recv_raw(self, timeout: float = 5.0) -> str | bytes | None:
        """The next frame; None when the server closed the connection."""
        msg = await asyncio.wait_for(self.conn.read_message(), timeout)
        self.ended = msg is None
        return msg

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await self.recv_raw(timeout)
        if msg is None:
            raise ConnectionError(f"closed by the server: {self.close_code} {self.close_reason}")
        result: dict[str, Any] = json.loads(msg)
        return result

    async def recv_op(self, op: str, timeout: float = 5.0) -> dict[str, Any]:
        """Skip frames until one with ``"op": op`` (returns it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            if msg.get("op") == op:
                return msg

    async def request(self, obj: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send ``obj`` with a fresh ``id`` and return the reply carrying that id."""
        obj = {**obj, "id": obj.get("id", uuid.uuid4().hex[:8])}
        await self.send(obj)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            if msg.get("id") == obj["id"]:
                return msg

    async def expect_nothing(self, within: float = 0.3) -> None:
        try:
            msg = await asyncio.wait_for(self.conn.read_message(), within)
        except TimeoutError:
            return
        raise AssertionError(f"expected no frame, got {msg!r}")

    async def wait_closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Read until the server closes; returns (close_code, close_reason)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.ended:
            self.ended = await asyncio.wait_for(self.conn.read_message(), max(0.01, deadline - loop.time())) is None
        return self.close_code, self.close_reason

    @property
    def close_code(self) -> int | None:
        return self.conn.close_code

    @property
    def close_reason(self) -> str | None:
        return self.conn.close_reason

    def close(self, code: int | None = None) -> None:
        """Start the close handshake (see :meth:`aclose` to also wait for its end)."""
        self.conn.close(code)

    async def aclose(self, code: int | None = None, timeout: float = 2.0) -> None:
        """Close and finish the handshake while the loop runs, then release the socket: one left to
        the garbage collector is a ResourceWarning, an error in whichever test happens to collect it."""
        self.conn.close(code)
        try:
            if self.close_code is None and not self.ended:  # else its end was read already
                await self.wait_closed(timeout=timeout)
        except (TimeoutError, OSError):
            pass
        if self.conn.stream is not None:
            self.conn.stream.close()


async def ws_connect(url: str, *, headers: dict[str, str] | None = None, subprotocols: list[str] | None = None,
                     welcome: bool = False, timeout: float = 5.0, **kwargs: Any) -> WsClient:
    """Connect a real client; with ``welcome=True`` the welcome frame is read and checked."""
    request = HTTPRequest(url, headers=headers or {}, connect_timeout=timeout, request_timeout=timeout)
    conn = await websocket_connect(request, subprotocols=subprotocols, **kwargs)
    client = WsClient(conn)
    if welcome:
        first = await client.recv(timeout)
        assert first.get("op") == "welcome", first
    return client


@dataclass
class LiveServer:
    """A running wirehub app on a free port in this process."""

    app: Wirehub
    port: int
    clients: list[WsClient] = field(default_factory=list)

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def ws_url(self, path: str) -> str:
        return self.url(path, "ws")

    async def ws(self, path: str, **kwargs: Any) -> WsClient:
        client = await ws_connect(self.ws_url(path), **kwargs)
        self.clients.append(client)
        return client

    async def http(self, path: str, method: str = "GET", body: Any = None,
                   headers: dict[str, str] | None = None) -> HTTPResponse:
        """An HTTP request that returns error responses instead of raising."""
        if body is not None and not isinstance(body, str | bytes):
            body = json.dumps(body)
        req = HTTPRequest(self.url(path), method=method, body=body, headers=headers or {},
                          allow_nonstandard_methods=True)
        try:
            return await AsyncHTTPClient().fetch(req, raise_error=False)
        except HTTPClientError as exc:  # pragma: no cover - raise_error=False returns instead
            assert exc.response is not None
            return exc.response


def config_for_tests(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config tests start from: defaults, port 0, no pings, quiet logs."""
    base: dict[str, Any] = {"server": {"port": 0, "host": "127.0.0.1", "ping_interval": 0}}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.02) -> None:
    """Until ``check()`` is true; AssertionError after ``timeout`` seconds (a replica reads another's
    writes once they reached the broker, not at the same instant)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout}s: {check}")
        await asyncio.sleep(interval)
