"""A join without ``since`` starts from the hub's live position (:meth:`wirehub.hub.Hub.position`), not a
history read, and a join into a subscribed room skips the room lock. Both must stay gap-free and
duplicate-free while messages are published during the joins (memory and Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from wirehub.auth import Identity
from wirehub.builtins.bus.memory import create_backend
from wirehub.hub import Hub, envelope
from wirehub.metrics import Metrics
from wirehub.session import Session
from wirehub.testing import FakeTransport, LiveServer, WsClient, eventually, unique_room

CHAT = "/ws/chat"
ServerFactory = Callable[..., Awaitable[LiveServer]]


@pytest.fixture(params=["memory", "redis"])
async def server(request: pytest.FixtureRequest, wirehub_server: ServerFactory) -> LiveServer:
    bus: dict[str, Any] = {"plugin": "memory"}
    if request.param == "redis":
        broker: Any = request.getfixturevalue("redis_server")
        bus = {"plugin": "redis", "redis": {"url": broker.url, "key_prefix": f"jp{uuid.uuid4().hex[:8]}"}}
    return await wirehub_server({
        "bus": bus,
        "auth": {"plugin": "test-header"},
        "plugins": {"load": ["tests.plugins_for_tests.chat_auth"]},
        "endpoints": [{"path": CHAT, "handler": "chat", "options": {"publish_rate": 1000, "publish_burst": 1000}}],
    })


async def _member(server: LiveServer, user: str, room: str) -> tuple[WsClient, dict[str, Any]]:
    ws = await server.ws(CHAT, headers={"X-User": user}, welcome=True)
    joined = await ws.request({"op": "join", "room": room})
    assert joined["op"] == "joined", joined
    return ws, joined


async def test_joins_during_publishes_get_every_message_after_their_offset_once(server: LiveServer) -> None:
    room = unique_room()
    publisher, first = await _member(server, "pub", room)
    hub = server.app.hub
    assert hub.position(room) == (first["offset"], first["epoch"])  # subscribed: the live path is taken
    total, joiners = 120, 24
    offsets: list[int] = []

    async def publish_all() -> None:
        for i in range(total):
            offsets.append((await publisher.request({"op": "publish", "room": room, "data": i}))["offset"])
            await asyncio.sleep(0)

    async def join_and_read(n: int) -> tuple[int, list[int]]:
        await asyncio.sleep(0.003 * n)  # spread over the publishes
        ws, joined = await _member(server, f"u{n}", room)
        assert joined["epoch"] == first["epoch"] and joined["recovered"] is False
        got: list[int] = []
        while True:
            msg = await ws.recv_op("message")
            if msg["data"] == "end":
                return joined["offset"], got
            got.append(msg["offset"])

    readers = [asyncio.ensure_future(join_and_read(n)) for n in range(joiners)]
    await publish_all()
    # every reader must be a member before the end marker goes out
    async def all_members() -> bool:
        return len(hub.members(room)) == joiners + 1

    await eventually(all_members)
    await publisher.request({"op": "publish", "room": room, "data": "end"})
    results = await asyncio.gather(*readers)
    assert any(start > first["offset"] for start, _ in results)  # some joined while publishes went on
    assert any(start < offsets[-1] for start, _ in results)
    for start, got in results:
        assert got == [o for o in offsets if o > start], (start, got)
    assert hub.position(room) is not None


def _session() -> Session:
    return Session(FakeTransport(), Identity(user="u"), endpoint="/ws/test", node="n1", max_queue_bytes=1 << 20)


async def test_position_is_known_only_while_subscribed_with_no_repair() -> None:
    backend = create_backend({}, "bus.memory")
    hub = Hub(backend, Metrics())
    await backend.bus.start(hub)
    hub.on_bus_state(True)
    assert hub.position("r") is None
    a = _session()
    await hub.join("r", a)
    top, epoch = await backend.history.position("r")
    assert hub.position("r") == (top, epoch)
    offset = await hub.publish("r", envelope(b'{"op":"message"}'), history=True)
    assert offset is not None
    async def delivered() -> bool:
        return hub.position("r") == (offset, epoch)

    await eventually(delivered)
    b = _session()
    await hub.join("r", b)  # the fast path: subscribed, no lock held
    assert set(hub.members("r")) == {a, b} and "r" in b.rooms
    hub.on_bus_state(False)
    hub.on_bus_state(True)  # the repair runs: no live position until it is done
    assert hub.position("r") is None
    async def repaired() -> bool:
        return hub.position("r") is not None

    await eventually(repaired)
    assert hub.position("r") == (offset, epoch)
    await hub.leave("r", a)
    await hub.leave("r", b)
    assert hub.position("r") is None and hub.rooms() == []
    await hub.close()
    await backend.bus.close()


async def test_a_join_while_the_last_leave_unsubscribes_waits_and_subscribes_again() -> None:
    backend = create_backend({}, "bus.memory")
    hub = Hub(backend, Metrics())
    await backend.bus.start(hub)
    hub.on_bus_state(True)
    a, b = _session(), _session()
    await hub.join("r", a)
    leaving = asyncio.ensure_future(hub.leave("r", a))
    await asyncio.sleep(0)  # the leave holds the lock now (or is done)
    await hub.join("r", b)
    await leaving
    assert hub.members("r") == [b] and hub.position("r") is not None  # subscribed for b
    await hub.leave("r", b)
    await hub.close()
    await backend.bus.close()
