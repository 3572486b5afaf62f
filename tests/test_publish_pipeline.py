"""Pipelined chat publishes (issue 11): a session's next frame is read while its publishes wait for the bus.

Against real brokers: the bus's ordered hand-off (publishes started in an order get offsets and are delivered
in it), a WebSocket burst stored, delivered and acked in order, a ping answered while a publish waits for a
paused Redis, the per-session cap (``publish_pipeline``), and every publish in flight answered when the broker
dies."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.helpers import bus_block, bus_options, nats_replicas
from wirehub.app import Wirehub
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.memory import create_backend as memory_backend
from wirehub.builtins.bus.nats import create_backend as nats_backend
from wirehub.builtins.bus.nats_acks import Dropped
from wirehub.builtins.bus.nats_bus import NatsBus
from wirehub.builtins.bus.redis import RedisBus
from wirehub.builtins.bus.redis import create_backend as redis_backend
from wirehub.builtins.handlers.chat import ChatHandler
from wirehub.bus import Backend, BusUnavailable, PublishOutcomeUnknown, ordered_handoff
from wirehub.config import ConfigError, config_from_dict
from wirehub.eager import Continued
from wirehub.testing import LiveServer, Recorder, WsClient, config_for_tests, unique_room

pytestmark = pytest.mark.timeout(90)

CHAT = "/ws/chat"
ServerFactory = Callable[..., Awaitable[LiveServer]]
#: a burst of 200 is not rate-limited
FAST_CHAT = {"publish_rate": 10000, "publish_burst": 10000}


def eager(coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
    """Start ``coro`` in this call, up to its first suspension (as the chat op starts a publish), outside any task."""
    loop = asyncio.get_running_loop()
    try:
        first = coro.send(None)
    except StopIteration as stop:
        done: asyncio.Future[Any] = loop.create_future()
        done.set_result(stop.value)
        return done
    return loop.create_task(Continued(coro, first))


async def started_backend(backend: Backend) -> tuple[Backend, Recorder]:
    recorder = Recorder()
    await backend.bus.start(recorder)
    return backend, recorder


async def check_ordered_handoff(backend: Backend, recorder: Recorder, n: int = 200) -> None:
    """``n`` history publishes to one room started eagerly in order, in groups over several loop turns (so
    several batches are in flight at once), then one a turn; the first with a dedupe key (NATS then updates
    its stream first): their offsets increase in that order, and the subscriber gets them in that order."""
    assert ordered_handoff(backend.bus)
    room = unique_room()
    await backend.bus.subscribe(room)
    answers: list[asyncio.Future[Any]] = []
    for i in range(n):
        dedupe = {"dedupe_key": f"k{uuid.uuid4().hex[:8]}", "dedupe_window": 7.0} if i == 0 else {}
        answers.append(eager(backend.bus.publish(room, b"m%d" % i, history=True, **dedupe)))
        if i % 10 == 9 or i >= n // 2:
            # the next ones go in another batch, maybe before this one is answered; one a loop turn, some
            # start in the turn where an earlier one was just answered
            await asyncio.sleep(0)
    offsets = await asyncio.gather(*answers)
    assert offsets == sorted(offsets) and len(set(offsets)) == n, offsets
    got = await recorder.wait_for(room, n)
    assert got == [b"m%d" % i for i in range(n)]
    delivered = [o for r, _, o in recorder.messages if r == room]
    assert delivered == offsets


async def test_memory_bus_keeps_the_order_publishes_were_started_in() -> None:
    backend, recorder = await started_backend(memory_backend({}, "bus.memory"))
    try:
        await check_ordered_handoff(backend, recorder)
    finally:
        await backend.bus.close()


async def test_broker_bus_keeps_the_order_publishes_were_started_in(kind: str, broker: BrokerProcess) -> None:
    opts = bus_options(kind, broker, f"o{uuid.uuid4().hex[:6]}")
    made = redis_backend(opts, "bus.redis") if kind == "redis" else nats_backend(opts, "bus.nats")
    backend, recorder = await started_backend(made)
    try:
        await check_ordered_handoff(backend, recorder)
    finally:
        await backend.bus.close()


async def test_a_redis_batch_cancelled_before_it_started_does_not_hold_its_room_back(
        redis_server_factory: Callable[..., BrokerProcess]) -> None:
    """A flush task cancelled before its first step (a shutdown) answers its publishers and lets the room's
    next batch go: a ``finally`` in it would never run, and the next batch would wait for it forever."""
    server = redis_server_factory()
    backend, _ = await started_backend(redis_backend(bus_options("redis", server, "c"), "bus.redis"))
    bus = backend.bus
    assert isinstance(bus, RedisBus) and bus._publish_batch is not None
    batcher = bus._publish_batch
    try:
        room = unique_room()
        first = eager(bus.publish(room, b"m1", history=True))
        await asyncio.sleep(0)  # the batch's flush task is made in this turn ...
        for task in list(batcher._flushing):
            task.cancel()  # ... and cancelled before its first step
        with pytest.raises(PublishOutcomeUnknown):  # answered (maybe published), not left waiting
            await asyncio.wait_for(first, 5)
        assert await asyncio.wait_for(bus.publish(room, b"m2", history=True), 5) > 0
        assert not batcher._tails
    finally:
        await bus.close()


async def test_a_rooms_redis_publishes_made_while_its_batch_waits_go_together_in_the_next_one(
        redis_paused: tuple[BrokerProcess, Callable[[int], Awaitable[None]]]) -> None:
    """One batch per room in flight: the publishes made meanwhile (one a loop turn) wait and then go as one
    batch, in order. A queue of one-publish batches, each sent once the one before was answered, grows
    without bound once the round trip is longer than the time between publishes (a reconnect storm)."""
    server, pause = redis_paused
    backend, recorder = await started_backend(redis_backend(redis_bus(server)["redis"], "bus.redis"))
    bus = backend.bus
    assert isinstance(bus, RedisBus) and bus._publish_batch is not None
    batcher = bus._publish_batch
    try:
        room = unique_room()
        await bus.subscribe(room)
        await pause(1000)
        n = 50
        answers = []
        for i in range(n):
            answers.append(eager(bus.publish(room, b"m%d" % i, history=True)))
            await asyncio.sleep(0)
        sent = batcher.batches
        offsets = await asyncio.wait_for(asyncio.gather(*answers), 10)
        assert sent == 1  # the first, waiting for the paused Redis; the others wait for it
        assert batcher.batches == 2
        assert offsets == sorted(offsets) and len(set(offsets)) == n
        assert await recorder.wait_for(room, n) == [b"m%d" % i for i in range(n)]
        assert not batcher._tails and not batcher._parked
    finally:
        await bus.close()


async def test_closing_the_redis_bus_answers_the_publishes_waiting_for_their_rooms_batch(
        redis_paused: tuple[BrokerProcess, Callable[[int], Awaitable[None]]]) -> None:
    """A publish parked behind its room's batch in flight is answered by the time ``close`` returns (an offset,
    or refused or maybe stored), never left waiting."""
    server, pause = redis_paused
    backend, _ = await started_backend(redis_backend(redis_bus(server)["redis"], "bus.redis"))
    bus = backend.bus
    assert isinstance(bus, RedisBus)
    room = unique_room()
    await pause(500)
    first = eager(bus.publish(room, b"m0", history=True))
    await asyncio.sleep(0)
    second = eager(bus.publish(room, b"m1", history=True))
    await asyncio.sleep(0)
    await bus.close()
    assert first.done() and second.done()
    for answer in (first, second):  # an offset, or refused / maybe stored: not left waiting
        assert answer.exception() is None or isinstance(answer.exception(), BusUnavailable)


async def test_a_rooms_nats_history_publishes_waiting_for_its_lock_go_as_one_atomic_batch(
        nats_server: BrokerProcess) -> None:
    """The lock's holder writes the room's publishes queued behind it in one atomic batch (one round trip),
    at consecutive offsets in order; a dedupe-keyed one goes alone. One write per publish, each after the
    one before was acknowledged, made the room's rate one per round trip: in a reconnect storm the queue
    grew without bound."""
    backend, recorder = await started_backend(nats_backend(bus_options("nats", nats_server, "a"), "bus.nats"))
    bus = backend.bus
    assert isinstance(bus, NatsBus) and bus._atomic  # nats-server 2.12+
    try:
        room = unique_room()
        await bus.subscribe(room)
        await bus.publish(room, b"m0", history=True)  # the room's first message (a run start) goes alone
        writes = bus.history_writes
        n = 60
        answers = [eager(bus.publish(room, b"m%d" % i, history=True)) for i in range(1, n)]
        keyed = eager(bus.publish(room, b"m%d" % n, history=True, dedupe_key="k", dedupe_window=5.0))
        answers += [keyed, eager(bus.publish(room, b"m%d" % (n + 1), history=True))]
        offsets = await asyncio.wait_for(asyncio.gather(*answers), 10)
        assert bus.history_writes - writes <= 4  # m1 alone, m2..m59 batched, m60 alone, m61
        assert offsets == list(range(offsets[0], offsets[0] + n + 1))
        assert await recorder.wait_for(room, n + 2) == [b"m%d" % i for i in range(n + 2)]
        assert await bus.publish(room, b"again", history=True, dedupe_key="k", dedupe_window=5.0) == offsets[n - 1]
        assert not bus._waiting and not bus._locks
    finally:
        await bus.close()


async def test_a_nats_history_publish_cancelled_while_it_waits_for_the_room_is_not_written(
        nats_server: BrokerProcess) -> None:
    backend, recorder = await started_backend(nats_backend(bus_options("nats", nats_server, "c"), "bus.nats"))
    bus = backend.bus
    assert isinstance(bus, NatsBus)
    try:
        room = unique_room()
        await bus.subscribe(room)
        await bus.publish(room, b"m0", history=True)
        first = eager(bus.publish(room, b"m1", history=True))  # holds the room while it is written
        gone = eager(bus.publish(room, b"gone", history=True))
        last = eager(bus.publish(room, b"m2", history=True))
        gone.cancel()
        one, two = await asyncio.wait_for(asyncio.gather(first, last), 10)
        assert two == one + 1 and gone.cancelled()
        assert await recorder.wait_for(room, 3) == [b"m0", b"m1", b"m2"]
        assert not bus._waiting and not bus._locks
    finally:
        await bus.close()


async def _batch_after_stream_update(bus: NatsBus, **change: Any) -> tuple[list[Any], int]:
    """The room's stream updated with ``change`` (as an operator or an older replica might), then m1 written
    alone while a 1,000-byte publish and two small ones queue behind it (the next holder's batch): their
    outcomes (offset or exception) and the room's first offset."""
    room = unique_room()
    await bus.subscribe(room)
    first = await bus.publish(room, b"m0", history=True)
    rs = bus.stream_of(room)
    assert bus.js is not None
    await bus.js.update_stream(dataclasses.replace(rs.config, **change))
    holder = eager(bus.publish(room, b"m1", history=True))
    queued = [eager(bus.publish(room, payload, history=True)) for payload in (b"x" * 1000, b"s2", b"s3")]
    outcomes = await asyncio.wait_for(asyncio.gather(holder, *queued, return_exceptions=True), 10)
    return outcomes, first


async def test_a_refused_nats_batch_answers_each_publish_with_its_own_outcome(nats_server: BrokerProcess) -> None:
    """A batch refused for one message (too large for the stream) is written one at a time: that one is
    refused, the others are stored at consecutive offsets, and batching stays on (only "atomic publish is
    disabled" turns it off). Before, the refusal turned batching off for good and every publish queued behind
    the refused one got its error, though none of them was sent."""
    backend, _ = await started_backend(nats_backend(bus_options("nats", nats_server, "r"), "bus.nats"))
    bus = backend.bus
    assert isinstance(bus, NatsBus) and bus._atomic
    try:
        (m1, big, s2, s3), first = await _batch_after_stream_update(bus, max_msg_size=300)
        assert m1 == first + 1
        assert isinstance(big, BusUnavailable) and not isinstance(big, PublishOutcomeUnknown), big
        assert (s2, s3) == (m1 + 1, m1 + 2)
        assert bus._atomic
    finally:
        await bus.close()


async def test_a_stream_without_atomic_batches_gets_the_queued_publishes_one_at_a_time(
        nats_server: BrokerProcess) -> None:
    """An older replica updated the stream without ``allow_atomic``: the refused batch ("atomic publish is
    disabled") is written one at a time and this replica stops batching."""
    backend, _ = await started_backend(nats_backend(bus_options("nats", nats_server, "o"), "bus.nats"))
    bus = backend.bus
    assert isinstance(bus, NatsBus) and bus._atomic
    try:
        (m1, big, s2, s3), first = await _batch_after_stream_update(bus, allow_atomic=False)
        assert [m1, big, s2, s3] == [first + 1, first + 2, first + 3, first + 4]
        assert not bus._atomic
    finally:
        await bus.close()


async def test_a_nats_batch_whose_answer_is_dropped_is_outcome_unknown_and_not_written_again(
        nats_server: BrokerProcess) -> None:
    """The acks inbox overflowed while a batch's commit was out (its answer dropped, :class:`Dropped`): the
    batch may be stored, so its publishes are "outcome unknown". Read as a refusal, they were written once
    more, one by one: every message stored twice."""
    backend, _ = await started_backend(nats_backend(bus_options("nats", nats_server, "d"), "bus.nats"))
    bus = backend.bus
    assert isinstance(bus, NatsBus) and bus._atomic and bus.acks is not None
    acks, real = bus.acks, bus.acks.request

    async def request(subject: str, payload: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
        answer = asyncio.ensure_future(real(subject, payload, headers))
        if headers and "Nats-Batch-Commit" in headers:
            for _ in range(3):  # handed to the connection, its answer not yet read: the inbox overflows
                await asyncio.sleep(0)
            acks.fail_all(Dropped("test: the acks inbox overflowed"))
        return await answer

    try:
        room = unique_room()
        first = await bus.publish(room, b"m0", history=True)
        acks.request = request  # type: ignore[method-assign]
        holder = eager(bus.publish(room, b"m1", history=True))
        queued = [eager(bus.publish(room, b"q%d" % i, history=True)) for i in range(3)]
        outcomes = await asyncio.wait_for(asyncio.gather(holder, *queued, return_exceptions=True), 10)
        assert outcomes[0] == first + 1
        assert all(isinstance(o, PublishOutcomeUnknown) for o in outcomes[1:]), outcomes
        acks.request = real  # type: ignore[method-assign]
        await asyncio.sleep(0.5)  # the server may still be storing the batch whose answer was dropped
        bus._last.pop(room, None)
        _, top, _ = await bus.last(room)
        # m1, and the batch of three once if its commit went out before the overflow (else none of it),
        # never a second copy
        assert top in (first + 1, first + 4), (first, top)
    finally:
        await bus.close()


async def test_nats_batches_of_two_replicas_into_one_room_get_consecutive_offsets(nats_server: BrokerProcess) -> None:
    """Two replicas' batches race for the room's next offsets: the later one is refused whole (its expected
    last sequence is stale), reads the room's last again and is sent again. Every offset once, each replica's
    in its own order, and a subscriber gets the messages in offset order."""
    prefix = f"t{uuid.uuid4().hex[:6]}"
    reader, recorder = await started_backend(nats_backend(bus_options("nats", nats_server, prefix), "bus.nats"))
    async with nats_replicas(nats_server, prefix) as make:
        a, b = (await make()).bus, (await make()).bus
        room = unique_room()
        await reader.bus.subscribe(room)
        await a.publish(room, b"a0", history=True)
        n = 40
        names = [b"a%d" % i for i in range(1, n)] + [b"b%d" % i for i in range(n)]
        mine = [eager(a.publish(room, m, history=True)) for m in names[:n - 1]]
        theirs = [eager(b.publish(room, m, history=True)) for m in names[n - 1:]]
        got_a = await asyncio.wait_for(asyncio.gather(*mine), 20)
        got_b = await asyncio.wait_for(asyncio.gather(*theirs), 20)
        assert got_a == sorted(got_a) and got_b == sorted(got_b)
        everyone = sorted([*got_a, *got_b])
        assert everyone == list(range(everyone[0], everyone[0] + 2 * n - 1))
        offset_of = dict(zip(names, [*got_a, *got_b], strict=True))
        delivered = await recorder.wait_for(room, 2 * n)
        assert delivered[0] == b"a0" and [offset_of[m] for m in delivered[1:]] == everyone
    await reader.bus.close()


def test_redis_without_its_publish_batcher_and_cluster_mode_do_not_claim_it(
        redis_server_factory: Callable[..., BrokerProcess]) -> None:
    """Each publish one call on a pooled connection: two may reach Redis in either order."""
    server = redis_server_factory()
    batched = redis_backend(bus_options("redis", server, "p"), "bus.redis").bus
    assert isinstance(batched, RedisBus) and ordered_handoff(batched)
    batched._publish_batch = None
    assert not ordered_handoff(batched)
    cluster = redis_backend({"mode": "cluster", "cluster": {"nodes": ["127.0.0.1:1"]}}, "bus.redis").bus
    assert not ordered_handoff(cluster)
    assert not ordered_handoff(object())  # a bus that says nothing: not claimed


# -- over a WebSocket ------------------------------------------------------------------------------------------


def chat_config(bus: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"bus": bus, "endpoints": [{"path": CHAT, "handler": "chat", "options": {**FAST_CHAT, **options}}]}


def chat_handler(server: LiveServer) -> ChatHandler:
    handler = server.app.handlers[CHAT]
    assert isinstance(handler, ChatHandler)
    return handler


async def member(server: LiveServer, room: str) -> WsClient:
    ws = await server.ws(CHAT)
    assert (await ws.recv())["op"] == "welcome"
    joined = await ws.request({"op": "join", "room": room})
    assert joined["op"] == "joined", joined
    return ws


async def send_publishes(ws: WsClient, room: str, ids: range) -> None:
    for i in ids:
        await ws.send({"op": "publish", "id": i, "room": room, "data": i})


async def replies(ws: WsClient, n: int, timeout: float = 20) -> list[dict[str, Any]]:
    """The next ``n`` frames that answer a request (they carry an id)."""
    got: list[dict[str, Any]] = []
    while len(got) < n:
        frame = await ws.recv(timeout)
        if "id" in frame:
            got.append(frame)
    return got


@pytest.fixture
async def redis_paused(redis_server_factory: Callable[..., BrokerProcess]) -> AsyncIterator[
        tuple[BrokerProcess, Callable[[int], Awaitable[None]]]]:
    """A Redis of the test's own and ``await pause(ms)``: it runs no write (publish scripts) for ``ms``."""
    server = redis_server_factory()
    client = aioredis.from_url(server.url)

    async def pause(ms: int) -> None:
        await client.execute_command("CLIENT", "PAUSE", ms, "WRITE")

    yield server, pause
    await client.aclose()


def redis_bus(server: BrokerProcess) -> dict[str, Any]:
    """A bus that waits out a paused Redis (a pause is not an outage)."""
    return {"plugin": "redis", "redis": bus_options("redis", server, f"w{uuid.uuid4().hex[:6]}", heartbeat_timeout=6.0,
                                                    op_timeout=5.0)}


@pytest.mark.parametrize("value", [0, 1025, "x"])
def test_publish_pipeline_is_checked_at_load(value: Any) -> None:
    config = config_from_dict(config_for_tests(chat_config({"plugin": "memory"}, publish_pipeline=value)))
    with pytest.raises(ConfigError) as err:
        Wirehub.build(config)
    assert err.value.key == "endpoints[0].options.publish_pipeline"


async def test_a_burst_is_stored_delivered_and_acked_in_order(
        kind: str, broker: BrokerProcess, wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config(bus_block(kind, broker, f"b{uuid.uuid4().hex[:6]}")))
    assert chat_handler(server).pipeline == 16
    room = unique_room()
    sender, receiver = await member(server, room), await member(server, room)
    n = 200
    await send_publishes(sender, room, range(n))
    acks = await replies(sender, n)
    assert [a["op"] for a in acks] == ["ack"] * n, [a for a in acks if a["op"] != "ack"][:3]
    assert [a["id"] for a in acks] == list(range(n))
    offsets = [a["offset"] for a in acks]
    assert offsets == sorted(offsets) and len(set(offsets)) == n
    messages = [await receiver.recv_op("message") for _ in range(n)]
    assert [(m["data"], m["offset"]) for m in messages] == list(zip(range(n), offsets, strict=True))
    history = await receiver.request({"op": "history", "room": room, "limit": n})
    assert [(m["data"], m["offset"]) for m in history["messages"]] == list(zip(range(n), offsets, strict=True))


async def test_a_ping_after_a_publish_is_answered_while_the_publish_waits_for_the_bus(
        redis_paused: tuple[BrokerProcess, Callable[[int], Awaitable[None]]], wirehub_server: ServerFactory) -> None:
    broker, pause = redis_paused
    server = await wirehub_server(chat_config(redis_bus(broker)))
    room = unique_room()
    ws = await member(server, room)
    await pause(800)
    await ws.send({"op": "publish", "id": "p", "room": room, "data": 1})
    await ws.send({"op": "ping", "id": "g"})
    first, second = await replies(ws, 2)
    assert (first["op"], first["id"]) == ("pong", "g"), first  # one at a time, the ack would come first
    assert (second["op"], second["id"]) == ("ack", "p"), second


async def test_at_most_publish_pipeline_publishes_of_a_session_are_in_flight(
        redis_paused: tuple[BrokerProcess, Callable[[int], Awaitable[None]]], wirehub_server: ServerFactory) -> None:
    broker, pause = redis_paused
    server = await wirehub_server(chat_config(redis_bus(broker), publish_pipeline=4))
    assert chat_handler(server).pipeline == 4
    publishing = server.app.hub.publishing
    room = unique_room()
    ws = await member(server, room)
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(publishing.count)
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    try:
        await pause(800)
        await send_publishes(ws, room, range(10))
        await ws.send({"op": "ping", "id": "g"})
        got = await replies(ws, 11)
    finally:
        watcher.cancel()
    assert max(seen) == 4, seen  # four waited for the paused Redis together, never a fifth
    ops = [(r["op"], r["id"]) for r in got]
    # the fifth publish waited for the first's ack, so the ping (read after the tenth) came after six acks
    assert ops.index(("pong", "g")) >= 6, ops
    assert [r for r in ops if r[0] == "ack"] == [("ack", i) for i in range(10)]


async def test_one_at_a_time_when_publish_pipeline_is_1(
        redis_paused: tuple[BrokerProcess, Callable[[int], Awaitable[None]]], wirehub_server: ServerFactory) -> None:
    broker, pause = redis_paused
    server = await wirehub_server(chat_config(redis_bus(broker), publish_pipeline=1))
    assert chat_handler(server).pipeline == 1
    room = unique_room()
    ws = await member(server, room)
    await pause(500)
    await ws.send({"op": "publish", "id": "p", "room": room, "data": 1})
    await ws.send({"op": "ping", "id": "g"})
    assert [r["op"] for r in await replies(ws, 2)] == ["ack", "pong"]


async def test_every_publish_in_flight_gets_its_own_error_when_the_broker_dies(
        redis_paused: tuple[BrokerProcess, Callable[[int], Awaitable[None]]], wirehub_server: ServerFactory) -> None:
    broker, pause = redis_paused
    server = await wirehub_server(chat_config(redis_bus(broker)))
    publishing = server.app.hub.publishing
    room = unique_room()
    ws = await member(server, room)
    await pause(5000)
    await send_publishes(ws, room, range(5))
    for _ in range(200):
        if publishing.count == 5:
            break
        await asyncio.sleep(0.01)
    assert publishing.count == 5  # all five handed to the bus, none answered
    broker.kill()
    got = await replies(ws, 5)
    assert [(r["op"], r["id"]) for r in got] == [("error", i) for i in range(5)], got
    assert {r["code"] for r in got} <= {"unavailable", "timeout"}, got
    assert publishing.count == 0
    assert (await ws.request({"op": "ping"}))["op"] == "pong"  # the session stays open


async def test_a_refusal_waits_for_the_answers_of_the_publishes_before_it(
        redis_paused: tuple[BrokerProcess, Callable[[int], Awaitable[None]]], wirehub_server: ServerFactory) -> None:
    broker, pause = redis_paused
    server = await wirehub_server(chat_config(redis_bus(broker), publish_rate=0.01, publish_burst=3))
    room = unique_room()
    ws = await member(server, room)
    await pause(500)
    await send_publishes(ws, room, range(2))
    await ws.send({"op": "publish", "id": "bad", "room": room})  # no data
    await send_publishes(ws, room, range(2, 3))  # over the rate
    got = [(r["op"], r["id"], r.get("code")) for r in await replies(ws, 4)]
    assert got == [("ack", 0, None), ("ack", 1, None), ("error", "bad", "bad_request"), ("error", 2, "rate_limited")]


async def test_publishes_in_flight_when_their_session_closes_are_still_delivered(
        redis_paused: tuple[BrokerProcess, Callable[[int], Awaitable[None]]], wirehub_server: ServerFactory) -> None:
    broker, pause = redis_paused
    server = await wirehub_server(chat_config(redis_bus(broker)))
    publishing = server.app.hub.publishing
    room = unique_room()
    sender, receiver = await member(server, room), await member(server, room)
    await pause(500)
    await send_publishes(sender, room, range(5))
    for _ in range(200):
        if publishing.count == 5:
            break
        await asyncio.sleep(0.01)
    assert publishing.count == 5
    await sender.aclose()  # the answers have nobody to go to; the messages were accepted
    messages = [await receiver.recv_op("message") for _ in range(5)]
    assert [m["data"] for m in messages] == list(range(5))
    assert await publishing.wait(5)
