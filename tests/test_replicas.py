"""Three real ``wirehub serve`` processes on one Redis or one NATS, with real WebSocket clients on
the chat endpoint: one delivery per member in one order, presence across replicas (and after a
SIGKILL), recovery on another replica, and a broker restart under live sessions."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.helpers import Cluster, ServerProcess, bus_block
from wirehub.brokers import BrokerProcess, NatsServer, RedisServer
from wirehub.testing import WsClient, unique_room, ws_connect

pytestmark = pytest.mark.slow


class ChatCluster(Cluster):
    """The replicas, their broker, and the chat clients opened on them (closed after the test)."""

    def __init__(self, kind: str, broker: BrokerProcess, replicas: list[ServerProcess]) -> None:
        super().__init__(replicas)
        self.kind = kind
        self.broker = broker
        self.clients: list[WsClient] = []

    async def client(self, replica: int) -> WsClient:
        c = await ws_connect(self.replicas[replica].url("/ws/chat", "ws"), welcome=True)
        self.clients.append(c)
        return c


# One broker and three replicas per kind for the module (starting them is most of a test's time): a test
# may kill a replica or the broker; the next test's ``cluster`` starts again whatever is down (the broker on
# its port, a replica on its own) and waits until every replica is ready.


@pytest.fixture(scope="module", params=["redis", "nats"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def broker(kind: str) -> Iterator[BrokerProcess]:
    """A broker of the module's own (a test kills it and starts it again)."""
    with (RedisServer() if kind == "redis" else NatsServer()) as b:
        yield b


@pytest.fixture(scope="module")
def replicas(kind: str, broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[list[ServerProcess]]:
    """Three replicas (the installed ``wirehub`` entry point, each in a session of its own) on ``broker``."""
    cluster = Cluster.configure(tmp_path_factory.mktemp(f"replicas-{kind}"),
                                [f"replica-{name}" for name in ("a", "b", "c")], {
        "bus": bus_block(kind, broker, f"e{uuid.uuid4().hex[:6]}"),
        "endpoints": [{"path": "/ws/chat", "handler": "chat",
                       "options": {"publish_rate": 1000, "publish_burst": 1000}}],
    }, installed=True)
    cluster.start()
    yield cluster.replicas
    cluster.stop()


@pytest.fixture
async def cluster(kind: str, broker: BrokerProcess, replicas: list[ServerProcess]) -> AsyncIterator[ChatCluster]:
    if not broker.running:
        broker.start()
    for r in replicas:
        if not r.running:
            r.start()
    c = ChatCluster(kind, broker, replicas)
    await c.wait_ready()
    yield c
    # while the loop runs and before the replicas stop: a close handshake left unfinished leaves its socket
    # to the garbage collector (a ResourceWarning in a later test)
    await asyncio.gather(*(client.aclose() for client in c.clients))


async def collect(client: WsClient, room: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next ``count`` ``message`` frames of ``room`` (other frames are skipped)."""
    out: list[dict[str, Any]] = []
    while len(out) < count:
        msg = await client.recv_op("message", timeout)
        if msg["room"] == room:
            out.append(msg)
    return out


async def test_every_member_on_every_replica_gets_each_message_once_in_one_order(cluster: ChatCluster) -> None:
    room = unique_room()
    members = [await cluster.client(i % 3) for i in range(6)]  # two on each replica
    for m in members:
        joined = await m.request({"op": "join", "room": room})
        assert joined["op"] == "joined", joined
    pub_a, pub_c = await cluster.client(0), await cluster.client(2)
    for p in (pub_a, pub_c):
        assert (await p.request({"op": "join", "room": room}))["op"] == "joined"

    async def publish(client: WsClient, tag: str, n: int) -> list[int]:
        ids = [f"{tag}{i}" for i in range(n)]
        for i in ids:
            await client.send({"op": "publish", "room": room, "data": {"n": i}, "id": i})
        acks = {}
        while len(acks) < n:
            msg = await client.recv(10)
            if msg.get("op") == "ack":
                acks[msg["id"]] = msg["offset"]
            assert msg.get("op") != "error", msg
        return [acks[i] for i in ids]

    offsets_a, offsets_c = await asyncio.gather(publish(pub_a, "a", 25), publish(pub_c, "c", 25))
    assert offsets_a == sorted(offsets_a) and offsets_c == sorted(offsets_c)
    assert len(set(offsets_a) | set(offsets_c)) == 50
    streams = await asyncio.gather(*(collect(m, room, 50) for m in members))
    first = [(m["data"]["n"], m["offset"]) for m in streams[0]]
    for got in streams:
        assert [(m["data"]["n"], m["offset"]) for m in got] == first  # same messages, same order
    assert [o for _, o in first] == sorted(o for _, o in first)
    assert sorted(n for n, _ in first) == sorted([f"a{i}" for i in range(25)] + [f"c{i}" for i in range(25)])
    for m in members:
        await m.expect_nothing(0.2)  # and nothing twice


async def test_presence_spans_replicas_and_a_killed_replica_expires(cluster: ChatCluster) -> None:
    room = unique_room()
    clients = [await cluster.client(i) for i in range(3)]
    users = []
    for c in clients:
        joined = await c.request({"op": "join", "room": room})
        users.append(joined)
    presence = await clients[0].request({"op": "presence", "room": room})
    names = {m["user"] for m in presence["members"]}
    assert len(names) == 3

    cluster.replicas[2].kill()  # SIGKILL: no leave, no goodbye
    deadline = time.monotonic() + 1.5 + 3.0  # presence_ttl plus slack
    while True:
        presence = await clients[0].request({"op": "presence", "room": room})
        if len(presence["members"]) == 2:
            break
        assert time.monotonic() < deadline, presence
        await asyncio.sleep(0.1)
    # the others keep serving
    await clients[1].send({"op": "publish", "room": room, "data": "still here", "id": "p1"})
    assert (await collect(clients[0], room, 1))[0]["data"] == "still here"
    assert await cluster.replicas[0].status("/readyz") == 200


async def test_a_client_recovers_on_another_replica(cluster: ChatCluster) -> None:
    room = unique_room()
    publisher = await cluster.client(1)
    await publisher.request({"op": "join", "room": room})
    first = await cluster.client(0)
    joined = await first.request({"op": "join", "room": room})
    await publisher.request({"op": "publish", "room": room, "data": "seen"})
    seen = (await collect(first, room, 1))[0]
    first.close()

    for i in range(3):  # missed while away
        await publisher.request({"op": "publish", "room": room, "data": f"missed{i}"})
    again = await cluster.client(2)
    rejoined = await again.request({"op": "join", "room": room,
                                    "since": {"offset": seen["offset"], "epoch": joined["epoch"]}})
    assert rejoined["op"] == "joined" and rejoined["recovered"] is True, rejoined
    missed = await collect(again, room, 3)
    assert [m["data"] for m in missed] == ["missed0", "missed1", "missed2"]

    stale = await cluster.client(2)
    other_room = await stale.request({"op": "join", "room": room, "since": {"offset": 1, "epoch": "nope"}})
    assert other_room["recovered"] is False  # an epoch from elsewhere: a fresh start, said so


async def test_broker_restart_under_live_sessions(cluster: ChatCluster) -> None:
    room = unique_room()
    members = [await cluster.client(i) for i in range(3)]
    for m in members:
        await m.request({"op": "join", "room": room})
    await members[0].request({"op": "publish", "room": room, "data": "before"})
    for m in members[1:]:
        assert (await collect(m, room, 1))[0]["data"] == "before"

    cluster.broker.kill()
    t0 = time.monotonic()
    await cluster.wait_ready(timeout=5, want=503)
    assert time.monotonic() - t0 < 3
    refused = await members[0].request({"op": "publish", "room": room, "data": "during"})
    assert refused["op"] == "error" and refused["code"] == "unavailable", refused

    cluster.broker.start()
    await cluster.wait_ready(timeout=15)
    if cluster.kind == "redis":
        # this Redis kept nothing: each replica's repair finds a new epoch and tells its members
        for m in members:
            gap = await m.recv_op("gap", 5)
            assert gap["room"] == room
    # resubscribed by themselves: the same sessions get new messages, nothing silently missing
    ack = await members[1].request({"op": "publish", "room": room, "data": "after"})
    assert ack["op"] == "ack", ack
    for m in (members[0], members[2]):
        got = await m.recv_op("message", 10)
        while got.get("data") != "after":
            got = await m.recv_op("message", 10)
        assert got["data"] == "after"
    for m in members:
        await m.send(json.dumps({"op": "ping", "id": "x"}))
    for r in cluster.replicas:
        assert r.running, r.output()[-2000:]
