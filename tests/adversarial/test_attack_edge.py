"""Issue 12, defects 1, 7 and 8: attacks on the network edge, each against a real server with a bystander.

1. idle TCP connections past the file limit (a real ``wirehub serve`` started with a soft file limit of 128
   and a hard one of 256), headers or a body sent too slowly, every connection busy at the cap;
7. malformed requests (a NUL in a static path, bad percent-encoding, a bad Origin or Host, oversized headers);
8. invalid control frames (a ping over 125 bytes, a fragmented ping, reserved bits and opcodes).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import resource
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ServerProcess, write_config
from wirehub.accept import PROBE_SLOTS
from wirehub.config import ConfigError, config_from_dict
from wirehub.testing import LiveServer, WsClient, free_port, ws_connect

Start = Callable[..., Awaitable[LiveServer]]
ECHO = [{"path": "/ws/echo", "handler": "echo"}]
FD_LIMIT = 256


# -- helpers ----------------------------------------------------------------------------------------------------


async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, dict[str, Any] | None, bytes]:
    """Send ``data`` on a new connection and read the answer up to the server's close: (status, JSON body, raw)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        length = re.search(rb"\r\nContent-Length: (\d+)", head)
        body = await asyncio.wait_for(reader.readexactly(int(length.group(1))) if length else reader.read(), timeout)
    finally:
        writer.close()
    raw = head + body
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
    assert match, raw[:200]
    is_json = b"Content-Type: application/json" in head
    return int(match.group(1)), json.loads(body) if is_json and body else None, raw


async def metrics_text(port: int) -> str:
    return (await raw_request(port, get("/metrics")))[2].partition(b"\r\n\r\n")[2].decode()


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def echo_round_trip(client: WsClient, tag: str) -> None:
    await client.send(json.dumps({"tag": tag}))
    assert await client.recv(timeout=5.0) == {"echo": {"tag": tag}}


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not in /metrics")


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections that never send a byte (the kernel completes them from the backlog)."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        socks.append(sock)
    return socks


async def wait_all_closed_by_server(socks: list[socket.socket], timeout: float) -> None:
    """Every socket sees the server's FIN (or RST) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pending = list(socks)
    for sock in pending:
        sock.setblocking(False)
    while pending and time.monotonic() < deadline:
        still = []
        for sock in pending:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                still.append(sock)
                continue
            except ConnectionResetError:
                continue
            assert data == b"" or data.startswith(b"HTTP/1.1 503"), data[:100]
        pending = still
        if pending:
            await asyncio.sleep(0.1)
    assert not pending, f"{len(pending)} of {len(socks)} idle connections still open after {timeout}s"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Raw sockets a test opens; closed at its end."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def low_fd_limit() -> None:
    # a soft limit below the hard one: wirehub raises it to the hard one at startup
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT // 2, FD_LIMIT))


@pytest.fixture
async def limited_replica(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ServerProcess]]]:
    """Factory: a ``wirehub serve`` subprocess with RLIMIT_NOFILE 128 (soft) / 256 (hard) and a 1 s header
    timeout."""
    started: list[ServerProcess] = []

    async def start(**server: Any) -> ServerProcess:
        port = free_port()
        config = {
            "server": {"host": "127.0.0.1", "port": port, "ping_interval": 0, "header_timeout": 1.0, **server},
            "logging": {"level": "info"},
            "endpoints": ECHO,
        }
        replica = ServerProcess(write_config(tmp_path / "edge.yaml", config), port, unset_env=("WIREHUB_CONFIG",),
                                cwd=tmp_path, preexec_fn=low_fd_limit)
        started.append(replica)
        return await replica.start_ready()

    yield start
    for replica in started:
        replica.stop()


async def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, Any] | None]:
    status, body, _ = await raw_request(port, get(path), timeout)
    return status, body


# -- defect 1: file descriptors -----------------------------------------------------------------------------------


async def test_idle_connections_past_the_file_limit_evict_each_other_and_the_replica_stays_served(
        limited_replica: Callable[..., Awaitable[ServerProcess]], sockets: list[socket.socket]) -> None:
    replica = await limited_replica()  # cap derived: 256 - fd_reserve 128 = 128
    startup = replica.output()
    assert "file limit 256; connection cap 128" in startup, startup
    bystander = await ws_connect(f"ws://127.0.0.1:{replica.port}/ws/echo")
    try:
        await echo_round_trip(bystander, "before")
        size_before = len(replica.output())
        sockets += idle_connections(replica.port, 400)  # more than the file limit
        # a new connection is served at once: it takes the place of the longest-idle one
        assert (await http_get(replica.port, "/healthz", timeout=2.0))[0] == 200
        await echo_round_trip(bystander, "during")
        text = await metrics_text(replica.port)
        assert metric(text, "wirehub_connections_max") == 128
        assert metric(text, "wirehub_connections") <= 128
        assert metric(text, "wirehub_connections_evicted_total") >= 400 - 128
        assert metric(text, "wirehub_accept_paused_total") == 0  # the cap kept it below EMFILE
        # the evicted ones at once, the last 128 by the 1 s header timeout
        await wait_all_closed_by_server(sockets, timeout=5.0)
        await echo_round_trip(bystander, "after")
        assert (await http_get(replica.port, "/healthz"))[0] == 200
        text = await metrics_text(replica.port)
        assert metric(text, "wirehub_connections") <= 3  # the bystander, this request, maybe the last one
        closed = (metric(text, "wirehub_connections_evicted_total")
                  + metric(text, "wirehub_connections_refused_total", reason="header_timeout"))
        assert closed >= 400
        log = replica.output()[size_before:]
        assert "Traceback" not in log and len(log) < 4000, log[:2000]
    finally:
        bystander.close()


async def test_emfile_pauses_accepting_with_one_log_line_and_recovers(
        limited_replica: Callable[..., Awaitable[ServerProcess]], sockets: list[socket.socket]) -> None:
    # a cap above the file limit: accepting runs into EMFILE
    replica = await limited_replica(max_connections=10000)
    bystander = await ws_connect(f"ws://127.0.0.1:{replica.port}/ws/echo")
    try:
        size_before = len(replica.output())
        cpu_before = cpu_seconds(replica.proc.pid)
        sockets += idle_connections(replica.port, 400)
        await asyncio.sleep(0.5)  # the replica is out of descriptors: accepts pause and resume
        await echo_round_trip(bystander, "during")
        # answered once the header timeout frees descriptors (the request waits in the listen backlog)
        assert (await http_get(replica.port, "/healthz", timeout=10.0))[0] == 200
        await wait_all_closed_by_server(sockets, timeout=10.0)
        await echo_round_trip(bystander, "after")
        text = await metrics_text(replica.port)
        assert metric(text, "wirehub_accept_paused_total") >= 1
        log = replica.output()[size_before:]
        lines = [line for line in log.splitlines() if "accept failed" in line]
        assert len(lines) == 1 and "EMFILE" in lines[0], log[:3000]
        assert "Traceback" not in log and len(log) < 4000, log[:3000]
        # the pauses keep the loop from spinning: well under one core over the several seconds of the attack
        assert cpu_seconds(replica.proc.pid) - cpu_before < 1.5
    finally:
        bystander.close()


async def test_at_a_full_cap_only_probes_are_served_and_past_the_probe_slots_connections_get_503(
        wirehub_server: Start, sockets: list[socket.socket]) -> None:
    server = await wirehub_server({"endpoints": ECHO, "server": {"max_connections": 2, "body_timeout": 30}})
    bystander = await server.ws("/ws/echo")
    other = await server.ws("/ws/echo")  # the cap is full of sessions: nothing to evict
    over_cap = (503, {"error": "unavailable", "reason": "too_many_connections"})
    # a full replica still answers its probes (and is not restarted for being full) ...
    assert await http_get(server.port, "/healthz") == (200, {"status": "ok", "node": server.app.node})
    assert (await http_get(server.port, "/readyz"))[0] == 200
    # ... and nothing else
    status, body, raw = await raw_request(server.port, get("/static/wirehub.js"))
    assert (status, body) == over_cap and b"Retry-After: 1" in raw
    assert (await http_get(server.port, "/ws/echo"))[0] == 503
    # idle connections past the cap take each other's probe slots, not the probes' turn
    sockets += idle_connections(server.port, 3 * PROBE_SLOTS)
    assert (await http_get(server.port, "/healthz"))[0] == 200
    await echo_round_trip(bystander, "bystander")
    # every probe slot busy (a request whose body never comes): a new connection is answered at the accept
    for sock in idle_connections(server.port, PROBE_SLOTS):
        sockets.append(sock)
        sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    await asyncio.sleep(0.2)
    status, body, raw = await raw_request(server.port, get("/healthz"))
    assert (status, body) == over_cap and b"Connection: close" in raw
    text = server.app.metrics.render().decode()
    assert metric(text, "wirehub_connections_refused_total", reason="over_cap") == 3
    assert metric(text, "wirehub_connections") <= 2 + PROBE_SLOTS
    await echo_round_trip(bystander, "bystander")
    # a session ends: room for anything again
    for sock in sockets:
        sock.close()
    other.close()
    await other.wait_closed()
    for _ in range(50):  # the server side of the closes completes a moment later
        if metric(server.app.metrics.render().decode(), "wirehub_connections") < 2:
            break
        await asyncio.sleep(0.02)
    assert (await raw_request(server.port, get("/static/wirehub.js")))[0] == 200


async def test_headers_sent_byte_by_byte_are_cut_at_the_header_timeout(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO, "server": {"header_timeout": 1.0}})
    bystander = await server.ws("/ws/echo")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    request = get("/healthz")
    started = time.monotonic()
    got = b"x"
    try:
        for byte in request:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                got = await asyncio.wait_for(reader.read(100), 0.2)  # a byte every 0.2 s
            except TimeoutError:
                continue
            break
    except ConnectionError:
        got = b""
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    assert got == b"", got  # closed without an answer
    assert 0.9 < elapsed < 0.2 * len(request), elapsed  # at the timeout, long before the head was complete
    await echo_round_trip(bystander, "bystander")
    text = server.app.metrics.render().decode()
    assert metric(text, "wirehub_connections_refused_total", reason="header_timeout") == 1


async def test_a_keep_alive_connection_gets_idle_timeout_between_requests_not_header_timeout(
        wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO, "server": {"header_timeout": 0.5, "idle_timeout": 2.0}})
    bystander = await server.ws("/ws/echo")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

    async def healthz() -> bytes:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        length = re.search(rb"Content-Length: (\d+)", head)
        assert length, head
        await reader.readexactly(int(length.group(1)))
        return head

    try:
        assert (await healthz()).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(1.0)  # twice the header timeout: it applies to the first head only
        assert (await healthz()).startswith(b"HTTP/1.1 200")
        idle_from = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed by the idle timeout
        assert 1.5 < time.monotonic() - idle_from < 4.0
    finally:
        writer.close()
    await echo_round_trip(bystander, "bystander")
    text = server.app.metrics.render().decode()
    assert metric(text, "wirehub_connections_refused_total", reason="header_timeout") == 0


async def test_a_request_body_slower_than_the_body_timeout_is_cut(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": ECHO, "server": {"body_timeout": 1.0}})
    bystander = await server.ws("/ws/echo")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = time.monotonic()
    try:
        writer.write(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"room\"")  # and never the rest
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed, no answer
    finally:
        writer.close()
    assert 0.9 < time.monotonic() - started < 4.0
    await echo_round_trip(bystander, "bystander")


@pytest.mark.parametrize(("server", "key", "message"), [
    ({"header_timeout": 0}, "server.header_timeout", "at least 0.1"),
    ({"body_timeout": "soon"}, "server.body_timeout", "expected a number"),
    ({"idle_timeout": 0}, "server.idle_timeout", "at least 0.1"),
    ({"max_connections": -1}, "server.max_connections", "at least 0"),
    ({"fd_reserve": 1.5}, "server.fd_reserve", "expected an integer"),
    ({"max_header_size": 100}, "server.max_header_size", "at least 1024"),
])
def test_edge_config_errors_name_the_key(server: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"server": server})
    assert err.value.key == key and message in err.value.message


# -- defect 7: malformed HTTP -----------------------------------------------------------------------------------


UPGRADE = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
           "Sec-WebSocket-Version: 13")


@pytest.mark.parametrize(("request_bytes", "status", "error"), [
    (get("/static/wirehub.js%00.txt"), 404, "not_found"),
    (get("/static/%00"), 404, "not_found"),
    (get("/static/%ZZ"), 404, "not_found"),
    (get("/static/%ff%fe"), 400, "bad_request"),
    (get("/static/" + "a" * 5000), 404, "not_found"),
    (get("/static/..%2f..%2fservice/app.py"), 403, "forbidden"),
    (get("/" + "a" * 20000), 404, "not_found"),
    (get("/healthz%00"), 404, "not_found"),
    (get("/ws/echo", *UPGRADE, "Origin: http://[::1"), 403, "forbidden_origin"),
    (get("/ws/echo", *UPGRADE, "Origin: \x00\xff"), 400, "bad_request"),  # Tornado's, made JSON
], ids=["nul-in-static", "nul-alone", "bad-percent", "bad-utf8", "long-static", "traversal", "long-path",
        "nul-in-healthz", "bad-origin-ipv6", "nul-in-header"])
async def test_malformed_requests_get_a_json_answer_and_no_traceback(
        wirehub_server: Start, caplog: pytest.LogCaptureFixture, request_bytes: bytes, status: int,
        error: str) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    bystander = await server.ws("/ws/echo")
    got, body, raw = await raw_request(server.port, request_bytes)
    assert got == status, raw[:300]
    assert body is not None and body["error"] == error
    assert b"Content-Type: application/json" in raw
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]
    await echo_round_trip(bystander, "bystander")


async def test_a_bad_host_header_gets_400(wirehub_server: Start, caplog: pytest.LogCaptureFixture) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    bystander = await server.ws("/ws/echo")
    status, body, _ = await raw_request(server.port, b"GET /healthz HTTP/1.1\r\nHost: \xff[::1\r\n\r\n")
    assert (status, body) == (400, {"error": "bad_request", "reason": "malformed HTTP request"})
    assert not [r for r in caplog.records if r.exc_info]
    await echo_round_trip(bystander, "bystander")


@pytest.mark.parametrize("size", [70_000, 1_000_000])
async def test_headers_over_the_limit_get_431_before_the_close(wirehub_server: Start, size: int) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    bystander = await server.ws("/ws/echo")
    status, body, raw = await raw_request(server.port, get("/healthz", "X-Big: " + "a" * size))
    assert (status, body) == (431, {"error": "headers_too_large", "reason": "request head over the size limit"})
    assert b"Connection: close" in raw
    text = server.app.metrics.render().decode()
    assert metric(text, "wirehub_connections_refused_total", reason="headers_too_large") == 1
    await echo_round_trip(bystander, "bystander")
    assert (await http_get(server.port, "/healthz"))[0] == 200


# -- defect 8: control frames ------------------------------------------------------------------------------------


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_close_code(reader: asyncio.StreamReader, timeout: float = 5.0) -> int | None:
    """Read server frames up to a Close frame: its code (None if the TCP connection ends first)."""
    while True:
        try:
            head = await asyncio.wait_for(reader.readexactly(2), timeout)
        except asyncio.IncompleteReadError:
            return None
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await reader.readexactly(8))[0]
        payload = await reader.readexactly(n)
        if head[0] & 0x0F == 0x8:
            return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005


@pytest.mark.parametrize("attack", [
    frame(0x9, b"p" * 126),
    frame(0x9, b"p" * 1000),
    frame(0x9, b"ping", fin=False) + frame(0x0, b"more"),
    frame(0xA, b"q" * 200),
    frame(0x8, struct.pack("!H", 1000), fin=False),
    bytes([0x81 | 0x40, 0x80]) + os.urandom(4),  # an empty text frame with RSV1 set
    frame(0x3, b"x"),
    frame(0xB, b"x"),
], ids=["ping-126", "ping-1000", "fragmented-ping", "pong-200", "fragmented-close", "reserved-bit",
        "reserved-data-opcode", "reserved-control-opcode"])
async def test_invalid_control_frames_are_closed_1002(wirehub_server: Start, attack: bytes) -> None:
    server = await wirehub_server({"endpoints": ECHO})
    bystander = await server.ws("/ws/echo")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(get("/ws/echo", "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                         "Sec-WebSocket-Version: 13").replace(b"Connection: close\r\n", b""))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        assert head.startswith(b"HTTP/1.1 101"), head
        writer.write(frame(0x1, b'{"tag":"ok"}') + attack)
        await writer.drain()
        assert await read_close_code(reader) == 1002
        await echo_round_trip(bystander, "bystander")
    finally:
        writer.close()
