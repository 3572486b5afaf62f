"""The backend contract suites of wirehub.testing, run against every backend (one parametrised suite)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from nats.js.errors import NoKeysError

from wirehub import PresenceEntry
from wirehub.brokers import NatsServer, RedisServer
from wirehub.builtins.bus.memory import MemoryHistory, MemoryPresence
from wirehub.builtins.bus.nats import NatsBus
from wirehub.builtins.bus.redis import RedisBus
from wirehub.bus import Backend
from wirehub.testing import (
    BackendFactory,
    BackendPair,
    BusContract,
    Footprint,
    HistoryContract,
    PresenceContract,
    PresenceExpiryContract,
    StateStoreContract,
    unique_room,
)

# Broker buses: every replica of a test is a separate backend (its own connections) on the session's
# broker; a fresh key/subject prefix per test keeps tests apart.
FAST = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "op_timeout": 3.0, "presence_ttl": 3.0}


def _memory(request: pytest.FixtureRequest, prefix: str) -> dict[str, Any]:
    return {"plugin": "memory"}  # one process, one memory backend: both "replicas" share it


def _redis(request: pytest.FixtureRequest, prefix: str) -> dict[str, Any]:
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"plugin": "redis", "redis": {"url": server.url, "key_prefix": prefix, **FAST}}


def _nats(request: pytest.FixtureRequest, prefix: str) -> dict[str, Any]:
    server: NatsServer = request.getfixturevalue("nats_server")
    return {"plugin": "nats", "nats": {"servers": [server.url], "subject_prefix": prefix, "storage": "memory",
                                       **FAST}}


# name -> the bus block of a test, given its fresh prefix
BUS_BLOCKS: dict[str, Callable[[pytest.FixtureRequest, str], dict[str, Any]]] = {
    "memory": _memory, "redis": _redis, "nats": _nats,
}


@pytest.fixture(params=sorted(BUS_BLOCKS))
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def bus_config(backend_kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The bus block of this test (wirehub.testing's backend_pair, backend, ... start replicas of it)."""
    return BUS_BLOCKS[backend_kind](request, f"t{uuid.uuid4().hex[:8]}")


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


@pytest.fixture
async def broker_ops(backend_kind: str, bus_config: dict[str, Any]) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Operations the broker executed so far for this test: Redis commands (INFO commandstats,
    without INFO itself); NATS messages stored in the test's KV buckets (puts, purges, creates)."""
    options = bus_config[backend_kind]
    if backend_kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(options["url"])

        async def redis_ops() -> int:
            stats = await client.info("commandstats")
            return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")

        yield redis_ops
        await client.aclose()
        return
    import nats

    nc = await nats.connect(options["servers"])
    js = nc.jetstream()
    ours = f"KV_{options['subject_prefix']}_"

    async def nats_ops() -> int:
        infos: list[Any] = []
        while True:  # pages of 256: the session's server holds every earlier test's streams
            page = await js.streams_info(offset=len(infos))
            infos += page
            if len(page) < 256:
                break
        return sum(int(info.state.last_seq) for info in infos if info.config.name.startswith(ours))

    yield nats_ops
    await nc.close()


# replicas of one process cannot die apart: the brokers only
@pytest.mark.parametrize("backend_kind", ["nats", "redis"])
class TestPresenceExpiry(PresenceExpiryContract):
    pass


async def test_history_expires_by_age(bus_backends: BackendFactory, backend_kind: str) -> None:
    """Messages older than history_ttl are gone: an offset before them is not recoverable."""
    backend, _ = await bus_backends.replica(history_ttl=1)
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
