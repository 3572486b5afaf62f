"""Contract suites for presence: :class:`PresenceContract` (every backend) and
:class:`PresenceExpiryContract` (backends whose replicas can die). Import them from :mod:`wirehub.testing`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

from wirehub.bus import Backend, Presence, PresenceCount, PresenceEntry, PresenceMember, PresencePage
from wirehub.testing.contracts import BackendPair, Footprint
from wirehub.testing.helpers import eventually, unique_room


@runtime_checkable
class InspectablePresence(Protocol):
    """A presence store that can list what it keeps in the broker for a room (all built-in ones)."""

    async def stored_keys(self, room: str) -> list[str]: ...


async def _scan_pages(p: Presence, room: str, limit: int) -> tuple[list[PresenceMember], list[PresencePage]]:
    members: list[PresenceMember] = []
    pages: list[PresencePage] = []
    after: str | None = None
    while True:
        page = await p.page(room, after, limit)
        pages.append(page)
        members += page.members
        assert len(page.members) <= limit
        if page.cursor is None:
            return members, pages
        assert page.cursor == page.members[-1].user
        after = page.cursor
        assert len(pages) < 10_000, "the cursor does not advance"


async def _join_many(p: Presence, room: str, entries: list[PresenceEntry]) -> None:
    for i in range(0, len(entries), 50):  # a few concurrent joins, as from many clients
        await asyncio.gather(*(p.join(room, e) for e in entries[i:i + 50]))


class PresenceContract:
    """Provide ``backend`` and ``backend_pair`` (two replicas on one broker; one shared backend
    for a single-process store). Presence is per connection; a user leaves with their last
    connection; counts and pages are exact across replicas. With ``footprint`` (see :data:`Footprint`)
    it also checks that join/leave churn stores nothing."""

    async def test_join_and_leave_churn_leaves_nothing(self, backend: Backend, footprint: Footprint) -> None:
        before = await footprint()
        p = backend.presence
        for i in range(10):
            room = unique_room("churn")
            assert await p.members(room) == []
            assert await p.join(room, PresenceEntry("alice", f"s{i}a", "n1")) is True
            assert await p.join(room, PresenceEntry("bob", f"s{i}b", "n2")) is True
            assert len(await p.members(room)) == 2
            assert await p.leave(room, f"s{i}a") == "alice"
            assert await p.leave(room, f"s{i}b") == "bob"
            assert await p.leave(room, "never-joined") is None
            assert await p.members(room) == []
        assert await footprint() == before

    async def test_join_and_leave_per_user(self, backend: Backend) -> None:
        room = unique_room()
        p = backend.presence
        assert await p.join(room, PresenceEntry("alice", "s1", "n1")) is True
        assert await p.join(room, PresenceEntry("alice", "s2", "n1")) is False  # second tab
        assert await p.join(room, PresenceEntry("bob", "s3", "n2", {"name": "Bob"})) is True
        members = await p.members(room)
        assert sorted((m.user, m.session) for m in members) == [("alice", "s1"), ("alice", "s2"), ("bob", "s3")]
        assert next(m for m in members if m.user == "bob").info == {"name": "Bob"}
        assert await p.leave(room, "s1") is None  # alice still has s2
        assert await p.leave(room, "s2") == "alice"
        assert await p.leave(room, "s2") is None  # idempotent
        assert [m.user for m in await p.members(room)] == ["bob"]

    async def test_rooms_are_separate(self, backend: Backend) -> None:
        a, b = unique_room(), unique_room()
        await backend.presence.join(a, PresenceEntry("alice", "s1", "n1"))
        assert await backend.presence.members(b) == []
        assert await backend.presence.count(b) == PresenceCount(0, 0)
        assert await backend.presence.page(b, None, 10) == PresencePage([], None, PresenceCount(0, 0))

    async def test_two_connections_of_a_user_count_once(self, backend_pair: BackendPair) -> None:
        (a, _), (b, _) = backend_pair
        room = unique_room()
        assert await a.presence.join(room, PresenceEntry("alice", "s1", "na", {"name": "Alice"})) is True
        assert await b.presence.join(room, PresenceEntry("alice", "s2", "nb", {"name": "Alice"})) is False
        assert await a.presence.join(room, PresenceEntry("bob", "s3", "na")) is True
        for p in (a.presence, b.presence):
            async def both_seen(p: Presence = p) -> bool:
                return await p.count(room) == PresenceCount(users=2, connections=3)

            await eventually(both_seen)
            page = await p.page(room, None, 10)
            assert page.members == [PresenceMember("alice", 2, {"name": "Alice"}), PresenceMember("bob", 1, {})]
            assert page.cursor is None and page.count == PresenceCount(2, 3)
        assert await b.presence.leave(room, "s2") is None
        assert await a.presence.count(room) == PresenceCount(2, 2)  # read your writes: a wrote s1, s3

    async def test_lookup_gives_the_count_and_which_of_some_users_are_in_the_room_now(
            self, backend_pair: BackendPair) -> None:
        """What a batched presence.diff is checked against when it is sent: the count, and of the users it
        names those present now (in the order given, each once), read on either replica after the writes."""
        (a, _), (b, _) = backend_pair
        room = unique_room()
        assert await a.presence.join(room, PresenceEntry("ann", "s1", "na", {"name": "Ann"})) is True
        assert await b.presence.join(room, PresenceEntry("ann", "s2", "nb", {"name": "Ann"})) is False
        assert await b.presence.join(room, PresenceEntry("bob", "s3", "nb")) is True
        for p in (a.presence, b.presence):
            found = await p.lookup(room, ["zed", "bob", "ann", "bob"])
            assert found.members == [PresenceMember("bob", 1, {}), PresenceMember("ann", 2, {"name": "Ann"})]
            assert found.count == PresenceCount(2, 3) and found.cursor is None
        assert await b.presence.leave(room, "s3") == "bob"
        assert await a.presence.leave(room, "s1") is None
        for p in (a.presence, b.presence):  # the other replica's leave is seen too
            found = await p.lookup(room, ["bob", "ann"])
            assert found.members == [PresenceMember("ann", 1, {"name": "Ann"})], found
            assert found.count == PresenceCount(1, 1)
        assert await a.presence.lookup(room, []) == PresencePage([], None, PresenceCount(1, 1))
        many = [f"absent-{i}" for i in range(9000)]  # more than one call's arguments can carry, in a script
        assert (await b.presence.lookup(room, [*many, "ann"])).members == [PresenceMember("ann", 1, {"name": "Ann"})]
        assert await b.presence.lookup(unique_room(), ["ann"]) == PresencePage([], None, PresenceCount())

    async def test_count_and_pages_exact_across_replicas(self, backend_pair: BackendPair) -> None:
        """1,000 members, half joined on each replica: pages of 37 from either replica list every
        member once, in user id order; the counts agree."""
        (a, _), (b, _) = backend_pair
        room = unique_room()
        users = [f"user-{i:04d}-{uuid.uuid4().hex[:4]}" for i in range(1000)]
        entries = [PresenceEntry(u, f"s-{u}", ("na", "nb")[i % 2], {"name": u.upper()}) for i, u in enumerate(users)]
        await asyncio.gather(_join_many(a.presence, room, entries[0::2]), _join_many(b.presence, room, entries[1::2]))
        for p in (a.presence, b.presence):
            async def all_seen(p: Presence = p) -> bool:
                return await p.count(room) == PresenceCount(1000, 1000)

            await eventually(all_seen)
            members, pages = await _scan_pages(p, room, 37)
            assert [m.user for m in members] == sorted(users)
            assert all(m.connections == 1 and m.info == {"name": m.user.upper()} for m in members)
            assert len(pages) == 28 and all(pg.count == PresenceCount(1000, 1000) for pg in pages)
        # a user who stays for the whole scan is seen once, while others come and go between pages
        first = await a.presence.page(room, None, 37)
        await b.presence.leave(room, entries[1].session)
        await b.presence.join(room, PresenceEntry("user-0000-aaaa", "late", "nb"))  # sorts before the cursor
        after: str | None = first.cursor
        seen = [m.user for m in first.members]
        while after is not None:
            page = await a.presence.page(room, after, 37)
            seen += [m.user for m in page.members]
            after = page.cursor
        assert len(seen) == len(set(seen)) and seen == sorted(seen)
        stayed = set(users) - {entries[1].user}
        assert stayed <= set(seen)

    async def test_the_last_leave_leaves_nothing_in_the_broker(self, backend_pair: BackendPair) -> None:
        (a, _), (b, _) = backend_pair
        room = unique_room()
        assert isinstance(a.presence, InspectablePresence)
        await a.presence.join(room, PresenceEntry("alice", "s1", "na", {"name": "A"}))
        await b.presence.join(room, PresenceEntry("alice", "s2", "nb"))
        await b.presence.join(room, PresenceEntry("bob", "s3", "nb"))
        assert await a.presence.stored_keys(room) != []
        assert await a.presence.leave(room, "s1") is None
        assert await b.presence.leave(room, "s2") == "alice"
        assert await b.presence.leave(room, "s3") == "bob"
        assert await a.presence.stored_keys(room) == []
        assert await b.presence.count(room) == PresenceCount(0, 0)


#: ``await replica(**options)``: a new started backend on the shared broker (same key prefix)
ReplicaFactory = Callable[..., Awaitable[Backend]]


class PresenceExpiryContract:
    """Provide ``presence_replica`` (a :data:`ReplicaFactory`; the fixture closes what it made) and
    ``broker_ops`` (``await broker_ops()``: how many operations the broker has executed so far).
    For the broker backends, whose replicas can die: upkeep cost and the expiry of a dead replica."""

    #: presence_ttl and presence_interval of the replicas in these tests
    ttl = 1.0
    interval = 0.25

    async def test_a_dead_replica_leaves_within_ttl_and_is_reported_once(
        self, presence_replica: ReplicaFactory,
    ) -> None:
        opts = {"presence_ttl": self.ttl, "presence_interval": self.interval}
        a = await presence_replica(**opts)
        c = await presence_replica(**opts)
        dead = await presence_replica(**opts)
        room, other = unique_room(), unique_room()
        node = f"dead-{uuid.uuid4().hex[:6]}"
        calls: list[tuple[str, str, list[str]]] = []
        a.presence.on_departed(lambda r, users: calls.append(("a", r, sorted(users))))

        async def on_c(r: str, users: Sequence[str]) -> None:  # an async listener works too
            calls.append(("c", r, sorted(users)))

        c.presence.on_departed(on_c)
        await a.presence.join(room, PresenceEntry("anna", "sa", "node-a"))
        await a.presence.join(room, PresenceEntry("shared", "sa2", "node-a"))
        doomed = [f"d{i}" for i in range(30)]
        for u in doomed:
            await dead.presence.join(room, PresenceEntry(u, f"s-{u}", node))
        await dead.presence.join(room, PresenceEntry("shared", "sd2", node))  # stays: also on a
        await dead.presence.join(other, PresenceEntry("d0", "s-other", node))

        async def before() -> bool:
            return await a.presence.count(room) == PresenceCount(32, 33)

        await eventually(before)
        await dead.bus.close()  # upkeep stops; nothing is left: as a SIGKILL looks to the broker
        started = asyncio.get_running_loop().time()

        async def gone() -> bool:
            return (await a.presence.count(room) == PresenceCount(2, 2)
                    and await c.presence.count(other) == PresenceCount(0, 0))

        await eventually(gone, timeout=self.ttl + self.interval + 3.0)
        took = asyncio.get_running_loop().time() - started
        assert took < self.ttl + self.interval + 3.0
        await eventually(lambda: _true(len(calls) >= 2))
        await asyncio.sleep(self.ttl + 2 * self.interval)  # no second report from another replica
        assert len({who for who, _, _ in calls}) == 1, calls
        assert sorted((r, users) for _, r, users in calls) == sorted([(room, sorted(doomed)), (other, ["d0"])])
        assert isinstance(a.presence, InspectablePresence)
        assert await a.presence.stored_keys(other) == []
        page = await c.presence.page(room, None, 10)
        assert [(m.user, m.connections) for m in page.members] == [("anna", 1), ("shared", 1)]

    async def test_a_replica_declared_dead_in_a_stall_writes_its_entries_again_and_reports_them(
        self, presence_replica: ReplicaFactory,
    ) -> None:
        """A replica whose upkeep stalls for longer than the TTL is declared dead (its entries removed and reported
        departed); at its next heartbeat it writes them again and reports their users to ``on_restored``."""
        opts = {"presence_ttl": self.ttl, "presence_interval": self.interval}
        a = await presence_replica(**opts)
        stalled = await presence_replica(**opts)
        room, other = unique_room(), unique_room()
        node = f"stall-{uuid.uuid4().hex[:6]}"
        departed: list[tuple[str, list[str]]] = []
        restored: list[tuple[str, list[str]]] = []
        a.presence.on_departed(lambda r, users: departed.append((r, sorted(users))))
        stalled.presence.on_restored(lambda r, users: restored.append((r, sorted(users))))
        await a.presence.join(room, PresenceEntry("anna", "sa", "node-a"))
        await stalled.presence.join(room, PresenceEntry("s1", "s-1", node))
        await stalled.presence.join(room, PresenceEntry("s1", "s-1b", node))  # one user, two connections
        await stalled.presence.join(room, PresenceEntry("s2", "s-2", node))
        await stalled.presence.join(other, PresenceEntry("s2", "s-other", node))
        await eventually(lambda: _is(a.presence, room, PresenceCount(3, 4)))

        upkeep = stalled.presence.upkeep  # type: ignore[attr-defined]
        go_on = asyncio.Event()

        async def stalled_upkeep() -> None:
            await go_on.wait()
            await upkeep()

        stalled.presence.upkeep = stalled_upkeep  # type: ignore[attr-defined]
        await eventually(lambda: _true(len(departed) == 2), timeout=self.ttl + self.interval + 3.0)
        assert sorted(departed) == sorted([(room, ["s1", "s2"]), (other, ["s2"])])
        assert await a.presence.count(room) == PresenceCount(1, 1)
        assert restored == []

        go_on.set()
        await eventually(lambda: _true(len(restored) == 2))
        assert sorted(restored) == sorted([(room, ["s1", "s2"]), (other, ["s2"])])
        await eventually(lambda: _is(a.presence, room, PresenceCount(3, 4)))
        await eventually(lambda: _is(a.presence, other, PresenceCount(1, 1)))

    async def test_upkeep_round_trips_do_not_grow_with_entries(
        self, presence_replica: ReplicaFactory, broker_ops: Callable[[], Awaitable[int]],
    ) -> None:
        """Idle replicas cost the same broker operations per interval with 2 entries and with 600
        entries in 120 rooms (no per-entry or per-room refresh)."""
        opts = {"presence_ttl": self.ttl, "presence_interval": self.interval}
        a = await presence_replica(**opts)
        b = await presence_replica(**opts)
        await a.presence.join(unique_room(), PresenceEntry("u", "s0", "node-a"))
        await b.presence.join(unique_room(), PresenceEntry("v", "s1", "node-b"))
        window = 8 * self.interval

        async def ops_in_window() -> int:
            start = await broker_ops()
            await asyncio.sleep(window)
            return await broker_ops() - start

        few = await ops_in_window()
        rooms = [unique_room() for _ in range(120)]
        for i in range(600):
            replica = (a, b)[i % 2]
            await replica.presence.join(rooms[i % 120], PresenceEntry(f"u{i}", f"s-{i}", f"node-{'ab'[i % 2]}"))
        many = await ops_in_window()
        assert few > 0  # the counter sees upkeep
        # jitter: one interval more or less of each replica's heartbeat and watchdog in the window
        assert many <= few * 1.5 + 4, (few, many)


async def _true(value: bool) -> bool:
    return value


async def _is(p: Presence, room: str, count: PresenceCount) -> bool:
    return await p.count(room) == count
