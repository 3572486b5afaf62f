"""A NATS join's round trips, against a real nats-server: the presence write is the join's only broker round
trip (no leader request before it, nor after it for the count of a count-only room), and "first connection of
its user" is decided at the write's echo in the room's live copy, so of two connections of one user joining
at the same instant on two replicas exactly one is reported first (and, of their two leaves, exactly one
reports the user)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest

from tests.helpers import nats_replicas
from wirehub import Identity, Session
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.nats_buckets import Write
from wirehub.builtins.bus.nats_presence import NatsPresence, _LiveRoom
from wirehub.builtins.handlers.chat_presence import ChatPresence, PresenceRule, PresenceRules
from wirehub.bus import Backend, PresenceCount, PresenceEntry
from wirehub.hub import Hub
from wirehub.testing import eventually, unique_room

Replica = Callable[[], Awaitable[Backend]]


@pytest.fixture
async def replica(nats_server: BrokerProcess) -> AsyncIterator[Replica]:
    """``await replica()``: a started NATS backend; all of them share one key prefix."""
    async with nats_replicas(nats_server, f"rt{uuid.uuid4().hex[:6]}", presence_interval=0.25) as make:
        yield make


def presence(backend: Backend) -> NatsPresence:
    assert isinstance(backend.presence, NatsPresence)
    return backend.presence


async def test_a_user_joining_on_two_replicas_at_once_is_first_exactly_once(replica: Replica) -> None:
    a, b = await replica(), await replica()
    room = unique_room()
    # both replicas follow the room (live copies running) before the simultaneous joins
    await asyncio.gather(a.presence.join(room, PresenceEntry("seed", "s-seed-a", "node-a", {})),
                         b.presence.join(room, PresenceEntry("seed", "s-seed-b", "node-b", {})))
    users = [f"u{i:03d}" for i in range(40)]
    on_a = [PresenceEntry(u, f"s-{u}-a", "node-a", {}) for u in users]
    on_b = [PresenceEntry(u, f"s-{u}-b", "node-b", {}) for u in users]
    firsts = await asyncio.gather(*(a.presence.join(room, e) for e in on_a),
                                  *(b.presence.join(room, e) for e in on_b))
    assert [x + y for x, y in zip(firsts[:40], firsts[40:], strict=True)] == [1] * 40
    # both copies hold both connections of every user, at once after the joins (read your writes) and across
    assert await a.presence.count(room) == PresenceCount(41, 82)
    assert await b.presence.count(room) == PresenceCount(41, 82)
    # of the two leaves of each user, exactly one reports the user
    left = await asyncio.gather(*(a.presence.leave(room, e.session) for e in on_a),
                                *(b.presence.leave(room, e.session) for e in on_b))
    assert sorted(u for u in left if u is not None) == users
    await eventually(lambda: _count_is(a, room, PresenceCount(1, 2)))


def _leader_requests(p: NatsPresence, monkeypatch: Any) -> list[str]:
    """The rooms whose stream leader ``p`` asks for their newest sequence from now on (a sync's request)."""
    asked: list[str] = []
    leader_seq = p._leader_seq

    async def counted(room: str) -> int:
        asked.append(room)
        return await leader_seq(room)

    monkeypatch.setattr(p, "_leader_seq", counted)
    return asked


async def _count_is(backend: Backend, room: str, count: PresenceCount) -> bool:
    return await backend.presence.count(room) == count


async def test_a_join_into_a_followed_room_asks_the_leader_nothing(replica: Replica, monkeypatch: Any) -> None:
    a, b = await replica(), await replica()
    room = unique_room()
    assert await b.presence.join(room, PresenceEntry("bob", "s-bob", "node-b", {}))
    assert await a.presence.join(room, PresenceEntry("ann", "s-ann-1", "node-a", {}))
    asked = _leader_requests(presence(a), monkeypatch)
    # another replica's member joined before: the join's echo comes after it, so bob is not "first" here
    assert not await a.presence.join(room, PresenceEntry("bob", "s-bob-a", "node-a", {}))
    assert await a.presence.join(room, PresenceEntry("cid", "s-cid", "node-a", {}))
    assert asked == []
    page = await presence(a).joined_page(room, 10)
    assert [m.user for m in page.members] == ["ann", "bob", "cid"] and page.count == PresenceCount(3, 4)
    assert await a.presence.leave(room, "s-bob-a") is None  # bob is still connected on b
    assert await b.presence.leave(room, "s-bob") == "bob"


async def test_a_count_only_joined_asks_the_leader_nothing_and_counts_every_join(replica: Replica,
                                                                                 monkeypatch: Any) -> None:
    """The chat's ``joined`` of a count-only room (``presence_limit`` 0, a big room's usual rule) reads the
    count from the live copy as the first page does, without a second sync (a leader request per loop
    iteration, and in a join storm a wait for the other joins' echoes), and counts what a read would."""
    a, b = await replica(), await replica()
    room = unique_room()
    assert await b.presence.join(room, PresenceEntry("bob", "s-bob", "node-b", {}))
    chat = ChatPresence(PresenceRules([PresenceRule("*", presence_limit=0)], "off", 100), 1000,
                        cast(Hub, None), a.presence)
    await chat.join(_session("seed"), room)  # the room followed: a live copy runs on a
    asked = _leader_requests(presence(a), monkeypatch)
    joined = await asyncio.gather(*(chat.join(_session(f"u{i}"), room) for i in range(5)))
    assert asked == []
    # each joined counts bob, the seed and itself at least, and the last of the batch all of them
    replies = [json.loads(b"{" + fields[1:] + members + b"}") for fields, members in joined]
    assert all(r["presence"] == [] for r in replies)
    counts = [r["count"] for r in replies]
    assert all(c["users"] >= 3 for c in counts) and max(c["users"] for c in counts) == 7, counts
    assert await a.presence.count(room) == PresenceCount(7, 7)


def _session(user: str) -> Session:
    return Session(_Quiet(), Identity(user=user, rooms=("*",)), endpoint="/ws/chat", node="node-a",
                   max_queue_bytes=1 << 20)


class _Quiet:
    """A transport that takes nothing (the presence join sends no frame with events off)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the join used the transport: {name}")


async def test_the_echo_of_a_later_write_of_a_key_settles_its_join_first(replica: Replica) -> None:
    """A consumer restarted with the key's last value only never echoes the join's write: the echo of the
    leave's later write decides both, the join first (its user was first, the leave reports the user)."""
    p = presence(await replica())
    room = unique_room()
    bucket = p._new_key(room, "node-a")
    live = _LiveRoom(None, p._tag, lambda key, msg: None)
    entry = PresenceEntry("ann", "s-ann", "node-a", {})
    join = Write()
    join.joins = [entry]
    join.firsts = asyncio.get_running_loop().create_future()
    leave = Write()
    left: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
    leave.left.append((entry.session, left))
    bucket.writes["1"], bucket.writes["2"] = join, leave
    p._settle(bucket, "2", live)
    assert join.firsts.result() == {"s-ann"} and left.result() == "ann"
    assert live.roster.count() == PresenceCount(0, 0) and bucket.writes == {}
