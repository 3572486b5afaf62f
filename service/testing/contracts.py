"""Contract suites every bus backend keeps: :class:`BusContract`, :class:`HistoryContract`,
:class:`StateStoreContract` (presence: :mod:`wirehub.testing.presence_contracts`). Import them from
:mod:`wirehub.testing`; docs/plugins.md describes the fixtures each one takes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from wirehub.bus import Backend, BusHandler, StateConflict
from wirehub.testing.helpers import unique_room


class Recorder(BusHandler):
    """A BusHandler that records what the bus pushes."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, int | None]] = []
        self.states: list[bool] = []
        self._event = asyncio.Event()

    def on_bus_message(self, room: str, payload: bytes, offset: int | None) -> None:
        self.messages.append((room, payload, offset))
        self._event.set()

    def on_bus_state(self, healthy: bool) -> None:
        self.states.append(healthy)

    def of(self, room: str) -> list[bytes]:
        return [p for r, p, _ in self.messages if r == room]

    async def wait_for(self, room: str, count: int, timeout: float = 5.0) -> list[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.of(room)) < count:
            self._event.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"got {len(self.of(room))} of {count} messages in {room}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), remaining)
        return self.of(room)


BackendPair = tuple[tuple[Backend, Recorder], tuple[Backend, Recorder]]


class BusContract:
    """Every bus keeps these. Provide ``backend_pair``: two started backends on one broker, each
    with its Recorder (two replicas); for the memory bus both may be the same backend."""

    async def test_publish_reaches_subscribers_on_every_replica(self, backend_pair: BackendPair) -> None:
        (a, ra), (b, rb) = backend_pair
        room = unique_room()
        await a.bus.subscribe(room)
        await b.bus.subscribe(room)
        await a.bus.publish(room, b"hello")
        assert await ra.wait_for(room, 1) == [b"hello"]
        assert await rb.wait_for(room, 1) == [b"hello"]

    async def test_one_order_per_room_for_every_replica(self, backend_pair: BackendPair) -> None:
        (a, ra), (b, rb) = backend_pair
        room = unique_room()
        await a.bus.subscribe(room)
        await b.bus.subscribe(room)
        sent = [f"m{i}".encode() for i in range(50)]
        await asyncio.gather(*(
            (a if i % 2 else b).bus.publish(room, payload, history=True) for i, payload in enumerate(sent)
        ))
        got_a, got_b = await ra.wait_for(room, 50), await rb.wait_for(room, 50)
        assert got_a == got_b
        assert sorted(got_a) == sorted(sent)
        offsets = [o for r, _, o in ra.messages if r == room and o is not None]
        assert offsets == sorted(offsets) and len(set(offsets)) == 50

    async def test_history_offsets_follow_publish_order(self, backend_pair: BackendPair) -> None:
        (a, ra), _ = backend_pair
        room = unique_room()
        await a.bus.subscribe(room)
        first = await a.bus.publish(room, b"1", history=True)
        second = await a.bus.publish(room, b"2", history=True)
        plain = await a.bus.publish(room, b"3")
        assert isinstance(first, int) and isinstance(second, int) and second > first
        assert plain is None
        await ra.wait_for(room, 3)
        assert [(p, o) for r, p, o in ra.messages if r == room] == [(b"1", first), (b"2", second), (b"3", None)]

    async def test_unsubscribed_rooms_are_not_delivered(self, backend_pair: BackendPair) -> None:
        (a, ra), (b, _) = backend_pair
        room, other = unique_room(), unique_room()
        await a.bus.subscribe(room)
        await a.bus.subscribe(other)
        await a.bus.unsubscribe(other)
        await b.bus.publish(other, b"nobody")
        await b.bus.publish(room, b"somebody")
        await ra.wait_for(room, 1)
        await asyncio.sleep(0.1)
        assert ra.of(other) == []

    async def test_healthy_while_connected(self, backend_pair: BackendPair) -> None:
        (a, _), _ = backend_pair
        assert a.bus.healthy is True

    async def test_a_dedupe_key_is_published_once_across_replicas(self, backend_pair: BackendPair) -> None:
        (a, ra), (b, rb) = backend_pair
        room, other = unique_room(), unique_room()
        for bus in (a.bus, b.bus):
            await bus.subscribe(room)
            await bus.subscribe(other)
        first = await a.bus.publish(room, b"once", history=True, dedupe_key="k-1", dedupe_window=60)
        # the retry, on the other replica and on the same one: the first offset, nothing delivered
        assert await b.bus.publish(room, b"once", history=True, dedupe_key="k-1", dedupe_window=60) == first
        assert await a.bus.publish(room, b"once", history=True, dedupe_key="k-1", dedupe_window=60) == first
        # keys are per room, and other keys (or none) publish as usual
        elsewhere = await b.bus.publish(other, b"same key", history=True, dedupe_key="k-1", dedupe_window=60)
        second = await b.bus.publish(room, b"twice", history=True, dedupe_key="k-2", dedupe_window=60)
        third = await a.bus.publish(room, b"plain", history=True)
        assert isinstance(first, int) and isinstance(second, int) and isinstance(third, int)
        assert first < second < third and isinstance(elsewhere, int)
        for rec in (ra, rb):
            assert await rec.wait_for(room, 3) == [b"once", b"twice", b"plain"]
            assert await rec.wait_for(other, 1) == [b"same key"]
        await asyncio.sleep(0.1)
        assert ra.of(room) == [b"once", b"twice", b"plain"] and rb.of(room) == ra.of(room)
        page = await a.history.read(room, None, 10)
        assert [p for _, p in page.messages] == [b"once", b"twice", b"plain"]

    async def test_concurrent_publishes_with_one_dedupe_key_store_one(self, backend_pair: BackendPair) -> None:
        (a, ra), (b, _) = backend_pair
        room = unique_room()
        await a.bus.subscribe(room)
        offsets = await asyncio.gather(*(
            (a if i % 2 else b).bus.publish(room, b"racing", history=True, dedupe_key="same", dedupe_window=60)
            for i in range(10)
        ))
        assert len(set(offsets)) == 1 and isinstance(offsets[0], int)
        await ra.wait_for(room, 1)
        await asyncio.sleep(0.1)
        assert ra.of(room) == [b"racing"]


#: ``footprint()``: what the backend stores (broker keys, stream subjects, in-memory logs), as a sorted
#: list of names; equal before and after operations that must store nothing.
Footprint = Callable[[], Awaitable[list[str]]]


class HistoryContract:
    """Provide ``backend``: a started Backend, and ``footprint`` (see :data:`Footprint`). History is
    bounded and epoch-tagged."""

    async def test_read_after_an_offset_returns_the_rest_in_order(self, backend: Backend) -> None:
        room = unique_room()
        offsets = [await backend.bus.publish(room, f"m{i}".encode(), history=True) for i in range(5)]
        page = await backend.history.read(room, offsets[1], 100)
        assert page.complete
        assert [p for _, p in page.messages] == [b"m2", b"m3", b"m4"]
        assert [o for o, _ in page.messages] == offsets[2:]
        assert page.top == offsets[-1]

    async def test_read_without_after_returns_the_newest(self, backend: Backend) -> None:
        room = unique_room()
        for i in range(5):
            await backend.bus.publish(room, f"m{i}".encode(), history=True)
        page = await backend.history.read(room, None, 2)
        assert page.complete and [p for _, p in page.messages] == [b"m3", b"m4"]

    async def test_limit_bounds_the_page(self, backend: Backend) -> None:
        room = unique_room()
        first = await backend.bus.publish(room, b"a", history=True)
        for i in range(5):
            await backend.bus.publish(room, f"m{i}".encode(), history=True)
        page = await backend.history.read(room, first, 2)
        assert page.complete and [p for _, p in page.messages] == [b"m0", b"m1"]

    async def test_position_of_a_new_room_is_zero_with_a_stable_epoch(self, backend: Backend) -> None:
        room = unique_room()
        top, epoch = await backend.history.position(room)
        assert top == 0 and isinstance(epoch, str) and epoch
        offset = await backend.bus.publish(room, b"x", history=True)
        top2, epoch2 = await backend.history.position(room)
        assert (top2, epoch2) == (offset, epoch)
        page = await backend.history.read(room, 0, 10)
        assert page.complete and page.epoch == epoch and [p for _, p in page.messages] == [b"x"]

    async def test_an_offset_beyond_the_top_is_not_recoverable(self, backend: Backend) -> None:
        room = unique_room()
        await backend.bus.publish(room, b"x", history=True)
        page = await backend.history.read(room, 10_000, 10)
        assert page.complete is False and page.messages == []

    async def test_up_to_date_is_complete_and_empty(self, backend: Backend) -> None:
        room = unique_room()
        offset = await backend.bus.publish(room, b"x", history=True)
        page = await backend.history.read(room, offset, 10)
        assert page.complete is True and list(page.messages) == []

    async def test_trimmed_history_is_not_recoverable(self, small_history_backend: Backend) -> None:
        """``small_history_backend`` keeps at most 3 messages per room."""
        backend = small_history_backend
        room = unique_room()
        offsets = [await backend.bus.publish(room, f"m{i}".encode(), history=True) for i in range(10)]
        page = await backend.history.read(room, offsets[1], 100)
        assert page.complete is False
        recent = await backend.history.read(room, offsets[6], 100)
        assert recent.complete and [p for _, p in recent.messages] == [b"m7", b"m8", b"m9"]

    async def test_trimming_keeps_the_position(self, small_history_backend: Backend) -> None:
        """Chat clients store (offset, epoch): trimming must neither reuse offsets nor change the epoch."""
        backend = small_history_backend
        room = unique_room()
        _, epoch = await backend.history.position(room)
        offsets = [await backend.bus.publish(room, f"m{i}".encode(), history=True) for i in range(10)]
        assert await backend.history.position(room) == (offsets[-1], epoch)
        newest = await backend.history.read(room, None, 100)
        assert newest.epoch == epoch and newest.top == offsets[-1]
        assert [(o, p) for o, p in newest.messages] == [(offsets[i], f"m{i}".encode()) for i in (7, 8, 9)]
        after = await backend.bus.publish(room, b"m10", history=True)
        assert isinstance(after, int) and after > offsets[-1]


    async def test_reading_an_unknown_room_creates_nothing(self, backend: Backend, footprint: Footprint) -> None:
        """A client can name any number of rooms: reading one without messages must store nothing
        (no key, log or stream entry), yet report a stable epoch, the one its first message gets."""
        before = await footprint()
        rooms = [unique_room("unread") for _ in range(20)]
        epochs = {}
        for room in rooms:
            top, epoch = await backend.history.position(room)
            newest = await backend.history.read(room, None, 10)
            from_zero = await backend.history.read(room, 0, 10)
            beyond = await backend.history.read(room, 5, 10)
            assert (top, newest.top, from_zero.top) == (0, 0, 0) and epoch
            assert newest.complete and from_zero.complete and not beyond.complete
            assert newest.messages == [] and from_zero.messages == [] and beyond.messages == []
            assert newest.epoch == from_zero.epoch == beyond.epoch == epoch
            assert await backend.history.position(room) == (0, epoch)
            epochs[room] = epoch
        assert await footprint() == before
        room = rooms[0]
        offset = await backend.bus.publish(room, b"first", history=True)
        page = await backend.history.read(room, 0, 10)  # a client that joined the empty room recovers
        assert page.epoch == epochs[room] and page.complete and page.messages == [(offset, b"first")]


class StateStoreContract:
    """Provide ``backend``. Compare-and-set never loses a write."""

    async def test_versions_start_at_one_and_increase(self, backend: Backend) -> None:
        room = unique_room()
        assert await backend.state.get(room) is None
        assert await backend.state.compare_and_set(room, 0, {"a": 1}) == 1
        assert await backend.state.get(room) == (1, {"a": 1})
        assert await backend.state.compare_and_set(room, 1, {"a": 2}) == 2
        assert await backend.state.get(room) == (2, {"a": 2})

    async def test_a_stale_version_conflicts_and_changes_nothing(self, backend: Backend) -> None:
        room = unique_room()
        await backend.state.compare_and_set(room, 0, {"n": 0})
        with pytest.raises(StateConflict):
            await backend.state.compare_and_set(room, 0, {"n": 99})
        assert await backend.state.get(room) == (1, {"n": 0})

    async def test_concurrent_increments_lose_nothing(self, backend: Backend) -> None:
        room = unique_room()
        await backend.state.compare_and_set(room, 0, {"n": 0})

        async def increment() -> None:
            while True:
                found = await backend.state.get(room)
                assert found is not None
                version, doc = found
                try:
                    await backend.state.compare_and_set(room, version, {"n": doc["n"] + 1})
                    return
                except StateConflict:
                    await asyncio.sleep(0)

        await asyncio.gather(*(increment() for _ in range(20)))
        assert await backend.state.get(room) == (21, {"n": 20})

    async def test_returned_documents_are_copies(self, backend: Backend) -> None:
        room = unique_room()
        doc = {"list": [1]}
        await backend.state.compare_and_set(room, 0, doc)
        doc["list"].append(2)
        found = await backend.state.get(room)
        assert found is not None and found[1] == {"list": [1]}

    async def test_delete_forgets_the_room(self, backend: Backend) -> None:
        room = unique_room()
        await backend.state.compare_and_set(room, 0, {"x": 1})
        await backend.state.delete(room)
        assert await backend.state.get(room) is None


async def memory_footprint(backend: Backend) -> list[str]:
    """The :data:`Footprint` of a backend whose history and presence are the built-in memory ones
    (:func:`wirehub.memory_backend`, or a bus plugin wrapping it): the rooms with a log or a roster."""
    from wirehub.builtins.bus.memory import MemoryHistory, MemoryPresence

    history, presence = backend.history, backend.presence
    assert isinstance(history, MemoryHistory) and isinstance(presence, MemoryPresence), backend
    return sorted([f"h:{r}" for r in history._rooms] + [f"p:{r}" for r in presence._rooms])
