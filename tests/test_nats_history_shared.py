"""NATS history reads with the same (room, since, newest offset) share one scan (one ephemeral consumer), as
the rejoins of a reconnect storm do, against a real nats-server: every reader gets the whole, exact range,
and a reader that goes away does not take the scan from the others."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers import bus_options
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.nats import create_backend
from wirehub.builtins.bus.nats_history import NatsHistory
from wirehub.bus import Backend
from wirehub.testing import Recorder, unique_room


@pytest.fixture
async def backend(nats_server: BrokerProcess) -> AsyncIterator[Backend]:
    made = create_backend(bus_options("nats", nats_server, f"hs{uuid.uuid4().hex[:6]}"), "bus.nats")
    await made.bus.start(Recorder())
    yield made
    await made.bus.close()


def consumers_made(history: NatsHistory, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the scans' ephemeral consumers (``js.subscribe`` calls of the history reads)."""
    bus: Any = history.bus
    made: list[int] = []
    subscribe = bus.js.subscribe

    async def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return await subscribe(*args, **kwargs)

    monkeypatch.setattr(bus.js, "subscribe", counting)
    return made


async def test_reads_of_the_same_range_share_one_scan(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    room = unique_room()
    offsets = [await backend.bus.publish(room, b"m%d" % i, history=True) for i in range(30)]
    assert isinstance(backend.history, NatsHistory)
    made = consumers_made(backend.history, monkeypatch)
    since = offsets[9]
    pages = await asyncio.gather(*(backend.history.read(room, since, 100) for _ in range(50)))
    assert len(made) == 1  # one consumer for 50 readers
    for page in pages:
        assert page.complete and page.top == offsets[-1]
        assert [o for o, _ in page.messages] == offsets[10:]
        assert [p for _, p in page.messages] == [b"m%d" % i for i in range(10, 30)]
    # another range (or the same one later, once the scan is done) is a scan of its own
    await backend.history.read(room, offsets[19], 100)
    await backend.history.read(room, since, 100)
    assert len(made) == 3


async def test_a_reader_that_goes_away_leaves_the_scan_to_the_others(backend: Backend) -> None:
    room = unique_room()
    offsets = [await backend.bus.publish(room, b"m%d" % i, history=True) for i in range(5)]
    readers = [asyncio.ensure_future(backend.history.read(room, offsets[0], 100)) for _ in range(3)]
    await asyncio.sleep(0)
    readers[0].cancel()
    done = await asyncio.gather(*readers, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError)
    for page in done[1:]:
        assert not isinstance(page, BaseException) and [o for o, _ in page.messages] == offsets[1:]
