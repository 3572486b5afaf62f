"""Broker faults survived by the Redis and NATS buses, each done for real to a broker of the test's own:
killed and restarted, hung (SIGSTOP) and resumed, publishes while it is down, a replica that vanished."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import bus_options
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.nats import create_backend as nats_backend
from wirehub.builtins.bus.redis import create_backend as redis_backend
from wirehub.bus import Backend, BusUnavailable, PresenceEntry
from wirehub.testing import LiveServer, Recorder, unique_room


def options(kind: str, broker: BrokerProcess, **extra: Any) -> dict[str, Any]:
    """Bus options with fast failure detection (``FAST_BUS``) and a prefix of their own."""
    return bus_options(kind, broker, f"f{uuid.uuid4().hex[:6]}", **extra)


def make_backend(kind: str, opts: dict[str, Any]) -> Backend:
    return redis_backend(opts, "bus.redis") if kind == "redis" else nats_backend(opts, "bus.nats")


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


# ``kind`` (redis, nats) and ``broker`` (of the test's own: it gets killed or paused) are in conftest.py.

Started = Callable[..., Awaitable[tuple[Backend, Recorder]]]


@pytest.fixture
async def started(kind: str, broker: BrokerProcess) -> AsyncIterator[Started]:
    """``await started(**options)``: a started backend (a replica) on the test's broker."""
    backends: list[Backend] = []
    shared = options(kind, broker)

    async def start(**extra: Any) -> tuple[Backend, Recorder]:
        backend = make_backend(kind, {**shared, **extra})
        recorder = Recorder()
        await backend.bus.start(recorder)
        backends.append(backend)
        return backend, recorder

    yield start
    for backend in backends:
        await backend.bus.close()


async def test_killed_and_restarted_broker(kind: str, broker: BrokerProcess, started: Started) -> None:
    (a, ra), (b, rb) = await started(), await started()
    room = unique_room()
    await a.bus.subscribe(room)
    await b.bus.subscribe(room)
    await a.bus.publish(room, b"before", history=True)
    await ra.wait_for(room, 1)  # delivered everywhere before the kill (in flight it would be lost)
    await rb.wait_for(room, 1)

    broker.kill()
    took = await until(lambda: not a.bus.healthy and not b.bus.healthy, 5, "both replicas notice the kill")
    assert took < 3
    assert ra.states[-1] is False and rb.states[-1] is False
    with pytest.raises(BusUnavailable):
        await a.bus.publish(room, b"lost", history=True)
    with pytest.raises(BusUnavailable):
        await a.history.read(room, 0, 10)

    broker.start()  # same port
    await until(lambda: a.bus.healthy and b.bus.healthy, 10, "both replicas reconnect by themselves")
    assert ra.states[-2:] == [False, True] and rb.states[-2:] == [False, True]
    # every room was resubscribed without anybody asking: delivery resumes
    offset = await b.bus.publish(room, b"after", history=True)
    assert await ra.wait_for(room, 2) == [b"before", b"after"]
    assert await rb.wait_for(room, 2) == [b"before", b"after"]
    assert b"lost" not in ra.of(room)  # refused while down, so never delivered later
    page = await a.history.read(room, None, 10)
    if kind == "nats":  # the JetStream store survived the restart: same epoch, history kept
        assert [p for _, p in page.messages] == [b"before", b"after"]
    else:  # this Redis keeps nothing on disk: the room's epoch is new, and says so
        assert [p for _, p in page.messages] == [b"after"] and offset == 1


async def test_restart_with_persistence_keeps_history_and_epoch(
        kind: str, redis_server_factory: Callable[..., BrokerProcess],
        nats_server_factory: Callable[..., BrokerProcess]) -> None:
    broker = redis_server_factory(appendonly=True) if kind == "redis" else nats_server_factory()
    backend = make_backend(kind, options(kind, broker))
    await backend.bus.start(Recorder())
    try:
        room = unique_room()
        first = await backend.bus.publish(room, b"one", history=True)
        top, epoch = await backend.history.position(room)
        broker.stop()
        await until(lambda: not backend.bus.healthy, 5, "down")
        broker.start()
        await until(lambda: backend.bus.healthy, 10, "up again")
        assert await backend.history.position(room) == (top, epoch)
        page = await backend.history.read(room, 0, 10)
        assert page.complete and page.messages == [(first, b"one")]
    finally:
        await backend.bus.close()


def _thread_states(pid: int) -> list[str]:
    return [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in Path(f"/proc/{pid}/task").iterdir()]


def test_pause_returns_once_every_broker_thread_is_stopped(broker: BrokerProcess) -> None:
    """The kernel hands a process-wide SIGSTOP to one thread; until that one runs, the others go on serving
    (a loaded machine's paused nats-server answered a publish's three requests). pause() waits for them all."""
    assert broker.proc is not None
    for _ in range(20):
        broker.pause()
        assert set(_thread_states(broker.proc.pid)) <= {"T", "t"}
        broker.resume()
        deadline = time.monotonic() + 5
        while {"T", "t"} & set(_thread_states(broker.proc.pid)):
            assert time.monotonic() < deadline, "not resumed"
            time.sleep(0.001)


async def test_hung_broker_is_noticed_by_the_watchdog(kind: str, broker: BrokerProcess, started: Started) -> None:
    (a, ra), (b, rb) = await started(), await started()
    room = unique_room()
    await a.bus.subscribe(room)
    await b.bus.subscribe(room)
    broker.pause()
    try:
        took = await until(lambda: not a.bus.healthy and not b.bus.healthy, 5, "the watchdog notices the hang")
        assert took < 2.5  # heartbeat_interval + heartbeat_timeout, plus scheduling
        t0 = time.monotonic()
        with pytest.raises(BusUnavailable):
            await a.bus.publish(room, b"x", history=True)
        assert time.monotonic() - t0 < 0.2  # refused at once while down, not after a timeout
    finally:
        broker.resume()
    await until(lambda: a.bus.healthy and b.bus.healthy, 10, "recovered after SIGCONT")
    assert ra.states[-2:] == [False, True]
    await a.bus.publish(room, b"again", history=True)
    assert await rb.wait_for(room, 1) == [b"again"]


async def test_a_publish_that_the_broker_does_not_answer_times_out(
        kind: str, broker: BrokerProcess, started: Started) -> None:
    # a long heartbeat so that the publish, not the watchdog, meets the hang first
    a, _ = await started(heartbeat_interval=30, heartbeat_timeout=30, op_timeout=0.5)
    room = unique_room()
    broker.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(BusUnavailable):
            await a.bus.publish(room, b"x", history=True)
        assert time.monotonic() - t0 < 1.5
    finally:
        broker.resume()


async def test_presence_of_a_vanished_replica_expires(kind: str, started: Started) -> None:
    (a, _), (b, _) = await started(), await started()
    room = unique_room()
    await a.presence.join(room, PresenceEntry("alice", "sa", "node-a"))
    await b.presence.join(room, PresenceEntry("bob", "sb", "node-b"))
    await asyncio.sleep(2.0)  # longer than presence_ttl (1.5 s): both replicas keep refreshing
    assert sorted(m.user for m in await a.presence.members(room)) == ["alice", "bob"]
    await b.bus.close()  # replica b stops refreshing without leaving (as if SIGKILLed)
    deadline = time.monotonic() + 4
    while [m.user for m in await a.presence.members(room)] != ["alice"]:
        assert time.monotonic() < deadline, "bob's entry did not expire"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_readyz_follows_the_broker(kind: str, fault: str, broker: BrokerProcess,
                                         wirehub_server: Callable[..., Awaitable[LiveServer]]) -> None:
    server = await wirehub_server({"bus": {"plugin": kind, kind: options(kind, broker)}})
    assert (await server.http("/readyz")).code == 200
    if fault == "kill":
        broker.kill()
    else:
        broker.pause()
    t0 = time.monotonic()
    try:
        while (await server.http("/readyz")).code != 503:
            assert time.monotonic() - t0 < 3, "/readyz did not turn 503"
            await asyncio.sleep(0.05)
        assert (await server.http("/healthz")).code == 200
        assert server.app.metrics is not None
    finally:
        if fault == "kill":
            broker.start()
        else:
            broker.resume()
    t0 = time.monotonic()
    while (await server.http("/readyz")).code != 200:
        assert time.monotonic() - t0 < 10, "/readyz did not recover"
        await asyncio.sleep(0.05)


async def test_a_replica_that_lost_its_bus_repairs_its_rooms_from_history(
        kind: str, broker: BrokerProcess, wirehub_server: Callable[..., Awaitable[LiveServer]]) -> None:
    """Only replica A loses the broker (its watchdog fired; the broker is fine) while B publishes:
    A's members get what they missed from history once A is back, even in a room where A had not
    delivered any message yet."""
    shared = options(kind, broker)
    config = {"bus": {"plugin": kind, kind: shared}, "endpoints": [{"path": "/ws/chat", "handler": "chat"}]}
    a, b = await wirehub_server(config), await wirehub_server(config)
    room = unique_room()
    on_a, on_b = await a.ws("/ws/chat", welcome=True), await b.ws("/ws/chat", welcome=True)
    assert (await on_a.request({"op": "join", "room": room}))["op"] == "joined"
    assert (await on_b.request({"op": "join", "room": room}))["op"] == "joined"

    bus: Any = a.app.backend.bus
    release = asyncio.Event()
    reopen = bus._open

    async def held_open() -> None:
        await release.wait()
        await reopen()

    bus._open = held_open
    bus._fail("test: the connection of replica A broke")
    await until(lambda: not bus.healthy, 3, "A notices")
    assert (await on_b.request({"op": "publish", "room": room, "data": "missed"}))["op"] == "ack"
    release.set()
    await until(lambda: bus.healthy, 5, "A reconnects")
    got = await on_a.recv_op("message", 5)
    assert got["data"] == "missed"
    assert (await on_b.request({"op": "publish", "room": room, "data": "live"}))["op"] == "ack"
    assert (await on_a.recv_op("message", 5))["data"] == "live"
