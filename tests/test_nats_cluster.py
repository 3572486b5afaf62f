"""The nats bus on a real 3-node NATS cluster with replicated JetStream (R3 stream and KV buckets): the
backend contract suites, and the stream and buckets placed on all three nodes.

The module's cluster (tests/conftest.py's nats_cluster); never killed here."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from nats.js.errors import NoKeysError

from wirehub import BusUnavailable
from wirehub.builtins.bus.nats import NatsBus
from wirehub.builtins.bus.nats import create_backend as nats_backend
from wirehub.bus import Backend, PresenceCount, PresenceEntry
from wirehub.nats_cluster import NatsCluster
from wirehub.testing import (
    BusContract,
    Footprint,
    HistoryContract,
    PresenceContract,
    PresenceExpiryContract,
    Recorder,
    StateStoreContract,
    eventually,
    unique_room,
)

FAST = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "op_timeout": 3.0, "presence_ttl": 3.0}


@pytest.fixture
def cluster(nats_cluster: NatsCluster) -> NatsCluster:
    return nats_cluster


@pytest.fixture
def make_options(cluster: NatsCluster) -> Callable[..., dict[str, Any]]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return lambda **o: {"servers": cluster.urls, "subject_prefix": prefix, "replicas": 3, "storage": "memory",
                        **FAST, **o}


@pytest.fixture
def bus_config(make_options: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The bus block of this test (wirehub.testing's backend_pair, backend, ... start replicas of it)."""
    return {"plugin": "nats", "nats": make_options()}


async def _started(options: dict[str, Any]) -> tuple[Backend, Recorder]:
    backend = nats_backend(options, "bus.nats")
    recorder = Recorder()
    await backend.bus.start(recorder)
    return backend, recorder


@pytest.fixture
def footprint(backend: Backend) -> Footprint:
    async def keys() -> list[str]:
        bus = backend.bus
        assert isinstance(bus, NatsBus) and bus.presence is not None
        info = await bus.js.stream_info(bus.stream, subjects_filter=">")
        out = [f"s:{subject}" for subject in (info.state.subjects or {})]
        for kv in (bus.presence.members_kv, bus.state_kv):
            with contextlib.suppress(NoKeysError):
                out += [f"{kv._name}:{key}" for key in await kv.keys()]
        return sorted(out)

    return keys


class TestBus(BusContract):
    pass


class TestHistory(HistoryContract):
    pass


class TestPresence(PresenceContract):
    pass


class TestStateStore(StateStoreContract):
    pass


@pytest.fixture
async def broker_ops(cluster: NatsCluster, bus_config: dict[str, Any]
                     ) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Messages stored in this test's KV buckets (puts, purges, creates), as in test_contracts."""
    import nats

    nc = await nats.connect(cluster.urls)
    js = nc.jetstream()
    ours = f"KV_{bus_config['nats']['subject_prefix']}_"

    async def ops() -> int:
        return sum(int(info.state.last_seq) for info in await js.streams_info() if info.config.name.startswith(ours))

    yield ops
    await nc.close()


class TestPresenceExpiry(PresenceExpiryContract):
    pass


async def test_stream_and_buckets_have_three_replicas_on_three_nodes(
        make_options: Callable[..., dict[str, Any]]) -> None:
    backend, _ = await _started(make_options(storage="file"))
    try:
        bus = backend.bus
        assert isinstance(bus, NatsBus)
        await bus.publish("r3-room", b"x", history=True)
        names = [bus.stream, *[f"KV_{bus.prefix}_{b}" for b in ("members", "nodes", "claims", "state")]]
        for name in names:
            info = await bus.js.stream_info(name)
            assert info.config.num_replicas == 3, name
            placed = {info.cluster.leader, *(r.name for r in info.cluster.replicas or [])}
            assert placed == {"n1", "n2", "n3"}, (name, placed)
    finally:
        await backend.bus.close()


# -- a join's round trips (issue 11) ----------------------------------------------------------------------


def _count_requests(bus: NatsBus) -> list[int]:
    """Counts the requests ``bus`` sends from now on (nats-py's and its own writes: every publish with a reply)."""
    sent = [0]
    publish = bus.nc.publish

    async def counting(subject: str, payload: bytes = b"", reply: str = "", headers: Any = None) -> None:
        if reply:
            sent[0] += 1
        await publish(subject, payload, reply=reply, headers=headers)

    bus.nc.publish = counting
    return sent


@pytest.fixture
async def replicas(make_options: Callable[..., dict[str, Any]]) -> AsyncIterator[list[tuple[Backend, Recorder]]]:
    made = [await _started(make_options()) for _ in range(3)]
    yield made
    for backend, _ in made:
        await backend.bus.close()


def _bus(backend: Backend) -> NatsBus:
    assert isinstance(backend.bus, NatsBus)
    return backend.bus


async def test_a_join_storm_costs_a_few_writes_and_counts_stay_exact(
        replicas: list[tuple[Backend, Recorder]]) -> None:
    """300 members join one room at once over 3 replicas, each as chat's join does (presence write,
    first page, history position): for the room a few requests per replica and loop iteration (the
    joins of an iteration share presence keys of up to BUCKET entries, written once), not a write or
    a position per join. Right after, every replica counts and
    pages all of them (its copy waits for the writes acknowledged before the read)."""
    room = unique_room()
    backends = [b for b, _ in replicas]
    for i, b in enumerate(backends):  # each replica follows the room and has its copy
        await b.bus.subscribe(room)
        await b.presence.join(room, PresenceEntry(f"first-{i}", f"first-{i}", f"node-{i}"))
        assert await b.history.position(room) == (0, _bus(b).epoch)
    top = await backends[0].bus.publish(room, b"m", history=True)
    for _, recorder in replicas:
        await recorder.wait_for(room, 1)
    sent = [_count_requests(_bus(b)) for b in backends]

    async def member(i: int) -> None:
        b = backends[i % 3]
        await b.presence.join(room, PresenceEntry(f"user-{i:04d}", f"s-{i}", f"node-{i % 3}"))
        await b.presence.page(room, None, 10)
        assert await b.history.position(room) == (top, _bus(b).epoch)

    await asyncio.gather(*(member(i) for i in range(300)))
    requests = sum(n[0] for n in sent)
    # before: 600 (a position request and a write per join), then 300 (a write per join)
    assert 3 <= requests <= 60, requests
    for b in backends:
        assert await b.presence.count(room) == PresenceCount(303, 303)  # at once, no waiting
        users, after = [], None
        while True:
            page = await b.presence.page(room, after, 37)
            users += [m.user for m in page.members]
            if page.cursor is None:
                break
            after = page.cursor
        assert users == sorted({f"user-{i:04d}" for i in range(300)} | {f"first-{i}" for i in range(3)})


async def test_a_read_sees_a_leave_another_replica_reported_done(replicas: list[tuple[Backend, Recorder]]) -> None:
    """A replica's copy of a room may apply writes later than the stream leader acknowledged them (its
    consumer may sit on a lagging stream replica: the flaky test_two_connections_of_a_user_count_once).
    Here a's copy gets every message 0.3 s late: after b's leave returned, a's count still has it."""
    (a, _), (b, _), _ = replicas
    room = unique_room()
    await a.presence.join(room, PresenceEntry("alice", "s1", "na"))
    await b.presence.join(room, PresenceEntry("bob", "s2", "nb"))

    async def both() -> bool:
        return await a.presence.count(room) == PresenceCount(2, 2)

    await eventually(both)
    live = a.presence._current_live(room)  # type: ignore[attr-defined]
    echo, loop = live.echo, asyncio.get_running_loop()
    live.echo = lambda key, seq, msg: loop.call_later(0.3, echo, key, seq, msg)
    assert await b.presence.leave(room, "s2") == "bob"
    assert await a.presence.count(room) == PresenceCount(1, 1)
    assert [m.user for m in (await a.presence.page(room, None, 10)).members] == ["alice"]


async def test_a_followed_room_s_position_comes_from_its_consumer(replicas: list[tuple[Backend, Recorder]]) -> None:
    """While a replica follows a room, the position is the newest offset its consumer delivered (no
    request); joins of one moment share one request otherwise; an unfollowed room is asked."""
    (a, _), (b, recorder), _ = replicas
    room, other = unique_room(), unique_room()
    await b.bus.subscribe(room)
    sent = _count_requests(_bus(b))
    positions = await asyncio.gather(*(b.history.position(room) for _ in range(50)))
    assert positions == [(0, _bus(b).epoch)] * 50 and sent[0] == 1
    offsets = [await a.bus.publish(room, f"m{i}".encode(), history=True) for i in range(3)]
    await recorder.wait_for(room, 3)
    sent[0] = 0
    assert await b.history.position(room) == (offsets[-1], _bus(b).epoch)
    assert sent[0] == 0
    assert (await _bus(b).last(room))[1] == offsets[-1]  # what the broker says
    await a.bus.publish(other, b"x", history=True)
    sent[0] = 0
    assert (await b.history.position(other))[0] >= 1 and sent[0] == 1  # not followed: asked each time
    assert (await b.history.position(other))[0] >= 1 and sent[0] == 2
    await b.bus.unsubscribe(room)
    await a.bus.publish(room, b"later", history=True)
    assert (await b.history.position(room))[0] == offsets[-1] + 1  # unfollowed again: asked


async def test_writes_without_answer_fail_alone(make_options: Callable[..., dict[str, Any]]) -> None:
    """Presence writes share one inbox and one timer per loop iteration: a write nobody answers (here: a
    subscriber that never replies), or one no stream takes, fails with BusUnavailable; the bus stays up."""
    backend, _ = await _started(make_options(op_timeout=0.3))
    bus = _bus(backend)
    try:
        await bus.nc.subscribe("silent.x")
        results = await asyncio.gather(bus.write("presence", "silent.x", b""), bus.write("presence", "silent.x", b""),
                                       return_exceptions=True)
        assert all(isinstance(r, BusUnavailable) and "no answer" in str(r) for r in results), results
        with pytest.raises(BusUnavailable, match="503"):
            await bus.write("presence", "no-stream-here.x", b"")
        assert bus.healthy and bus.acks is not None and bus.acks.pending() == 0
        room = unique_room()
        assert await backend.presence.join(room, PresenceEntry("u", "s", "n")) is True
    finally:
        await backend.bus.close()


async def test_a_join_sees_the_joins_acknowledged_before_it(replicas: list[tuple[Backend, Recorder]]) -> None:
    """b's copy of the room gets every message 0.3 s late (a lagging stream replica): alice's second
    connection, joined on b after her first one on a was acknowledged, is not her first."""
    (a, _), (b, _), _ = replicas
    room = unique_room()
    await b.presence.join(room, PresenceEntry("carol", "s0", "nb"))
    live = b.presence._current_live(room)  # type: ignore[attr-defined]
    echo, loop = live.echo, asyncio.get_running_loop()
    live.echo = lambda key, seq, msg: loop.call_later(0.3, echo, key, seq, msg)
    assert await a.presence.join(room, PresenceEntry("alice", "s1", "na")) is True
    assert await b.presence.join(room, PresenceEntry("alice", "s2", "nb")) is False
    assert await b.presence.count(room) == PresenceCount(2, 3)


async def test_the_last_members_of_a_room_leave_together(replicas: list[tuple[Backend, Recorder]]) -> None:
    """The last 3 local members (joined one by one: a key each) leave at once and the echo of one purge
    comes 0.2 s after the others: the copy stays until that leave saw its echo (dropping it with the
    first finished leave made the last one wait op_timeout for an echo that never came: a drain then
    ran out of grace)."""
    (a, _), _, _ = replicas
    room = unique_room()
    for user in ("d1", "d2", "d3"):
        await a.presence.join(room, PresenceEntry(user, f"s-{user}", "na"))
    live = a.presence._current_live(room)  # type: ignore[attr-defined]
    echo, loop = live.echo, asyncio.get_running_loop()
    d3_key = a.presence._local[room]["s-d3"].key  # type: ignore[attr-defined]  # its own key: joined alone

    def delivered(key: str, seq: int, msg: Any) -> None:
        if a.presence._current_live(room) is live:  # type: ignore[attr-defined]  # a dropped copy gets nothing
            echo(key, seq, msg)

    def late(key: str, seq: int, msg: Any) -> None:
        if key == d3_key and not msg.data:
            loop.call_later(0.2, delivered, key, seq, msg)
        else:
            echo(key, seq, msg)

    live.echo = late
    t0 = loop.time()
    users = await asyncio.gather(*(a.presence.leave(room, f"s-{user}") for user in ("d1", "d2", "d3")))
    assert users == ["d1", "d2", "d3"]
    assert loop.time() - t0 < 1.5  # op_timeout is 3 s
    assert a.presence._current_live(room) is None  # type: ignore[attr-defined]
