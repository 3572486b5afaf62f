"""The accept path's own reading of a first request head (service/accept.py, service/head.py): a plain
version-13 upgrade is served without Tornado's HTTP/1 connection; anything else (malformed, unusual,
plain HTTP, refused after authentication) is replayed into Tornado byte for byte, with its answers and
keep-alive, and whatever the client sent after the head (a first frame, pipelined requests) is kept."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from tornado.http1connection import HTTP1ServerConnection
from tornado.httputil import HTTPHeaders
from tornado.iostream import IOStream

from wirehub.event_loop import loop_name
from wirehub.head import parse_head
from wirehub.testing import LiveServer
from wirehub.upgrade import LeanSocket

Start = Callable[..., Awaitable[LiveServer]]
ECHO = [{"path": "/ws/echo", "handler": "echo"}]
KEY = base64.b64encode(b"0123456789abcdef").decode()


def upgrade_head(path: str = "/ws/echo", *extra: str, eol: str = "\r\n") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13", *extra]
    return (eol.join(lines) + eol + eol).encode("latin-1")


def text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """One HTTP answer: status, head, body (by Content-Length; none for a 101)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head[9:12])
    length = re.search(rb"\r\nContent-Length: (\d+)", head)
    body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5) if length else b""
    return status, head, body


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readexactly(2), 5)
    return await asyncio.wait_for(reader.readexactly(head[1] & 0x7F), 5)


async def exchange(server: LiveServer, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


@pytest.fixture
def http1_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every Tornado HTTP/1 server connection started from now on (in this process)."""
    started: list[object] = []
    original = HTTP1ServerConnection.start_serving

    def counting(self: HTTP1ServerConnection, delegate: Any) -> None:
        started.append(self)
        original(self, delegate)

    monkeypatch.setattr(HTTP1ServerConnection, "start_serving", counting)
    return started


# -- on a real server ------------------------------------------------------------------------------------------


async def test_a_plain_upgrade_skips_tornados_http1_connection_and_plain_http_does_not(
        wirehub_server: Start, http1_connections: list[object]) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    reader, writer = await exchange(server, upgrade_head())
    status, head, _ = await read_answer(reader)
    assert status == 101, head
    assert isinstance(next(iter(server.app.sessions.values())), LeanSocket)
    assert http1_connections == []
    reader2, writer2 = await exchange(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, _, body = await read_answer(reader2)
    assert (status, json.loads(body)["status"]) == (200, "ok")
    assert len(http1_connections) == 1
    await closed(writer)
    await closed(writer2)


async def test_a_frame_sent_with_the_upgrade_head_is_read(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    reader, writer = await exchange(server, upgrade_head() + text_frame(b'{"n":1}') + text_frame(b'{"n":2}'))
    status, head, _ = await read_answer(reader)
    assert status == 101, head
    assert await read_frame(reader) == b'{"echo":{"n":1}}'
    assert await read_frame(reader) == b'{"echo":{"n":2}}'
    await closed(writer)


async def test_pipelined_requests_after_a_plain_head_are_all_answered_in_order(
        wirehub_server: Start, http1_connections: list[object]) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    pipelined = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                 b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                 b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    reader, writer = await exchange(server, pipelined)
    answers = [await read_answer(reader) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 404, 200]
    assert json.loads(answers[1][2]) == {"error": "not_found", "reason": "no route for /nowhere"}
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the third, as asked
    assert len(http1_connections) == 1
    await closed(writer)


async def test_an_upgrade_after_a_plain_request_on_one_connection_is_served_by_tornados_path(
        wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    reader, writer = await exchange(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + upgrade_head())
    assert (await read_answer(reader))[0] == 200
    status, head, _ = await read_answer(reader)
    assert status == 101, head
    writer.write(text_frame(b'{"n":3}'))
    assert await read_frame(reader) == b'{"echo":{"n":3}}'
    await closed(writer)


@pytest.mark.parametrize(("data", "status", "error"), [
    (b"GET  /ws/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "bad_request"),
    (b"GET /ws/echo HTTP/1.1 x\r\nHost: 127.0.0.1\r\n\r\n", 400, "bad_request"),
    (b"GET /ws/echo\r\nHost: 127.0.0.1\r\n\r\n", 400, "bad_request"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "bad_request"),
    (upgrade_head("/ws/echo", "X-No-Colon"), 400, "bad_request"),
    (upgrade_head("/ws/echo", " X-Folded: yes"), 400, "bad_request"),
    (upgrade_head("/ws/echo", "X-Nul: a\x00b"), 400, "bad_request"),
    (upgrade_head("/ws/echo").replace(b"Host: 127.0.0.1", b"Host: \xff[::1"), 400, "bad_request"),
    (upgrade_head("/ws/echo").replace(b"Host: 127.0.0.1\r\n", b""), 400, "bad_request"),
    (upgrade_head("/ws/nowhere"), 404, "not_found"),
    (upgrade_head("/ws/echo", "Origin: http://evil.example"), 403, "forbidden_origin"),
], ids=["double-space", "extra-part", "no-version", "tls-hello", "no-colon", "folded", "nul", "bad-host", "no-host",
        "no-endpoint", "foreign-origin"])
async def test_malformed_or_refused_heads_get_tornados_json_answer(
        wirehub_server: Start, caplog: pytest.LogCaptureFixture, data: bytes, status: int, error: str) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    reader, writer = await exchange(server, data)
    got, head, body = await read_answer(reader)
    assert got == status, head
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["error"] == error
    assert not [r for r in caplog.records if r.exc_info]
    assert not server.app.sessions
    await closed(writer)


@pytest.mark.parametrize("data", [
    upgrade_head(eol="\n"),  # bare LF line ends: Tornado still reads them
    upgrade_head("/ws/echo", "Content-Length: 0"),  # a body header: Tornado reads (and checks) bodies
    b"\r\n" + upgrade_head(),  # an empty line before the request, which Tornado skips
    upgrade_head("/ws/echo", "X-Dup: a", "x-dup: b", "X-Odd:\t tabbed \t"),  # a duplicate header, tabs
], ids=["bare-lf", "content-length", "leading-crlf", "duplicate-header"])
async def test_unusual_but_valid_upgrades_are_still_upgraded(wirehub_server: Start, data: bytes) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    reader, writer = await exchange(server, data)
    status, head, _ = await read_answer(reader)
    assert status == 101, head
    writer.write(text_frame(b'{"n":4}'))
    assert await read_frame(reader) == b'{"echo":{"n":4}}'
    await closed(writer)


@pytest.mark.parametrize("size", [70_000, 1_000_000])
async def test_an_upgrade_head_over_the_limit_gets_431(wirehub_server: Start, size: int) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    reader, writer = await exchange(server, upgrade_head("/ws/echo", "X-Big: " + "a" * size))
    status, head, body = await read_answer(reader)
    assert (status, json.loads(body)) == (431, {"error": "headers_too_large",
                                                "reason": "request head over the size limit"})
    assert b"Connection: close" in head
    assert not server.app.sessions
    await closed(writer)


async def test_a_head_sent_in_pieces_is_upgraded(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    data = upgrade_head()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for i in range(0, len(data), 7):
        writer.write(data[i:i + 7])
        await writer.drain()
        await asyncio.sleep(0.005)
    status, head, _ = await read_answer(reader)
    assert status == 101, head
    await closed(writer)


async def test_a_head_sent_a_moment_after_the_accept_is_read_without_tornados_read(
        wirehub_server: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[object] = []
    original = IOStream.read_until_regex

    def counting(self: IOStream, regex: bytes, max_bytes: int | None = None) -> Any:
        reads.append(self)
        return original(self, regex, max_bytes)

    monkeypatch.setattr(IOStream, "read_until_regex", counting)
    server = await wirehub_server({"endpoints": ECHO})
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await asyncio.sleep(0.1)  # accepted, and nothing to read yet
    writer.write(upgrade_head())
    status, head, _ = await read_answer(reader)
    assert status == 101, head
    assert reads == []  # a plain reader on the loop waited for the head, not Tornado's buffered read
    await closed(writer)


async def test_a_connection_cut_at_the_header_timeout_leaves_no_reader_on_the_loop(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO, "server": {"header_timeout": 0.3}})
    table = server.app.server.table
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for _ in range(100):
        if table.waiting:
            break
        await asyncio.sleep(0.01)
    fd = next(iter(table.waiting)).socket.fileno()  # the server's side, waiting for its head with a reader
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server, after no head came
    for _ in range(100):
        if not table.open:
            break
        await asyncio.sleep(0.02)
    assert not table.open and not table.waiting
    await closed(writer)
    # The server's wait for the head was taken off the loop: asyncio's remove_reader answers whether a reader
    # was still there (one left on a closed fd keeps the fd's next socket from ever being read). uvloop's
    # answers None, and a poll it keeps for a closed fd does not block the next socket; there this checks
    # only that the call is safe.
    loop = asyncio.get_running_loop()
    assert loop.remove_reader(fd) is (None if loop_name(loop) == "uvloop" else False)


async def test_a_refusal_after_authentication_is_tornados_answer_after_one_authentication(
        wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    app = server.app
    calls: list[str] = []
    authenticate = app.authenticator.authenticate

    async def counted(request: Any) -> Any:
        calls.append(request.path)
        return await authenticate(request)

    app.authenticator.authenticate = counted  # type: ignore[method-assign]
    reader, writer = await exchange(server, upgrade_head("/ws/echo?guest=bad"))
    status, head, body = await read_answer(reader)
    assert status == 400, head
    assert b"Cache-Control: no-store" in head
    assert json.loads(body) == {"error": "bad_request", "reason": "bad_guest_key"}
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the answer, as Tornado's path does
    assert calls == ["/ws/echo"]
    text = app.metrics.render().decode()
    assert 'wirehub_auth_failures_total{reason="bad_guest_key"} 1.0' in text
    await closed(writer)
    reader, writer = await exchange(server, upgrade_head("/ws/echo?guest=" + "g" * 16))
    assert (await read_answer(reader))[0] == 101
    assert calls == ["/ws/echo", "/ws/echo"]
    await closed(writer)


async def test_an_authenticator_that_suspends_still_upgrades(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    app = server.app
    authenticate = app.authenticator.authenticate

    async def slow(request: Any) -> Any:
        await asyncio.sleep(0.05)
        return await authenticate(request)

    app.authenticator.authenticate = slow  # type: ignore[method-assign]
    reader, writer = await exchange(server, upgrade_head() + text_frame(b'{"n":5}'))
    assert (await read_answer(reader))[0] == 101
    assert await read_frame(reader) == b'{"echo":{"n":5}}'
    await closed(writer)


# -- the reader itself ---------------------------------------------------------------------------------------


def tornado_parse(data: bytes) -> tuple[str, HTTPHeaders]:
    text = data.decode("latin1")
    eol = text.find("\n")
    return text[:eol].rstrip("\r"), HTTPHeaders.parse(text[eol:])


@pytest.mark.parametrize("data", [
    upgrade_head(),
    upgrade_head("/ws/echo?guest=abc&x=%20", "Cookie: a=1", "cookie: b=2", "X-Latin: caf\xe9", "X-Empty:",
                 "X-Spaces:   v  w   "),
    b"GET / HTTP/1.1\r\n\r\n",
])
def test_what_the_reader_takes_it_reads_as_tornado_does(data: bytes) -> None:
    parsed = parse_head(data)
    assert parsed is not None
    start_line, headers, fields = parsed
    line, expected = tornado_parse(data)
    assert " ".join(start_line) == line
    assert sorted(headers.get_all()) == sorted(expected.get_all())
    assert fields == {name: expected[name] for name in expected}
    assert all(headers[name] == expected[name] for name in expected)


@pytest.mark.parametrize("data", [
    upgrade_head(eol="\n"),
    b"\r\n" + upgrade_head(),
    b"POST /ws/echo HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ws/echo HTTP/1.0\r\nHost: x\r\n\r\n",
    b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
    b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /ws/echo HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET /ws/echo HTTP/1.1\r\nBad Name: x\r\n\r\n",
    b"GET /ws/echo HTTP/1.1\r\nX: a\x7fb\r\n\r\n",
    b"GET /ws/\x01echo HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["bare-lf", "leading-crlf", "post", "http10", "content-length", "chunked", "folded", "space-in-name",
        "del-in-value", "control-in-target"])
def test_what_the_reader_does_not_take_is_left_to_tornado(data: bytes) -> None:
    assert parse_head(data) is None


async def test_a_head_over_a_small_limit_in_one_packet_gets_431(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO, "server": {"max_header_size": 1024}})
    reader, writer = await exchange(server, upgrade_head("/ws/echo", "X-Big: " + "a" * 1500))
    status, _, body = await read_answer(reader)
    assert (status, json.loads(body)["error"]) == (431, "headers_too_large")
    await closed(writer)
    reader, writer = await exchange(server, upgrade_head("/ws/echo", "X-Fits: " + "a" * 700))
    assert (await read_answer(reader))[0] == 101
    await closed(writer)


async def test_connections_closed_before_or_during_their_head_leave_nothing_behind(
        wirehub_server: Start, caplog: pytest.LogCaptureFixture) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    for data in (b"", upgrade_head()[:30]):
        _, writer = await exchange(server, data)
        await closed(writer)
    table = server.app.server.table
    for _ in range(100):
        if not table.open:
            break
        await asyncio.sleep(0.02)
    assert not table.open and not table.waiting and not table.first_heads
    assert not [r for r in caplog.records if r.exc_info]
    reader, writer = await exchange(server, upgrade_head())
    assert (await read_answer(reader))[0] == 101
    await closed(writer)


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "example.com", "[::1]:443", "a-b.example.com:1"])
def test_the_plain_request_is_what_tornado_makes_of_the_same_head(host: str) -> None:
    from tornado.httputil import HTTPServerRequest

    from wirehub.accept import _HeadConnection, _PeerContext
    from wirehub.upgrade import _PLAIN_HOST, _PlainRequest

    assert _PLAIN_HOST.fullmatch(host)
    parsed = parse_head(upgrade_head().replace(b"127.0.0.1", host.encode()))
    assert parsed is not None
    start_line, headers, _ = parsed
    connection = _HeadConnection(None, _PeerContext("10.0.0.1", "http"))  # type: ignore[arg-type]
    ours = vars(_PlainRequest(connection, start_line, headers, host))
    tornados = vars(HTTPServerRequest(connection=connection, start_line=start_line, headers=headers))
    assert ours.keys() == tornados.keys()
    assert {k: v for k, v in ours.items() if k != "_start_time"} == {
        k: v for k, v in tornados.items() if k != "_start_time"}


async def test_a_query_string_is_parsed_for_the_authenticator(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    reader, writer = await exchange(server, upgrade_head("/ws/echo?guest=" + "k" * 16 + "&x=1"))
    assert (await read_answer(reader))[0] == 101
    (session_side,) = server.app.sessions.values()
    reader2, writer2 = await exchange(server, upgrade_head("/ws/echo?guest=" + "k" * 16))
    assert (await read_answer(reader2))[0] == 101
    users = {s.identity.user for s in server.app.sessions.values()}  # the same guest key: the same user
    assert len(users) == 1 and session_side.identity is not None
    await closed(writer)
    await closed(writer2)
