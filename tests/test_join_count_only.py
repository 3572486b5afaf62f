"""A count-only ``joined`` (``presence_limit: 0``) on Redis costs one round trip, as a page does (issue 11): the
room's count is read after the join in the join's own pipeline, not by a ``count`` of its own afterwards (a second
round trip and two more commands per join: a count-only join cost more than a join with a page of 20). The reply
is the same: the count, an empty ``presence`` and no cursor, across replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from wirehub.brokers import RedisServer
from wirehub.builtins.bus.redis_presence import RedisPresence
from wirehub.testing import LiveServer, unique_room

Start = Callable[..., Awaitable[LiveServer]]
CHAT = "/ws/chat"


def _config(redis_url: str, prefix: str, node: str, events: str) -> dict[str, Any]:
    return {"auth": {"plugin": "test-header"}, "plugins": {"load": ["tests.plugins_for_tests.chat_auth"]},
            "bus": {"plugin": "redis", "redis": {"url": redis_url, "key_prefix": prefix}},
            "server": {"node_id": node},
            "endpoints": [{"path": CHAT, "handler": "chat", "options": {
                "presence_rules": [{"pattern": "count-*", "presence_limit": 0, "events": events},
                                   {"pattern": "*", "events": "off"}]}}]}


@pytest.mark.parametrize("events", ["off", "each", "batched"])
async def test_a_count_only_join_on_redis_reads_the_count_in_the_joins_pipeline(
        wirehub_server: Start, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, events: str) -> None:
    counts: list[str] = []
    original = RedisPresence.count

    async def counting(self: RedisPresence, room: str) -> Any:
        counts.append(room)
        return await original(self, room)

    monkeypatch.setattr(RedisPresence, "count", counting)
    prefix = f"co{uuid.uuid4().hex[:8]}"
    a, b = [await wirehub_server(_config(redis_server.url, prefix, f"r{i}", events)) for i in range(2)]
    room, paged = unique_room("count"), unique_room("paged")
    clients, replies = [], []
    for i, user in enumerate(["u0", "u0", "u2", "u3", "u4", "u5"]):  # two tabs of u0; over both replicas
        ws = await (a if i % 2 else b).ws(CHAT, headers={"X-User": user}, welcome=True)
        clients.append(ws)
        replies.append(await ws.request({"op": "join", "room": room, "id": i}))
    together = await asyncio.gather(*(ws.request({"op": "join", "room": paged}) for ws in clients))
    assert counts == []  # the count came with each join, never read on its own
    for i, joined in enumerate(replies):
        assert joined["op"] == "joined" and joined["id"] == i
        assert joined["presence"] == [] and "cursor" not in joined
    assert [r["count"] for r in replies] == [{"users": 1, "connections": 1}, {"users": 1, "connections": 2},
                                             {"users": 2, "connections": 3}, {"users": 3, "connections": 4},
                                             {"users": 4, "connections": 5}, {"users": 5, "connections": 6}]
    assert all(r["count"]["connections"] >= 1 and r["presence"] for r in together)  # a page where limit > 0
    assert (await clients[0].request({"op": "presence", "room": room, "count_only": True}))["count"] == {
        "users": 5, "connections": 6}
