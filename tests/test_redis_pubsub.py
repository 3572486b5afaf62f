"""The Redis bus's batched publishes and draining pub/sub reader (plugins/bus/redis_pubsub.py), against a
real redis-server: publishes of one event-loop turn go as one pipeline, keep their order on every
replica, each publisher gets its own result or error, and a broker lost mid-batch answers every
publisher with an error, never a silent loss."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc

from tests.helpers import started_redis
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.redis import RedisBus
from wirehub.builtins.bus.redis_pubsub import read_pubsub
from wirehub.bus import Backend, BusUnavailable, PublishOutcomeUnknown
from wirehub.testing import Recorder, unique_room

pytestmark = pytest.mark.timeout(60)

Started = Callable[..., Awaitable[tuple[Backend, Recorder]]]


@pytest.fixture
async def started(redis_server_factory: Callable[..., BrokerProcess]) -> AsyncIterator[tuple[BrokerProcess, Started]]:
    """A Redis of the test's own and ``await start()``: a started Redis backend (a replica) on it."""
    server = redis_server_factory()
    async with started_redis(server, f"b{uuid.uuid4().hex[:6]}") as start:
        yield server, start


def batcher_of(backend: Backend) -> Any:
    assert isinstance(backend.bus, RedisBus)
    return backend.bus._publish_batch


async def test_publishes_of_one_turn_go_as_one_pipeline_in_order_on_every_replica(
        started: tuple[BrokerProcess, Started]) -> None:
    _, start = started
    (a, ra), (b, rb) = await start(), await start()
    room = unique_room()
    for backend in (a, b):
        await backend.bus.subscribe(room)
    # two replicas publish concurrently, 20 each in one turn, history and plain publishes mixed
    jobs = [backend.bus.publish(room, f"{name}{i}".encode(), history=i % 4 != 3)
            for i in range(20) for name, backend in (("a", a), ("b", b))]
    results = await asyncio.gather(*jobs)
    for name, backend in (("a", a), ("b", b)):
        batcher = batcher_of(backend)
        assert (batcher.batches, batcher.commands) == (1, 20), name
    offsets = [r for r in results if r is not None]
    assert sorted(offsets) == list(range(1, 31))
    # each replica's publishes got offsets in the order they were made
    for name in ("a", "b"):
        mine = [r for (r, i) in zip(results, range(40), strict=True) if r is not None and ("a", "b")[i % 2] == name]
        assert mine == sorted(mine)
    got_a, got_b = await ra.wait_for(room, 40), await rb.wait_for(room, 40)
    assert got_a == got_b  # one order on every replica
    for name in (b"a", b"b"):
        assert [p for p in got_a if p.startswith(name)] == [name + str(i).encode() for i in range(20)]
    delivered = [o for r, _, o in ra.messages if r == room and o is not None]
    assert delivered == sorted(delivered) == list(range(1, 31))


async def test_one_failing_publish_in_a_batch_is_answered_to_its_publisher_only(
        started: tuple[BrokerProcess, Started]) -> None:
    server, start = started
    backend, recorder = await start()
    assert isinstance(backend.bus, RedisBus)
    good, bad = unique_room(), unique_room()
    await backend.bus.subscribe(good)
    async with aioredis.Redis(port=server.port) as raw:
        await raw.set(backend.bus.key("m", bad), "not a hash")  # the publish script's HINCRBY fails on it
    results = await asyncio.gather(backend.bus.publish(good, b"1", history=True),
                                   backend.bus.publish(bad, b"x", history=True),
                                   backend.bus.publish(good, b"2", history=True), return_exceptions=True)
    assert batcher_of(backend).batches == 1
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], rexc.ResponseError) and "WRONGTYPE" in str(results[1])
    assert await recorder.wait_for(good, 2) == [b"1", b"2"]
    assert backend.bus.healthy  # a command's error is not a broken connection
    assert await backend.bus.publish(good, b"3", history=True) == 3


async def test_a_batch_after_a_script_cache_flush_still_runs_once(started: tuple[BrokerProcess, Started]) -> None:
    server, start = started
    backend, recorder = await start()
    room = unique_room()
    await backend.bus.subscribe(room)
    async with aioredis.Redis(port=server.port) as raw:
        await raw.script_flush()  # EVALSHA answers NOSCRIPT (not run): each is run again alone
    results = await asyncio.gather(*(backend.bus.publish(room, b"%d" % i, history=True) for i in range(5)))
    assert results == [1, 2, 3, 4, 5]
    assert await recorder.wait_for(room, 5) == [b"0", b"1", b"2", b"3", b"4"]


async def test_a_broker_hung_under_a_sent_batch_gives_every_publisher_outcome_unknown(
        started: tuple[BrokerProcess, Started]) -> None:
    server, start = started
    backend, _ = await start()
    room = unique_room()
    await backend.bus.subscribe(room)
    assert await backend.bus.publish(room, b"before", history=True) == 1
    server.pause()  # the batch is written to the socket, and no answer comes
    try:
        jobs = [asyncio.ensure_future(backend.bus.publish(room, b"%d" % i, history=True)) for i in range(10)]
        await asyncio.sleep(0.2)
        assert batcher_of(backend).batches == 2 and not any(j.done() for j in jobs)
        results = await asyncio.gather(*jobs, return_exceptions=True)
        # maybe published (sent, then no answer within op_timeout): never "unavailable", never a success
        assert all(type(r) is PublishOutcomeUnknown for r in results), results
        await asyncio.wait_for(_until_down(backend), 5)
        with pytest.raises(BusUnavailable) as down:  # the bus noticed: nothing more is sent
            await backend.bus.publish(room, b"after", history=True)
        assert type(down.value) is BusUnavailable
    finally:
        server.resume()


async def test_a_broker_killed_under_a_batch_gives_every_publisher_an_error(
        started: tuple[BrokerProcess, Started]) -> None:
    server, start = started
    backend, _ = await start()
    room = unique_room()
    await backend.bus.subscribe(room)
    assert await backend.bus.publish(room, b"before", history=True) == 1
    jobs = [asyncio.ensure_future(backend.bus.publish(room, b"%d" % i, history=True)) for i in range(10)]
    await asyncio.sleep(0)  # all submitted: the batch goes after this turn
    server.kill()  # dead before the batch reaches it (the event loop waits for the kill)
    results = await asyncio.gather(*jobs, return_exceptions=True)
    assert all(isinstance(r, BusUnavailable) for r in results), results  # an error each, no silent loss
    assert batcher_of(backend).batches in (1, 2)  # sent and broken, or not sent once the bus saw it down


async def _until_down(backend: Backend) -> None:
    """Until the bus reports itself down (polled: the bus has no event for it)."""
    for _ in range(500):
        if not backend.bus.healthy:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the bus did not notice the hung broker")


async def test_a_publish_made_while_down_is_not_sent(started: tuple[BrokerProcess, Started]) -> None:
    server, start = started
    backend, _ = await start()
    bus = backend.bus
    assert isinstance(bus, RedisBus)
    room = unique_room()
    job = asyncio.ensure_future(bus.publish(room, b"x", history=True))
    await asyncio.sleep(0)  # submitted; its batch is flushed after this turn
    bus._healthy = False  # down between the submit and the flush
    with pytest.raises(BusUnavailable) as err:
        await job
    assert type(err.value) is BusUnavailable  # "not published", not "maybe"
    bus._healthy = True
    assert batcher_of(backend).batches == 0
    async with aioredis.Redis(port=server.port) as raw:
        assert await raw.exists(bus.key("m", room)) == 0


async def test_a_cancelled_publisher_s_command_is_not_sent(started: tuple[BrokerProcess, Started]) -> None:
    _, start = started
    backend, recorder = await start()
    room = unique_room()
    await backend.bus.subscribe(room)
    gone = asyncio.ensure_future(backend.bus.publish(room, b"gone", history=True))
    kept = asyncio.ensure_future(backend.bus.publish(room, b"kept", history=True))
    await asyncio.sleep(0)  # both submitted
    gone.cancel()
    assert await kept == 1
    assert await recorder.wait_for(room, 1) == [b"kept"]
    assert batcher_of(backend).commands == 1


async def test_the_reader_drains_every_buffered_message_per_socket_read(
        redis_server_factory: Callable[..., BrokerProcess]) -> None:
    server = redis_server_factory()
    async with aioredis.Redis(port=server.port) as sub, aioredis.Redis(port=server.port) as pub:
        pubsub = sub.pubsub()
        got: list[tuple[bytes, bytes]] = []
        other: list[str] = []
        done, confirmed = asyncio.Event(), asyncio.Event()

        def on_other(msg: Mapping[str, Any]) -> None:
            other.append(msg["type"])
            confirmed.set()

        def on_message(ch: bytes, data: bytes) -> None:
            got.append((ch, data))
            if len(got) == 500:
                done.set()

        await pubsub.subscribe(b"ch")
        stream = pubsub.connection._reader
        reads = 0
        real_read = stream.read

        async def counting_read(n: int) -> bytes:
            nonlocal reads
            reads += 1
            return bytes(await real_read(n))

        stream.read = counting_read
        task = asyncio.ensure_future(read_pubsub(pubsub, on_message, on_other))
        try:
            await asyncio.wait_for(confirmed.wait(), 5)
            assert other == ["subscribe"]
            confirmed.clear()
            async with pub.pipeline(transaction=False) as pipe:
                for i in range(500):
                    pipe.publish(b"ch", b"%d" % i)
                await pipe.execute()
            await asyncio.wait_for(done.wait(), 10)
            assert got == [(b"ch", b"%d" % i) for i in range(500)]
            assert reads < 50  # about 10 KiB of replies: a few reads, not one per message
            await pubsub.unsubscribe(b"ch")
            await asyncio.wait_for(confirmed.wait(), 5)
            assert other == ["subscribe", "unsubscribe"]  # and no message went the slow way
            assert b"ch" not in pubsub.channels  # redis-py's bookkeeping kept (no leak per room)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await pubsub.aclose()


async def test_the_reader_reports_a_closed_connection(redis_server_factory: Callable[..., BrokerProcess]) -> None:
    server = redis_server_factory()
    async with aioredis.Redis(port=server.port) as sub:
        pubsub = sub.pubsub()
        await pubsub.subscribe(b"ch")
        task = asyncio.ensure_future(read_pubsub(pubsub, lambda ch, data: None, lambda m: None))
        await asyncio.sleep(0.1)
        server.kill()
        with pytest.raises((ConnectionError, rexc.ConnectionError)):
            await asyncio.wait_for(task, 5)
        await pubsub.aclose()


async def test_without_hiredis_the_subscriber_reads_with_redis_py(
        started: tuple[BrokerProcess, Started], monkeypatch: pytest.MonkeyPatch) -> None:
    # redis-py parsing in Python (no hiredis reader found): the reader falls back to get_message
    from wirehub.builtins.bus import redis_pubsub

    monkeypatch.setattr(redis_pubsub, "hiredis_io", lambda conn: None)
    _, start = started
    (a, ra), (b, _) = await start(), await start()
    room = unique_room()
    await a.bus.subscribe(room)
    for i in range(5):
        await b.bus.publish(room, f"m{i}".encode(), history=True)
    await ra.wait_for(room, 5)
    assert ra.of(room) == [f"m{i}".encode() for i in range(5)]


async def _subscribed(pub: Any, channel: bytes) -> None:
    """Until the server has run a SUBSCRIBE sent on another connection: only then is a publish from ``pub``
    sure to come after its confirmation (the server may read the two sockets in either order)."""
    deadline = asyncio.get_running_loop().time() + 5
    while (await pub.pubsub_numsub(channel))[0][1] < 1:
        assert asyncio.get_running_loop().time() < deadline, f"SUBSCRIBE {channel!r} never ran"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def _reading(server: BrokerProcess, on_message: Callable[[bytes, bytes], None],
                   on_other: Callable[[Mapping[str, Any]], None]) -> AsyncIterator[tuple[Any, Any]]:
    """(subscriber pubsub on ``ch``, publisher client) with :func:`read_pubsub` running on the subscriber."""
    async with aioredis.Redis(port=server.port) as sub, aioredis.Redis(port=server.port) as pub:
        pubsub = sub.pubsub()
        await pubsub.subscribe(b"ch")
        await _subscribed(pub, b"ch")
        task = asyncio.ensure_future(read_pubsub(pubsub, on_message, on_other))
        try:
            yield pubsub, pub
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await pubsub.aclose()


async def test_channel_messages_are_dispatched_from_the_socket_callback(
        redis_server_factory: Callable[..., BrokerProcess]) -> None:
    # No Future, task step or extra loop iteration per wakeup: with groups spread over the replicas most bus
    # messages arrive alone, and that was a fixed cost of each (docs/buses.md, "The Redis bus's hot paths")
    server = redis_server_factory()
    got: list[tuple[bytes, asyncio.Task[Any] | None]] = []
    done = asyncio.Event()

    def on_message(ch: bytes, data: bytes) -> None:
        got.append((data, asyncio.current_task()))
        if len(got) == 3:
            done.set()

    async with _reading(server, on_message, lambda m: None) as (_, pub):
        await asyncio.sleep(0.05)  # the subscribe confirmation is in
        for i in range(3):
            await pub.publish(b"ch", b"m%d" % i)
        await asyncio.wait_for(done.wait(), 5)
        assert got == [(b"m0", None), (b"m1", None), (b"m2", None)]


async def test_a_confirmation_between_messages_keeps_the_connection_s_order(
        redis_server_factory: Callable[..., BrokerProcess]) -> None:
    server = redis_server_factory()
    events: list[str] = []
    done = asyncio.Event()

    def on_message(ch: bytes, data: bytes) -> None:
        events.append(data.decode())
        if data == b"last":
            done.set()

    def on_other(msg: Mapping[str, Any]) -> None:
        events.append(f"{msg['type']} {msg['channel'].decode()}")

    async with _reading(server, on_message, on_other) as (pubsub, pub):
        await asyncio.sleep(0.05)
        transport = pubsub.connection._writer.transport
        transport.pause_reading()  # what follows reaches the reader in one piece: message, confirmation, message
        await pub.publish(b"ch", b"first")
        await pubsub.subscribe(b"ch2")
        await _subscribed(pub, b"ch2")
        await pub.publish(b"ch", b"after")
        await pub.publish(b"ch2", b"last")
        await asyncio.sleep(0.05)
        transport.resume_reading()
        await asyncio.wait_for(done.wait(), 5)
        assert events == ["subscribe ch", "first", "subscribe ch2", "after", "last"]
        assert b"ch2" in pubsub.channels  # redis-py's bookkeeping saw the confirmation


async def test_a_failing_message_callback_ends_the_reader_with_its_error(
        redis_server_factory: Callable[..., BrokerProcess]) -> None:
    server = redis_server_factory()
    got: list[bytes] = []

    def on_message(ch: bytes, data: bytes) -> None:
        if data == b"boom":
            raise ValueError("boom")
        got.append(data)

    async with aioredis.Redis(port=server.port) as sub, aioredis.Redis(port=server.port) as pub:
        pubsub = sub.pubsub()
        await pubsub.subscribe(b"ch")
        task = asyncio.ensure_future(read_pubsub(pubsub, on_message, lambda m: None))
        await asyncio.sleep(0.05)
        for data in (b"a", b"boom", b"b"):
            await pub.publish(b"ch", data)
        with pytest.raises(ValueError, match="boom"):
            await asyncio.wait_for(task, 5)
        await asyncio.sleep(0.05)
        assert got == [b"a"]  # nothing after the failure reaches the callback (the bus reconnects)
        await pubsub.aclose()
