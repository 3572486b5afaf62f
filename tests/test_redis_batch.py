"""The redis bus's per-iteration pipeline (``plugins/bus/redis_batch.py``), on a real redis-server: a join
storm's presence writes, first-page reads and history positions travel in a bounded number of round trips;
counts and pages stay exact across 3 replicas; replays of one range asked for at once are one script run,
shared, and never shared with a caller who asked after it was sent; a Redis that lost its scripts is
answered with EVAL; a room's joins asked for after its leave run after it, an info JSON cannot hold fails
its own join only, a pipeline wakes at most MAX_BATCH joins' callers, entries written again are a join's."""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from wirehub import PresenceEntry
from wirehub.brokers import RedisServer
from wirehub.builtins.bus.redis import RedisBus
from wirehub.builtins.bus.redis import create_backend as redis_backend
from wirehub.builtins.bus.redis_batch import MAX_BATCH, MAX_GROUP
from wirehub.builtins.bus.redis_presence import SCRIPTS
from wirehub.builtins.bus.redis_scripts import POSITION, READ
from wirehub.bus import Backend
from wirehub.testing import Recorder, unique_room

pytestmark = pytest.mark.timeout(60)

FAST = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "op_timeout": 3.0, "presence_ttl": 3.0}


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[list[Backend]]:
    """Three backends ("replicas") on the session's Redis, one key prefix for this test."""
    opts = {"url": redis_server.url, "key_prefix": f"t{uuid.uuid4().hex[:8]}", **FAST}
    made = [redis_backend(opts, "bus.redis") for _ in range(3)]
    for backend in made:
        await backend.bus.start(Recorder())
    yield made
    for backend in made:
        await backend.bus.close()


@pytest.fixture
async def redis_calls(redis_server: RedisServer) -> AsyncIterator[Callable[[], Awaitable[dict[str, int]]]]:
    """Commands the session's Redis has executed so far, by name (INFO commandstats)."""
    client = aioredis.Redis.from_url(redis_server.url)

    async def calls() -> dict[str, int]:
        stats = await client.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    yield calls
    await client.aclose()


class Sent(list[list[Any]]):
    """The pipelines sent, one list of commands each; ``event`` is set at each."""

    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()


def round_trips(backend: Backend) -> Sent:
    """Records the pipelines ``backend`` sends to Redis (a client-side wrapper)."""
    bus = backend.bus
    assert isinstance(bus, RedisBus)
    sent = Sent()
    send = bus.send_batch

    async def counted(commands: list[Any]) -> list[Any]:
        sent.append(list(commands))
        sent.event.set()
        return await send(commands)

    bus.send_batch = counted  # type: ignore[method-assign]
    return sent


def script_runs(sent: list[list[Any]], source: str) -> int:
    sha = hashlib.sha1(source.encode()).hexdigest()
    return sum(1 for batch in sent for c in batch if c[:2] == ("EVALSHA", sha))


def entry(user: str, node: str) -> PresenceEntry:
    return PresenceEntry(user, f"s-{user}-{uuid.uuid4().hex[:6]}", node, {"name": user})


async def join_like_chat(backend: Backend, room: str, e: PresenceEntry, limit: int) -> Any:
    """What the chat endpoint asks of the backend for one join (no ``since``)."""
    await backend.presence.join(room, e)
    page = await backend.presence.page(room, None, limit)
    position = await backend.history.position(room)
    return page, position


async def test_a_join_storm_costs_a_few_round_trips_not_three_per_join(
        replicas: list[Backend], redis_calls: Callable[[], Awaitable[dict[str, int]]]) -> None:
    one = replicas[0]
    room = unique_room("storm")
    # the node's first heartbeat, and Redis learning the scripts (NOSCRIPT, then EVAL), outside the count
    await join_like_chat(one, room, entry("warm", "n0"), 20)
    sent = round_trips(one)
    before = await redis_calls()
    n = 300
    results = await asyncio.gather(*(join_like_chat(one, room, entry(f"u{i:04d}", "n0"), 20) for i in range(n)))
    after = await redis_calls()
    # one pipeline per step of the joins (presence write, first page, position) and MAX_BATCH joins, not
    # one per join (and maybe a presence heartbeat)
    sizes = [len(batch) for batch in sent]
    assert 1 <= len(sizes) <= 3 * math.ceil(n / MAX_BATCH) + 1, sizes
    assert sum(sizes) <= 2 * n + 10, sizes  # 2 commands per join write; the page and position read once per batch
    assert script_runs(sent, POSITION) <= 3 and script_runs(sent, SCRIPTS["presence_page"]) <= 3
    scripts = sum(after.get(c, 0) - before.get(c, 0) for c in ("evalsha", "eval"))
    assert scripts < n + 20, (before, after)  # the join scripts, plus a few shared reads
    stats = one.bus.batch.stats  # type: ignore[attr-defined]
    assert stats.shared >= 2 * (n - 10)
    counts = [page.count.connections for page, _ in results]
    assert max(counts) == n + 1
    for page, position in results:
        assert position == results[0][1]
        assert [m.user for m in page.members] == sorted(m.user for m in page.members)


async def test_counts_and_pages_are_exact_across_three_replicas_after_concurrent_joins(
        replicas: list[Backend]) -> None:
    room = unique_room("three")
    users = [f"user-{i:04d}" for i in range(240)]
    done = 0

    async def one(i: int, user: str) -> None:
        nonlocal done
        backend = replicas[i % 3]
        await backend.presence.join(room, entry(user, f"node{i % 3}"))
        joined_before = done + 1  # joins completed before this page was asked for, this one included
        page = await backend.presence.page(room, None, 50)
        assert page.count.users >= joined_before  # a replica reads its own (and earlier) writes
        done += 1

    await asyncio.gather(*(one(i, u) for i, u in enumerate(users)))
    for backend in replicas:
        page = await backend.presence.page(room, None, 50)
        assert [m.user for m in page.members] == sorted(users)[:50]
        assert (page.count.users, page.count.connections) == (240, 240)
        assert page.cursor == sorted(users)[49]
        rest = await backend.presence.page(room, page.cursor, 500)
        assert [m.user for m in rest.members] == sorted(users)[50:]
    # the cached first page is dropped when a user on it leaves, on every replica
    first = sorted(users)[0]
    session = next(e.session for e in await replicas[0].presence.members(room) if e.user == first)
    assert await replicas[1].presence.leave(room, session) == first
    for backend in replicas:
        page = await backend.presence.page(room, None, 50)
        assert [m.user for m in page.members] == sorted(users)[1:51]
        assert page.count.users == 239


async def test_replays_of_one_range_asked_at_once_are_one_script_run_shared_by_all(replicas: list[Backend]) -> None:
    backend = replicas[0]
    room = unique_room("replay")
    for i in range(30):
        await backend.bus.publish(room, b"m%d" % i, history=True)
    sent = round_trips(backend)
    pages = await asyncio.gather(*(backend.history.read(room, 10, 100) for _ in range(200)))
    assert script_runs(sent, READ) == 1  # one command, one round trip, for 200 readers
    assert backend.bus.batch.stats.shared == 199  # type: ignore[attr-defined]
    assert all(p is pages[0] for p in pages)
    assert [off for off, _ in pages[0].messages] == list(range(11, 31))
    assert pages[0].messages[-1][1] == b"m29"
    # a different range, or another room, is its own read
    other = await asyncio.gather(backend.history.read(room, 10, 100), backend.history.read(room, 20, 100))
    assert [o for o, _ in other[1].messages] == list(range(21, 31))


async def test_a_read_asked_after_the_shared_one_was_sent_sees_what_was_published_in_between(
        replicas: list[Backend]) -> None:
    backend = replicas[0]
    room = unique_room("late")
    await backend.bus.publish(room, b"a", history=True)
    sent = round_trips(backend)
    early = asyncio.ensure_future(backend.history.read(room, 0, 100))
    await sent.event.wait()  # the early read's pipeline has been sent
    assert script_runs(sent, READ) == 1
    await backend.bus.publish(room, b"b", history=True)
    late = await backend.history.read(room, 0, 100)
    assert [p for _, p in late.messages] == [b"a", b"b"]
    assert (await early).messages[0] == (1, b"a")
    top, _ = await backend.history.position(room)
    assert top == 2


async def test_a_redis_that_lost_its_scripts_gets_them_again(
        replicas: list[Backend], redis_server: RedisServer) -> None:
    backend = replicas[0]
    room = unique_room("noscript")
    await backend.presence.join(room, entry("a", "n0"))
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    page, (top, epoch) = await join_like_chat(backend, room, entry("b", "n0"), 10)
    assert [m.user for m in page.members] == ["a", "b"]
    assert top == 0 and epoch
    assert (await backend.history.read(room, 0, 10)).complete


async def test_a_first_page_that_moved_parses_only_the_members_it_did_not_hold(replicas: list[Backend]) -> None:
    a, b = replicas[0], replicas[1]
    room = unique_room("memo")
    for i in range(30):
        await a.presence.join(room, entry(f"m{i:02d}", "n0"))
    first = await a.presence.page(room, None, 10)
    await b.presence.join(room, entry("a-new", "n1"))  # ranks first: the page moved by one
    moved = await a.presence.page(room, None, 10)
    assert [m.user for m in moved.members] == ["a-new", *(m.user for m in first.members[:9])]
    assert all(x is y for x, y in zip(moved.members[1:], first.members[:9], strict=True))
    assert moved.members[0].info == {"name": "a-new"}
    assert moved.count.users == 31


async def test_without_hiredis_the_batches_are_packed_by_redis_py(
        replicas: list[Backend], monkeypatch: pytest.MonkeyPatch) -> None:
    # hiredis is in the redis extra, but redis-py alone must still serve a join storm
    from wirehub.builtins.bus import redis_batch

    monkeypatch.setattr(redis_batch, "_pack_command", None)
    room = unique_room("nohiredis")
    users = [f"u{i:03d}" for i in range(30)]
    await asyncio.gather(*(replicas[i % 3].presence.join(room, entry(u, f"node{i % 3}"))
                           for i, u in enumerate(users)))
    page = await replicas[0].presence.page(room, None, 10)
    assert [m.user for m in page.members] == users[:10]
    assert page.count.users == 30


async def test_the_joins_of_one_iteration_into_a_room_are_one_script_run_and_their_page_comes_with_it(
        replicas: list[Backend]) -> None:
    one = replicas[0]
    room = unique_room("group")
    await join_like_chat(one, room, entry("warm", "n0"), 20)  # the heartbeat and the scripts, outside the count
    sent = round_trips(one)
    users = [f"u{i:04d}" for i in range(300)]
    entries = [entry(u, "n0") for u in users] + [entry(u, "n0") for u in users[:40]]  # 40 second connections
    join_page = one.presence.join_page  # type: ignore[attr-defined]
    results = await asyncio.gather(*(join_page(room, e, 20) for e in entries))
    # one join script run (and one SADD) per room and MAX_GROUP joins, the page read in the same pipeline
    assert script_runs(sent, SCRIPTS["presence_join"]) <= math.ceil(len(entries) / MAX_GROUP) + 1
    assert script_runs(sent, SCRIPTS["presence_page"]) == script_runs(sent, SCRIPTS["presence_join"])
    assert sum(1 for batch in sent for c in batch if c[0] == "SADD") == script_runs(sent, SCRIPTS["presence_join"])
    assert len(sent) <= 3
    # "first of its user" exactly once per user, as joins one by one would say
    firsts = [e.user for e, (first, _) in zip(entries, results, strict=True) if first]
    assert sorted(firsts) == users
    for e, (_, page) in zip(entries, results, strict=True):
        names = [m.user for m in page.members]
        assert names == sorted(names) and len(names) == 20
        assert e.user in names or e.user > names[-1]  # the page was read after the join
    page = await one.presence.page(room, None, 20)
    assert (page.count.users, page.count.connections) == (301, 341)
    assert [m.user for m in page.members] == users[:20]
    assert [m.connections for m in page.members] == [2] * 20
    index = await one.presence.members(room)
    assert len(index) == 341


async def test_a_join_given_up_leaves_the_others_of_its_script_run_joined(replicas: list[Backend]) -> None:
    one, other = replicas[0], replicas[1]
    room = unique_room("cancel")
    await one.presence.join(room, entry("warm", "n0"))
    entries = [entry(f"c{i:02d}", "n0") for i in range(10)]
    tasks = [asyncio.ensure_future(one.presence.join(room, e)) for e in entries]
    await asyncio.sleep(0)  # all queued in one iteration, into one request made by the first
    tasks[0].cancel()  # the caller whose future is the request's own
    tasks[3].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError) and isinstance(done[3], asyncio.CancelledError)
    assert [d for i, d in enumerate(done) if i not in (0, 3)] == [True] * 8
    users = {"warm"} | {e.user for e in entries}

    async def members() -> set[str]:
        return {m.user for m in (await other.presence.page(room, None, 50)).members}

    # the given-up joins were sent in the script run (they ran), and their leaves wait for upkeep
    assert await members() == users
    await one.presence.upkeep()
    assert await members() == users - {entries[0].user, entries[3].user}
    assert len(await other.presence.members(room)) == 9  # their entries, not only their users


async def test_a_join_asked_for_after_a_leave_of_its_room_runs_after_it(replicas: list[Backend]) -> None:
    """A retried leave and a join of the same session again: the join must not go into a script run queued
    before the leave (the leave would then remove the new entry, on every replica, while it is joined)."""
    one, other = replicas[0], replicas[1]
    presence: Any = one.presence
    room = unique_room("order")
    await presence.join(room, entry("warm", "n0"))
    s = entry("s", "n0")
    await presence.join(room, s)
    leaving = asyncio.ensure_future(presence.leave(room, s.session))
    await asyncio.sleep(0)
    leaving.cancel()  # a leave given up: retried by upkeep (it was sent, so the entry is gone meanwhile)
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert (room, s.session) in presence._unleft
    # in one loop iteration: a join of another session (its script run is queued), the retried leave, S again
    x = asyncio.ensure_future(presence.join(room, entry("x", "n0")))
    retry = asyncio.ensure_future(presence._retry_leaves())
    again = asyncio.ensure_future(presence.join(room, PresenceEntry(s.user, s.session, s.node, {"name": "s2"})))
    assert await asyncio.gather(x, retry, again) == [True, None, True]
    assert s.session in {e.session for e in await other.presence.members(room)}
    assert "s" in {m.user for m in (await other.presence.page(room, None, 50)).members}
    assert (room, s.session) not in presence._unleft


async def test_an_info_json_cannot_hold_fails_its_join_alone(replicas: list[Backend]) -> None:
    one, other = replicas[0], replicas[1]
    presence: Any = one.presence
    room = unique_room("badinfo")
    await presence.join(room, entry("warm", "n0"))
    good = [entry(f"g{i}", "n0") for i in range(5)]
    bad = PresenceEntry("bad", "s-bad", "n0", {"name": "b", "x": object()})
    tasks = [asyncio.ensure_future(presence.join_page(room, e, 10)) for e in good[:3]]
    tasks.append(asyncio.ensure_future(presence.join_page(room, bad, 10)))
    tasks += [asyncio.ensure_future(presence.join_page(room, e, 10)) for e in good[3:]]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[3], TypeError)  # raised in its caller, not in the batch's task
    assert [first for first, _ in (d for i, d in enumerate(done) if i != 3)] == [True] * 5
    assert {m.user for m in done[0][1].members} == {"warm"} | {e.user for e in good}
    assert {m.user for m in (await other.presence.page(room, None, 10)).members} == {"warm"} | {e.user for e in good}
    # nothing of the failed join is kept: no entry to write again, no leave to retry
    assert bad.session not in presence._local.get(room, {}) and (room, bad.session) not in presence._unleft


async def test_a_pipeline_wakes_at_most_max_batch_callers_of_gathered_joins(replicas: list[Backend]) -> None:
    one = replicas[0]
    rooms = [unique_room(f"wide{i}") for i in range(3)]
    for room in rooms:
        await one.presence.join(room, entry("warm", "n0"))
    sent = round_trips(one)
    sha = hashlib.sha1(SCRIPTS["presence_join"].encode()).hexdigest()
    joins = [one.presence.join(room, entry(f"u{i:03d}", "n0")) for room in rooms for i in range(200)]
    assert all(await asyncio.gather(*joins))
    # a join script run carries 4 arguments per join after its 4 keys
    per_pipeline = [sum((len(c) - 7) // 4 for c in batch if c[:2] == ("EVALSHA", sha)) for batch in sent]
    assert sum(per_pipeline) == 600
    assert max(per_pipeline) <= MAX_BATCH


async def test_a_group_that_cannot_make_its_commands_fails_its_callers_and_not_the_batch(
        replicas: list[Backend]) -> None:
    from wirehub.builtins.bus.redis_batch import Group

    class Broken(Group):
        def commands(self, key: Any, items: list[Any]) -> tuple[list[Any], None]:
            raise ValueError("no commands")

        def results(self, key: Any, items: list[Any], replies: list[Any], context: Any) -> list[Any]:
            raise AssertionError("not sent")

    class Echo(Group):
        def commands(self, key: Any, items: list[Any]) -> tuple[list[Any], None]:
            return [("ECHO", item) for item in items], None

        def results(self, key: Any, items: list[Any], replies: list[Any], context: Any) -> list[Any]:
            return replies

    batch = replicas[0].bus.batch  # type: ignore[attr-defined]
    out = await asyncio.gather(batch.gather("broken", 1, Broken()), batch.gather("broken", 2, Broken()),
                               batch.gather("echo", "a", Echo()), batch.gather("echo", "b", Echo()),
                               batch.run([("PING",)]), return_exceptions=True)
    assert [type(x) for x in out[:2]] == [ValueError, ValueError]
    assert out[2:] == [b"a", b"b", [b"PONG"]]


async def test_entries_written_again_after_the_broker_lost_them_are_the_bytes_a_join_writes(
        replicas: list[Backend], redis_server: RedisServer) -> None:
    one = replicas[0]
    bus = one.bus
    assert isinstance(bus, RedisBus)
    room = unique_room("restore")
    e = PresenceEntry("u1", "s-u1", "n0", {"name": "Zoë", "x": [1, 2]})
    await one.presence.join(room, e)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async def stored() -> tuple[Any, Any]:
            return await client.hget(bus.key("pc", room), "u1"), await client.hget(bus.key("ps", room), "s-u1")

        joined = await stored()
        await client.delete(*await client.keys(f"{bus.prefix}:*"))  # the broker lost them (and the stamp)
        assert await stored() == (None, None)
        await one.presence.upkeep()  # its stamp is gone: it writes its entries again
        assert await stored() == joined
    finally:
        await client.aclose()
