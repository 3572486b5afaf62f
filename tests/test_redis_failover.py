"""Failovers under load, done for real: a Redis Cluster primary SIGKILLed (its replica takes over) and a
Sentinel-managed master SIGKILLed (the sentinels promote a replica). Two wirehub replicas, members on
one, publishers on the other: every acknowledged message reaches the members or is covered by a
``gap`` frame (never a silent loss), and in a cluster the rooms on other shards are not disturbed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.crc import key_slot

from tests.helpers import FAST_BUS
from wirehub.broker_clusters import REDIS7_HINT, RedisCluster, RedisSentinel, find_redis7
from wirehub.builtins.bus._broker import encode_room
from wirehub.builtins.bus.redis_cluster import RedisClusterBus
from wirehub.testing import LiveServer, WsClient, unique_room

pytestmark = pytest.mark.skipif(find_redis7() is None, reason=REDIS7_HINT)


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> Iterator[RedisCluster]:
    """The session's cluster (tests/conftest.py), shared with test_redis_cluster.py: the node a test kills
    is restarted after it (as a replica of the one promoted), so the next test finds it whole."""
    yield redis_cluster
    redis_cluster.restore()


@pytest.fixture
def sentinel() -> Iterator[RedisSentinel]:
    """A setup of the test's own: a killed master comes back as a replica only once the sentinels'
    next rounds notice it and it has synced (about 5 s), which is longer than a fresh setup takes."""
    with RedisSentinel() as s:
        yield s


def config(bus: dict[str, Any]) -> dict[str, Any]:
    opts = {"key_prefix": f"f{uuid.uuid4().hex[:6]}", **FAST_BUS, **bus}
    # no rate limits: a publisher whose shard is healthy publishes faster than the defaults allow
    return {"server": {"op_rate": 0}, "bus": {"plugin": "redis", "redis": opts},
            "endpoints": [{"path": "/ws/chat", "handler": "chat",
                           "options": {"publish_rate": 10000, "publish_burst": 10000}}]}


@dataclass
class Load:
    """Publishers (one connection per room, on replica B) and a member of every room (on replica A)."""

    member: WsClient
    publishers: dict[str, WsClient]
    rooms: list[str]
    acked: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, list[str]] = field(default_factory=dict)
    frames: list[dict[str, Any]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, room: str) -> None:
        n = 0
        while not self.stop.is_set():
            data = f"{room}:{n}"
            n += 1
            try:
                reply = await self.publishers[room].request({"op": "publish", "room": room, "data": data}, timeout=5)
            except TimeoutError:
                reply = {"op": "error"}
            assert reply.get("code") in (None, "unavailable", "timeout"), reply  # the shard's outage only
            (self.acked if reply["op"] == "ack" else self.failed).setdefault(room, []).append(data)
            await asyncio.sleep(0.01)

    async def collect(self) -> None:
        while True:
            raw = await self.member.recv_raw(timeout=60)
            if raw is None:
                return
            self.frames.append(json.loads(raw))

    async def more_acks(self, rooms: list[str], count: int = 5, timeout: float = 15.0) -> None:
        """Until each of ``rooms`` has ``count`` more acknowledged publishes than now (the load ran, and
        ran on whatever serves the room now): a wait on that, not a sleep that hopes for it."""
        start = {room: len(self.acked.get(room, [])) for room in rooms}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(len(self.acked.get(room, [])) < start[room] + count for room in rooms):
            assert loop.time() < deadline, f"fewer than {count} publishes acknowledged in {timeout}s"
            await asyncio.sleep(0.02)

    def received(self, room: str) -> list[str]:
        return [f["data"] for f in self.frames if f.get("op") == "message" and f.get("room") == room]

    def gaps(self, room: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("op") == "gap" and f.get("room") == room]

    def check_no_silent_loss(self, room: str) -> None:
        got = self.received(room)
        assert len(got) == len(set(got)), f"{room}: a message was delivered twice"
        numbers = [int(d.rsplit(":", 1)[1]) for d in got]
        assert numbers == sorted(numbers), f"{room}: out of order"
        lost = [d for d in self.acked.get(room, []) if d not in set(got)]
        assert not lost or self.gaps(room), f"{room}: acknowledged but never delivered, and no gap: {lost}"


async def run_load(a: LiveServer, b: LiveServer, rooms: list[str]) -> tuple[Load, list[asyncio.Task[None]]]:
    member = await a.ws("/ws/chat", welcome=True)
    publishers = {room: await b.ws("/ws/chat", welcome=True) for room in rooms}
    for room in rooms:
        assert (await member.request({"op": "join", "room": room}))["op"] == "joined"
        assert (await publishers[room].request({"op": "join", "room": room}))["op"] == "joined"
    load = Load(member, publishers, rooms)
    tasks = [asyncio.ensure_future(load.collect())] + [asyncio.ensure_future(load.publish(r)) for r in rooms]
    return load, tasks


async def finish(load: Load, tasks: list[asyncio.Task[None]]) -> None:
    load.stop.set()
    await asyncio.gather(*tasks[1:])
    # the last acknowledged message of every room arrives (the repair and live delivery are done)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while any(load.acked.get(r) and load.acked[r][-1] not in load.received(r) for r in load.rooms):
        assert loop.time() < deadline, "the newest acknowledged messages did not arrive"
        await asyncio.sleep(0.05)
    tasks[0].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await tasks[0]


def rooms_by_primary(cluster: RedisCluster, count: int) -> dict[int, list[str]]:
    """``count`` rooms on each primary (port -> rooms)."""
    out: dict[int, list[str]] = {}
    while len(out) < cluster.primaries or any(len(v) < count for v in out.values()):
        room = unique_room()
        port = cluster.primary_of(key_slot(encode_room(room).encode())).port
        if len(out.setdefault(port, [])) < count:
            out[port].append(room)
    return out


async def test_a_killed_primary_fails_over_and_only_its_rooms_notice(
        cluster: RedisCluster, wirehub_server: Callable[..., Awaitable[LiveServer]]) -> None:
    cfg = config({"mode": "cluster", "cluster": {"nodes": cluster.startup_nodes}})
    a, b = await wirehub_server(cfg), await wirehub_server(cfg)
    by_primary = rooms_by_primary(cluster, 2)
    victim_port = sorted(by_primary)[0]
    victim = next(n for n in cluster.nodes if n.port == victim_port)
    shard_rooms = by_primary[victim_port]
    other_rooms = [r for port, rs in by_primary.items() if port != victim_port for r in rs]
    load, tasks = await run_load(a, b, shard_rooms + other_rooms)
    try:
        await load.more_acks(load.rooms)
        victim.kill()  # SIGKILL: its replica is promoted after cluster-node-timeout (1 s)
        await asyncio.to_thread(cluster.wait_ok, 20)
        bus = a.app.backend.bus
        assert isinstance(bus, RedisClusterBus)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while bus.moves < len(shard_rooms) or bus._moving:  # A subscribed them on the promoted replica
            assert loop.time() < deadline, "the shard's rooms did not move to the promoted replica"
            await asyncio.sleep(0.05)
        await load.more_acks(shard_rooms)  # publishing on the promoted replica
        await finish(load, tasks)
    finally:
        load.stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        victim.start()  # it rejoins as a replica of the promoted one
        await asyncio.to_thread(cluster.wait_ok, 20)
    assert a.app.backend.bus.healthy and b.app.backend.bus.healthy
    for room in other_rooms:  # undisturbed: every publish acknowledged, every message delivered, no gap
        assert not load.failed.get(room), f"{room} (another shard) refused publishes"
        assert load.received(room) == load.acked[room]
        assert not load.gaps(room)
    assert any(load.failed.get(room) for room in shard_rooms)  # the shard was down for a while
    for room in shard_rooms:
        load.check_no_silent_loss(room)
        assert load.acked[room][-1] in load.received(room)  # the room came back
        # the promoted replica is another lineage: a new epoch, announced to the member
        assert load.gaps(room), f"{room}: no gap after its primary failed over"
    assert a.app.ready and b.app.ready


# Known leak, not yet traced: under load, redis-py can abandon a connection to the dead master during
# the failover, and it is collected after its loop closed (a ResourceWarning at this test's teardown).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_sentinel_failover_under_load_loses_nothing_silently(
        sentinel: RedisSentinel, wirehub_server: Callable[..., Awaitable[LiveServer]]) -> None:
    cfg = config({"mode": "sentinel", "sentinel": {"nodes": sentinel.sentinel_nodes,
                                                  "master_name": sentinel.master_name}})
    a, b = await wirehub_server(cfg), await wirehub_server(cfg)
    rooms = [unique_room() for _ in range(4)]
    old = sentinel.master()
    load, tasks = await run_load(a, b, rooms)
    try:
        await load.more_acks(rooms)
        old.kill()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (await asyncio.to_thread(sentinel.master)) is old:
            assert loop.time() < deadline, "the sentinels did not promote a replica"
            await asyncio.sleep(0.2)
        while not (a.app.ready and b.app.ready):
            assert loop.time() < deadline, "the replicas did not reconnect to the new master"
            await asyncio.sleep(0.1)
        await load.more_acks(rooms)  # publishing on the new master
        await finish(load, tasks)
    finally:
        load.stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for room in rooms:
        load.check_no_silent_loss(room)
        assert load.acked[room][-1] in load.received(room)
        assert load.gaps(room), f"{room}: no gap after the master failed over"
