"""Drain on SIGTERM, with a real ``wirehub serve`` process and many real WebSocket clients.

- /readyz is 503 from the first request after SIGTERM; new upgrades are refused with 503;
- every client gets the frames queued before the drain, then 1001 with ``retry_ms=N`` (N spread over
  drain.reconnect_jitter), in paced batches;
- the process exits 0 within drain.grace;
- with two replicas on one Redis, a message published on the other replica just before the drain is
  delivered to the draining replica's clients or recoverable from history after they reconnect.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.helpers import ServerProcess, write_config
from wirehub.auth import Identity
from wirehub.session import Session
from wirehub.testing import FakeTransport, LiveServer, free_port

HINT = re.compile(r"^server going away; retry_ms=(\d+)$")
CLIENTS = 200
GRACE = 10.0
JITTER = 5.0


def log_lines(replica: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in replica.output().splitlines() if line.startswith("{")]


async def http_get(url: str, timeout: float = 2.0) -> HTTPResponse:
    req = HTTPRequest(url, connect_timeout=timeout, request_timeout=timeout)
    try:
        return await AsyncHTTPClient().fetch(req, raise_error=False)
    except HTTPClientError as exc:  # pragma: no cover - raise_error=False returns instead
        assert exc.response is not None
        return exc.response


def make_replica(tmp_path: Path, name: str, overrides: dict[str, Any]) -> ServerProcess:
    """``wirehub --config NAME.yaml serve`` (not started), run in ``tmp_path`` without ``WIREHUB_CONFIG``."""
    port = free_port()
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "ping_interval": 0, "node_id": name},
        "drain": {"grace": GRACE, "batch_size": 50, "batch_interval": 0.1, "reconnect_jitter": JITTER},
        "logging": {"level": "info", "format": "json"},
        "endpoints": [{"path": "/ws/echo", "handler": "echo"}],
    }
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    return ServerProcess(write_config(tmp_path / f"{name}.yaml", config), port, name=name,
                         unset_env=("WIREHUB_CONFIG",), cwd=tmp_path)


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[ServerProcess] = []

    async def start(name: str = "replica-a", **overrides: Any) -> ServerProcess:
        replica = make_replica(tmp_path, name, overrides)
        started.append(replica)
        await replica.start().wait_ready(request_timeout=0.5)
        return replica

    yield start
    for replica in started:
        replica.kill()


@pytest.fixture
def opened() -> Iterator[list[WebSocketClientConnection]]:
    """Client connections to close at the end (Tornado warns about any left open, even if the server
    closed it)."""
    conns: list[WebSocketClientConnection] = []
    yield conns
    for conn in conns:
        conn.close()


async def connect_many(url: str, n: int, opened: list[WebSocketClientConnection]) -> list[WebSocketClientConnection]:
    conns: list[WebSocketClientConnection] = []
    for start in range(0, n, 50):
        batch = [websocket_connect(HTTPRequest(url, connect_timeout=10, request_timeout=10))
                 for _ in range(start, min(n, start + 50))]
        for result in await asyncio.gather(*batch, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result
            conns.append(result)
            opened.append(result)
    return conns


async def metric(replica: ServerProcess, name: str, **labels: str) -> float:
    text = (await http_get(replica.url("/metrics"))).body.decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def read_until_closed(conn: WebSocketClientConnection, timeout: float) -> tuple[list[str], float]:
    """Every frame until the close; returns them and when the close arrived (monotonic)."""
    frames: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        msg = await asyncio.wait_for(conn.read_message(), max(0.01, deadline - loop.time()))
        if msg is None:
            return frames, time.monotonic()
        assert isinstance(msg, str)
        frames.append(msg)


async def test_sigterm_drains_200_clients_with_1001_and_a_jittered_hint(
        replicas: Callable[..., Any], opened: list[WebSocketClientConnection]) -> None:
    replica: ServerProcess = await replicas()
    conns = await connect_many(replica.url("/ws/echo", "ws"), CLIENTS, opened)
    assert await metric(replica, "wirehub_sessions", endpoint="/ws/echo") == CLIENTS
    # Each client sends one message; its echo is queued to it before the drain (the server counted it),
    # and is not read here before SIGTERM: it must arrive before the close frame.
    await asyncio.gather(*(c.write_message(json.dumps({"n": i})) for i, c in enumerate(conns)))
    deadline = time.monotonic() + 10
    while await metric(replica, "wirehub_messages_out_total") < CLIENTS:
        assert time.monotonic() < deadline, "the echoes were not sent"
        await asyncio.sleep(0.05)

    sigterm_at = time.monotonic()
    replica.proc.send_signal(signal.SIGTERM)
    readiness = [await http_get(replica.url("/readyz"))]
    assert readiness[0].code == 503, "readiness must fail from the first moment"
    assert json.loads(readiness[0].body)["reason"] == "draining"
    with pytest.raises(HTTPClientError) as info:
        await websocket_connect(HTTPRequest(replica.url("/ws/echo", "ws"), request_timeout=5))
    assert info.value.code == 503

    results = await asyncio.gather(*(read_until_closed(c, GRACE + 5) for c in conns))
    while replica.proc.poll() is None:  # readiness stays 503 until the listener closes
        try:
            response = await http_get(replica.url("/readyz"), 0.5)
        except (OSError, HTTPClientError):  # the listener is closed: the process is about to exit
            break
        readiness.append(response)
        await asyncio.sleep(0.05)
    assert all(r.code == 503 for r in readiness), [r.code for r in readiness]

    hints: list[int] = []
    for i, (conn, (frames, _)) in enumerate(zip(conns, results, strict=True)):
        assert [json.loads(f) for f in frames] == [{"echo": {"n": i}}], "a queued frame was lost"
        assert conn.close_code == 1001
        assert conn.close_reason is not None
        hint = HINT.match(conn.close_reason)
        assert hint is not None, conn.close_reason
        hints.append(int(hint.group(1)))
    assert all(0 <= h <= JITTER * 1000 for h in hints)
    assert max(hints) - min(hints) > 2000 and len(set(hints)) > CLIENTS // 2, "reconnects are not spread"

    code = await asyncio.get_running_loop().run_in_executor(None, replica.proc.wait, GRACE + 5)
    elapsed = time.monotonic() - sigterm_at
    assert code == 0
    assert elapsed < GRACE, f"exit took {elapsed:.1f}s, over the grace of {GRACE}s"
    logs = log_lines(replica)
    closed = [e for e in logs if e.get("event") == "session_close"]
    assert len(closed) == CLIENTS and {e["code"] for e in closed} == {1001}
    # Paced: 4 batches of 50, 0.1 s apart (timed by the server; the clients' clock sees its own load).
    batches = [e for e in logs if e.get("event") == "drain_batch"]
    assert [e["closing"] for e in batches] == [50, 100, 150, 200]
    assert batches[-1]["ts"] - batches[0]["ts"] >= 0.29
    assert any("drained 200 sessions" in e["msg"] for e in logs)


# -- two replicas on one Redis ----------------------------------------------------------------------------------


async def _recv_op(conn: WebSocketClientConnection, op: str, timeout: float = 5.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        raw = await asyncio.wait_for(conn.read_message(), max(0.01, deadline - loop.time()))
        assert raw is not None, f"closed while waiting for {op}: {conn.close_code} {conn.close_reason}"
        assert isinstance(raw, str)
        msg: dict[str, Any] = json.loads(raw)
        if msg.get("op") == op:
            return msg


async def _chat_request(conn: WebSocketClientConnection, request: dict[str, Any], op: str) -> dict[str, Any]:
    await conn.write_message(json.dumps(request))
    return await _recv_op(conn, op)


@pytest.mark.redis
async def test_messages_published_elsewhere_around_the_drain_are_delivered_or_recoverable(
        replicas: Callable[..., Any], opened: list[WebSocketClientConnection], redis_server: Any) -> None:
    """Clients of replica B (draining) get every message published on replica A just before and during
    the drain: live before their 1001, else from history when they rejoin on A with their position."""
    prefix = f"drain-{os.getpid()}-{time.monotonic_ns()}"
    overrides = {
        "bus": {"plugin": "redis", "redis": {"url": redis_server.url, "key_prefix": prefix}},
        "endpoints": [{"path": "/ws/chat", "handler": "chat"}],
    }
    a: ServerProcess = await replicas("replica-a", **overrides)
    b: ServerProcess = await replicas("replica-b", **overrides)
    room = "drain-room"
    members = await connect_many(b.url("/ws/chat", "ws"), 20, opened)
    positions: list[dict[str, Any]] = []
    for conn in members:
        joined = await _chat_request(conn, {"op": "join", "room": room, "id": "j"}, "joined")
        positions.append({"offset": joined["offset"], "epoch": joined["epoch"]})
    (publisher,) = await connect_many(a.url("/ws/chat", "ws"), 1, opened)
    await _chat_request(publisher, {"op": "join", "room": room, "id": "j"}, "joined")

    before = await _chat_request(publisher, {"op": "publish", "room": room, "data": "before", "id": "p1"}, "ack")
    b.proc.send_signal(signal.SIGTERM)  # just after the broker took it
    await publisher.write_message(json.dumps({"op": "publish", "room": room, "data": "during", "id": "p2"}))
    during = await _recv_op(publisher, "ack")
    assert during["offset"] > before["offset"]

    live_counts = {"before": 0, "during": 0}
    results = await asyncio.gather(*(read_until_closed(c, GRACE + 5) for c in members))
    rejoin_url = a.url("/ws/chat", "ws")
    for conn, position, (frames, _) in zip(members, positions, results, strict=True):
        assert conn.close_code == 1001 and HINT.match(conn.close_reason or ""), conn.close_reason
        got = {m["data"]: m for m in map(json.loads, frames) if m.get("op") == "message"}
        for data in got:
            live_counts[data] += 1
        missing = {"before", "during"} - set(got)
        if missing:  # reconnect to the other replica from the last position seen, as a client does
            last = max((m["offset"] for m in got.values()), default=position["offset"])
            (again,) = await connect_many(rejoin_url, 1, opened)
            joined = await _chat_request(
                again, {"op": "join", "room": room, "id": "r", "since": {"offset": last, "epoch": position["epoch"]}},
                "joined")
            assert joined["recovered"] is True, joined
            replayed = [await _recv_op(again, "message") for _ in missing]
            assert {m["data"] for m in replayed} == missing
            again.close()
    assert await asyncio.get_running_loop().run_in_executor(None, b.proc.wait, GRACE + 5) == 0
    # Which path each message took depends on timing (live until a session's close frame is queued, after
    # that from history); both count as delivered, and every client got both messages one way or the other.
    assert sum(live_counts.values()) <= 2 * len(members)
    print(f"delivered live: {live_counts}; the rest recovered from history")
    assert a.proc.poll() is None and (await http_get(a.url("/readyz"))).code == 200


async def test_a_session_whose_upgrade_raced_the_drain_is_closed_too(wirehub_server: Callable[..., Any]) -> None:
    """An upgrade that passed the draining check just before SIGTERM opens after the drain began: it gets
    1001 with the hint as well, instead of lingering until the grace is over."""
    server: LiveServer = await wirehub_server({"endpoints": [{"path": "/ws/echo", "handler": "echo"}],
                                               "drain": {"grace": 5}})
    app = server.app
    app.begin_drain()
    transport = FakeTransport()
    session = Session(transport, Identity(user="late"), endpoint="/ws/echo", node=app.node, max_queue_bytes=65536)
    app.session_opened(session, None)  # type: ignore[arg-type]
    assert transport.closed_with is not None
    code, reason = transport.closed_with
    assert code == 1001 and HINT.match(reason)
    app.sessions.pop(session)
    app.metrics.sessions.labels("/ws/echo").dec()


async def test_drain_ends_event_streams_with_a_jittered_retry(wirehub_server: Callable[..., Any]) -> None:
    """Server-Sent Events streams are not left to the keepalive: the drain ends them at once with
    ``retry: N`` (N in 1..reconnect_jitter ms) so that browsers reconnect elsewhere, spread out."""
    server: LiveServer = await wirehub_server({"drain": {"grace": 5, "reconnect_jitter": 2}})
    chunks: list[bytes] = []
    got_first = asyncio.Event()

    def on_chunk(chunk: bytes) -> None:
        chunks.append(chunk)
        got_first.set()

    request = HTTPRequest(server.url("/sse?rooms=lobby"), streaming_callback=on_chunk, request_timeout=10)
    stream = asyncio.ensure_future(AsyncHTTPClient().fetch(request, raise_error=False))
    await asyncio.wait_for(got_first.wait(), 5)
    started = time.monotonic()
    await server.app.drain()
    response = await asyncio.wait_for(stream, 5)
    assert time.monotonic() - started < 3, "the drain waited for the stream's keepalive"
    assert response.code == 200
    body = b"".join(chunks).decode()
    retry = re.findall(r"^retry: (\d+)$", body, re.MULTILINE)
    assert len(retry) >= 2 and 1 <= int(retry[-1]) <= 2000, body  # the stream's first retry is its default
