"""NATS history reads of a room the replica follows come from the room's tail (its consumer's newest history
messages, plugins/bus/nats_tail.py), as a reconnect storm's rejoins with ``since`` do: no ephemeral JetStream
consumer, one direct get per loop iteration, exactly the range a scan returns, against a real nats-server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.helpers import bus_options
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.nats import create_backend
from wirehub.bus import Backend
from wirehub.testing import Recorder, unique_room

Make = Callable[..., Any]


@pytest.fixture
async def make(nats_server: BrokerProcess) -> AsyncIterator[Make]:
    """Backends on one nats-server; those made with the same ``prefix`` share stream and buckets."""
    made: list[Backend] = []

    async def factory(prefix: str, **extra: Any) -> Backend:
        backend = create_backend(bus_options("nats", nats_server, prefix, **extra), "bus.nats")
        await backend.bus.start(Recorder())
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        await backend.bus.close()


def count_calls(obj: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = getattr(obj, name)

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counting)
    return calls


async def test_many_concurrent_rejoins_read_the_followed_room_without_a_consumer(
        make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = await make(f"tl{uuid.uuid4().hex[:6]}")
    bus: Any = backend.bus
    room = unique_room()
    await bus.subscribe(room)
    offsets = [await bus.publish(room, b"m%d" % i, history=True) for i in range(40)]
    scans = count_calls(bus.js, "subscribe", monkeypatch)  # a scan is an ephemeral consumer
    gets = count_calls(bus.acks, "get", monkeypatch)
    # the members of a killed replica all saw offsets[9]; some rejoin later (a few more published meanwhile)
    first = await asyncio.gather(*(backend.history.read(room, offsets[9], 100) for _ in range(2000)))
    offsets.append(await bus.publish(room, b"m40", history=True))
    second = await asyncio.gather(*(backend.history.read(room, offsets[9], 100) for _ in range(2000)))
    assert scans == []
    assert len(gets) == 2  # one direct get per loop iteration's reads
    for pages, n in ((first, 40), (second, 41)):
        for page in pages:
            assert page.complete and page.top == offsets[n - 1] and page.epoch == bus.epoch
            assert page.messages == [(offsets[i], b"m%d" % i) for i in range(10, n)]
    # a page of the newest (no since) and a short limit come from the tail too
    newest = await backend.history.read(room, None, 5)
    assert newest.complete and newest.messages == [(offsets[i], b"m%d" % i) for i in range(36, 41)]
    short = await backend.history.read(room, offsets[9], 3)
    assert short.complete and short.messages == [(offsets[i], b"m%d" % i) for i in range(10, 13)]
    assert scans == []


async def test_a_message_acknowledged_on_another_replica_before_the_read_is_in_it(make: Make) -> None:
    prefix = f"tl{uuid.uuid4().hex[:6]}"
    reader, writer = await make(prefix), await make(prefix)
    room = unique_room()
    await reader.bus.subscribe(room)
    first = await writer.bus.publish(room, b"a", history=True)
    for i in range(20):  # the read does not return before the reader's consumer delivered what it must hold
        offset = await writer.bus.publish(room, b"b%d" % i, history=True)
        page = await reader.history.read(room, first, 100)
        assert page.complete and page.top == offset and page.messages[-1] == (offset, b"b%d" % i)
        assert len(page.messages) == i + 1


async def test_a_range_older_than_the_tail_is_scanned_once(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """A room this replica starts following in a storm: its consumer delivers only what comes after the
    subscribe, so the first read of an older range is a scan; the scan seeds the tail, and the next reads of
    it (and of anything newer) come from memory."""
    backend = await make(f"tl{uuid.uuid4().hex[:6]}")
    bus: Any = backend.bus
    room = unique_room()
    before = [await bus.publish(room, b"o%d" % i, history=True) for i in range(10)]
    await bus.subscribe(room)
    scans = count_calls(bus.js, "subscribe", monkeypatch)
    page = await backend.history.read(room, before[4], 100)  # nothing delivered yet: a scan
    assert page.complete and page.messages == [(before[i], b"o%d" % i) for i in range(5, 10)]
    assert len(scans) == 1
    pages = await asyncio.gather(*(backend.history.read(room, before[i], 100) for i in (4, 6, 9)))
    assert [p.messages for p in pages] == [[(before[i], b"o%d" % i) for i in range(j + 1, 10)] for j in (4, 6, 9)]
    assert len(scans) == 1
    after = [await bus.publish(room, b"n%d" % i, history=True) for i in range(5)]
    page = await backend.history.read(room, before[7], 100)
    assert page.complete and [o for o, _ in page.messages] == before[8:] + after
    assert len(scans) == 1
    page = await backend.history.read(room, before[2], 100)  # older than the seeded range: a scan
    assert page.complete and [o for o, _ in page.messages] == before[3:] + after
    assert len(scans) == 2
    page = await backend.history.read(room, before[3], 100)  # seeded by the last one
    assert page.complete and [o for o, _ in page.messages] == before[4:] + after
    assert len(scans) == 2


async def test_the_tail_holds_no_more_than_the_stream(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = await make(f"tl{uuid.uuid4().hex[:6]}", history_size=20)
    bus: Any = backend.bus
    room = unique_room()
    await bus.subscribe(room)
    offsets = [await bus.publish(room, b"m%d" % i, history=True) for i in range(30)]
    scans = count_calls(bus.js, "subscribe", monkeypatch)
    page = await backend.history.read(room, offsets[15], 100)
    assert page.complete and [o for o, _ in page.messages] == offsets[16:]
    assert scans == []
    # trimmed from the stream: not recoverable, from the tail or the scan alike
    page = await backend.history.read(room, offsets[5], 100)
    assert not page.complete and page.messages == []


async def test_after_unsubscribe_and_resubscribe_the_tail_starts_again(
        make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = await make(f"tl{uuid.uuid4().hex[:6]}")
    bus: Any = backend.bus
    room = unique_room()
    await bus.subscribe(room)
    offsets = [await bus.publish(room, b"m%d" % i, history=True) for i in range(5)]
    await bus.unsubscribe(room)
    offsets += [await bus.publish(room, b"m%d" % i, history=True) for i in range(5, 8)]  # nobody follows
    await bus.subscribe(room)
    offsets += [await bus.publish(room, b"m%d" % i, history=True) for i in range(8, 10)]
    page = await backend.history.read(room, offsets[1], 100)  # the gap while unsubscribed: read by a scan
    assert page.complete and page.messages == [(offsets[i], b"m%d" % i) for i in range(2, 10)]


async def test_messages_past_history_ttl_are_not_recovered_from_the_tail(make: Make) -> None:
    backend = await make(f"tl{uuid.uuid4().hex[:6]}", history_ttl=1)
    bus: Any = backend.bus
    room = unique_room()
    await bus.subscribe(room)
    offsets = [await bus.publish(room, b"m%d" % i, history=True) for i in range(3)]
    await asyncio.sleep(2.0)  # the stream dropped them (max_age): the tail must not hand them out
    offsets.append(await bus.publish(room, b"m3", history=True))
    page = await backend.history.read(room, offsets[0], 100)
    assert not page.complete and page.messages == []
    page = await backend.history.read(room, offsets[2], 100)
    assert page.complete and page.messages == [(offsets[3], b"m3")]
