"""The recent history of the rooms a NATS replica follows, kept from their live subscriptions: a read with ``since``
(the replay of a rejoin) answered from memory instead of an ephemeral JetStream consumer.

A reconnect storm's rejoins all ask for the same few seconds of one room's history. A JetStream scan per
(room, since, newest offset) cost ``nats-server`` a consumer create and delete each, and under a storm's
load such a scan missed ``op_timeout`` and failed every rejoin that shared it (``error unavailable``). The
room's subscription delivers every history message anyway: each followed room keeps its newest ones here.

A tail is exact: ``floor`` is an offset such that EVERY history message of the room with offset in
(``floor``, newest entry] is in it (offsets are consecutive in stream order and the room's
subscription delivers in stream order, its gaps filled before delivery: nats_bus). It never holds more
than the stream keeps (at most ``history_size`` entries; entries older than ``history_ttl`` are dropped
before a read), so a read from it returns what a scan would. Bounded: :data:`ROOM_MESSAGES` and
:data:`ROOM_BYTES` per room, :data:`TOTAL_BYTES` over all rooms (the least recently appended rooms' tails go first).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time

#: newest history messages kept per followed room (at most history_size)
ROOM_MESSAGES = 256
#: payload bytes kept per followed room
ROOM_BYTES = 256 * 1024
#: payload bytes kept over all rooms of a replica
TOTAL_BYTES = 64 * 1024 * 1024

Entry = tuple[int, bytes, bool, float]  # offset, payload, is run start, broker time (epoch seconds)
#: the entries of a tail that never held one: a deque costs about 760 bytes even empty, and most followed rooms
#: (a personal room, a quiet group) have no history message while followed
NONE: tuple[Entry, ...] = ()


class Tail:
    """One room's tail, tied to one subscription of the room (a new subscription starts a new tail)."""

    __slots__ = ("entries", "floor", "ready", "seq", "size", "waiters")

    def __init__(self) -> None:
        self.entries: collections.deque[Entry] | tuple[Entry, ...] = NONE
        #: every history message with offset in (floor, newest entry] is in ``entries``; -1 while empty
        self.floor = -1
        #: stream sequence of the newest history message the subscription delivered (0: none yet)
        self.seq = 0
        #: its subscription's baseline is known: every history message stored from now on comes through it
        self.ready = False
        self.size = 0
        #: reads waiting until the subscription delivered a stream sequence
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []

    def queue(self) -> collections.deque[Entry]:
        """``entries`` to change (made at the first entry)."""
        entries = self.entries
        if isinstance(entries, tuple):
            entries = self.entries = collections.deque()
        return entries

    def range(self, floor: int, top: int) -> list[Entry] | None:
        """The messages with offset in (``floor``, ``top``], or None when the tail does not hold all of them."""
        entries = self.entries
        if not entries or floor < self.floor or top > entries[-1][0]:
            return None
        first = entries[0][0]
        return list(itertools.islice(entries, floor + 1 - first, top + 1 - first))


class Tails:
    """The tails of the followed rooms of one connection."""

    def __init__(self, history_size: int, history_ttl: float) -> None:
        self.max_messages = min(ROOM_MESSAGES, history_size)
        self.ttl = history_ttl
        self._rooms: collections.OrderedDict[str, Tail] = collections.OrderedDict()
        self._size = 0

    def start(self, room: str) -> Tail | None:
        """A new subscription of ``room``: an empty tail (the old one's messages may have a gap to the new)."""
        self.drop(room)
        if not self.max_messages:
            return None
        tail = self._rooms[room] = Tail()
        return tail

    def drop(self, room: str) -> None:
        tail = self._rooms.pop(room, None)
        if tail is not None:
            self._size -= tail.size
            self._wake(tail, None)

    def clear(self) -> None:
        for room in list(self._rooms):
            self.drop(room)

    def get(self, room: str) -> Tail | None:
        return self._rooms.get(room)

    def add(self, room: str, seq: int, offset: int, payload: bytes, start: bool, at: float) -> None:
        """A history message the room's subscription delivered (in stream order)."""
        tail = self._rooms.get(room)
        if tail is None or seq <= tail.seq:
            return
        entries = tail.queue()
        if start or not entries or offset != entries[-1][0] + 1:
            # a new run, the first message, or (never expected) a jump: coverage starts here
            self._size -= tail.size
            entries.clear()
            tail.size = 0
            tail.floor = offset - 1
        entries.append((offset, payload, start, at))
        tail.seq = seq
        tail.size += len(payload)
        self._size += len(payload)
        self._bound(room, tail)
        if tail.waiters:
            self._wake(tail, seq)

    def seed(self, room: str, tail: Tail, floor: int, found: list[Entry], seq: int) -> None:
        """A scan's messages with offset in (``floor``, top], up to stream sequence ``seq``, read after ``tail``
        was :attr:`~Tail.ready` (so every later message comes through its subscription): the tail holds them too,
        and the next reads of the range need no scan (a room this replica started following in a storm)."""
        if self._rooms.get(room) is not tail or not tail.ready or not found or found[0][0] != floor + 1:
            return
        if any(b[0] != a[0] + 1 for a, b in itertools.pairwise(found)):
            return  # a gap (a message trimmed meanwhile): leave it to the scans
        entries, top = tail.entries, found[-1][0]
        if not entries and tail.seq <= seq:
            if tail.seq and tail.floor != top:
                return  # emptied by expiry: its next message must follow the seeded ones
            tail.floor, tail.seq = top, seq
        if (not entries and tail.floor == top) or (entries and floor < tail.floor <= top):
            entries = tail.queue()
            for entry in reversed(found):
                if entry[0] <= tail.floor:
                    entries.appendleft(entry)
                    tail.size += len(entry[1])
                    self._size += len(entry[1])
            tail.floor = floor
            self._bound(room, tail)

    def _bound(self, room: str, tail: Tail) -> None:
        entries = tail.entries
        while len(entries) > self.max_messages or (tail.size > ROOM_BYTES and len(entries) > 1):
            self._pop(tail)
        self._rooms.move_to_end(room)
        while self._size > TOTAL_BYTES and self._rooms:
            oldest = next(iter(self._rooms))
            self.drop(oldest)
            if oldest == room:
                break

    def expire(self, tail: Tail) -> None:
        """Drop the entries the stream no longer keeps (older than ``history_ttl``, by the broker's clock)."""
        horizon = time.time() - self.ttl
        while tail.entries and tail.entries[0][3] < horizon:
            self._pop(tail)

    def _pop(self, tail: Tail) -> None:
        offset, payload, _, _ = tail.queue().popleft()
        tail.floor = offset
        tail.size -= len(payload)
        self._size -= len(payload)

    async def reach(self, room: str, tail: Tail, seq: int, timeout: float) -> bool:
        """Wait until ``tail``'s subscription delivered stream sequence ``seq``: False when it did not within
        ``timeout`` or the tail was dropped meanwhile."""
        if tail.seq >= seq:
            return self._rooms.get(room) is tail
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        tail.waiters.append((seq, fut))
        timer = loop.call_later(timeout, _release, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if (seq, fut) in tail.waiters:  # timed out: not woken by a delivery, so not taken off by _wake
                tail.waiters.remove((seq, fut))
        return tail.seq >= seq and self._rooms.get(room) is tail

    @staticmethod
    def _wake(tail: Tail, seq: int | None) -> None:
        """Release the reads waiting for ``seq`` or less (all of them when ``seq`` is None: dropped)."""
        waiting = []
        for target, fut in tail.waiters:
            if seq is None or target <= seq:
                _release(fut)
            elif not fut.done():
                waiting.append((target, fut))
        tail.waiters = waiting


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
