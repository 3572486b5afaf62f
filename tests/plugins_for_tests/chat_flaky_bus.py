"""A bus ``flaky`` for the chat tests: the memory backend with a switch and an optional delay.

``bus.down = True`` makes every bus, history and presence call raise BusUnavailable and tells the
hub (``on_bus_state(False)``); ``bus.set_down(False)`` brings it back (the hub then repairs its
rooms from history). ``bus.delay`` > 0 makes subscribe and history calls yield to the event loop
for that many seconds, so that publishes interleave with a join (the gap-free recovery tests).
``bus.inner`` is the memory bus: publishing through it while "down" stands for another replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from wirehub import (
    Backend,
    BusHandler,
    BusUnavailable,
    DepartedListener,
    HistoryPage,
    PresenceCount,
    PresenceEntry,
    PresencePage,
    hookimpl,
)
from wirehub.builtins.bus.memory import MemoryBus, MemoryHistory, MemoryPresence, create_backend


class FlakyBus:
    def __init__(self, inner: MemoryBus) -> None:
        self.inner = inner
        self.down = False
        self.delay = 0.0
        self._handler: BusHandler | None = None

    @property
    def healthy(self) -> bool:
        return not self.down and self.inner.healthy

    def check(self) -> None:
        if self.down:
            raise BusUnavailable("flaky bus is down")

    async def pause(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)

    def set_down(self, down: bool) -> None:
        self.down = down
        if self._handler is not None:
            self._handler.on_bus_state(not down)

    async def start(self, handler: BusHandler) -> None:
        self._handler = handler
        await self.inner.start(handler)

    async def close(self) -> None:
        await self.inner.close()

    async def publish(self, room: str, payload: bytes, *, history: bool = False) -> int | None:
        self.check()
        return await self.inner.publish(room, payload, history=history)

    async def subscribe(self, room: str) -> None:
        self.check()
        await self.pause()
        await self.inner.subscribe(room)

    async def unsubscribe(self, room: str) -> None:
        self.check()
        await self.inner.unsubscribe(room)


class FlakyHistory:
    def __init__(self, inner: MemoryHistory, bus: FlakyBus) -> None:
        self.inner, self.bus = inner, bus

    async def read(self, room: str, after: int | None, limit: int) -> HistoryPage:
        self.bus.check()
        await self.bus.pause()
        return await self.inner.read(room, after, limit)

    async def position(self, room: str) -> tuple[int, str]:
        self.bus.check()
        await self.bus.pause()
        return await self.inner.position(room)


class FlakyPresence:
    def __init__(self, inner: MemoryPresence, bus: FlakyBus) -> None:
        self.inner, self.bus = inner, bus

    async def join(self, room: str, entry: PresenceEntry) -> bool:
        self.bus.check()
        return await self.inner.join(room, entry)

    async def leave(self, room: str, session: str) -> str | None:
        self.bus.check()
        return await self.inner.leave(room, session)

    async def members(self, room: str) -> list[PresenceEntry]:
        self.bus.check()
        return await self.inner.members(room)

    async def count(self, room: str) -> PresenceCount:
        self.bus.check()
        return await self.inner.count(room)

    async def page(self, room: str, after: str | None, limit: int) -> PresencePage:
        self.bus.check()
        return await self.inner.page(room, after, limit)

    def on_departed(self, callback: DepartedListener) -> None:
        self.inner.on_departed(callback)


def _factory(options: Mapping[str, Any], key: str) -> Backend:
    memory = create_backend(options, key)
    assert isinstance(memory.bus, MemoryBus)
    assert isinstance(memory.history, MemoryHistory) and isinstance(memory.presence, MemoryPresence)
    bus = FlakyBus(memory.bus)
    return Backend(
        bus=bus,
        history=FlakyHistory(memory.history, bus),
        presence=FlakyPresence(memory.presence, bus),
        state=memory.state,
        name="flaky",
    )


@hookimpl
def wirehub_register_buses() -> Mapping[str, Any]:
    return {"flaky": _factory}
