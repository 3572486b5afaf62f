"""Issue 12, defect 2: state that one client can create.

- ``history`` (and ``join``/``leave`` churn) of unique rooms must create nothing: 100,000 of them over a
  real WebSocket to a ``wirehub serve`` process grow its RSS by under 5 MB and leave no broker key;
- every op goes through the per-session op rate (``server.op_rate``): floods are answered
  ``rate_limited`` with ``retry_ms``, sustained abuse is closed with 4029;
- the memory bus's history is capped in bytes (``bus.memory.history_max_bytes``), evicting the least
  recently used rooms, and a reader of an evicted room sees a new epoch (``recovered: false``).

Each test checks that a bystander session on the same server is still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError

from bench.loadgen import rss_bytes
from tests.helpers import FAST_BUS, ServerProcess, write_config
from wirehub.brokers import NatsServer, RedisServer
from wirehub.builtins.bus._broker import encode_room
from wirehub.testing import LiveServer, WsClient, free_port, unique_room, ws_connect

CHAT = "/ws/chat"
GAME = "/ws/game"
#: history requests per bus (NATS answers one in about 0.7 ms: a tenth keeps the test to seconds)
FLOOD = {"memory": 100_000, "redis": 100_000, "nats": 10_000}
ATTACK_CONNECTIONS = 4
BATCH = 500
#: high enough that the flood is never refused: this test is about state, the next ones about rates
NO_OP_LIMIT = {"op_rate": 10_000_000, "op_burst": 10_000_000}


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not exported")


async def publish_round_trip(url: str) -> str:
    """A bystander's publish is acknowledged and reaches another member of its room (returned)."""
    room = unique_room("bystander")
    sender, listener = await ws_connect(url, welcome=True), await ws_connect(url, welcome=True)
    try:
        for client in (sender, listener):
            assert (await client.request({"op": "join", "room": room}))["op"] == "joined"
        ack = await sender.request({"op": "publish", "room": room, "data": {"still": "served"}})
        assert ack["op"] == "ack", ack
        message = await listener.recv_op("message")
        assert message["data"] == {"still": "served"} and message["offset"] == ack["offset"]
    finally:
        await asyncio.gather(sender.aclose(), listener.aclose())
    return room


# -- 100,000 history requests for unique rooms --------------------------------------------------------------


async def _redis_state(server: RedisServer, prefix: str) -> tuple[set[str], int]:
    """The keys under ``prefix``, and DBSIZE."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(server.url)
    try:
        keys = {k.decode() async for k in client.scan_iter(match=f"{prefix}:*", count=1000)}
        nodes = f"{prefix}:presence:nodes"  # the replicas' liveness set: one per deployment, not per room
        size = int(await client.dbsize()) - (nodes in keys)
        keys.discard(nodes)
        return keys, size
    finally:
        await client.aclose()


async def _nats_state(server: NatsServer, prefix: str) -> tuple[set[str], int]:
    """The subjects of the rooms stream, and of the presence members bucket (keys and delete markers)."""
    import nats

    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        rooms = await js.stream_info(f"{prefix}_rooms", subjects_filter=">")
        presence = await js.stream_info(f"KV_{prefix}_members", subjects_filter=">")
        return set(rooms.state.subjects or {}), len(presence.state.subjects or {})
    finally:
        await nc.close()


def _room_keys(kind: str, prefix: str, room: str) -> set[str]:
    """What one room with history holds on the ``kind`` broker (a bystander's room)."""
    token = encode_room(room)
    if kind == "redis":
        return {f"{prefix}:h:{{{token}}}", f"{prefix}:m:{{{token}}}"}
    return {f"{prefix}.r.{token}.h", f"{prefix}.r.{token}.e"}  # history, and presence events


@pytest.fixture(params=["memory", "redis", "nats"])
async def flood_target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[
        tuple[str, str, ServerProcess, Callable[[], Awaitable[Any]]]]:
    """``(kind, prefix, server, broker_state)``: a ``wirehub serve`` process on the bus under test, and
    what its broker holds (keys / stream subjects under the prefix, or the memory bus's history bytes)."""
    kind, prefix = str(request.param), f"atk{uuid.uuid4().hex[:8]}"
    port = free_port()
    bus: dict[str, Any] = {"plugin": kind}
    if kind == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        bus["redis"] = {"url": redis.url, "key_prefix": prefix, **FAST_BUS}
    elif kind == "nats":
        nats_srv: NatsServer = request.getfixturevalue("nats_server")
        bus["nats"] = {"servers": [nats_srv.url], "subject_prefix": prefix, "storage": "memory", **FAST_BUS}
    config = write_config(tmp_path / f"{kind}.yaml", {
        "server": {"port": port, "host": "127.0.0.1", "ping_interval": 0, **NO_OP_LIMIT},
        "logging": {"access_log": False}, "bus": bus,
    })
    server = await ServerProcess(config, port, name=f"flood-{kind}").start_ready()

    async def broker_state() -> Any:
        if kind == "redis":
            return await _redis_state(redis, prefix)
        if kind == "nats":
            return await _nats_state(nats_srv, prefix)
        return metric(await server_metrics(server), "wirehub_history_bytes")

    try:
        yield kind, prefix, server, broker_state
    finally:
        server.stop()


async def server_metrics(server: ServerProcess) -> str:
    return (await AsyncHTTPClient().fetch(server.url("/metrics"))).body.decode()


async def history_flood(ws: WsClient, count: int, tag: str) -> None:
    """``count`` history requests for unique rooms, sent in batches; every reply is an empty page."""
    for start in range(0, count, BATCH):
        n = min(BATCH, count - start)
        for i in range(start, start + n):
            await ws.send({"op": "history", "id": i, "room": f"{tag}-{i}", "limit": 10})
        for _ in range(n):
            reply = await ws.recv(10)
            assert reply["op"] == "history" and reply["messages"] == [] and reply["offset"] == 0, reply


@pytest.mark.timeout(240)  # Redis answers ~1,500 reads/s on a busy 2-core machine: 100,000 take over a minute
async def test_history_of_unique_rooms_creates_no_state(
        flood_target: tuple[str, str, ServerProcess, Callable[[], Awaitable[Any]]]) -> None:
    kind, prefix, server, broker_state = flood_target
    url = server.url(CHAT, "ws")
    count = FLOOD[kind]
    # one anonymous client with a few connections (the broker buses answer each connection's requests
    # one after the other: several connections keep the test to seconds)
    attackers = [await ws_connect(url, welcome=True) for _ in range(ATTACK_CONNECTIONS)]
    try:
        await asyncio.gather(*(history_flood(a, 500, f"warm{i}") for i, a in enumerate(attackers)))  # warm up
        state_before, rss_before = await broker_state(), rss_bytes(server.proc.pid)
        tag = uuid.uuid4().hex[:8]
        flood = asyncio.gather(*(history_flood(a, count // len(attackers), f"{tag}.{i}")
                                 for i, a in enumerate(attackers)))
        await asyncio.sleep(0.5)
        bystander_rooms = [await publish_round_trip(url)]  # served during the flood
        await flood
        grown = rss_bytes(server.proc.pid) - rss_before
        assert grown < 5 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB over {count} history requests"
        bystander_rooms.append(await publish_round_trip(url))  # and after it
        state_after = await broker_state()
        if kind != "memory":  # the bystanders' presence leaves with their closed sockets, a moment later
            expected = set().union(*(_room_keys(kind, prefix, room) for room in bystander_rooms))
            for _ in range(100):
                if state_after[0] - state_before[0] == expected:
                    break
                await asyncio.sleep(0.1)
                state_after = await broker_state()
        if kind == "memory":  # only the bystanders' rooms hold history
            assert state_before == 0 and 0 < state_after < 4096
        else:
            expected = set().union(*(_room_keys(kind, prefix, room) for room in bystander_rooms))
            assert state_after[0] - state_before[0] == expected
            if kind == "redis":  # nothing anywhere in Redis but the bystanders' rooms (other tests' keys may expire)
                assert state_after[1] - state_before[1] <= len(expected)
    finally:
        await asyncio.gather(*(a.aclose() for a in attackers))


# -- the per-session op rate -------------------------------------------------------------------------------

OP_LIMITS = {"op_rate": 5, "op_burst": 10, "op_rate_close_after": 40}

#: (endpoint, request i of the flood): requests that were not rate limited before
FLOODS: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
    "chat-history": (CHAT, lambda i: {"op": "history", "room": f"h-{i}-{uuid.uuid4().hex[:6]}"}),
    "chat-presence": (CHAT, lambda i: {"op": "presence", "room": f"p-{i}-{uuid.uuid4().hex[:6]}"}),
    "chat-join": (CHAT, lambda i: {"op": "join", "room": f"j-{i}-{uuid.uuid4().hex[:6]}"}),
    "game-join": (GAME, lambda i: {"op": "join", "room": f"g-{i}-{uuid.uuid4().hex[:6]}"}),
    "ping": (CHAT, lambda i: {"op": "ping"}),
}


@pytest.mark.parametrize("flood", sorted(FLOODS))
async def test_an_op_flood_is_rate_limited_then_closed(wirehub_server: Callable[..., Awaitable[LiveServer]],
                                                       flood: str) -> None:
    server = await wirehub_server({"server": OP_LIMITS})
    path, make = FLOODS[flood]
    attacker = await server.ws(path, welcome=True)
    for i in range(30):  # sent at once: the burst of 10 (and what refills meanwhile) is served
        await attacker.send({**make(i), "id": i})
    replies = [await attacker.recv() for _ in range(30)]
    assert [r["id"] for r in replies] == list(range(30))
    refused = [r for r in replies if r["op"] == "error"]
    assert 30 - 12 <= len(refused) <= 30 - 10, replies
    for r in refused:
        assert r["code"] == "rate_limited" and isinstance(r["retry_ms"], int) and 0 < r["retry_ms"] <= 1000, r
    assert all(r["op"] != "error" for r in replies[:10])
    bystander = await server.ws(CHAT, welcome=True)  # a session of its own: its own budget
    assert (await bystander.request({"op": "ping"}))["op"] == "pong"
    # the abuse goes on: after op_rate_close_after refusals in a row, close 4029 with a retry hint
    with contextlib.suppress(WebSocketClosedError, StreamClosedError):
        for i in range(30, 90):
            await attacker.send({**make(i), "id": i})
    code, reason = await attacker.wait_closed()
    assert code == 4029 and reason is not None and "retry_ms=" in reason
    await publish_round_trip(server.ws_url(CHAT))
    errors = await server.http("/metrics")
    assert metric(errors.body.decode(), 'wirehub_errors_total{code="rate_limited"}') >= 40


async def test_the_op_rate_refills(wirehub_server: Callable[..., Awaitable[LiveServer]]) -> None:
    """A client that waits retry_ms is served again (the limit is a rate, not a quota)."""
    server = await wirehub_server({"server": {"op_rate": 20, "op_burst": 2}})
    client = await server.ws(CHAT, welcome=True)
    assert [(await client.request({"op": "ping"}))["op"] for _ in range(2)] == ["pong", "pong"]
    refused = await client.request({"op": "history", "room": "lobby"})
    assert refused["code"] == "rate_limited"
    await asyncio.sleep(refused["retry_ms"] / 1000)
    assert (await client.request({"op": "history", "room": "lobby"}))["op"] == "history"


#: a chat endpoint whose publish rate does not slow the filling of the history
FAST_CHAT = [{"path": CHAT, "handler": "chat", "options": {"publish_rate": 100_000, "publish_burst": 100_000}}]


# -- the memory bus's byte cap --------------------------------------------------------------------------------


async def test_memory_history_cap_evicts_least_recently_used_rooms(
        wirehub_server: Callable[..., Awaitable[LiveServer]]) -> None:
    cap = 65536
    server = await wirehub_server({"server": NO_OP_LIMIT, "endpoints": FAST_CHAT, "bus": {"plugin": "memory",
                                                                   "memory": {"history_max_bytes": cap}}})
    writer = await server.ws(CHAT, welcome=True)
    old = unique_room("old")
    await writer.request({"op": "join", "room": old})
    first = await writer.request({"op": "publish", "room": old, "data": "x" * 1000})
    epoch = (await writer.request({"op": "history", "room": old}))["epoch"]
    await writer.request({"op": "leave", "room": old})
    rooms = [unique_room("fill") for _ in range(100)]  # ~1.4 kB each: twice the cap
    for room in rooms:
        await writer.request({"op": "join", "room": room})
        assert (await writer.request({"op": "publish", "room": room, "data": "y" * 1000}))["op"] == "ack"
        await writer.request({"op": "leave", "room": room})
    text = (await server.http("/metrics")).body.decode()
    held, evicted = metric(text, "wirehub_history_bytes"), metric(text, "wirehub_history_rooms_evicted_total")
    assert 0 < held <= cap and 40 <= evicted < 100
    # the least recently used room was dropped: a reader at its old position learns it (a new epoch)
    reader = await server.ws(CHAT, welcome=True)
    joined = await reader.request({"op": "join", "room": old, "since": {"offset": first["offset"], "epoch": epoch}})
    assert joined["recovered"] is False and joined["epoch"] != epoch and joined["offset"] == 0
    page = await reader.request({"op": "history", "room": old, "since": {"offset": first["offset"], "epoch": epoch}})
    assert page["complete"] is False and page["messages"] == []
    # the most recently used rooms are kept
    newest = await reader.request({"op": "history", "room": rooms[-1]})
    assert [m["data"] for m in newest["messages"]] == ["y" * 1000]
    await publish_round_trip(server.ws_url(CHAT))


async def test_memory_history_cap_trims_rooms_with_members_instead_of_dropping_them(
        wirehub_server: Callable[..., Awaitable[LiveServer]]) -> None:
    """A room with members here keeps its epoch and offsets (they never see an offset twice); its
    oldest messages go instead."""
    server = await wirehub_server({"server": NO_OP_LIMIT, "endpoints": FAST_CHAT, "bus": {"plugin": "memory",
                                                                   "memory": {"history_max_bytes": 65536}}})
    member, writer = await server.ws(CHAT, welcome=True), await server.ws(CHAT, welcome=True)
    room = unique_room("kept")
    joined = await member.request({"op": "join", "room": room})
    await writer.request({"op": "join", "room": room})
    offsets = [(await writer.request({"op": "publish", "room": room, "data": "z" * 1000}))["offset"]
               for _ in range(100)]
    assert offsets == list(range(1, 101))
    page = await member.request({"op": "history", "room": room, "limit": 500})
    assert page["epoch"] == joined["epoch"] and page["offset"] == 100
    kept = [m["offset"] for m in page["messages"]]
    assert kept == list(range(kept[0], 101)) and 20 < len(kept) < 60  # the newest that fit in 64 KiB
    text = (await server.http("/metrics")).body.decode()
    assert metric(text, "wirehub_history_bytes") <= 65536
    assert metric(text, "wirehub_history_rooms_evicted_total") == 0
    await publish_round_trip(server.ws_url(CHAT))


async def test_invalid_frames_count_against_the_op_rate(wirehub_server: Callable[..., Awaitable[LiveServer]]) -> None:
    server = await wirehub_server({"server": OP_LIMITS})
    attacker = await server.ws(CHAT, welcome=True)
    for _ in range(30):
        await attacker.send("{not json")
    codes = [(await attacker.recv())["code"] for _ in range(30)]
    assert codes[:10] == ["bad_json"] * 10 and set(codes[12:]) == {"rate_limited"}, codes
    bystander = await server.ws(CHAT, welcome=True)
    assert (await bystander.request({"op": "ping"}))["op"] == "pong"


async def test_join_leave_churn_leaves_nothing_behind(wirehub_server: Callable[..., Awaitable[LiveServer]]) -> None:
    """Chat and game join/leave of unique rooms: no history log, presence entry, hub room or game record."""
    server = await wirehub_server({"server": NO_OP_LIMIT})
    chat, game = await server.ws(CHAT, welcome=True), await server.ws(GAME, welcome=True)
    for i in range(200):
        for client, path in ((chat, CHAT), (game, GAME)):
            room = f"churn-{i}-{uuid.uuid4().hex[:6]}"
            assert (await client.request({"op": "join", "room": room}))["op"] in ("joined", "state")
            assert (await client.request({"op": "leave", "room": room}))["op"] == "left", path
    backend, handler = server.app.backend, server.app.handlers[GAME]
    assert backend.history.bytes_held == 0  # type: ignore[attr-defined]
    assert backend.presence._rooms == {}  # type: ignore[attr-defined]
    assert server.app.hub.rooms() == [] and server.app.hub._rooms == {}
    assert handler.views == {} and handler.idle == {}  # type: ignore[attr-defined]
    await publish_round_trip(server.ws_url(CHAT))
