"""A replica's live copy of a room on NATS is a core subscription to the members stream's RePublish, not a
JetStream consumer per room (:mod:`wirehub.builtins.bus.nats_presence`), against real nats-servers: the
broker holds no consumer for the copies, a missed write is repaired (by its key's next write, by the next
read, after a slow consumer's drops, after a new stream leader), a duplicate is dropped, and three
replicas' copies agree while joins and leaves race."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import pytest

from tests.helpers import FAST_BUS, nats_replicas
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus import nats_presence
from wirehub.builtins.bus._broker import encode_room
from wirehub.builtins.bus.nats import create_backend
from wirehub.builtins.bus.nats_buckets import encode_entries
from wirehub.builtins.bus.nats_presence import NatsPresence, _LiveRoom
from wirehub.bus import Backend, PresenceCount, PresenceEntry
from wirehub.nats_cluster import NatsCluster
from wirehub.testing import Recorder, eventually, unique_room

Replica = Callable[[], Awaitable[Backend]]


@pytest.fixture
def prefix() -> str:
    return f"rp{uuid.uuid4().hex[:6]}"


@pytest.fixture
async def replica(nats_server: BrokerProcess, prefix: str) -> AsyncIterator[Replica]:
    """``await replica()``: a started NATS backend; all of them share one key prefix."""
    async with nats_replicas(nats_server, prefix, presence_interval=0.25) as make:
        yield make


def presence(backend: Backend) -> NatsPresence:
    assert isinstance(backend.presence, NatsPresence)
    return backend.presence


def live_of(backend: Backend, room: str) -> _LiveRoom:
    live = presence(backend)._current_live(room)
    assert live is not None
    return live


async def members_consumers(backend: Backend) -> list[Any]:
    p = presence(backend)
    return list(await p.bus.js.consumers_info(f"KV_{p.members_bucket}"))


def foreign_key(room: str, node: str, n: int) -> str:
    """A key of another replica (a tag no live replica has)."""
    return f"{encode_room(room)}.{encode_room(node)}.zzzz{n}"


async def write_unrepublished(backend: Backend, key: str, data: bytes, headers: dict[str, str] | None = None) -> int:
    """A write the stream stores without republishing it (republish off meanwhile): a lost republish."""
    p = presence(backend)
    js, stream = p.bus.js, f"KV_{p.members_bucket}"
    config = (await js.stream_info(stream)).config
    await js.update_stream(dataclasses.replace(config, republish=None))
    try:
        ack = await js.publish(p.pre + key, data, headers=headers)
    finally:
        await js.update_stream(config)
    return int(ack.seq)


async def test_the_copies_hold_no_consumer_on_the_broker(replica: Replica, prefix: str) -> None:
    """Two replicas with members in 5 rooms: each keeps a copy of every room, the members stream has no
    consumer (before: one ordered consumer per room and replica) and republishes to <prefix>.pm.>."""
    a, b = await replica(), await replica()
    rooms = [unique_room() for _ in range(5)]
    for i, room in enumerate(rooms):
        assert await a.presence.join(room, PresenceEntry(f"a{i}", f"sa{i}", "node-a"))
        assert await b.presence.join(room, PresenceEntry(f"b{i}", f"sb{i}", "node-b"))
    for room in rooms:
        assert await a.presence.count(room) == PresenceCount(2, 2)
        assert await b.presence.count(room) == PresenceCount(2, 2)
        live_of(a, room), live_of(b, room)
    assert await members_consumers(a) == []
    p = presence(a)
    config = (await p.bus.js.stream_info(f"KV_{p.members_bucket}")).config
    assert config.republish.dest == f"{prefix}.pm.>" and config.allow_direct
    # a room where this replica has no member is read without a consumer too
    other = unique_room()
    await b.presence.join(other, PresenceEntry("c", "sc", "node-b"))
    assert await a.presence.count(other) == PresenceCount(1, 1)
    assert await members_consumers(a) == []


async def test_a_bucket_of_an_earlier_version_gets_the_republish(nats_server: BrokerProcess, prefix: str) -> None:
    """The members bucket exists without RePublish and direct gets (an earlier release made it): a replica
    that starts sets both, and its copies work."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.create_key_value(bucket=f"{prefix}_members", history=1)
        assert (await js.stream_info(f"KV_{prefix}_members")).config.republish is None
        async with nats_replicas(nats_server, prefix) as make:
            a, b = await make(), await make()
            config = (await js.stream_info(f"KV_{prefix}_members")).config
            assert config.republish.src == f"$KV.{prefix}_members.>" and config.allow_direct
            room = unique_room()
            await a.presence.join(room, PresenceEntry("alice", "s1", "node-a"))
            await b.presence.join(room, PresenceEntry("bob", "s2", "node-b"))
            assert await a.presence.count(room) == PresenceCount(2, 2)
    finally:
        await nc.close()


async def test_a_missed_write_is_repaired(replica: Replica) -> None:
    """Writes of another replica's key that were stored but never republished: the key's next write
    repairs the copy by itself (it holds the key's whole state); a missed purge that no write follows is
    found by the next read (the copy is behind the leader's sequence) and the room is read again."""
    a, b = await replica(), await replica()
    room = unique_room()
    await b.presence.join(room, PresenceEntry("bob", "sb", "node-b"))
    await a.presence.join(room, PresenceEntry("alice", "sa", "node-a"))
    await eventually(lambda: _is(live_of(b, room).roster.count(), PresenceCount(2, 2)))
    live = live_of(b, room)
    key = foreign_key(room, "node-x", 1)
    carol, dave = PresenceEntry("carol", "sc", "node-x"), PresenceEntry("dave", "sd", "node-x")
    await write_unrepublished(a, key, encode_entries("node-x", [carol]))
    assert live.roster.count() == PresenceCount(2, 2)  # the copy missed it
    await presence(a).bus.js.publish(presence(a).pre + key, encode_entries("node-x", [carol, dave]))
    await eventually(lambda: _is(live.roster.count(), PresenceCount(4, 4)))
    assert live.gaps == 1 and live.resyncs == 0
    # the key's purge is lost and nothing follows it: the next read finds the copy behind and re-reads
    await write_unrepublished(a, key, b"", {"KV-Operation": "PURGE", "Nats-Rollup": "sub", "Nats-TTL": "60"})
    assert live.roster.count() == PresenceCount(4, 4)
    assert await b.presence.count(room) == PresenceCount(2, 2)
    assert live.resyncs == 1 and live_of(b, room) is live
    assert sorted(m.user for m in (await b.presence.page(room, None, 10)).members) == ["alice", "bob"]
    # a missed new key (its first write) is found the same way
    await write_unrepublished(a, foreign_key(room, "node-x", 2), encode_entries("node-x", [dave]))
    assert await b.presence.count(room) == PresenceCount(3, 3)
    assert live.resyncs == 2


async def test_duplicates_and_stale_writes_are_dropped(replica: Replica) -> None:
    """A write the copy holds, or an older one of a key the copy saw purged, delivered again (a
    re-read's overlap, a leader change): ignored; alice does not come back."""
    a, b = await replica(), await replica()
    room = unique_room()
    await b.presence.join(room, PresenceEntry("bob", "sb", "node-b"))
    alice = PresenceEntry("alice", "sa", "node-a")
    await a.presence.join(room, alice)
    live = live_of(b, room)
    key = presence(a)._local[room]["sa"].key
    await eventually(lambda: _is(live.roster.count(), PresenceCount(2, 2)))
    joined_seq = live.seqs[key]
    pb = presence(b)
    nc = pb.bus.nc
    value = encode_entries("node-a", [alice])

    async def replay(seq: int, last: int) -> None:
        await nc.publish(pb.dest + key, value, headers={"Nats-Sequence": str(seq), "Nats-Last-Sequence": str(last)})
        await nc.flush()

    before = live.duplicates
    await replay(joined_seq, 0)  # the same write again
    await eventually(lambda: _is(live.duplicates, before + 1))
    assert await a.presence.leave(room, "sa") == "alice"
    await eventually(lambda: _is(live.roster.count(), PresenceCount(1, 1)))
    await replay(joined_seq, 0)  # the join's write, after the purge that removed it
    await eventually(lambda: _is(live.duplicates, before + 2))
    assert live.roster.count() == PresenceCount(1, 1)
    assert await b.presence.count(room) == PresenceCount(1, 1)
    assert live.gaps == 0


async def test_three_replicas_agree_while_joins_and_leaves_race(replica: Replica) -> None:
    """Three replicas, 4 workers each, join and leave connections of 8 shared users at random (the third
    replica's copy starts in the middle of it): every copy ends with the true members, and per user the
    "first connection" answers minus the "last connection left" answers are 1 if present, else 0."""
    reps = [await replica() for _ in range(3)]
    room = unique_room()
    stay: set[tuple[str, str]] = set()  # (user, session)
    firsts: Counter[str] = Counter()
    departed: Counter[str] = Counter()

    async def worker(i: int, w: int) -> None:
        rng = random.Random(i * 10 + w)
        if i == 2:
            await asyncio.sleep(0.05 + 0.02 * w)
        backend = reps[i]
        for n in range(25):
            entry = PresenceEntry(f"u{rng.randrange(8)}", f"s{i}-{w}-{n}", f"node-{i}")
            if await backend.presence.join(room, entry):
                firsts[entry.user] += 1
            await asyncio.sleep(rng.random() * 0.004)
            if rng.random() < 0.6:
                user = await backend.presence.leave(room, entry.session)
                if user is not None:
                    departed[user] += 1
            else:
                stay.add((entry.user, entry.session))

    await asyncio.gather(*(worker(i, w) for i in range(3) for w in range(4)))
    users = {user for user, _ in stay}
    for backend in reps:
        assert await backend.presence.count(room) == PresenceCount(len(users), len(stay))
        assert {(e.user, e.session) for e in await backend.presence.members(room)} == stay
    for user in {*firsts, *departed}:
        assert firsts[user] - departed[user] == (1 if user in users else 0), (user, firsts, departed)
    assert await members_consumers(reps[0]) == []


async def test_a_slow_consumer_s_drops_end_in_a_re_read(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy's subscription may queue one message (nats-py drops the rest and reports a slow consumer):
    a burst of 60 writes of another replica's keys is dropped in part, and the copy is read again without
    any read asking for it."""
    monkeypatch.setattr(nats_presence, "SUB_PENDING", 1)
    a, b = await replica(), await replica()
    room = unique_room()
    await b.presence.join(room, PresenceEntry("bob", "sb", "node-b"))
    live = live_of(b, room)
    nc = presence(a).bus.nc
    for n in range(60):
        node = f"node-{n}"
        await nc.publish(presence(a).pre + foreign_key(room, node, n),
                         encode_entries(node, [PresenceEntry(f"u{n:02d}", f"s{n}", node)]))
    await nc.flush()
    await eventually(lambda: _is(live.roster.count(), PresenceCount(61, 61)))
    assert live.resyncs >= 1


async def test_a_new_stream_leader_makes_every_copy_read_again(nats_cluster: NatsCluster) -> None:
    """On a 3-node cluster (R3): no consumer for the copies either; when the members stream's leader steps
    down, each replica re-reads its copies (the new leader republishes only what it applies as leader), and
    they keep following the room."""
    prefix = f"rc{uuid.uuid4().hex[:6]}"
    opts = {"replicas": 3, "storage": "memory", "op_timeout": 3.0, "presence_ttl": 3.0}
    made: list[Backend] = []
    try:
        for _ in range(2):
            backend = create_backend({"servers": nats_cluster.urls, "subject_prefix": prefix, **FAST_BUS, **opts},
                                     "bus.nats")
            made.append(backend)
            await backend.bus.start(Recorder())
        a, b = made
        room = unique_room()
        await a.presence.join(room, PresenceEntry("alice", "sa", "node-a"))
        await b.presence.join(room, PresenceEntry("bob", "sb", "node-b"))
        assert await a.presence.count(room) == PresenceCount(2, 2)
        assert await b.presence.count(room) == PresenceCount(2, 2)
        assert await members_consumers(a) == []
        copies = [live_of(a, room), live_of(b, room)]
        answer = await presence(a).bus.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.KV_{prefix}_members", b"",
                                                  timeout=5)
        assert b'"success":true' in answer.data.replace(b" ", b""), answer.data
        await eventually(lambda: _all(live.resyncs >= 1 for live in copies), timeout=10)
        await a.presence.join(room, PresenceEntry("carol", "sc", "node-a"))
        assert await b.presence.count(room) == PresenceCount(3, 3)
        assert await b.presence.leave(room, "sb") == "bob"
        assert await a.presence.count(room) == PresenceCount(2, 2)
    finally:
        for backend in made:
            await backend.bus.close()


async def _is(value: Any, expected: Any) -> bool:
    return bool(value == expected)


async def _all(values: Any) -> bool:
    return all(values)


async def test_a_room_of_more_keys_than_a_page_is_read_whole(replica: Replica) -> None:
    """1,100 keys of other replicas (a slow join storm writes a key per join): a copy's start reads them in
    pages of 1024 (batched direct gets), and so does a read of the room by a replica without members."""
    a, b = await replica(), await replica()
    room = unique_room()
    js, nc, pre = presence(a).bus.js, presence(a).bus.nc, presence(a).pre
    n = nats_presence.PAGE + 76
    for i in range(n - 1):
        node = f"node-{i}"
        entry = PresenceEntry(f"u{i:04d}", f"s{i}", node)
        await nc.publish(pre + foreign_key(room, node, i), encode_entries(node, [entry]))
    last = f"node-{n - 1}"  # acknowledged: every write before it on this connection is stored too
    await js.publish(pre + foreign_key(room, last, n - 1),
                     encode_entries(last, [PresenceEntry(f"u{n - 1:04d}", f"s{n - 1}", last)]))
    assert await a.presence.count(room) == PresenceCount(n, n)  # no member on a: one read of the room
    assert await b.presence.join(room, PresenceEntry("bob", "sb", "node-b"))
    assert live_of(b, room).roster.count() == PresenceCount(n + 1, n + 1)
    assert await b.presence.count(room) == PresenceCount(n + 1, n + 1) and live_of(b, room).resyncs == 0


async def test_messages_that_are_no_republished_write_are_ignored(replica: Replica) -> None:
    """Something else publishes on the copy's subject: without a stream sequence (or with an unreadable one)
    it is dropped with a warning, and the copy stays right."""
    a = await replica()
    room = unique_room()
    await a.presence.join(room, PresenceEntry("alice", "sa", "node-a"))
    p = presence(a)
    live = live_of(a, room)
    subject = p.dest + foreign_key(room, "node-x", 1)
    value = encode_entries("node-x", [PresenceEntry("mallory", "sm", "node-x")])
    await p.bus.nc.publish(subject, value)
    await p.bus.nc.publish(subject, value, headers={"Nats-Sequence": "x"})
    await p.bus.nc.publish(subject, b"not json", headers={"Nats-Sequence": "1"})  # unreadable value
    await p.bus.nc.flush()
    await asyncio.sleep(0.1)
    assert live.roster.count() == PresenceCount(1, 1)
    assert [m.user for m in (await a.presence.page(room, None, 10)).members] == ["alice"]
