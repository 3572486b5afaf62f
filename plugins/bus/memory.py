"""The in-process backend: bus, history (ring buffer), presence and state store in one process.

For a single replica and for tests. Delivery is synchronous inside ``publish``, so the order of
publishes is the order of delivery. History is lost when the process restarts; the epoch
(new per process and per room) tells clients so.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.bus import (
    Backend,
    BusHandler,
    DepartedCallback,
    HistoryPage,
    PresenceCount,
    PresenceEntry,
    PresenceMember,
    PresencePage,
    StateConflict,
)
from service.config import opt, parse_block
from service.hookspecs import hookimpl
from service.plugins import BusFactory


@dataclass(frozen=True)
class MemoryOptions:
    #: messages kept per room, and their maximum age in seconds
    history_size: int = opt(1000, min=0)
    history_ttl: float = opt(3600.0, min=1)


class MemoryBus:
    def __init__(self, history: MemoryHistory) -> None:
        self._history = history
        self._handler: BusHandler | None = None
        self._rooms: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None

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

    async def publish(self, room: str, payload: bytes, *, history: bool = False) -> int | None:
        offset = self._history.append(room, payload) if history else None
        if self._handler is not None and room in self._rooms:
            self._handler.on_bus_message(room, payload, offset)
        return offset

    async def subscribe(self, room: str) -> None:
        self._rooms.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)


@dataclass
class _RoomLog:
    epoch: str
    top: int = 0
    touched: float = field(default_factory=time.monotonic)
    messages: deque[tuple[int, float, bytes]] = field(default_factory=deque)


class MemoryHistory:
    def __init__(self, size: int, ttl: float) -> None:
        self.size, self.ttl = size, ttl
        self._instance = uuid.uuid4().hex[:8]
        self._generation = itertools.count(1)
        self._rooms: dict[str, _RoomLog] = {}

    def _log(self, room: str) -> _RoomLog:
        log = self._rooms.get(room)
        if log is None:
            log = self._rooms[room] = _RoomLog(epoch=f"{self._instance}.{next(self._generation)}")
        log.touched = time.monotonic()
        self._trim(log)
        return log

    def _trim(self, log: _RoomLog) -> None:
        horizon = time.monotonic() - self.ttl
        while log.messages and (len(log.messages) > self.size or log.messages[0][1] < horizon):
            log.messages.popleft()

    def sweep(self) -> None:
        """Forget rooms untouched for a TTL whose messages all expired (their epoch dies too)."""
        horizon = time.monotonic() - self.ttl
        for room, log in list(self._rooms.items()):
            self._trim(log)
            if not log.messages and log.touched < horizon:
                del self._rooms[room]

    def append(self, room: str, payload: bytes) -> int:
        log = self._log(room)
        log.top += 1
        if self.size:
            log.messages.append((log.top, time.monotonic(), payload))
            self._trim(log)
        return log.top

    async def read(self, room: str, after: int | None, limit: int) -> HistoryPage:
        log = self._log(room)
        msgs = log.messages
        if after is None:
            newest = list(msgs)[-limit:] if limit > 0 else []
            return HistoryPage(log.epoch, log.top, [(o, p) for o, _, p in newest], True)
        oldest = msgs[0][0] if msgs else log.top + 1
        complete = 0 <= after <= log.top and after >= oldest - 1
        chosen = [(o, p) for o, _, p in msgs if o > after][:limit] if complete else []
        return HistoryPage(log.epoch, log.top, chosen, complete)

    async def position(self, room: str) -> tuple[int, str]:
        log = self._log(room)
        return log.top, log.epoch


class MemoryPresence:
    """One process is one replica: no replica of it can die alone, so ``on_departed`` never fires.
    count and page scan the room (O(n)); fine for a single process and tests."""

    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, PresenceEntry]] = {}
        self._departed: list[DepartedCallback] = []

    async def join(self, room: str, entry: PresenceEntry) -> bool:
        members = self._rooms.setdefault(room, {})
        first = all(e.user != entry.user for e in members.values())
        members[entry.session] = entry
        return first

    async def leave(self, room: str, session: str) -> str | None:
        members = self._rooms.get(room)
        if not members or session not in members:
            return None
        entry = members.pop(session)
        if not members:
            del self._rooms[room]
        return entry.user if all(e.user != entry.user for e in members.values()) else None

    def _users(self, room: str) -> dict[str, PresenceMember]:
        users: dict[str, PresenceMember] = {}
        for e in self._rooms.get(room, {}).values():
            known = users.get(e.user)
            users[e.user] = PresenceMember(e.user, known.connections + 1 if known else 1,
                                           known.info if known else e.info)
        return users

    async def count(self, room: str) -> PresenceCount:
        return PresenceCount(len(self._users(room)), len(self._rooms.get(room, {})))

    async def page(self, room: str, after: str | None, limit: int) -> PresencePage:
        users = self._users(room)
        ordered = sorted(u for u in users if after is None or u > after)
        chosen = ordered[:limit]
        cursor = chosen[-1] if chosen and len(ordered) > len(chosen) else None
        count = PresenceCount(len(users), len(self._rooms.get(room, {})))
        return PresencePage([users[u] for u in chosen], cursor, count)

    def on_departed(self, callback: DepartedCallback) -> None:
        self._departed.append(callback)

    async def members(self, room: str) -> list[PresenceEntry]:
        return list(self._rooms.get(room, {}).values())


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
    history = MemoryHistory(opts.history_size, opts.history_ttl)
    return Backend(
        bus=MemoryBus(history), history=history, presence=MemoryPresence(), state=MemoryStateStore(), name="memory"
    )


@hookimpl
def wirehub_register_buses() -> Mapping[str, BusFactory]:
    return {"memory": create_backend}
