"""Game-state consistency across replicas, with three in-process replicas sharing one in-process
broker (tests/plugins_for_tests/game_shared_bus.py) whose publishes are delayed at random, so that
versions committed on different replicas reach the others out of order. The same properties run
against real Redis and NATS with `wirehub serve` processes in tests/test_game_replicas.py."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.plugins_for_tests import game_shared_bus
from tests.plugins_for_tests.game_client import GameClient
from wirehub.testing import LiveServer, unique_room

GAME = "/ws/game"
ServerFactory = Callable[..., Awaitable[LiveServer]]
PLUGINS = ["tests.plugins_for_tests.game_rules", "tests.plugins_for_tests.game_shared_bus"]


def replica_config(broker: str, delay: float = 0.01, **options: Any) -> dict[str, Any]:
    opts = {"tick": 0.02, "verify_interval": 0.5, "gap_timeout": 0.3, "updates_per_second": 0, **options}
    return {"bus": {"plugin": "shared", "shared": {"broker": broker, "delay": delay}},
            "endpoints": [{"path": GAME, "handler": "game", "options": opts}],
            "plugins": {"load": PLUGINS}}


@pytest.fixture
async def replicas(wirehub_server: ServerFactory) -> Any:
    async def start(n: int = 3, delay: float = 0.01, **options: Any) -> list[LiveServer]:
        broker = unique_room("broker")
        return [await wirehub_server(replica_config(broker, delay, **options)) for _ in range(n)]

    return start


@pytest.fixture
async def clients() -> Any:
    made: list[GameClient] = []

    async def connect(server: LiveServer, name: str = "") -> GameClient:
        client = await GameClient.connect(server.ws_url(GAME), name)
        made.append(client)
        return client

    yield connect
    await asyncio.gather(*(c.aclose() for c in made))


def broker_of(server: LiveServer) -> game_shared_bus.SharedBroker:
    return server.app.backend.bus.broker  # type: ignore[attr-defined,no-any-return]


async def stored(server: LiveServer, room: str) -> tuple[int, Any]:
    """The store's (version, state); a room without state is at version 0 with the initial state {}."""
    found = await server.app.backend.state.get(f"game/{room}")
    return (0, {}) if found is None else (found[0], found[1]["s"])


async def converge(server: LiveServer, room: str, members: list[GameClient], timeout: float = 10.0) -> tuple[int, Any]:
    """Wait until every member's copy equals the store's (version, state); returns it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        top = await stored(server, room)
        if all(m.rooms.get(room) == top for m in members):
            return top
        if loop.time() > deadline:
            wrong = {m.name: m.rooms.get(room, (None,))[0] for m in members if m.rooms.get(room) != top}
            raise AssertionError(f"members did not converge on version {top[0]}: {wrong}")
        await asyncio.sleep(0.05)


def metric(server: LiveServer, name: str) -> float:
    value = server.app.metrics.registry.get_sample_value(name, {"endpoint": GAME})
    return float(value or 0)


async def test_concurrent_increments_on_three_replicas_lose_nothing(replicas: Any, clients: Any) -> None:
    servers = await replicas(3)
    room = unique_room("counter")
    members = [await clients(servers[i % 3], f"m{i}") for i in range(9)]
    for m in members:
        await m.join(room)

    async def bump(m: GameClient) -> int:
        acks = 0
        for _ in range(15):
            reply = await m.update(room, [{"op": "replace", "path": "/n", "value": "+1"}])
            assert reply["op"] == "ack", reply
            acks += 1
        return acks

    total = sum(await asyncio.gather(*(bump(m) for m in members)))
    version, state = await converge(servers[0], room, members)
    assert state["n"] == total == 135
    # the retries ran: replicas did lose compare-and-set races, and re-validated on the newer state
    assert sum(metric(s, "wirehub_game_conflicts_total") for s in servers) > 0
    assert sum(metric(s, "wirehub_game_commits_total") for s in servers) == version


async def test_exhausted_retries_answer_conflict_and_change_nothing(replicas: Any, clients: Any) -> None:
    servers = await replicas(3, max_retries=1)
    room = unique_room("counter")
    members = [await clients(servers[i % 3], f"m{i}") for i in range(9)]
    for m in members:
        await m.join(room)

    async def bump(m: GameClient) -> list[dict[str, Any]]:
        return [await m.update(room, [{"op": "replace", "path": "/n", "value": "+1"}]) for _ in range(15)]

    replies = [r for rs in await asyncio.gather(*(bump(m) for m in members)) for r in rs]
    acks = [r for r in replies if r["op"] == "ack"]
    conflicts = [r for r in replies if r["op"] == "error"]
    assert conflicts, "no compare-and-set race was lost"
    assert all({k: r[k] for k in ("code", "message")} == {"code": "conflict",
               "message": "too many concurrent updates; retry"} for r in conflicts)
    _, state = await converge(servers[0], room, members)
    assert state["n"] == len(acks)  # refused updates left no trace


def random_patch(rng: random.Random, me: str) -> list[Any]:
    """A random patch on a document {"n", "list", "map"}; some do not apply (test, missing paths)."""
    kind = rng.randrange(8)
    if kind == 0:
        return [{"op": "replace", "path": "/n", "value": rng.randrange(100)}]
    if kind == 1:
        return [{"op": "add", "path": "/list/-", "value": f"{me}-{rng.randrange(1000)}"}]
    if kind == 2:
        return [{"op": "add", "path": "/list/0", "value": {"by": me}}]
    if kind == 3:
        return [{"op": "remove", "path": "/list/0"}]  # fails on an empty list
    if kind == 4:
        return [{"op": "add", "path": f"/map/{me}", "value": rng.randrange(10)}]
    if kind == 5:
        return [{"op": "test", "path": "/n", "value": rng.randrange(3)}, {"op": "add", "path": "/map/hit", "value": me}]
    if kind == 6:
        return [{"op": "copy", "from": "/n", "path": "/map/copied"}]
    return [{"op": "move", "from": f"/map/{me}", "path": "/map/moved"}]  # fails unless present


async def test_random_concurrent_updates_leave_every_client_on_the_server_state(replicas: Any,
                                                                                clients: Any) -> None:
    servers = await replicas(3, initial_state={"n": 0, "list": [], "map": {}})
    room = unique_room("prop")
    members = [await clients(servers[i % 3], f"c{i}") for i in range(12)]
    for m in members:
        await m.join(room)
    master = random.Random(20261126)
    seeds = [master.randrange(1 << 30) for _ in members]

    async def play(m: GameClient, seed: int) -> tuple[int, int]:
        rng = random.Random(seed)
        acks = errors = 0
        for _ in range(25):
            reply = await m.update(room, random_patch(rng, m.name))
            if reply["op"] == "ack":
                acks += 1
            else:
                assert reply["op"] == "error" and reply["code"] == "conflict", reply
                errors += 1
            if rng.random() < 0.2:
                await asyncio.sleep(rng.uniform(0, 0.02))
        return acks, errors

    results = await asyncio.gather(*(play(m, s) for m, s in zip(members, seeds, strict=True)))
    assert sum(a for a, _ in results) > 100 and sum(e for _, e in results) > 0
    version, state = await converge(servers[0], room, members)
    assert sum(m.gaps for m in members) == 0  # the replicas put versions in order themselves
    # a member joining now on any replica sees the same
    for s in servers:
        late = await clients(s, "late")
        reply = await late.join(room)
        assert (reply["version"], reply["state"]) == (version, state)


async def test_a_replica_joining_late_serves_the_current_state(replicas: Any, clients: Any) -> None:
    a_srv, b_srv, c_srv = await replicas(3)
    room = unique_room()
    a, b = await clients(a_srv, "a"), await clients(b_srv, "b")
    await a.join(room)
    await b.join(room)
    for i in range(20):
        await (a if i % 2 else b).update(room, [{"op": "add", "path": f"/k{i}", "value": i}])
    top = await converge(a_srv, room, [a, b])
    assert top[0] == 20
    c = await clients(c_srv, "c")  # c_srv never had a member of the room
    reply = await c.join(room)
    assert (reply["version"], reply["state"]) == top
    await a.update(room, [{"op": "add", "path": "/after", "value": True}])
    await converge(a_srv, room, [a, b, c])


@pytest.mark.parametrize("restart", ["kept", "wiped", "rolled_back"])
async def test_a_broker_outage_during_play_ends_on_the_right_state(replicas: Any, clients: Any,
                                                                  restart: str) -> None:
    servers = await replicas(3, verify_interval=1.0)
    broker = broker_of(servers[0])
    room = unique_room()
    members = [await clients(servers[i % 3], f"m{i}") for i in range(6)]
    for m in members:
        await m.join(room)
    for i in range(10):
        await members[i % 6].update(room, [{"op": "add", "path": f"/a{i}", "value": i}])
    snapshot = dict(broker.state._docs)
    for i in range(10, 15):
        await members[i % 6].update(room, [{"op": "add", "path": f"/a{i}", "value": i}])
    # the last publishes are lost: the broker goes down right after the commits
    broker.outage()
    reply = await members[0].update(room, [{"op": "add", "path": "/during", "value": 1}])
    assert reply == {"op": "error", "id": reply["id"], "code": "unavailable",
                     "message": "the state store is unavailable; retry"}
    sync = await members[1].request({"op": "sync", "room": room})
    assert sync["op"] == "error" and sync["code"] == "unavailable"
    await asyncio.sleep(0.1)
    broker.restore(wipe=restart == "wiped", state=snapshot if restart == "rolled_back" else None)
    if restart == "rolled_back":
        # two commits reach versions the members already had, with other content
        for i in range(2):
            await members[3].update(room, [{"op": "add", "path": f"/b{i}", "value": i}])
    top = await converge(servers[0], room, members)
    if restart == "kept":
        assert top[0] == 15 and top[1] == {f"a{i}": i for i in range(15)}
    elif restart == "wiped":
        assert top == (0, {})
    else:
        assert top[0] == 12 and top[1] == {**{f"a{i}": i for i in range(10)}, "b0": 0, "b1": 1}
    # and every member's sync agrees
    for m in members:
        reply = await m.sync(room)
        assert (reply["version"], reply["state"]) == top
    await members[0].update(room, [{"op": "add", "path": "/after", "value": True}])
    await converge(servers[0], room, members)


async def test_a_lost_last_message_is_found_by_the_periodic_check(replicas: Any, clients: Any) -> None:
    a_srv, b_srv = await replicas(2, verify_interval=0.3)
    room = unique_room()
    a, b = await clients(a_srv, "a"), await clients(b_srv, "b")
    await a.join(room)
    await b.join(room)
    # b's replica stops hearing the room (as if a message were lost), then a commits
    bus_b = b_srv.app.backend.bus
    bus_b.rooms.discard(f"game/{room}")  # type: ignore[attr-defined]
    await a.update(room, [{"op": "add", "path": "/x", "value": 1}])
    await converge(a_srv, room, [a, b], timeout=5)
    assert metric(b_srv, "wirehub_game_resyncs_total") >= 1


async def test_idle_expiry_waits_for_members_on_other_replicas(replicas: Any, clients: Any) -> None:
    a_srv, b_srv = await replicas(2, idle_expiry=0.2)
    room = unique_room()
    a, b = await clients(a_srv, "a"), await clients(b_srv, "b")
    await a.join(room)
    await b.join(room)
    await a.update(room, [{"op": "add", "path": "/x", "value": 1}])
    await a.request({"op": "leave", "room": room})
    await asyncio.sleep(0.8)
    assert (await stored(a_srv, room))[0] == 1  # b is still in the room, on the other replica
    await b.request({"op": "leave", "room": room})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while (await stored(a_srv, room))[0] != 0:
        assert loop.time() < deadline
        await asyncio.sleep(0.05)
