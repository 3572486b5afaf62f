"""The chat endpoint across two replicas on one real broker (Redis, NATS): messages, presence, recovery
and the HTTP publish API reach members connected to the other replica."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.helpers import rejoin_collecting
from wirehub.testing import LiveServer, WsClient, unique_room

CHAT = "/ws/chat"
KEY = "replica-test-key"
FAST = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "op_timeout": 3.0, "presence_ttl": 3.0}
ServerFactory = Callable[..., Awaitable[LiveServer]]


@pytest.fixture(params=["redis", "nats"])
async def replicas(request: pytest.FixtureRequest, wirehub_server: ServerFactory) -> tuple[LiveServer, LiveServer]:
    kind = str(request.param)
    prefix = f"chat{uuid.uuid4().hex[:8]}"
    if kind == "redis":
        broker: Any = request.getfixturevalue("redis_server")
        bus = {"plugin": "redis", "redis": {"url": broker.url, "key_prefix": prefix, **FAST}}
    else:
        broker = request.getfixturevalue("nats_server")
        bus = {"plugin": "nats", "nats": {"servers": [broker.url], "subject_prefix": prefix, "storage": "memory",
                                          **FAST}}
    config = {
        "bus": bus,
        "auth": {"plugin": "test-header"},
        "plugins": {"load": ["tests.plugins_for_tests.chat_auth"]},
        "endpoints": [{"path": CHAT, "handler": "chat", "options": {"publish_rate": 1000, "publish_burst": 1000}}],
        "api": {"keys": [KEY]},
    }
    return await wirehub_server({**config, "server": {"node_id": "r1"}}), await wirehub_server(
        {**config, "server": {"node_id": "r2"}})


async def member(server: LiveServer, user: str, room: str, **join: Any) -> tuple[WsClient, dict[str, Any]]:
    ws = await server.ws(CHAT, headers={"X-User": user}, welcome=True)
    joined = await ws.request({"op": "join", "room": room, **join})
    assert joined["op"] == "joined", joined
    return ws, joined


async def test_messages_and_presence_cross_replicas(replicas: tuple[LiveServer, LiveServer]) -> None:
    r1, r2 = replicas
    room = unique_room()
    alice, _ = await member(r1, "alice", room)
    bob, joined = await member(r2, "bob", room)
    assert [p["user"] for p in joined["presence"]] == ["alice", "bob"]
    assert (await alice.recv_op("presence.join"))["user"] == "bob"
    ack = await alice.request({"op": "publish", "room": room, "data": "hi bob"})
    msg = await bob.recv_op("message")
    assert msg["from"] == "alice" and msg["data"] == "hi bob" and msg["offset"] == ack["offset"]
    await alice.expect_nothing(0.2)

    bob2, _ = await member(r1, "bob", room)  # bob's second tab, on the other replica
    await alice.expect_nothing(0.2)
    bob.close()
    await alice.expect_nothing(0.3)
    bob2.close()
    assert (await alice.recv_op("presence.leave"))["user"] == "bob"


async def test_recovery_on_the_other_replica(replicas: tuple[LiveServer, LiveServer]) -> None:
    r1, r2 = replicas
    room = unique_room()
    alice, _ = await member(r1, "alice", room)
    bob, joined = await member(r1, "bob", room)
    await alice.request({"op": "publish", "room": room, "data": 1})
    first = await bob.recv_op("message")
    bob.close()
    sent = [(await alice.request({"op": "publish", "room": room, "data": i}))["offset"] for i in (2, 3)]
    bob2, rejoined = await member(r2, "bob", room, since={"offset": first["offset"], "epoch": joined["epoch"]})
    assert rejoined["recovered"] is True and rejoined["epoch"] == joined["epoch"]
    replay = [await bob2.recv_op("message") for _ in range(2)]
    assert [(m["data"], m["offset"]) for m in replay] == [(2, sent[0]), (3, sent[1])]
    live = await alice.request({"op": "publish", "room": room, "data": 4})
    assert (await bob2.recv_op("message"))["offset"] == live["offset"]
    _, other = await member(r2, "carol", room, since={"offset": first["offset"], "epoch": "not-the-epoch"})
    assert other["recovered"] is False


async def test_http_publish_reaches_members_on_every_replica(replicas: tuple[LiveServer, LiveServer]) -> None:
    r1, r2 = replicas
    room = unique_room()
    a, _ = await member(r1, "alice", room)
    b, _ = await member(r2, "bob", room)
    resp = await r1.http("/api/publish", "POST", body={"room": room, "data": "from ops"},
                         headers={"Authorization": f"Bearer {KEY}"})
    assert resp.code == 200
    for ws in (a, b):
        msg = await ws.recv_op("message")
        assert msg["from"] == "server" and msg["data"] == "from ops"


async def test_recovery_while_publishing_goes_on_has_no_gap_and_no_duplicate(
    replicas: tuple[LiveServer, LiveServer],
) -> None:
    """Real broker round trips inside the join: publishes land between the subscription, the
    history read and the release; the reader must still see every offset exactly once."""
    r1, r2 = replicas
    room = unique_room()
    publisher, _ = await member(r1, "pub", room)
    reader, joined = await member(r2, "reader", room)
    total = 150

    async def publish_all() -> list[int]:
        return [(await publisher.request({"op": "publish", "room": room, "data": i}))["offset"] for i in range(total)]

    task = asyncio.ensure_future(publish_all())
    got: list[int] = []
    for hop in range(4):
        while len(got) < 20 * (hop + 1):
            got.append((await reader.recv_op("message"))["offset"])
        reader.close()
        reader = await (r1, r2)[hop % 2].ws(CHAT, headers={"X-User": "reader"}, welcome=True)
        rejoined = await rejoin_collecting(reader, room, {"offset": got[-1], "epoch": joined["epoch"]}, got)
        assert rejoined["recovered"] is True
    sent = await task
    while len(got) < total:
        got.append((await reader.recv_op("message"))["offset"])
    assert got == sent
    await reader.expect_nothing(0.2)
