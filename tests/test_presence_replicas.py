"""Presence across real ``wirehub serve`` replicas on a real Redis and a real NATS: a SIGKILLed replica's
members leave the survivors' ``presence`` answers within presence_ttl + presence_interval, and the counts
are right before and after."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import FAST_BUS, Cluster, bus_options
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.nats import create_backend as nats_backend
from wirehub.builtins.bus.redis import create_backend as redis_backend
from wirehub.bus import Backend, BusUnavailable, PresenceCount, PresenceEntry
from wirehub.testing import Recorder, WsClient, eventually, unique_room, ws_connect

CHAT = "/ws/chat"
TTL, INTERVAL = FAST_BUS["presence_ttl"], 0.25


@pytest.fixture
async def cluster(kind: str, broker: BrokerProcess, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Three replicas (``kind`` and ``broker`` come from conftest.py: a broker of this test's own)."""
    bus = {"plugin": kind, kind: bus_options(kind, broker, f"pr{uuid.uuid4().hex[:6]}", presence_interval=INTERVAL)}
    cluster = Cluster.configure(tmp_path, ["node-a", "node-b", "node-c"], {
        "bus": bus,
        "auth": {"plugin": "test-header"},
        "plugins": {"load": ["tests.plugins_for_tests.chat_auth"]},
        "endpoints": [{"path": CHAT, "handler": "chat", "options": {"publish_rate": 1000, "publish_burst": 1000}}],
    })
    cluster.start()
    try:
        await cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


async def join(cluster: Cluster, replica: int, user: str, room: str) -> WsClient:
    ws = await ws_connect(cluster.replicas[replica].url(CHAT, "ws"), headers={"X-User": user}, welcome=True)
    joined = await ws.request({"op": "join", "room": room})
    assert joined["op"] == "joined", joined
    return ws


async def presence(ws: WsClient, room: str) -> dict[str, int]:
    """user -> connections, from a ``presence`` answer."""
    reply = await ws.request({"op": "presence", "room": room})
    assert reply["op"] == "presence", reply
    return {m["user"]: m["connections"] for m in reply["members"]}


async def presence_becomes(ws: WsClient, room: str, expected: dict[str, int], within: float = 5.0) -> None:
    """Presence on another replica follows a join once the broker carried it (NATS: a KV watch)."""
    deadline = time.monotonic() + within
    while (seen := await presence(ws, room)) != expected:
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.05)


async def test_a_sigkilled_replica_leaves_presence_within_ttl(cluster: Cluster) -> None:
    room = unique_room()
    clients: list[WsClient] = []
    for replica, users in enumerate([["a1", "a2"], ["b1", "b2"], ["c1", "c2", "c3"]]):
        for user in users:
            clients.append(await join(cluster, replica, user, room))
    clients.append(await join(cluster, 2, "a1", room))  # a1's second tab, on the replica that dies
    observer_a, observer_b = clients[0], clients[2]
    everyone = {"a1": 2, "a2": 1, "b1": 1, "b2": 1, "c1": 1, "c2": 1, "c3": 1}

    for observer in (observer_a, observer_b):
        await presence_becomes(observer, room, everyone)

    cluster.replicas[2].kill()  # SIGKILL: no leave, no goodbye
    killed = time.monotonic()
    survivors = {"a1": 1, "a2": 1, "b1": 1, "b2": 1}
    bound = TTL + INTERVAL + 1.5  # detection lag plus the time to remove them
    answers: list[dict[str, int]] = []
    while True:
        answers = [await presence(observer, room) for observer in (observer_a, observer_b)]
        if all(a == survivors for a in answers):
            break
        assert time.monotonic() - killed < bound, answers
        for a in answers:  # on the way: only the dead replica's connections go
            assert set(survivors) <= set(a), a
        await asyncio.sleep(0.1)
    # the survivors keep serving: a publish on one reaches a member on the other
    ack = await observer_b.request({"op": "publish", "room": room, "data": "still here"})
    assert ack["op"] == "ack", ack
    got: dict[str, Any] = await observer_a.recv_op("message")
    assert got["data"] == "still here" and got["from"] == "b1"
    # nothing comes back later, and a new member is counted normally
    await asyncio.sleep(INTERVAL * 2)
    late = await join(cluster, 1, "d1", room)
    await presence_becomes(observer_a, room, {**survivors, "d1": 1})
    await asyncio.gather(*(ws.aclose() for ws in (*clients, late)))  # before the replicas stop: see test_replicas


async def test_a_replica_stopped_for_longer_than_the_ttl_has_its_users_back_when_it_resumes(cluster: Cluster) -> None:
    """SIGSTOP (a frozen VM, a long pause) past presence_ttl: the survivors declare the replica dead, its user z
    leaves, and the members are told (presence.leave, then a truncated presence.diff). SIGCONT: its next
    heartbeat finds its entries gone and writes them again, and the members are told to reload (a truncated
    presence.diff with the count): z is listed again."""
    room = unique_room()
    watcher = await join(cluster, 0, "w", room)
    stalled = await join(cluster, 2, "z", room)
    await presence_becomes(watcher, room, {"w": 1, "z": 1})
    pid = cluster.replicas[2].proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        assert (await watcher.recv_op("presence.leave", timeout=TTL + INTERVAL + 5))["user"] == "z"
        gone = await watcher.recv_op("presence.diff")
        assert gone["truncated"] is True and gone["count"] == {"users": 1, "connections": 1}, gone
        assert await presence(watcher, room) == {"w": 1}
    finally:
        os.kill(pid, signal.SIGCONT)
    back = await watcher.recv_op("presence.diff", timeout=10)
    assert back["truncated"] is True and back["count"] == {"users": 2, "connections": 2}, back
    assert await presence(watcher, room) == {"w": 1, "z": 1}
    await asyncio.gather(watcher.aclose(), stalled.aclose())


async def test_a_broker_that_lost_presence_gets_it_back(kind: str, broker: BrokerProcess) -> None:
    """Entries are never refreshed, so a broker restart that lost them (Redis without persistence,
    a NATS memory store) must not lose them for good: each replica notices its heartbeat key is gone
    and writes its entries again, and reports their users to ``on_restored`` (the chat tells the members to
    reload: docs/protocol.md, "A replica declared dead that was only stalled")."""
    opts = bus_options(kind, broker, f"pl{uuid.uuid4().hex[:6]}", presence_interval=INTERVAL,
                       **({"storage": "memory"} if kind == "nats" else {}))
    make = redis_backend if kind == "redis" else nats_backend
    a: Backend = make(opts, f"bus.{kind}")
    b: Backend = make(opts, f"bus.{kind}")
    for backend in (a, b):
        await backend.bus.start(Recorder())
    restored: dict[str, set[tuple[str, str]]] = {"a": set(), "b": set()}
    for name, backend in (("a", a), ("b", b)):
        backend.presence.on_restored(
            lambda r, users, name=name: restored[name].update((r, u) for u in users))
    try:
        room = unique_room()
        await a.presence.join(room, PresenceEntry("alice", "sa", "node-a"))
        await a.presence.join(room, PresenceEntry("alice", "sa2", "node-a"))
        await b.presence.join(room, PresenceEntry("bob", "sb", "node-b"))

        async def whole(p: Backend = a) -> bool:
            return await p.presence.count(room) == PresenceCount(2, 3)

        await eventually(whole)
        broker.kill()
        await eventually(lambda: _false_when(a.bus.healthy or b.bus.healthy))
        broker.start()
        await eventually(lambda: _false_when(not (a.bus.healthy and b.bus.healthy)), timeout=10)
        # (this Redis keeps nothing on disk and this NATS stores in memory: the entries are gone)
        await eventually(whole, timeout=TTL + INTERVAL + 2)
        await eventually(lambda: whole(b), timeout=TTL + INTERVAL + 2)
        assert restored == {"a": {(room, "alice")}, "b": {(room, "bob")}}
        assert await b.presence.leave(room, "sb") == "bob"
        await eventually(lambda: _is(a, room, PresenceCount(1, 2)))
    finally:
        for backend in (a, b):
            await backend.bus.close()


async def _false_when(value: bool) -> bool:
    return not value


async def _is(backend: Backend, room: str, count: PresenceCount) -> bool:
    return await backend.presence.count(room) == count


async def test_a_leave_the_broker_did_not_take_is_retried(kind: str, broker: BrokerProcess) -> None:
    """Entries are never refreshed, so a leave refused while the broker hung must not leave a ghost
    member behind for as long as its replica lives: upkeep retries it."""
    opts = bus_options(kind, broker, f"pu{uuid.uuid4().hex[:6]}", presence_interval=INTERVAL)
    make = redis_backend if kind == "redis" else nats_backend
    a: Backend = make(opts, f"bus.{kind}")
    b: Backend = make(opts, f"bus.{kind}")
    for backend in (a, b):
        await backend.bus.start(Recorder())
    try:
        room = unique_room()
        await a.presence.join(room, PresenceEntry("alice", "sa", "node-a"))
        await b.presence.join(room, PresenceEntry("bob", "sb", "node-b"))
        await eventually(lambda: _is(b, room, PresenceCount(2, 2)))
        broker.pause()
        try:
            await eventually(lambda: _false_when(a.bus.healthy), timeout=5)
            with pytest.raises(BusUnavailable):
                await a.presence.leave(room, "sa")
        finally:
            broker.resume()
        await eventually(lambda: _false_when(not (a.bus.healthy and b.bus.healthy)), timeout=10)
        await eventually(lambda: _is(b, room, PresenceCount(1, 1)), timeout=TTL + INTERVAL + 2)
        page = await b.presence.page(room, None, 10)
        assert [m.user for m in page.members] == ["bob"]
    finally:
        for backend in (a, b):
            await backend.bus.close()
