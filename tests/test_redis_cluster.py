"""The redis bus on a real Redis Cluster (3 primaries + 3 replicas) and behind real Sentinels: the
backend contract suites, sharded pub/sub, and one room order across 3 replicas.

The session's cluster and sentinel setup (tests/conftest.py); the cluster is shared with
test_redis_failover.py, which restores what it kills; never killed here."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Cluster
from wirehub.broker_clusters import REDIS7_HINT, RedisCluster, RedisSentinel, find_redis7
from wirehub.builtins.bus.redis import RedisBus
from wirehub.builtins.bus.redis import create_backend as redis_backend
from wirehub.builtins.bus.redis_cluster import RedisClusterBus
from wirehub.bus import Backend
from wirehub.testing import (
    BusContract,
    Footprint,
    HistoryContract,
    PresenceContract,
    PresenceExpiryContract,
    Recorder,
    StateStoreContract,
    WsClient,
    unique_room,
    ws_connect,
)

pytestmark = pytest.mark.skipif(find_redis7() is None, reason=REDIS7_HINT)

FAST = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "op_timeout": 3.0, "presence_ttl": 3.0}


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> RedisCluster:
    return redis_cluster


@pytest.fixture
def sentinel(redis_sentinel: RedisSentinel) -> RedisSentinel:
    return redis_sentinel


def cluster_options(cluster: RedisCluster, prefix: str, **options: Any) -> dict[str, Any]:
    return {"mode": "cluster", "cluster": {"nodes": cluster.startup_nodes[:2]}, "key_prefix": prefix,
            **FAST, **options}


def sentinel_options(sentinel: RedisSentinel, prefix: str, **options: Any) -> dict[str, Any]:
    return {"mode": "sentinel", "sentinel": {"nodes": sentinel.sentinel_nodes, "master_name": sentinel.master_name},
            "key_prefix": prefix, **FAST, **options}


@pytest.fixture(params=["cluster", "sentinel"])
def make_options(request: pytest.FixtureRequest) -> Callable[..., dict[str, Any]]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    if request.param == "cluster":
        c = request.getfixturevalue("cluster")
        return lambda **o: cluster_options(c, prefix, **o)
    s = request.getfixturevalue("sentinel")
    return lambda **o: sentinel_options(s, prefix, **o)


@pytest.fixture
def bus_config(make_options: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The bus block of this test (wirehub.testing's backend_pair, backend, ... start replicas of it)."""
    return {"plugin": "redis", "redis": make_options()}


async def _started(options: dict[str, Any]) -> tuple[Backend, Recorder]:
    backend = redis_backend(options, "bus.redis")
    recorder = Recorder()
    await backend.bus.start(recorder)
    return backend, recorder


async def _keys(bus: RedisBus) -> list[str]:
    """Every key of the bus's prefix (on every primary of a cluster)."""
    client = bus.client
    if isinstance(bus, RedisClusterBus):
        import redis.asyncio as aioredis

        out: list[str] = []
        for node in client.get_primaries():
            direct = aioredis.Redis(host=node.host, port=node.port)
            try:
                out += [k.decode() async for k in direct.scan_iter(match=f"{bus.prefix}:*", count=1000)]
            finally:
                await direct.aclose()
        return out
    return [k.decode() async for k in client.scan_iter(match=f"{bus.prefix}:*", count=1000)]


@pytest.fixture
def footprint(backend: Backend) -> Footprint:
    bus = backend.bus
    assert isinstance(bus, RedisBus)

    async def keys() -> list[str]:
        # the liveness set and the epoch bases: one key per deployment (per slot in a cluster), not room state
        return sorted(k for k in await _keys(bus) if k != f"{bus.prefix}:presence:nodes"
                      and not k.startswith(f"{bus.prefix}:epoch"))

    return keys


class TestBus(BusContract):
    pass


class TestHistory(HistoryContract):
    pass


class TestPresence(PresenceContract):
    pass


class TestStateStore(StateStoreContract):
    pass


@pytest.fixture
async def broker_ops(request: pytest.FixtureRequest, bus_config: dict[str, Any]
                     ) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Commands every data node executed so far (INFO commandstats, without INFO itself)."""
    import redis.asyncio as aioredis

    if bus_config["redis"]["mode"] == "cluster":
        ports = [n.port for n in request.getfixturevalue("cluster").nodes]
    else:
        ports = [n.port for n in request.getfixturevalue("sentinel").servers]
    clients = [aioredis.Redis(port=p) for p in ports]

    async def ops() -> int:
        total = 0
        for c in clients:
            stats = await c.info("commandstats")
            total += sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
        return total

    yield ops
    for c in clients:
        await c.aclose()


class TestPresenceExpiry(PresenceExpiryContract):
    pass


def _rooms_on_each_primary(cluster: RedisCluster, each: int) -> list[str]:
    """``each`` new rooms on every primary of ``cluster``, as their slots are placed now."""
    from redis.crc import key_slot

    from wirehub.builtins.bus._broker import encode_room

    by_primary: dict[int, list[str]] = {}
    for _ in range(1000):
        if len(by_primary) == 3 and min(len(rooms) for rooms in by_primary.values()) == each:
            break
        room = unique_room()
        rooms = by_primary.setdefault(cluster.primary_of(key_slot(encode_room(room).encode())).port, [])
        if len(rooms) < each:
            rooms.append(room)
    assert len(by_primary) == 3, f"the cluster's slots are served by {len(by_primary)} primaries, not 3"
    return [room for rooms in by_primary.values() for room in rooms]


async def test_rooms_spread_over_every_shard_and_publish_only_on_their_own(cluster: RedisCluster) -> None:
    """SPUBLISH, never PUBLISH: each room's messages are counted on one primary, and with enough rooms
    on all three."""
    import redis.asyncio as aioredis

    backend, recorder = await _started(cluster_options(cluster, f"t{uuid.uuid4().hex[:8]}"))
    clients = [aioredis.Redis(port=n.port) for n in cluster.nodes]
    try:
        async def counts(name: str) -> list[int]:
            out = []
            for c in clients:
                stats = await c.info("commandstats")
                out.append(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)))
            return out

        before_pub = sum(await counts("publish"))
        rooms = _rooms_on_each_primary(cluster, 4)  # 12 random rooms miss a primary 2.3 % of the time
        for room in rooms:
            await backend.bus.subscribe(room)
        for room in rooms:
            await backend.bus.publish(room, b"h", history=True)
            await backend.bus.publish(room, b"p")
        for room in rooms:
            assert await recorder.wait_for(room, 2) == [b"h", b"p"]
        bus = backend.bus
        assert isinstance(bus, RedisClusterBus)
        assert len(bus._subs) == 3  # one sharded subscriber connection per primary
        assert sum(await counts("publish")) == before_pub  # the cluster-wide PUBLISH is never used
        assert sum(await counts("spublish")) >= len(rooms)
    finally:
        await backend.bus.close()
        for c in clients:
            await c.aclose()


async def test_a_burst_of_first_subscribes_on_a_new_bus_all_confirm(cluster: RedisCluster) -> None:
    """Many rooms subscribed at once on a bus that has no sharded subscriber connection yet (a join storm
    after start): each shard's first SSUBSCRIBEs race to open its connection, and none may be sent on a
    connection that is then dropped (its confirmation never read: the join answered unavailable)."""
    backend, recorder = await _started(cluster_options(cluster, f"t{uuid.uuid4().hex[:8]}"))
    try:
        rooms = [unique_room() for _ in range(150)]
        await asyncio.wait_for(asyncio.gather(*(backend.bus.subscribe(room) for room in rooms)), 2.5)
        for room in rooms:
            await backend.bus.publish(room, b"m")
        for room in rooms:
            assert await recorder.wait_for(room, 1) == [b"m"]
    finally:
        await backend.bus.close()


async def test_three_replicas_deliver_one_order(cluster: RedisCluster) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    replicas = [await _started(cluster_options(cluster, prefix)) for _ in range(3)]
    try:
        rooms = [unique_room() for _ in range(4)]
        for backend, _ in replicas:
            for room in rooms:
                await backend.bus.subscribe(room)

        async def publisher(i: int) -> None:
            backend = replicas[i][0]
            for n in range(40):
                for room in rooms:
                    await backend.bus.publish(room, f"{i}:{n}".encode(), history=n % 2 == 0)

        await asyncio.gather(*(publisher(i) for i in range(3)))
        for room in rooms:
            seen = [await r.wait_for(room, 120) for _, r in replicas]
            assert seen[0] == seen[1] == seen[2]
            offsets = [o for rr, _, o in replicas[0][1].messages if rr == room and o is not None]
            assert offsets == sorted(offsets) and len(offsets) == 60
    finally:
        for backend, _ in replicas:
            await backend.bus.close()


async def test_a_burst_beyond_the_pool_waits_instead_of_failing(make_options: Callable[..., dict[str, Any]]) -> None:
    """More concurrent commands than max_connections queue for a connection (op_timeout applies): none
    fails and the bus stays up (a pool that refused them would look like a broken broker)."""
    backend, _ = await _started(make_options(max_connections=2))
    try:
        rooms = [unique_room() for _ in range(120)]
        offsets = await asyncio.gather(*(backend.bus.publish(r, b"x", history=True) for r in rooms))
        assert offsets == [1] * len(rooms)
        assert backend.bus.healthy
    finally:
        await backend.bus.close()


async def test_three_wirehub_processes_deliver_one_order_on_the_cluster(cluster: RedisCluster, tmp_path: Path) -> None:
    """Three real ``wirehub serve`` processes on the cluster; members on each, publishers on two: every
    member gets every message once, in one order with increasing offsets."""
    bus = {"plugin": "redis", "redis": cluster_options(cluster, f"e{uuid.uuid4().hex[:6]}")}
    replicas = Cluster.configure(tmp_path, [f"replica-{n}" for n in "abc"], {
        "bus": bus, "endpoints": [{"path": "/ws/chat", "handler": "chat",
                                   "options": {"publish_rate": 1000, "publish_burst": 1000}}]})
    replicas.start()
    clients: list[WsClient] = []
    try:
        await replicas.wait_ready()

        async def client(i: int) -> WsClient:
            c = await ws_connect(replicas.replicas[i].url("/ws/chat", "ws"), welcome=True)
            clients.append(c)
            return c

        room = unique_room()
        members = [await client(i % 3) for i in range(6)]
        pubs = [await client(0), await client(2)]
        for c in members + pubs:
            assert (await c.request({"op": "join", "room": room}))["op"] == "joined"

        async def publish(c: WsClient, tag: str) -> None:
            for i in range(20):
                reply = await c.request({"op": "publish", "room": room, "data": f"{tag}{i}"})
                assert reply["op"] == "ack", reply

        await asyncio.gather(publish(pubs[0], "a"), publish(pubs[1], "c"))

        async def collect(c: WsClient) -> list[tuple[str, int]]:
            out = []
            while len(out) < 40:
                msg = await c.recv_op("message", 10)
                out.append((msg["data"], msg["offset"]))
            return out

        streams = await asyncio.gather(*(collect(m) for m in members))
        assert all(got == streams[0] for got in streams)
        offsets = [o for _, o in streams[0]]
        assert offsets == sorted(offsets) and len(set(offsets)) == 40
        for m in members:
            await m.expect_nothing(0.2)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))  # before the replicas stop: see test_replicas
        replicas.stop()


async def test_a_migrated_slot_moves_the_room_and_commands_follow(cluster: RedisCluster) -> None:
    """Resharding one room's slot to another primary (SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT
    NODE): Redis ends the old subscription, the replica subscribes on the new owner, and publishes
    follow MOVED. The room's history lives on in its slot; its epoch changes (the new primary's
    lineage), so a member at the old position is told of a gap, never left with a silent loss."""
    from redis.crc import key_slot

    from wirehub.builtins.bus._broker import encode_room

    prefix = f"t{uuid.uuid4().hex[:8]}"
    (a, ra), (b, _) = await _started(cluster_options(cluster, prefix)), await _started(cluster_options(cluster, prefix))
    try:
        room = unique_room()
        await a.bus.subscribe(room)
        await b.bus.publish(room, b"before", history=True)
        await ra.wait_for(room, 1)
        _, epoch = await a.history.position(room)
        slot = key_slot(encode_room(room).encode())
        source = cluster.primary_of(slot)
        primaries = [n for n in cluster.nodes if n.running and n.call("ROLE")[0] == "master"]
        target = next(n for n in primaries if n is not source)
        source_id, target_id = source.call("CLUSTER", "MYID"), target.call("CLUSTER", "MYID")
        target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        keys = source.call("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        assert keys  # the room's stream, meta hash and the slot's epoch base
        source.call("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        for n in primaries:
            n.call("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        bus = a.bus
        assert isinstance(bus, RedisClusterBus)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while bus.moves < 1 or bus._moving:
            assert loop.time() < deadline, "the subscription did not move"
            await asyncio.sleep(0.05)
        assert bus._ch_sub[bus.channel(room)].name == target.host_port
        await b.bus.publish(room, b"after", history=True)  # routed by MOVED to the new owner
        assert await ra.wait_for(room, 2) == [b"before", b"after"]
        assert (await a.history.position(room))[1] != epoch
        assert a.bus.healthy and b.bus.healthy
    finally:
        await a.bus.close()
        await b.bus.close()
