"""The backend contract suites of wirehub.testing, run against every backend (one parametrised suite)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from nats.js.errors import NoKeysError

from wirehub import PresenceEntry
from wirehub.brokers import NatsServer, RedisServer
from wirehub.builtins.bus.memory import MemoryHistory, MemoryPresence
from wirehub.builtins.bus.memory import create_backend as memory_backend
from wirehub.builtins.bus.nats import NatsBus
from wirehub.builtins.bus.nats import create_backend as nats_backend
from wirehub.builtins.bus.redis import RedisBus
from wirehub.builtins.bus.redis import create_backend as redis_backend
from wirehub.bus import Backend
from wirehub.testing import (
    BackendPair,
    BusContract,
    Footprint,
    HistoryContract,
    PresenceContract,
    PresenceExpiryContract,
    Recorder,
    StateStoreContract,
    unique_room,
)

# name -> async maker(request, options) -> (backend factory over one broker)
Maker = Callable[[pytest.FixtureRequest, dict[str, Any]], Awaitable[Callable[[], Backend]]]


async def _memory(request: pytest.FixtureRequest, options: dict[str, Any]) -> Callable[[], Backend]:
    # One process, one memory backend: both "replicas" share it.
    backend = memory_backend(options, "bus.memory")
    return lambda: backend


# Broker backends: every backend the factory makes is a separate "replica" (its own connections)
# on the session's broker; a fresh key/subject prefix per test keeps tests apart.
FAST = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "op_timeout": 3.0, "presence_ttl": 3.0}


async def _redis(request: pytest.FixtureRequest, options: dict[str, Any]) -> Callable[[], Backend]:
    server: RedisServer = request.getfixturevalue("redis_server")
    opts = {"url": server.url, "key_prefix": f"t{uuid.uuid4().hex[:8]}", **FAST, **options}
    return lambda: redis_backend(opts, "bus.redis")


async def _nats(request: pytest.FixtureRequest, options: dict[str, Any]) -> Callable[[], Backend]:
    server: NatsServer = request.getfixturevalue("nats_server")
    opts = {"servers": [server.url], "subject_prefix": f"t{uuid.uuid4().hex[:8]}", "storage": "memory", **FAST,
            **options}
    return lambda: nats_backend(opts, "bus.nats")


MAKERS: dict[str, Maker] = {"memory": _memory, "redis": _redis, "nats": _nats}
SMALL_HISTORY: dict[str, dict[str, Any]] = {"memory": {"history_size": 3}}


@pytest.fixture(params=sorted(MAKERS))
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _start_all(backends: list[Backend]) -> list[tuple[Backend, Recorder]]:
    """Start each distinct backend once with its own Recorder (a shared one keeps its recorder)."""
    recorders: dict[int, Recorder] = {}
    for b in backends:
        if id(b) not in recorders:
            recorders[id(b)] = Recorder()
            await b.bus.start(recorders[id(b)])
    return [(b, recorders[id(b)]) for b in backends]


@pytest.fixture
async def backend_pair(backend_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[BackendPair]:
    make = await MAKERS[backend_kind](request, {})
    first, second = await _start_all([make(), make()])
    yield first, second
    for b in {id(b): b for b in (first[0], second[0])}.values():
        await b.bus.close()


@pytest.fixture
async def backend(backend_pair: BackendPair) -> Backend:
    return backend_pair[0][0]


@pytest.fixture
async def small_history_backend(backend_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    make = await MAKERS[backend_kind](request, {"history_size": 3, **SMALL_HISTORY.get(backend_kind, {})})
    backend = make()
    await backend.bus.start(Recorder())
    yield backend
    await backend.bus.close()


async def _memory_footprint(backend: Backend) -> list[str]:
    history, presence = backend.history, backend.presence
    assert isinstance(history, MemoryHistory) and isinstance(presence, MemoryPresence)
    return sorted([f"h:{r}" for r in history._rooms] + [f"p:{r}" for r in presence._rooms])


async def _redis_footprint(backend: Backend) -> list[str]:
    bus = backend.bus
    assert isinstance(bus, RedisBus)
    keys = [k.decode() async for k in bus.client.scan_iter(match=f"{bus.prefix}:*", count=1000)]
    # the replicas' liveness set is one key per deployment, written by the first presence call: not room state
    return sorted(k for k in keys if k != f"{bus.prefix}:presence:nodes")


async def _nats_footprint(backend: Backend) -> list[str]:
    """Subjects of the rooms stream, and the live keys of the presence members and state buckets."""
    bus = backend.bus
    assert isinstance(bus, NatsBus)
    info = await bus.js.stream_info(bus.stream, subjects_filter=">")
    out = [f"s:{subject}" for subject in (info.state.subjects or {})]
    assert bus.presence is not None
    for kv in (bus.presence.members_kv, bus.state_kv):
        with contextlib.suppress(NoKeysError):
            out += [f"{kv._name}:{key}" for key in await kv.keys()]
    return sorted(out)


FOOTPRINTS: dict[str, Callable[[Backend], Awaitable[list[str]]]] = {
    "memory": _memory_footprint, "redis": _redis_footprint, "nats": _nats_footprint,
}


@pytest.fixture
def footprint(backend_kind: str, backend: Backend) -> Footprint:
    return lambda: FOOTPRINTS[backend_kind](backend)


class TestBus(BusContract):
    pass


class TestHistory(HistoryContract):
    pass


class TestPresence(PresenceContract):
    pass


class TestStateStore(StateStoreContract):
    pass


@dataclasses.dataclass
class _Shared:
    """The broker and key prefix that the replicas of one test share."""

    kind: str
    server: Any
    prefix: str = dataclasses.field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["nats", "redis"])
def shared_broker(request: pytest.FixtureRequest) -> _Shared:
    kind = str(request.param)
    return _Shared(kind, request.getfixturevalue(f"{kind}_server"))


@pytest.fixture
async def presence_replica(shared_broker: _Shared) -> AsyncIterator[Callable[..., Awaitable[Backend]]]:
    """Each ``await presence_replica(**options)`` is a new started replica on the test's broker and prefix."""
    made: list[Backend] = []
    url = shared_broker.server.url

    async def make(**options: Any) -> Backend:
        if shared_broker.kind == "redis":
            backend = redis_backend({"url": url, "key_prefix": shared_broker.prefix, **FAST, **options}, "bus.redis")
        else:
            backend = nats_backend({"servers": [url], "subject_prefix": shared_broker.prefix, "storage": "memory",
                                    **FAST, **options}, "bus.nats")
        await backend.bus.start(Recorder())
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.bus.close()


@pytest.fixture
async def broker_ops(shared_broker: _Shared) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Operations the broker executed so far for this test: Redis commands (INFO commandstats,
    without INFO itself); NATS messages stored in the test's KV buckets (puts, purges, creates)."""
    if shared_broker.kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(shared_broker.server.url)

        async def redis_ops() -> int:
            stats = await client.info("commandstats")
            return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")

        yield redis_ops
        await client.aclose()
        return
    import nats

    nc = await nats.connect(shared_broker.server.url)
    js = nc.jetstream()
    ours = f"KV_{shared_broker.prefix}_"

    async def nats_ops() -> int:
        return sum(int(info.state.last_seq) for info in await js.streams_info()
                   if info.config.name.startswith(ours))

    yield nats_ops
    await nc.close()


class TestPresenceExpiry(PresenceExpiryContract):
    pass


async def test_history_expires_by_age(backend_kind: str, request: pytest.FixtureRequest) -> None:
    """Messages older than history_ttl are gone: an offset before them is not recoverable."""
    make = await MAKERS[backend_kind](request, {"history_ttl": 1})
    backend = make()
    await backend.bus.start(Recorder())
    try:
        room = unique_room()
        first = await backend.bus.publish(room, b"old1", history=True)
        second = await backend.bus.publish(room, b"old2", history=True)
        assert first is not None and second is not None
        _, epoch = await backend.history.position(room)
        await asyncio.sleep(1.3)
        last = await backend.bus.publish(room, b"new", history=True)
        page = await backend.history.read(room, first, 10)
        assert page.complete is False or page.epoch != epoch  # old2 expired: a reader at old1 missed it
        recent = await backend.history.read(room, second, 10)
        if backend_kind == "memory":  # it forgets an expired room, epoch and all
            assert (recent.complete and recent.messages == [(last, b"new")]) or recent.epoch != epoch
        else:
            assert recent.complete and recent.epoch == epoch and recent.messages == [(last, b"new")]
    finally:
        await backend.bus.close()


async def test_of_two_leaves_of_one_user_on_two_replicas_exactly_one_reports_them(backend_pair: BackendPair) -> None:
    """A user with a connection on each replica leaves from both, one after the other and at once:
    the replica whose leave comes second (or, at once, exactly one of them) reports the user, even
    when its copy of the room has not yet seen the other replica's leave (NATS: its live copy lags)."""
    (a, _), (b, _) = backend_pair
    for i in range(40):
        room = unique_room()
        await a.presence.join(room, PresenceEntry("alice", f"s1-{i}", "na"))
        await b.presence.join(room, PresenceEntry("alice", f"s2-{i}", "nb"))
        await b.presence.join(room, PresenceEntry("bob", f"s3-{i}", "nb"))
        if i % 2:
            reported = await asyncio.gather(a.presence.leave(room, f"s1-{i}"), b.presence.leave(room, f"s2-{i}"))
            assert [r for r in reported if r is not None] == ["alice"], (i, reported)
        else:
            assert await a.presence.leave(room, f"s1-{i}") is None, i
            assert await b.presence.leave(room, f"s2-{i}") == "alice", i
        assert await b.presence.leave(room, f"s3-{i}") == "bob"
        assert (await b.presence.count(room)).users == 0


async def test_the_first_page_follows_changes_made_on_another_replica(backend_pair: BackendPair) -> None:
    """Replicas may keep a room's first page between reads (it is read by every join): a change on
    another replica to a user on that page (arrival, departure, connection count), and a room emptied
    and filled again, show in the next read; a change beyond the page does not alter it."""
    (a, _), (b, _) = backend_pair
    room = unique_room()

    async def first(limit: int = 2) -> list[tuple[str, int]]:
        return [(m.user, m.connections) for m in (await a.presence.page(room, None, limit)).members]

    for u in ("m", "n", "o"):
        await a.presence.join(room, PresenceEntry(u, f"s-{u}", "na"))
    assert await first() == [("m", 1), ("n", 1)]
    await b.presence.join(room, PresenceEntry("z", "s-z", "nb"))  # beyond the page
    page = await a.presence.page(room, None, 2)
    assert [m.user for m in page.members] == ["m", "n"] and page.cursor == "n" and page.count.users == 4
    await b.presence.join(room, PresenceEntry("b", "s-b", "nb"))
    assert await first() == [("b", 1), ("m", 1)]
    await b.presence.join(room, PresenceEntry("m", "s-m2", "nb"))
    assert await first() == [("b", 1), ("m", 2)]
    await b.presence.leave(room, "s-b")
    assert await first() == [("m", 2), ("n", 1)]
    for s in ("s-m", "s-n", "s-o"):
        await a.presence.leave(room, s)
    for s in ("s-m2", "s-z"):
        await b.presence.leave(room, s)
    assert await first() == []
    await b.presence.join(room, PresenceEntry("q", "s-q", "nb"))
    assert await first() == [("q", 1)]
