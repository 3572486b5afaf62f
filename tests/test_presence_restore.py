"""Restoring presence after a replica was declared dead or the broker lost its entries (Redis and NATS): the entries
are written again until they all are, not while a reaping of the node is under way, without writing back a session
that left meanwhile, and only the users who were gone from a room are reported to ``on_restored`` (once their key
was written, on NATS by whatever write of it went through)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from wirehub import BusUnavailable, PresenceCount, PresenceEntry
from wirehub.brokers import NatsServer, RedisServer
from wirehub.builtins.bus import redis_presence
from wirehub.testing import unique_room

FAST = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "op_timeout": 3.0, "presence_ttl": 1.5}


@pytest.fixture
def bus_config(backend_kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    prefix = f"rs{uuid.uuid4().hex[:8]}"
    if backend_kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return {"plugin": "redis", "redis": {"url": server.url, "key_prefix": prefix, **FAST}}
    nserver: NatsServer = request.getfixturevalue("nats_server")
    return {"plugin": "nats", "nats": {"servers": [nserver.url], "subject_prefix": prefix, "storage": "memory",
                                       **FAST}}


async def _reaped_replica(presence_replica: Any) -> tuple[Any, str, str, list[tuple[str, list[str]]]]:
    """A Redis replica with u1 and u2 on node ``stalled-node`` in a room, as a reaping left them (gone from the
    broker, still connected here); what it reports to ``on_restored`` is recorded."""
    b = await presence_replica()
    p = b.presence
    room, node = unique_room(), "stalled-node"
    restored: list[tuple[str, list[str]]] = []
    p.on_restored(lambda r, users: restored.append((r, sorted(users))))
    await p.join(room, PresenceEntry("u1", "s1", node))
    await p.join(room, PresenceEntry("u2", "s2", node))
    await _simulate_reaped(p, room, node)
    return p, room, node, restored


async def _simulate_reaped(p: Any, room: str, node: str) -> None:
    """What a live replica's reaping of ``node`` leaves in Redis: the room's keys, the node's index and stamp gone."""
    client = p.bus.client
    await client.delete(*p._keys(room), p._node_index(node))
    await client.zrem(p._nodes_key, node)


@pytest.mark.parametrize("backend_kind", ["redis"])
async def test_redis_a_restore_that_failed_is_tried_again_at_the_next_beat_and_reported(presence_replica: Any) -> None:
    """A replica declared dead writes its entries again at its next beat. That beat refreshed its stamp, so when
    the write fails (a timeout, the bus blipping) the next beats must try again until it goes through, and report
    the users (members told they left are told they are back)."""
    p, room, _, restored = await _reaped_replica(presence_replica)

    orig = p._pipeline
    failed = []

    async def flaky(*commands: Any, **kw: Any) -> Any:
        if not failed and any(isinstance(c, tuple) and c and c[0] == "SADD" for c in commands):
            failed.append(1)
            raise BusUnavailable("timeout (simulated) during the restore's write")
        return await orig(*commands, **kw)

    p._pipeline = flaky
    with pytest.raises(BusUnavailable):
        await p.upkeep()
    p._pipeline = orig
    for _ in range(3):
        await p.upkeep()
        await asyncio.sleep(0.1)
    count = await p.count(room)
    assert count == PresenceCount(2, 2), f"entries never written again: {count}"
    assert restored, "on_restored never called"


@pytest.mark.parametrize("backend_kind", ["redis"])
async def test_redis_a_session_that_leaves_during_a_restore_is_not_written_back(
    presence_replica: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The restore writes the entries batch by batch. A session that leaves while an earlier batch is on its way
    (its leave removes nothing: it was reaped) must not be written back by its own batch later (a ghost entry no
    leave would remove), nor its user reported back."""
    monkeypatch.setattr(redis_presence, "REAP_BATCH", 1)  # stands for > 500 entries on the replica
    p, room, _, restored = await _reaped_replica(presence_replica)

    orig = p._pipeline
    left: list[Any] = []

    async def with_a_leave_meanwhile(*commands: Any, **kw: Any) -> Any:
        out = await orig(*commands, **kw)
        if not left and any(isinstance(c, tuple) and c and c[0] == "SADD" for c in commands):
            left.append(await p.leave(room, "s2"))  # u2's connection closes while batch 1 was on its way
        return out

    p._pipeline = with_a_leave_meanwhile
    await p.upkeep()
    p._pipeline = orig
    members = sorted((e.user, e.session) for e in await p.members(room))
    assert members == [("u1", "s1")], f"ghost entry written back after its leave: {members}"
    assert all("u2" not in users for _, users in restored), f"u2 reported restored after leaving: {restored}"


@pytest.mark.parametrize("backend_kind", ["nats"])
async def test_nats_a_key_whose_restore_failed_is_reported_once_a_write_of_it_went_through(
    presence_replica: Any,
) -> None:
    """A key whose restore write failed waits to be reported. A leave of one of its entries writes the key's whole
    state (the others' entries are back in the broker) and settles it, so upkeep does not rewrite it: its users
    are reported all the same, at the next upkeep."""
    b = await presence_replica()
    other = (await presence_replica()).presence  # reads the broker (this replica's copy trusts its own keys)
    p = b.presence
    room, node = unique_room(), "stalled-node"
    restored: list[tuple[str, list[str]]] = []
    p.on_restored(lambda r, users: restored.append((r, sorted(users))))
    await p.join(room, PresenceEntry("u0", "s0", node))  # the node's first beat and the room's copy
    before = set(p._own[room])
    await asyncio.gather(p.join(room, PresenceEntry("u1", "s1", node)), p.join(room, PresenceEntry("u2", "s2", node)))
    buckets = [b for k, b in p._own[room].items() if k not in before]
    assert len(buckets) == 1, buckets  # one key holds both
    bucket = buckets[0]
    await p._purge(bucket.key)  # what the reaping of this node did
    await asyncio.sleep(0.2)
    assert (await other.count(room)).users == 1  # u0's key is still there

    orig = p.bus.write
    failed: list[str] = []

    async def flaky(kind: str, subject: str, data: bytes, headers: Any) -> int:
        if subject.endswith(bucket.key) and data:  # the broker does not take this key's writes (this upkeep)
            failed.append(subject)
            raise BusUnavailable("simulated write failure during the restore")
        return await orig(kind, subject, data, headers)

    p.bus.write = flaky
    p._last_beat = time.monotonic() - p.ttl - 1  # a stall longer than the TTL
    await p.upkeep()
    assert failed and bucket in p._unreported and bucket.unsettled
    assert all(users != ["u1", "u2"] for _, users in restored), restored  # u0's key may be reported
    restored.clear()
    p.bus.write = orig  # the broker takes writes again
    assert await p.leave(room, "s1") in ("u1", None)  # u1 leaves: the key is written with u2 in it
    assert not bucket.unsettled
    for _ in range(3):
        await p.upkeep()
        await asyncio.sleep(0.1)
    count = await other.count(room)
    assert count == PresenceCount(2, 2)  # u0, and u2 is back in the broker ...
    assert restored == [(room, ["u2"])], f"... but never reported restored: {restored}"


@pytest.mark.parametrize("backend_kind", ["redis"])
async def test_redis_a_restore_waits_while_a_claim_of_its_node_is_held(presence_replica: Any) -> None:
    """A replica whose entries were reaped writes them again only once no replica holds a claim of its node (a
    reaping under way would remove what it writes), then reports their users."""
    p, room, node, restored = await _reaped_replica(presence_replica)
    claim = p._claim_key(node)
    await p.bus.client.set(claim, "1", px=30_000)  # a reaping of the node under way
    for _ in range(2):
        await p.upkeep()
    assert await p.count(room) == PresenceCount(0, 0) and restored == []
    await p.bus.client.delete(claim)  # the reaping is over
    await p.upkeep()
    assert await p.count(room) == PresenceCount(2, 2)
    assert restored == [(room, ["u1", "u2"])]


@pytest.mark.parametrize("backend_kind", ["nats"])
async def test_nats_a_reaper_leaves_a_node_that_heartbeat_again_alone(presence_replica: Any) -> None:
    """A finds B dead (a stall past the TTL) and claims it; B heartbeats again before A's first purge: A purges
    nothing and reports no departure."""
    a = await presence_replica()
    b = await presence_replica()
    room = unique_room()
    departed: list[Any] = []
    a.presence.on_departed(lambda r, users: departed.append((r, sorted(users))))
    for i in range(3):
        await b.presence.join(room, PresenceEntry(f"b{i}", f"sb{i}", "node-b"))
    go, scanning, b_back = asyncio.Event(), asyncio.Event(), asyncio.Event()
    upkeep, scan, purge = b.presence.upkeep, a.presence._scan, a.presence._purge
    purged: list[str] = []

    async def stalled() -> None:
        await go.wait()
        await upkeep()

    async def slow_scan(pattern: str) -> Any:
        found = await scan(pattern)
        if pattern.startswith("*."):  # the reaping's scan of a node's keys
            scanning.set()
            await b_back.wait()
        return found

    async def recorded(key: str) -> int:
        purged.append(key)
        return await purge(key)

    b.presence.upkeep, a.presence._scan, a.presence._purge = stalled, slow_scan, recorded
    await asyncio.wait_for(scanning.wait(), 15)  # A claimed node-b and scanned its keys
    go.set()
    b.presence.upkeep = upkeep
    for _ in range(100):  # B's beat reaches A
        if a.presence._seen.get("node-b", 0.0) > time.monotonic() - a.presence.ttl:
            break
        await asyncio.sleep(0.05)
    b_back.set()
    await asyncio.gather(*list(a.presence._reapers), return_exceptions=True)
    assert purged == [] and departed == []
    assert await a.presence.count(room) == PresenceCount(3, 3)


@pytest.mark.parametrize("backend_kind", ["redis", "nats"])
async def test_a_heartbeat_late_past_the_ttl_that_nobody_reaped_reports_nobody(
    presence_replica: Any, backend_kind: str,
) -> None:
    """A heartbeat late past the TTL that nobody reaped (a pause shorter than a reaper's reaction): the replica
    writes its entries again (it may have been reaped; nothing changes) and reports nobody: the users never
    left."""
    b = await presence_replica()
    p = b.presence
    room = unique_room()
    restored: list[Any] = []
    p.on_restored(lambda r, users: restored.append((r, sorted(users))))
    for i in range(3):
        await p.join(room, PresenceEntry(f"u{i}", f"s{i}", "node-b"))
    if backend_kind == "redis":
        await b.bus.client.zadd(p._nodes_key, {"node-b": 1})  # its stamp stale
    else:
        p._last_beat = time.monotonic() - p.ttl - 1  # silent for longer than the TTL
    await p.upkeep()
    assert await p.count(room) == PresenceCount(3, 3)
    assert restored == []


@pytest.mark.parametrize("backend_kind", ["redis"])
async def test_redis_a_reaping_that_outlives_its_claim_leaves_the_entries_written_again(
    presence_replica: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reaping slower than the TTL (many batches, a slow broker) loses its claim; B, back, writes its entries
    again; the reaper, stalled between its check of the node and a batch, removes some of them once more. Its
    batch counts itself in B's reaped key, so B's next beat writes them again: none is lost for good."""
    monkeypatch.setattr(redis_presence, "REAP_BATCH", 1)  # stands for a node with many entries
    a = await presence_replica()
    b = await presence_replica()
    room = unique_room()
    departed: list[Any] = []
    restored: list[Any] = []
    a.presence.on_departed(lambda r, users: departed.append((r, sorted(users))))
    b.presence.on_restored(lambda r, users: restored.append((r, sorted(users))))
    for i in range(3):
        await b.presence.join(room, PresenceEntry(f"b{i}", f"sb{i}", "node-b"))
    await b.bus.client.zadd(b.presence._nodes_key, {"node-b": 1})  # B stalled past the TTL

    orig = a.presence._pipeline
    batches = 0

    async def slow_reaper(*commands: Any, **kw: Any) -> Any:
        nonlocal batches
        if commands and isinstance(commands[0], tuple) and commands[0][0] == "SRANDMEMBER":
            batches += 1
            if batches == 2:  # the reaping goes on past its claim's TTL
                await asyncio.sleep(a.presence.ttl_ms / 1000 + 0.5)
        return await orig(*commands, **kw)

    a.presence._pipeline = slow_reaper
    await a.presence.upkeep()  # A finds node-b dead; reaping starts
    await asyncio.sleep(0.3)
    await b.presence.upkeep()  # B back: claim held, waits
    await asyncio.sleep(a.presence.ttl_ms / 1000 + 0.1)
    await b.presence.upkeep()  # claim expired: B restores
    await asyncio.gather(*list(a.presence._reapers))
    for _ in range(3):
        await b.presence.upkeep()
        await a.presence.upkeep()
        await asyncio.sleep(0.1)
    count = await b.presence.count(room)
    assert count == PresenceCount(3, 3), f"B's 3 connected sessions are gone from presence for good: {count}"


@pytest.mark.parametrize("backend_kind", ["nats"])
async def test_nats_keys_purged_by_a_reaping_of_a_live_node_are_written_again(
    presence_replica: Any,
) -> None:
    """B (stalled past the TTL) wakes between A's scan and A's purges: its restore finds its keys there. A then
    purges them, and its purge of B's heartbeat key fails (a blip), so B's heartbeat does not tell it. B's copy of
    the room sees another replica purge a key of its own: it writes it again and reports its users."""
    a = await presence_replica()
    b = await presence_replica()
    c = await presence_replica()  # reads the broker
    rooms = [unique_room() for _ in range(3)]
    departed: list[Any] = []
    restored: list[Any] = []
    a.presence.on_departed(lambda r, users: departed.append((r, sorted(users))))
    b.presence.on_restored(lambda r, users: restored.append((r, sorted(users))))
    for i, room in enumerate(rooms):
        await b.presence.join(room, PresenceEntry(f"b{i}", f"sb{i}", "node-b"))
    for room in rooms:
        assert (await c.presence.count(room)).users == 1

    c.presence._reaping.add("node-b")  # A is the reaper
    go = asyncio.Event()
    upkeep = b.presence.upkeep

    async def stalled() -> None:
        await go.wait()
        await upkeep()

    b.presence.upkeep = stalled
    b_back = asyncio.Event()
    purge = a.presence._purge

    async def purge_after_b_is_back(key: str) -> int:
        await b_back.wait()
        return await purge(key)

    a.presence._purge = purge_after_b_is_back
    js = a.bus.js
    publish = js.publish
    nodes_subject = f"$KV.{a.presence.nodes_bucket}."

    async def blip(subject: str, *args: Any, **kw: Any) -> Any:
        if subject.startswith(nodes_subject) and (kw.get("headers") or {}).get("KV-Operation") == "PURGE":
            raise TimeoutError("blip on the heartbeat purge")
        return await publish(subject, *args, **kw)

    js.publish = blip
    for _ in range(100):
        await asyncio.sleep(0.1)
        if "node-b" in a.presence._reaping:
            break
    assert "node-b" in a.presence._reaping
    await asyncio.sleep(0.3)  # A claimed and scanned; now waits in _purge
    go.set()
    b.presence.upkeep = upkeep
    await asyncio.sleep(1.0)  # B's beats: silent > TTL, restores (keys all there)
    b_back.set()
    await asyncio.gather(*list(a.presence._reapers), return_exceptions=True)
    js.publish = publish
    await asyncio.sleep(2.0)  # several beats of B and upkeeps of A (every presence_ttl / 3)
    counts = [await c.presence.count(room) for room in rooms]
    assert all(n.users == 1 for n in counts), f"B's connected users are gone from presence for good: {counts}"
