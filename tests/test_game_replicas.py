"""The game endpoint on three real ``wirehub serve`` processes sharing one Redis or one NATS, with
real WebSocket clients: no lost write under concurrent updates (compare-and-set retries with
re-validation), every client's patched copy equal to the server's state after a random burst,
a late-joining replica serving the current state, and a broker restart during play."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, Cluster, ServerProcess, bus_block
from tests.plugins_for_tests.game_client import GameClient
from wirehub.brokers import BrokerProcess, NatsServer, RedisServer
from wirehub.testing import unique_room

pytestmark = pytest.mark.slow

GAME = "/ws/game"
RULES = "tests.plugins_for_tests.game_rules"
GAME_OPTIONS: dict[str, Any] = {"tick": 0.02, "updates_per_second": 0, "verify_interval": 1.0,
                                "gap_timeout": 0.5, "initial_state": {"n": 0, "list": [], "map": {}}}


def metric(replica: ServerProcess, name: str) -> float:
    _, body = replica.get("/metrics")
    for line in body.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def start_replicas(kind: str, broker: BrokerProcess, directory: Path, n: int = 3) -> list[ServerProcess]:
    """``n`` replicas on ``broker``, ready (all stopped again if one is not within 30 s)."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cluster = Cluster.configure(directory, [f"game-{i}" for i in range(n)], {
        "bus": bus_block(kind, broker, f"g{uuid.uuid4().hex[:6]}"),
        "endpoints": [{"path": GAME, "handler": "game", "options": GAME_OPTIONS}],
        "plugins": {"load": [RULES]},
    }, env={"PYTHONPATH": pythonpath})
    cluster.start()
    try:
        cluster.wait_ready_sync(30)
    except AssertionError:
        cluster.stop()
        raise
    return cluster.replicas


@pytest.fixture(scope="module", params=["redis", "nats"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Three replicas on a broker of this module's own (not restarted: the restart test has its own)."""
    kind = str(request.param)
    broker: BrokerProcess = RedisServer() if kind == "redis" else NatsServer()
    broker.start()
    replicas = start_replicas(kind, broker, tmp_path_factory.mktemp(f"game-{kind}"))
    yield replicas
    for r in replicas:
        r.stop(10)
    broker.close()


@pytest.fixture
async def clients() -> Any:
    made: list[GameClient] = []

    async def connect(replica: ServerProcess, name: str = "") -> GameClient:
        client = await GameClient.connect(replica.url(GAME, "ws"), name)
        made.append(client)
        return client

    yield connect
    await asyncio.gather(*(c.aclose() for c in made))


async def converge(room: str, members: list[GameClient], timeout: float = 15.0) -> tuple[int, Any]:
    """Wait until every member's copy equals what a sync returns, at a version no lower than any ack
    named (a sync answers with its replica's copy, which may be a tick behind the store)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        reply = await members[0].sync(room)
        if reply["op"] == "state" and reply["version"] >= max(m.top_ack for m in members):
            top = (reply["version"], reply["state"])
            if all(m.rooms.get(room) == top for m in members):
                return top
        if loop.time() > deadline:
            raise AssertionError(f"no convergence: {reply}; " + ", ".join(
                f"{m.name}@{m.rooms.get(room, (None,))[0]}" for m in members))
        await asyncio.sleep(0.1)


async def test_concurrent_updates_on_three_replicas_lose_no_write(cluster: list[ServerProcess], clients: Any) -> None:
    room = unique_room("counter")
    members = [await clients(cluster[i % 3], f"m{i}") for i in range(9)]
    for m in members:
        await m.join(room)
    conflicts_before = sum(metric(r, "wirehub_game_conflicts_total") for r in cluster)

    async def bump(m: GameClient) -> int:
        acks = 0
        for _ in range(20):
            reply = await m.update(room, [{"op": "replace", "path": "/n", "value": "+1"}])
            assert reply["op"] == "ack", reply
            acks += 1
        return acks

    total = sum(await asyncio.gather(*(bump(m) for m in members)))
    _, state = await converge(room, members)
    assert state["n"] == total == 180
    assert sum(metric(r, "wirehub_game_conflicts_total") for r in cluster) > conflicts_before


def random_patch(rng: random.Random, me: str) -> list[Any]:
    kind = rng.randrange(6)
    if kind == 0:
        return [{"op": "replace", "path": "/n", "value": rng.randrange(100)}]
    if kind == 1:
        return [{"op": "add", "path": "/list/-", "value": f"{me}-{rng.randrange(1000)}"}]
    if kind == 2:
        return [{"op": "remove", "path": "/list/0"}]
    if kind == 3:
        return [{"op": "add", "path": f"/map/{me}", "value": {"v": rng.randrange(10)}}]
    if kind == 4:
        return [{"op": "test", "path": "/n", "value": rng.randrange(3)}, {"op": "add", "path": "/map/hit", "value": me}]
    return [{"op": "move", "from": f"/map/{me}", "path": "/map/moved"}]


async def test_a_random_burst_leaves_every_client_on_the_server_state(cluster: list[ServerProcess],
                                                                      clients: Any) -> None:
    room = unique_room("prop")
    members = [await clients(cluster[i % 3], f"c{i}") for i in range(12)]
    for m in members:
        await m.join(room)
    master = random.Random(6)

    async def play(m: GameClient, seed: int) -> int:
        rng = random.Random(seed)
        acks = 0
        for _ in range(25):
            reply = await m.update(room, random_patch(rng, m.name))
            assert reply["op"] == "ack" or reply.get("code") == "conflict", reply
            acks += reply["op"] == "ack"
        return acks

    acks = await asyncio.gather(*(play(m, master.randrange(1 << 30)) for m in members))
    assert sum(acks) > 100
    version, state = await converge(room, members)
    assert sum(m.gaps for m in members) == 0
    for r in cluster:
        late = await clients(r, "late")
        reply = await late.join(room)
        assert (reply["version"], reply["state"]) == (version, state)


async def test_a_replica_joining_late_serves_the_current_state(cluster: list[ServerProcess], clients: Any) -> None:
    room = unique_room("late")
    a, b = await clients(cluster[0], "a"), await clients(cluster[1], "b")
    await a.join(room)
    await b.join(room)
    for i in range(30):
        await (a if i % 2 else b).update(room, [{"op": "add", "path": f"/map/k{i}", "value": i}])
    top = await converge(room, [a, b])
    c = await clients(cluster[2], "c")  # replica 2 has had no member of this room
    reply = await c.join(room)
    assert (reply["version"], reply["state"]) == top
    await a.update(room, [{"op": "add", "path": "/map/after", "value": True}])
    await converge(room, [a, b, c])


async def authoritative(replica: ServerProcess, room: str, timeout: float = 20.0) -> tuple[int, Any]:
    """The store's (version, state), through a replica with no member in ``room``: its join reads
    the store (retried while the replica answers ``unavailable``)."""
    probe = await GameClient.connect(replica.url(GAME, "ws"), "probe")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while (reply := await probe.join(room))["op"] == "error" and loop.time() < deadline:
            assert reply["code"] == "unavailable", reply
            await asyncio.sleep(0.2)
        assert reply["op"] == "state", reply
        assert (await probe.request({"op": "leave", "room": room}))["op"] == "left"
        return reply["version"], reply["state"]
    finally:
        await probe.aclose()


@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_a_broker_restart_during_play(kind: str, tmp_path: Path, clients: Any,
                                           redis_server_factory: Callable[..., BrokerProcess],
                                           nats_server_factory: Callable[..., BrokerProcess]) -> None:
    """Redis here keeps nothing across a restart (the room starts again); NATS keeps its KV. Either
    way every member ends on the store's state. Replica 3 has no members: it reads the store."""
    broker = redis_server_factory() if kind == "redis" else nats_server_factory()
    replicas = start_replicas(kind, broker, tmp_path, n=4)
    try:
        room = unique_room("restart")
        members = [await clients(replicas[i % 3], f"m{i}") for i in range(6)]
        for m in members:
            await m.join(room)
        stop = asyncio.Event()

        async def play(m: GameClient) -> tuple[int, int]:
            acks = errors = n = 0
            while not stop.is_set():
                n += 1
                reply = await m.update(room, [{"op": "add", "path": f"/map/{m.name}", "value": n}])
                if reply["op"] == "ack":
                    acks += 1
                else:
                    assert reply["code"] in ("unavailable", "conflict"), reply
                    errors += 1
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.01)
            return acks, errors

        players = [asyncio.ensure_future(play(m)) for m in members]
        await asyncio.sleep(0.5)
        before = await authoritative(replicas[3], room)
        assert before[0] > 0
        await asyncio.to_thread(broker.restart)
        await asyncio.sleep(2.0)
        stop.set()
        results = await asyncio.gather(*players)
        assert sum(e for _, e in results) > 0  # the outage was seen
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            top = await authoritative(replicas[3], room)
            if all(m.rooms.get(room) == top for m in members):
                break
            assert loop.time() < deadline, f"store at {top[0]}; members at {[m.rooms[room][0] for m in members]}"
            await asyncio.sleep(0.2)
        for m in members:  # and what each member's replica answers to sync agrees
            reply = await m.sync(room)
            assert (reply["version"], reply["state"]) == top
        if kind == "nats":
            assert top[0] > before[0]  # the KV survived the restart
        await members[0].update(room, [{"op": "add", "path": "/map/after", "value": True}])
        await converge(room, members)
        assert await authoritative(replicas[3], room) == members[0].rooms[room]
    finally:
        # stopped off the event loop, so that clients still answer the drain's close frames
        await asyncio.gather(*(asyncio.to_thread(r.stop, 10) for r in replicas))
