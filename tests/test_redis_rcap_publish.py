"""The Redis publish batcher's size cap (plugins/bus/redis_pubsub.py), against a real redis-server: after a
stall, a room's waiting publishes go in batches of at most MAX_BATCH_COMMANDS publishes and MAX_BATCH_BYTES
of arguments, in the room's order, ahead of what was published after them, and every publisher gets its own
answer (its offset; ``PublishOutcomeUnknown`` only if its batch was sent and not answered, ``BusUnavailable``
if it was never sent)."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.helpers import started_redis
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus import redis_pubsub
from wirehub.builtins.bus.redis import RedisBus
from wirehub.builtins.bus.redis_pubsub import MAX_BATCH_BYTES, MAX_BATCH_COMMANDS
from wirehub.bus import Backend, BusUnavailable, PublishOutcomeUnknown
from wirehub.testing import Recorder, unique_room

pytestmark = pytest.mark.timeout(90)

# a stall of a few tenths of a second is not an outage: the heartbeat and the batch in flight wait it out
PATIENT = {"op_timeout": 8.0, "heartbeat_timeout": 6.0}

Started = Callable[..., Awaitable[tuple[Backend, Recorder]]]


@pytest.fixture
async def started(redis_server_factory: Callable[..., BrokerProcess]) -> AsyncIterator[tuple[BrokerProcess, Started]]:
    """A Redis of the test's own (it is paused) and ``await start()``: a started Redis backend on it."""
    server = redis_server_factory()
    async with started_redis(server, f"c{uuid.uuid4().hex[:6]}") as start:
        try:
            yield server, start
        finally:
            server.resume()  # before the backends close


class Sent(list[list[Any]]):
    """The publish batches sent (their commands), recorded around redis_pubsub's ``send_on_pool``;
    ``before_send(n)``, when set, is awaited before the n-th batch (1-based) is sent."""

    before_send: Callable[[int], Awaitable[None]] | None = None

    def bytes_of(self, i: int) -> int:
        return sum(len(a) for c in self[i] for a in c if isinstance(a, bytes | str))


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    out = Sent()
    send = redis_pubsub.send_on_pool

    async def recorded(pool: Any, commands: list[Any]) -> list[Any]:
        out.append(list(commands))
        if out.before_send is not None:
            await out.before_send(len(out))
        return await send(pool, commands)

    monkeypatch.setattr(redis_pubsub, "send_on_pool", recorded)
    return out


def batcher_of(backend: Backend) -> Any:
    assert isinstance(backend.bus, RedisBus)
    return backend.bus._publish_batch


def count(batch: list[Any]) -> int:
    """Publishes in a batch sent (a script load in it is not one)."""
    return sum(1 for c in batch if c[0] != "SCRIPT")


def publishes(sent: Sent) -> list[int]:
    return [count(batch) for batch in sent]


async def test_after_a_stall_a_room_s_thousands_of_publishes_go_in_capped_batches_in_order(
        started: tuple[BrokerProcess, Started], sent: Sent) -> None:
    server, start = started
    (pub, _), (sub, got) = await start(**PATIENT), await start(**PATIENT)
    room = unique_room("stall")
    await sub.bus.subscribe(room)
    assert await pub.bus.publish(room, b"warm", history=True) == 1
    batcher = batcher_of(pub)
    n = 3000
    third = asyncio.Event()

    async def before_send(i: int) -> None:
        if i == 3:
            third.set()

    sent.before_send = before_send
    server.pause()
    try:
        first = asyncio.ensure_future(pub.bus.publish(room, b"p0", history=True))
        await asyncio.sleep(0.05)  # sent: in flight, unanswered
        assert batcher.batches == 2
        jobs = [first]
        for turn in range(10):  # many turns of the stall: all of them wait for the batch in flight
            jobs += [asyncio.ensure_future(pub.bus.publish(room, b"p%d" % i, history=i % 5 != 4))
                     for i in range(1 + turn * n // 10, 1 + (turn + 1) * n // 10)]
            await asyncio.sleep(0.02)
        assert batcher.batches == 2 and not any(j.done() for j in jobs)
    finally:
        server.resume()
    await asyncio.wait_for(third.wait(), 10)  # the first batch of the waiting ones: newer ones go behind them all
    newer = [asyncio.ensure_future(pub.bus.publish(room, b"n%d" % i, history=True)) for i in range(20)]
    results = await asyncio.gather(*jobs, *newer)
    # every publisher got its own offset, in the order it published (plain publishes have none)
    offsets = [r for r in results if r is not None]
    assert offsets == list(range(2, 2 + len(offsets)))
    assert len(offsets) == 1 + n - n // 5 + 20
    delivered = await got.wait_for(room, 2 + n + 20, timeout=30)
    assert delivered == [b"warm", *(b"p%d" % i for i in range(n + 1)), *(b"n%d" % i for i in range(20))]
    # no batch over the cap, so the waiting ones took several
    sizes = publishes(sent)
    assert max(sizes) <= MAX_BATCH_COMMANDS and batcher.largest <= MAX_BATCH_COMMANDS, sizes
    assert sum(sizes) == 2 + n + 20
    assert len(sizes) >= 2 + math.ceil(n / MAX_BATCH_COMMANDS), sizes


async def test_a_batch_holds_at_most_max_batch_bytes_and_a_larger_publish_goes_alone(
        started: tuple[BrokerProcess, Started], sent: Sent) -> None:
    server, start = started
    (pub, _), (sub, got) = await start(**PATIENT), await start(**PATIENT)
    rooms = [unique_room("big"), unique_room("big")]
    for room in rooms:
        await sub.bus.subscribe(room)
        assert await pub.bus.publish(room, b"warm", history=True) == 1
    payload = b"x" * (MAX_BATCH_BYTES // 5)
    huge = b"h" * (2 * MAX_BATCH_BYTES)
    made: dict[str, list[bytes]] = {room: [] for room in rooms}
    server.pause()
    try:
        jobs = [asyncio.ensure_future(pub.bus.publish(room, b"first", history=True)) for room in rooms]
        made[rooms[0]].append(b"first")
        made[rooms[1]].append(b"first")
        await asyncio.sleep(0.05)
        for i in range(24):  # the two rooms interleaved; one publish over the cap in the middle of each
            room = rooms[i % 2]
            data = (huge if i in (10, 11) else payload[:-1024]) + b"%08d" % i
            jobs.append(asyncio.ensure_future(pub.bus.publish(room, data, history=True)))
            made[room].append(data)
        await asyncio.sleep(0.05)
    finally:
        server.resume()
    results = await asyncio.gather(*jobs)
    for room in rooms:  # each room's offsets in the order of its publishes
        mine = [r for r, j in zip(results, [rooms[0], rooms[1], *(rooms[i % 2] for i in range(24))],
                                  strict=True) if j == room]
        assert mine == list(range(2, 2 + 13))
        assert await got.wait_for(room, 14, timeout=30) == [b"warm", *made[room]]
    for i, batch in enumerate(sent):
        if count(batch) > 1:  # payloads, and per publish a few hundred bytes of keys and arguments
            assert sent.bytes_of(i) <= MAX_BATCH_BYTES, (i, sent.bytes_of(i))
    alone = [batch for batch in sent if any(isinstance(a, bytes) and a.startswith(huge) for c in batch for a in c)]
    assert [count(batch) for batch in alone] == [1, 1]
    assert max(publishes(sent)) == 5  # 5 of a fifth of the cap, less 1 KiB each (their keys fit in that)


async def test_a_stall_under_the_capped_batches_gives_unknown_to_the_sent_one_and_unavailable_to_the_rest(
        started: tuple[BrokerProcess, Started], sent: Sent) -> None:
    server, start = started
    # the heartbeat notices the hang well before the batch in flight times out
    (pub, _), _ = await start(op_timeout=2.5, heartbeat_interval=0.1, heartbeat_timeout=0.5), await start()
    assert isinstance(pub.bus, RedisBus)
    room = unique_room("outcomes")
    assert await pub.bus.publish(room, b"warm", history=True) == 1  # batch 1
    held = asyncio.Event()

    async def before_send(n: int) -> None:
        if n == 2:  # a slow round trip: the room's next publishes wait for it
            await held.wait()
        elif n == 3:  # the first batch of those: Redis hangs under it
            server.pause()

    sent.before_send = before_send
    first = asyncio.ensure_future(pub.bus.publish(room, b"p0", history=True))
    await asyncio.sleep(0.05)
    n = 1000
    jobs = [asyncio.ensure_future(pub.bus.publish(room, b"p%d" % i, history=True)) for i in range(1, n + 1)]
    await asyncio.sleep(0.05)
    held.set()
    try:
        assert await first == 2
        results = await asyncio.gather(*jobs, return_exceptions=True)
    finally:
        server.resume()
    kinds = [type(r) for r in results]
    # sent and not answered: maybe published; never sent: not published (the bus was found down first)
    assert kinds == [PublishOutcomeUnknown] * MAX_BATCH_COMMANDS + [BusUnavailable] * (n - MAX_BATCH_COMMANDS)
    assert publishes(sent)[2] == MAX_BATCH_COMMANDS and len(sent) == 3
    async with aioredis.Redis(port=server.port) as raw:
        top = int(await raw.hget(pub.bus.key("m", room), "top") or 0)
    assert 2 <= top <= 2 + MAX_BATCH_COMMANDS  # none of those never sent was stored


async def test_a_room_whose_next_waiting_publishers_all_gave_up_still_sends_the_rest(
        started: tuple[BrokerProcess, Started], sent: Sent) -> None:
    """The publishers of the oldest waiting chunk of a room all cancelled (clients gone, a caller's timeout):
    no batch of that chunk goes, so none ends to take the room's next waiting ones; they are taken anyway, and
    a later publish of the room goes behind them (before, they waited forever, and so did the room)."""
    server, start = started
    (pub, _), (sub, got) = await start(**PATIENT), await start(**PATIENT)
    room = unique_room("gaveup")
    await sub.bus.subscribe(room)
    server.pause()
    try:
        first = asyncio.ensure_future(pub.bus.publish(room, b"p0", history=True))
        await asyncio.sleep(0.05)  # in flight, unanswered
        waiting = [asyncio.ensure_future(pub.bus.publish(room, b"p%d" % i, history=True)) for i in range(1, 301)]
        await asyncio.sleep(0.05)
        for job in waiting[:MAX_BATCH_COMMANDS]:  # exactly the chunk that goes next
            job.cancel()
    finally:
        server.resume()
    assert await first == 1
    rest = await asyncio.wait_for(asyncio.gather(*waiting[MAX_BATCH_COMMANDS:]), 10)
    later = await asyncio.wait_for(pub.bus.publish(room, b"later", history=True), 10)
    assert rest == list(range(2, 2 + 300 - MAX_BATCH_COMMANDS)) and later == rest[-1] + 1
    kept = [b"p%d" % i for i in range(MAX_BATCH_COMMANDS + 1, 301)]
    assert await got.wait_for(room, 2 + len(kept), timeout=10) == [b"p0", *kept, b"later"]


async def test_a_publish_made_as_its_room_s_batch_ends_goes_behind_the_room_s_waiting_ones(
        started: tuple[BrokerProcess, Started], sent: Sent, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten publishes of 300 KB wait behind the room's batch in flight; three fill a batch's bytes, so when it
    ends seven stay waiting: a publish made in that turn (the room has no batch in flight for a moment) goes
    behind them, not with the first three."""
    server, start = started
    (pub, _), (sub, got) = await start(**PATIENT), await start(**PATIENT)
    room = unique_room("turn")
    await sub.bus.subscribe(room)
    batcher = batcher_of(pub)
    real_ended = batcher._ended
    newer: list[asyncio.Future[Any]] = []

    def ended(batch: list[Any], channels: set[bytes]) -> None:
        if not newer:  # the first batch's end: the publish is made first, its submit runs before the next flush
            newer.append(asyncio.ensure_future(pub.bus.publish(room, b"new", history=True)))
        real_ended(batch, channels)

    monkeypatch.setattr(batcher, "_ended", ended)
    big = b"x" * 300_000
    server.pause()
    try:
        first = asyncio.ensure_future(pub.bus.publish(room, b"p0", history=True))
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(pub.bus.publish(room, big + b"%d" % i, history=True)) for i in range(1, 11)]
        await asyncio.sleep(0.05)
    finally:
        server.resume()
    assert await first == 1
    assert await asyncio.wait_for(asyncio.gather(*waiting, *newer), 10) == list(range(2, 13))
    assert (await got.wait_for(room, 12, timeout=10))[-1] == b"new"
