"""Redis presence writes of one room reach Redis in the order they were asked for (plugins/bus/redis_batch.py,
plugins/bus/redis_presence.py), against a real redis-server: the batcher has up to MAX_IN_FLIGHT pipelines
in flight on pooled connections, and Redis reads its connections in no set order (a long pipeline is read
16 KiB at a time, with the other connections served in between), so a leave at the end of a long pipeline
and the rejoin of its session (or user) sent in the next one could run in the other order: the member
absent while joined, or a user's departure and return both unreported."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.helpers import bus_options
from wirehub import PresenceEntry
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.redis import RedisBus, create_backend
from wirehub.builtins.bus.redis_batch import MAX_BATCH, MAX_IN_FLIGHT
from wirehub.bus import Backend
from wirehub.testing import Recorder, unique_room

pytestmark = pytest.mark.timeout(60)

PATIENT = {"op_timeout": 8.0, "heartbeat_timeout": 6.0, "presence_ttl": 60.0}  # no upkeep in the pauses


@pytest.fixture
async def paused(redis_server_factory: Callable[..., BrokerProcess]) -> AsyncIterator[tuple[BrokerProcess, Backend]]:
    """A Redis of the test's own (the test pauses it) and a started backend on it."""
    server = redis_server_factory()
    backend = create_backend(bus_options("redis", server, f"o{uuid.uuid4().hex[:6]}", **PATIENT), "bus.redis")
    await backend.bus.start(Recorder())
    yield server, backend
    server.resume()
    await backend.bus.close()


def entry(user: str, session: str | None = None, info: Any = None) -> PresenceEntry:
    return PresenceEntry(user, session or f"s-{user}-{uuid.uuid4().hex[:6]}", "n0", info or {"name": user})


def sent_event(backend: Backend) -> asyncio.Event:
    """Set each time ``backend``'s batcher sends a pipeline."""
    bus = backend.bus
    assert isinstance(bus, RedisBus)
    event = asyncio.Event()
    send = bus.send_batch

    async def sending(commands: list[Any]) -> list[Any]:
        event.set()
        return await send(commands)

    bus.send_batch = sending  # type: ignore[method-assign]
    return event


async def pooled(backend: Backend, n: int) -> None:
    """``n`` connections connected in the bus's pool (as in a replica that has been busy): a pipeline sent while
    Redis is paused is on its way, not waiting for a new connection's handshake."""
    bus = backend.bus
    assert isinstance(bus, RedisBus)
    pool = bus.client.connection_pool
    conns = [await pool.get_connection() for _ in range(n)]
    for conn in conns:
        assert conn.is_connected
        await pool.release(conn)


async def _behind_a_long_pipeline(server: BrokerProcess, backend: Backend, room: str, first: Any,
                                  then: Callable[[], Any]) -> tuple[Any, Any]:
    """``first`` (a presence op of ``room``) at the end of a long pipeline, and ``then()`` asked for once that
    pipeline was written: both sent while Redis is paused, so it reads them together when it resumes."""
    presence = backend.presence
    await pooled(backend, MAX_IN_FLIGHT)
    sent = sent_event(backend)
    filler = {"pad": "x" * 2000}  # ~4 KiB per join ahead of ``first``: far more than Redis reads at once
    server.pause()
    try:
        others = [asyncio.ensure_future(presence.join(unique_room("other"), entry(f"o{i}", info=filler)))
                  for i in range(MAX_BATCH - 1)]
        ahead = asyncio.ensure_future(first)
        await asyncio.wait_for(sent.wait(), 10)  # that pipeline is on its way
        await asyncio.sleep(0.05)
        behind = asyncio.ensure_future(then())
        await asyncio.sleep(0.1)  # the next one too, on a second connection, if the batcher lets it go
    finally:
        server.resume()
    out = await asyncio.gather(ahead, behind, *others)
    assert all(out[2:])
    return out[0], out[1]


async def test_a_rejoin_of_a_session_runs_after_its_leave_sent_in_the_pipeline_before(
        paused: tuple[BrokerProcess, Backend]) -> None:
    server, backend = paused
    assert MAX_IN_FLIGHT >= 2  # what makes two pipelines of a room race
    presence: Any = backend.presence
    room = unique_room("rejoin")
    s = entry("s")
    await presence.join(room, entry("stay"))
    assert await presence.join(room, s)
    left, rejoined = await _behind_a_long_pipeline(
        server, backend, room, presence.leave(room, s.session), lambda: presence.join(room, s))
    assert (left, rejoined) == ("s", True)  # in this order: the last of the user left, then came first again
    # the session is joined, on the broker too (a leave run after the join would have removed it)
    assert s.session in {e.session for e in await presence.members(room)}
    page = await presence.page(room, None, 10)
    assert [m.user for m in page.members] == ["s", "stay"] and page.count.connections == 2


async def test_a_user_s_departure_and_return_on_another_connection_are_both_reported(
        paused: tuple[BrokerProcess, Backend]) -> None:
    server, backend = paused
    presence: Any = backend.presence
    room = unique_room("return")
    old, new = entry("u"), entry("u")
    assert await presence.join(room, old)
    left, first = await _behind_a_long_pipeline(
        server, backend, room, presence.leave(room, old.session), lambda: presence.join(room, new))
    # reordered, the join would find the user present (not first) and the leave would not be the user's last
    assert (left, first) == ("u", True)
    assert [e.session for e in await presence.members(room)] == [new.session]


async def _warmed(backend: Backend, prefix: str) -> tuple[RedisBus, Any, str]:
    """The Redis bus, its presence and a new room with one member in it (its first round trips done)."""
    bus = backend.bus
    assert isinstance(bus, RedisBus)
    room = unique_room(prefix)
    await backend.presence.join(room, entry("warm"))
    return bus, backend.presence, room


async def test_joins_of_a_room_asked_for_while_its_pipeline_is_in_flight_wait_and_go_as_one_script_run(
        paused: tuple[BrokerProcess, Backend]) -> None:
    server, backend = paused
    bus, presence, room = await _warmed(backend, "wait")
    before = bus.batch.stats.round_trips
    server.pause()
    try:
        first = asyncio.ensure_future(presence.join(room, entry("a")))
        await asyncio.sleep(0.05)
        assert bus.batch.stats.round_trips == before + 1
        later = []
        for turn in range(5):  # several loop iterations while the room's pipeline is in flight
            later += [asyncio.ensure_future(presence.join(room, entry(f"b{turn}{i}"))) for i in range(10)]
            await asyncio.sleep(0.01)
        # they wait for the room's pipeline, though another may be in flight, and then go together
        assert bus.batch.stats.round_trips == before + 1
    finally:
        server.resume()
    assert await first and all(await asyncio.gather(*later))
    assert bus.batch.stats.round_trips == before + 2
    assert (await presence.page(room, None, 100)).count.users == 52


async def test_a_request_waiting_for_one_of_its_rooms_holds_back_the_later_requests_of_the_other(
        paused: tuple[BrokerProcess, Backend]) -> None:
    """Upkeep's retried leaves, a restore and a reaping write several rooms in one request: while it waits for a
    pipeline of one of them, a later write of another of its rooms waits behind it, and what names no room goes."""
    server, backend = paused
    bus = backend.bus
    assert isinstance(bus, RedisBus)
    batch = bus.batch
    prefix = bus.prefix
    before = batch.stats.round_trips
    server.pause()
    try:
        a = asyncio.ensure_future(batch.run([("RPUSH", f"{prefix}:a", "1")], rooms=("A",)))
        await asyncio.sleep(0.05)  # in flight
        ab = asyncio.ensure_future(batch.run([("RPUSH", f"{prefix}:a", "2"), ("RPUSH", f"{prefix}:b", "2")],
                                             rooms=("A", "B")))
        b = asyncio.ensure_future(batch.run([("RPUSH", f"{prefix}:b", "3")], rooms=("B",)))
        c = asyncio.ensure_future(batch.run([("RPUSH", f"{prefix}:c", "3")], rooms=("C",)))
        read = asyncio.ensure_future(batch.run([("LRANGE", f"{prefix}:b", 0, -1)]))
        await asyncio.sleep(0.05)
        # room C and the read went in a second pipeline; the writes of A and B wait for A's
        assert batch.stats.round_trips == before + 2
        assert not ab.done() and not b.done()
    finally:
        server.resume()
    assert await asyncio.gather(a, ab, b, c) == [[1], [2, 1], [2], [1]]
    assert await read == [[]]  # it did not wait for the writes of B asked for before it
    assert batch.stats.round_trips == before + 3  # A and B's writes together, in order


async def test_a_room_s_waiting_writes_are_sent_before_the_callers_of_the_pipeline_ahead_are_woken(
        paused: tuple[BrokerProcess, Backend]) -> None:
    """Holding a room's writes must not leave Redis idle while the replica wakes the callers of the pipeline
    ahead (a join storm into one room: 256 continuations): the next pipeline is written first."""
    server, backend = paused
    bus, presence, room = await _warmed(backend, "overlap")
    log: list[str] = []
    send = bus.send_batch

    async def sending(commands: list[Any]) -> list[Any]:
        log.append("sent")
        return await send(commands)

    bus.send_batch = sending  # type: ignore[method-assign]

    async def join(name: str) -> None:
        await presence.join(room, entry(name))
        log.append("woke")

    server.pause()
    try:
        first = [asyncio.ensure_future(join(f"a{i}")) for i in range(20)]
        await asyncio.sleep(0.05)
        later = [asyncio.ensure_future(join(f"b{i}")) for i in range(20)]
        await asyncio.sleep(0.05)
        assert log == ["sent"]  # the later joins wait for the room's pipeline
    finally:
        server.resume()
    await asyncio.gather(*first, *later)
    assert log[:3] == ["sent", "sent", "woke"]
    assert log.count("sent") == 2 and log.count("woke") == 40


async def test_a_leave_that_failed_under_its_session_s_waiting_rejoin_is_not_retried_over_the_rejoin(
        redis_server_factory: Callable[..., BrokerProcess]) -> None:
    """A leave whose pipeline got no answer (op_timeout) is retried by the upkeep, as it may not have run; but
    when its session joined the room again meanwhile (that join waited behind the leave's pipeline, then ran),
    retrying the leave would remove a joined member: it is not retried."""
    server = redis_server_factory()
    backend = create_backend(bus_options("redis", server, f"o{uuid.uuid4().hex[:6]}", op_timeout=0.5,
                                         heartbeat_timeout=6.0, presence_ttl=60.0), "bus.redis")
    await backend.bus.start(Recorder())
    try:
        bus, presence = backend.bus, backend.presence
        assert isinstance(bus, RedisBus)
        room, alice = unique_room(), entry("alice")
        assert await presence.join(room, alice) is True
        send = bus.send_batch
        hung = asyncio.Event()

        async def leave_never_answered(commands: list[Any]) -> list[Any]:
            if not hung.is_set() and any(alice.session in map(str, c) for c in commands):
                hung.set()
                await asyncio.Event().wait()  # no answer: op_timeout ends it
            return await send(commands)

        bus.send_batch = leave_never_answered  # type: ignore[method-assign]
        leave = asyncio.ensure_future(presence.leave(room, alice.session))
        await asyncio.wait_for(hung.wait(), 5)
        rejoin = asyncio.ensure_future(presence.join(room, alice))  # waits behind the leave's pipeline
        with pytest.raises(Exception):  # noqa: B017 (the bus's timeout error, whichever it is)
            await leave
        await asyncio.wait_for(rejoin, 5)  # (not "first": the leave never ran, its entry was still there)
        assert [e.session for e in await presence.members(room)] == [alice.session]
        await presence.upkeep()  # retries the leaves that may not have run
        assert [e.session for e in await presence.members(room)] == [alice.session]
    finally:
        await backend.bus.close()
