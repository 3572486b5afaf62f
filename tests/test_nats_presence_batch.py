"""NATS presence writes a loop iteration's joins of a room as a few keys of up to ``BUCKET`` entries
(:mod:`wirehub.builtins.bus.nats_buckets`), against a real nats-server: a storm is a few messages, a leave
rewrites only its key, a failed batch's joins are not members, a leave in the same iteration as a join is
right, and a killed replica's batched members leave the other replicas within the TTL."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.helpers import FAST_BUS, nats_replicas
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.nats_buckets import BUCKET, Joined, parse_entries
from wirehub.builtins.bus.nats_presence import NatsPresence
from wirehub.bus import Backend, BusUnavailable, PresenceCount, PresenceEntry
from wirehub.eager import Continued
from wirehub.testing import eventually, unique_room

INTERVAL = 0.25
Replica = Callable[[], Awaitable[Backend]]


@pytest.fixture
async def replica(nats_server: BrokerProcess) -> AsyncIterator[Replica]:
    """``await replica()``: a started NATS backend; all of them share one key prefix."""
    async with nats_replicas(nats_server, f"pb{uuid.uuid4().hex[:6]}", presence_interval=INTERVAL) as make:
        yield make


def presence(backend: Backend) -> NatsPresence:
    assert isinstance(backend.presence, NatsPresence)
    return backend.presence


def entries(n: int, node: str, prefix: str = "u") -> list[PresenceEntry]:
    return [PresenceEntry(f"{prefix}{i:04d}", f"s-{prefix}{i}-{node}", node, {"name": f"N{i}"}) for i in range(n)]


async def count_is(backend: Backend, room: str, count: PresenceCount) -> bool:
    return await backend.presence.count(room) == count


async def test_a_storm_of_joins_is_a_few_keys_and_every_replica_sees_every_member(replica: Replica) -> None:
    a, b = await replica(), await replica()
    room = unique_room()
    storm = entries(300, "node-a")
    # the first join waits for the node's first heartbeat and the room's copy: the rest of the storm then
    # runs to its write in one loop iteration (with them in the gather, where each resumed was up to timing)
    assert await a.presence.join(room, storm[0]) is True
    firsts = await asyncio.gather(*(a.presence.join(room, e) for e in storm[1:]))  # one loop iteration's joins
    assert all(firsts)
    keys = await presence(a).stored_keys(room)
    assert len(keys) == 1 + math.ceil((len(storm) - 1) / BUCKET), keys
    await eventually(lambda: count_is(b, room, PresenceCount(300, 300)))
    page = await b.presence.page(room, None, 5)
    assert [(m.user, m.info) for m in page.members] == [(f"u{i:04d}", {"name": f"N{i}"}) for i in range(5)]
    # a leave rewrites its key without the connection: the other replica applies only that difference
    assert await a.presence.leave(room, storm[7].session) == "u0007"
    await eventually(lambda: count_is(b, room, PresenceCount(299, 299)))
    assert "u0007" not in {e.user for e in await b.presence.members(room)}
    assert len(await presence(a).stored_keys(room)) == len(keys)
    # every leave of a key's last entries: the key is purged, and nothing of the room is left
    assert await asyncio.gather(*(a.presence.leave(room, e.session) for e in storm)) == [
        None if i == 7 else e.user for i, e in enumerate(storm)]
    assert await presence(a).stored_keys(room) == []
    await eventually(lambda: count_is(b, room, PresenceCount(0, 0)))


async def test_two_connections_of_a_user_in_one_batch_count_once(replica: Replica) -> None:
    a, b = await replica(), await replica()
    room = unique_room()
    one, two = PresenceEntry("alice", "s1", "node-a"), PresenceEntry("alice", "s2", "node-a")
    assert sorted(await asyncio.gather(a.presence.join(room, one), a.presence.join(room, two))) == [False, True]
    await eventually(lambda: count_is(b, room, PresenceCount(1, 2)))
    # both leave in one iteration (one rewrite of their key): exactly one reports alice
    assert sorted(await asyncio.gather(a.presence.leave(room, "s1"), a.presence.leave(room, "s2")),
                  key=str) == [None, "alice"]
    await eventually(lambda: count_is(b, room, PresenceCount(0, 0)))


async def test_a_leave_in_the_same_iteration_as_joins(replica: Replica) -> None:
    a, b = await replica(), await replica()
    room = unique_room()
    stay = PresenceEntry("stay", "s-stay", "node-a")
    assert await a.presence.join(room, stay) is True
    newcomers = entries(10, "node-a", "n")
    # joins of one iteration, the leave of an earlier member, and the leave of a join not written yet
    results = await asyncio.gather(*(a.presence.join(room, e) for e in newcomers),
                                   a.presence.leave(room, "s-stay"), a.presence.leave(room, newcomers[3].session))
    assert results[:10] == [i != 3 for i in range(10)]  # the one that left before its write is no member
    assert results[10:] == ["stay", None]
    expected = PresenceCount(9, 9)
    assert await a.presence.count(room) == expected
    await eventually(lambda: count_is(b, room, expected))
    assert {e.session for e in await b.presence.members(room)} == {e.session for e in newcomers} - {"s-n3-node-a"}


async def test_a_failed_batch_is_no_member_and_its_key_is_settled(replica: Replica, monkeypatch: Any) -> None:
    a, b = await replica(), await replica()
    room = unique_room()
    assert await a.presence.join(room, PresenceEntry("early", "s-early", "node-a")) is True
    bus = presence(a).bus
    write = bus.write
    failed: list[str] = []

    async def flaky(what: str, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> int:
        if payload and not failed:
            failed.append(subject)
            await write(what, subject, payload, headers)  # stored, yet the replica hears a failure
            raise BusUnavailable("presence: no answer from the broker within 1s")
        return await write(what, subject, payload, headers)

    monkeypatch.setattr(bus, "write", flaky)
    doomed = entries(5, "node-a", "d")
    results = await asyncio.gather(*(a.presence.join(room, e) for e in doomed), return_exceptions=True)
    assert all(isinstance(r, BusUnavailable) for r in results), results
    assert await a.presence.count(room) == PresenceCount(1, 1)
    assert await a.presence.leave(room, doomed[0].session) is None  # never a member
    # the write landed: upkeep writes the key's state again (none: a purge), the other replica follows
    await eventually(lambda: count_is(b, room, PresenceCount(1, 1)), timeout=FAST_BUS["presence_ttl"] + 3)
    await eventually(lambda: _keys_are(a, room, 1), timeout=3)
    # later joins work
    assert await a.presence.join(room, PresenceEntry("late", "s-late", "node-a")) is True
    await eventually(lambda: count_is(b, room, PresenceCount(2, 2)))


async def _keys_are(backend: Backend, room: str, n: int) -> bool:
    return len(await presence(backend).stored_keys(room)) == n


async def test_a_killed_replicas_batched_members_leave_within_the_ttl(replica: Replica) -> None:
    a, dead = await replica(), await replica()
    room = unique_room()
    departed: list[tuple[str, list[str]]] = []
    a.presence.on_departed(lambda r, users: departed.append((r, sorted(users))))
    await a.presence.join(room, PresenceEntry("shared", "s-shared-a", "node-a"))
    node = f"dead-{uuid.uuid4().hex[:6]}"
    doomed = entries(150, node, "d")
    await asyncio.gather(*(dead.presence.join(room, e) for e in doomed),
                         dead.presence.join(room, PresenceEntry("shared", "s-shared-d", node)))
    await eventually(lambda: count_is(a, room, PresenceCount(151, 152)))
    await dead.bus.close()  # no more heartbeats: as a SIGKILL looks to the broker
    ttl = FAST_BUS["presence_ttl"]
    await eventually(lambda: count_is(a, room, PresenceCount(1, 1)), timeout=ttl + INTERVAL + 3)
    await eventually(lambda: _true(bool(departed)))
    assert departed == [(room, sorted(e.user for e in doomed))]
    assert len(await presence(a).stored_keys(room)) == 1


async def _true(value: bool) -> bool:
    return value


def test_values_of_the_single_entry_format_are_read() -> None:
    old = b'{"user":"alice","session":"s1","node":"n1","info":{"name":"A"}}'
    assert parse_entries(old) == [PresenceEntry("alice", "s1", "n1", {"name": "A"})]
    new = b'{"n":"n1","e":[["alice","s1",{"name":"A"}],["bob","s2",{}]]}'
    assert parse_entries(new) == [PresenceEntry("alice", "s1", "n1", {"name": "A"}), PresenceEntry("bob", "s2", "n1")]
    for bad in (b"[]", b'{"n":"x"}', b'{"n":"x","e":[["a"]]}', b"nope"):
        with pytest.raises((ValueError, KeyError, TypeError)):
            parse_entries(bad)


async def test_the_joins_future_takes_eagerly_started_awaiters_and_ignores_one_joiners_cancel() -> None:
    """The server starts an op eagerly and gives the future it yielded to a Task later
    (``service/websocket.py``): many joins yield the same future before any Task takes it."""
    joined = Joined()

    async def waiter() -> str:
        await joined
        return "woke"

    coros = [waiter() for _ in range(3)]
    firsts = [c.send(None) for c in coros]
    assert all(f is joined for f in firsts)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(Continued(c, f)) for c, f in zip(coros, firsts, strict=True)]
    await asyncio.sleep(0)
    tasks[0].cancel()  # one joiner gives up: the others still get the outcome
    await asyncio.sleep(0)
    assert not joined.cancelled() and not any(t.done() for t in tasks)
    joined.set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert await asyncio.gather(*tasks[1:]) == ["woke", "woke"]


async def test_joins_waiting_at_close_fail_as_bus_unavailable(replica: Replica) -> None:
    """A join whose batch was not written when the presence closed fails as the broker being gone
    (``BusUnavailable``: the chat answers ``unavailable``), not with another error."""
    a = await replica()
    room = unique_room()
    await a.presence.join(room, entries(1, "na")[0])
    waiting = asyncio.ensure_future(a.presence.join(room, PresenceEntry("late", "s-late", "na")))
    await asyncio.sleep(0)  # batched: its write goes at the end of the loop iteration
    await presence(a).close()
    with pytest.raises(BusUnavailable):
        await waiting
