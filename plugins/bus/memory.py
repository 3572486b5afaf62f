"""The in-process backend: bus, history (ring buffer), presence and state store in one process.

For a single replica and for tests. Delivery is synchronous inside ``publish``, so the order of
publishes is the order of delivery. History is lost when the process restarts; the epoch
(new per process, and per dropped room: see :class:`MemoryHistory`) tells clients so. All rooms'
history together is capped at ``history_max_bytes``.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wirehub import (
    Backend,
    BusFactory,
    BusHandler,
    DepartedListener,
    HistoryPage,
    PresenceCount,
    PresenceEntry,
    PresenceMember,
    PresencePage,
    StateConflict,
    hookimpl,
    opt,
    parse_block,
)
from wirehub.builtins.bus._roster import Departures, Roster


@dataclass(frozen=True)
class MemoryOptions:
    #: messages kept per room, and their maximum age in seconds
    history_size: int = opt(1000, min=0)
    history_ttl: float = opt(3600.0, min=1)
    #: bytes of history (all rooms) one replica keeps; over it the least recently used rooms are dropped
    history_max_bytes: int = opt(64 * 1024 * 1024, min=65536)


class MemoryBus:
    #: publish runs to its end in the caller's call: the order publishes are started in is theirs
    ordered_handoff = True

    def __init__(self, history: MemoryHistory) -> None:
        self._history = history
        self._handler: BusHandler | None = None
        self._rooms = history.subscribed  # shared: the history keeps the logs of rooms with members
        self._sweeper: asyncio.Task[None] | None = None
        #: (room, dedupe key) -> (expiry on the monotonic clock, offset), in insertion order
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    @property
    def healthy(self) -> bool:
        return self._handler is not None

    async def start(self, handler: BusHandler) -> None:
        self._handler = handler
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def close(self) -> None:
        self._handler = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _sweep(self) -> None:
        interval = min(60.0, self._history.ttl)
        while True:
            await asyncio.sleep(interval)
            self._history.sweep()

    async def publish(self, room: str, payload: bytes, *, history: bool = False, dedupe_key: str | None = None,
                      dedupe_window: float = 0.0) -> int | None:
        dedupe = history and dedupe_key is not None and dedupe_window > 0
        if dedupe:
            assert dedupe_key is not None
            seen = self._duplicate(room, dedupe_key)
            if seen is not None:
                return seen
        offset = self._history.append(room, payload) if history else None
        if dedupe and offset is not None:
            assert dedupe_key is not None
            self._seen[(room, dedupe_key)] = (time.monotonic() + dedupe_window, offset)
        if self._handler is not None and room in self._rooms:
            self._handler.on_bus_message(room, payload, offset)
        return offset

    def _duplicate(self, room: str, key: str) -> int | None:
        """The offset of an earlier publish with ``key`` still in its window; drops expired keys
        from the oldest end first, so the table holds one window of keys at most."""
        now = time.monotonic()
        seen = self._seen
        while seen:
            oldest = next(iter(seen))
            if seen[oldest][0] > now:
                break
            del seen[oldest]
        found = seen.get((room, key))
        if found is None or found[0] <= now:
            return None
        return found[1]

    async def subscribe(self, room: str) -> None:
        self._rooms.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)


#: bytes counted for a room's log besides its messages, and for each message besides its payload
ROOM_OVERHEAD = 256
MESSAGE_OVERHEAD = 64
#: rooms are spread over this many loss counters (see MemoryHistory)
_LOSS_BUCKETS = 256


@dataclass
class _RoomLog:
    epoch: str
    top: int = 0
    touched: float = field(default_factory=time.monotonic)
    messages: deque[tuple[int, float, bytes]] = field(default_factory=deque)
    nbytes: int = 0


class MemoryHistory:
    """Ring buffers per room, created by the first publish (a read of a room without one creates nothing).

    The total is capped at ``max_bytes``: over it, the least recently used rooms' logs are dropped
    (``rooms_evicted``), except those of rooms with members, whose oldest messages are trimmed
    instead. A room's epoch is ``<instance>.<bucket>.<losses>``: ``losses`` counts the logs of the
    room's bucket that were dropped (evicted, or swept after the TTL). A room without a log reports
    the epoch its next log will get, so the epoch a client reads from an empty room is the one the
    first message is published under; and a dropped room's next log has a new epoch, so a client at
    an old position gets ``recovered: false`` / ``gap``, never a silent loss.
    """

    def __init__(self, size: int, ttl: float, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.size, self.ttl, self.max_bytes = size, ttl, max_bytes
        self._instance = uuid.uuid4().hex[:8]
        self._losses = [0] * _LOSS_BUCKETS
        #: least recently used first
        self._rooms: OrderedDict[str, _RoomLog] = OrderedDict()
        #: bytes held by every log (payloads plus overheads), and logs dropped to stay under max_bytes
        self.bytes_held = 0
        self.rooms_evicted = 0
        #: rooms the bus is subscribed to (members on this replica): never dropped, only trimmed
        self.subscribed: set[str] = set()

    def _bucket(self, room: str) -> int:
        return zlib.crc32(room.encode()) % _LOSS_BUCKETS

    def _epoch(self, room: str) -> str:
        bucket = self._bucket(room)
        return f"{self._instance}.{bucket}.{self._losses[bucket]}"

    def _existing(self, room: str) -> _RoomLog | None:
        log = self._rooms.get(room)
        if log is not None:
            log.touched = time.monotonic()
            self._rooms.move_to_end(room)
            self._trim(log)
        return log

    def _trim(self, log: _RoomLog) -> None:
        horizon = time.monotonic() - self.ttl
        while log.messages and (len(log.messages) > self.size or log.messages[0][1] < horizon):
            self._drop_oldest(log)

    def _drop_oldest(self, log: _RoomLog) -> None:
        freed = len(log.messages.popleft()[2]) + MESSAGE_OVERHEAD
        log.nbytes -= freed
        self.bytes_held -= freed

    def _forget(self, room: str) -> None:
        log = self._rooms.pop(room)
        self.bytes_held -= log.nbytes
        self._losses[self._bucket(room)] += 1

    def sweep(self) -> None:
        """Forget rooms untouched for a TTL whose messages all expired (their epoch dies too)."""
        horizon = time.monotonic() - self.ttl
        for room, log in list(self._rooms.items()):
            self._trim(log)
            if not log.messages and log.touched < horizon and room not in self.subscribed:
                self._forget(room)

    def _fit(self, keep: str) -> None:
        """Get under max_bytes: drop the least recently used logs of rooms without members here (not
        ``keep``); if that is not enough, the oldest messages of the least recently used rooms (a
        trim: offsets and epoch stay, so live members never see an offset twice)."""
        excess = self.bytes_held - self.max_bytes
        if excess <= 0:
            return
        victims = []
        for room, log in self._rooms.items():
            if excess <= 0:
                break
            if room != keep and room not in self.subscribed:
                victims.append(room)
                excess -= log.nbytes
        for room in victims:
            self._forget(room)
        self.rooms_evicted += len(victims)
        for log in self._rooms.values():
            while self.bytes_held > self.max_bytes and log.messages:
                self._drop_oldest(log)
            if self.bytes_held <= self.max_bytes:
                return

    def append(self, room: str, payload: bytes) -> int:
        log = self._existing(room)
        if log is None:
            log = self._rooms[room] = _RoomLog(epoch=self._epoch(room), nbytes=ROOM_OVERHEAD + len(room))
            self.bytes_held += log.nbytes
        log.top += 1
        if self.size:
            log.messages.append((log.top, time.monotonic(), payload))
            added = len(payload) + MESSAGE_OVERHEAD
            log.nbytes += added
            self.bytes_held += added
            self._trim(log)
        self._fit(room)
        return log.top

    async def read(self, room: str, after: int | None, limit: int) -> HistoryPage:
        log = self._existing(room)
        if log is None:  # nothing was published (or it was dropped): an empty page, and no new log
            return HistoryPage(self._epoch(room), 0, [], after is None or after == 0)
        msgs = log.messages
        if after is None:
            newest = list(msgs)[-limit:] if limit > 0 else []
            return HistoryPage(log.epoch, log.top, [(o, p) for o, _, p in newest], True)
        oldest = msgs[0][0] if msgs else log.top + 1
        complete = 0 <= after <= log.top and after >= oldest - 1
        chosen = [(o, p) for o, _, p in msgs if o > after][:limit] if complete else []
        return HistoryPage(log.epoch, log.top, chosen, complete)

    async def position(self, room: str) -> tuple[int, str]:
        log = self._existing(room)
        return (log.top, log.epoch) if log is not None else (0, self._epoch(room))


class MemoryPresence:
    """One :class:`~wirehub.builtins.bus._roster.Roster` per room; one process, so no replica can die and
    ``on_departed`` listeners are never called. A room's roster goes with its last connection."""

    def __init__(self) -> None:
        self._rooms: dict[str, Roster] = {}
        self._departures = Departures()

    async def join(self, room: str, entry: PresenceEntry) -> bool:
        return self.join_now(room, entry)

    def join_now(self, room: str, entry: PresenceEntry) -> bool:
        """:meth:`join` without a coroutine: nothing here waits."""
        roster = self._rooms.get(room)
        if roster is None:
            roster = self._rooms[room] = Roster()
        return roster.add(entry)

    def head_now(self, room: str, limit: int) -> tuple[Sequence[PresenceMember], str | None, int, int]:
        """The first page without a coroutine or a :class:`PresencePage`: ``(members, cursor, users,
        connections)``, what :meth:`page` ``(room, None, limit)`` says; the members are the same list while
        they hold (the chat endpoint then reuses its encoding). With ``limit`` 0 the count alone, as
        :meth:`count` says it (``[]``, None, users, connections), the roster's first page left as it is."""
        roster = self._rooms.get(room)
        if roster is None:
            return [], None, 0, 0
        if limit <= 0:
            return [], None, roster.users(), len(roster)
        members, cursor = roster.head(limit)
        return members, cursor, roster.users(), len(roster)

    async def leave(self, room: str, session: str) -> str | None:
        roster = self._rooms.get(room)
        if roster is None:
            return None
        user = roster.remove(session)
        if not roster:
            del self._rooms[room]
        return user

    async def count(self, room: str) -> PresenceCount:
        roster = self._rooms.get(room)
        return roster.count() if roster is not None else PresenceCount()

    async def page(self, room: str, after: str | None, limit: int) -> PresencePage:
        roster = self._rooms.get(room)
        return roster.page(after, limit) if roster is not None else PresencePage([], None, PresenceCount())

    async def lookup(self, room: str, users: Sequence[str]) -> PresencePage:
        roster = self._rooms.get(room)
        if roster is None:
            return PresencePage([], None, PresenceCount())
        return PresencePage(roster.lookup(users), None, roster.count())

    def on_departed(self, callback: DepartedListener) -> None:
        self._departures.add(callback)

    def on_restored(self, callback: DepartedListener) -> None:
        """Never called: one process, whose entries no replica removes."""

    async def members(self, room: str) -> list[PresenceEntry]:
        roster = self._rooms.get(room)
        return roster.entries() if roster is not None else []

    async def stored_keys(self, room: str) -> list[str]:
        """What this store holds for ``room`` (diagnostics, tests): the room itself, or nothing."""
        return [room] if room in self._rooms else []


class MemoryStateStore:
    def __init__(self) -> None:
        self._docs: dict[str, tuple[int, Any]] = {}

    async def get(self, room: str) -> tuple[int, Any] | None:
        found = self._docs.get(room)
        return (found[0], copy.deepcopy(found[1])) if found else None

    async def compare_and_set(self, room: str, expected_version: int, document: Any) -> int:
        current = self._docs.get(room, (0, None))[0]
        if current != expected_version:
            raise StateConflict(f"room {room!r} is at version {current}, not {expected_version}")
        self._docs[room] = (current + 1, copy.deepcopy(document))
        return current + 1

    async def delete(self, room: str) -> None:
        self._docs.pop(room, None)


def create_backend(options: Mapping[str, Any], key: str) -> Backend:
    opts = parse_block(MemoryOptions, options, key)
    history = MemoryHistory(opts.history_size, opts.history_ttl, opts.history_max_bytes)
    return Backend(
        bus=MemoryBus(history), history=history, presence=MemoryPresence(), state=MemoryStateStore(), name="memory"
    )


@hookimpl
def wirehub_register_buses() -> Mapping[str, BusFactory]:
    return {"memory": create_backend}
