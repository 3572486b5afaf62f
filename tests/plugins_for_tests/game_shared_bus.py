"""An in-process "broker" several in-process wirehub servers share: replicas in one test process.

``bus: {plugin: shared, shared: {broker: NAME, delay: 0.01}}``. Every server naming the same
broker shares its pub/sub, history, presence and state store, like replicas on one Redis. A
publish waits a random ``0..delay`` seconds before it enters the broker (the window in which a
commit that is already stored has not been published yet, so versions can arrive out of order),
then reaches every subscribed replica in one order. :meth:`SharedBroker.outage` takes the broker
down (publishes and reads raise BusUnavailable, messages are lost, buses report unhealthy) and
:meth:`SharedBroker.restore` brings it back, optionally with the stored state wiped or rolled back.
"""

from __future__ import annotations

import asyncio
import copy
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wirehub import (
    Backend,
    BusFactory,
    BusHandler,
    BusUnavailable,
    DepartedListener,
    HistoryPage,
    PresenceCount,
    PresenceEntry,
    PresencePage,
    hookimpl,
    opt,
    parse_block,
)
from wirehub.builtins.bus.memory import MemoryHistory, MemoryPresence, MemoryStateStore


@dataclass(frozen=True)
class SharedOptions:
    broker: str = "default"
    delay: float = opt(0.0, min=0)
    seed: int = 1


class SharedBroker:
    def __init__(self, delay: float, seed: int) -> None:
        self.delay = delay
        self.rng = random.Random(seed)
        self.up = True
        self.buses: list[SharedBus] = []
        self.history = MemoryHistory(1000, 3600)
        self.presence = MemoryPresence()
        self.state = MemoryStateStore()

    def check(self) -> None:
        if not self.up:
            raise BusUnavailable("shared broker is down")

    def outage(self) -> None:
        self.up = False
        for bus in self.buses:
            bus.notify(False)

    def restore(self, *, wipe: bool = False, state: dict[str, tuple[int, Any]] | None = None) -> None:
        if wipe:
            self.state = MemoryStateStore()
        if state is not None:
            self.state._docs = copy.deepcopy(state)
        self.up = True
        for bus in self.buses:
            bus.notify(True)


BROKERS: dict[str, SharedBroker] = {}


def broker(name: str) -> SharedBroker:
    return BROKERS[name]


class SharedBus:
    def __init__(self, broker: SharedBroker) -> None:
        self.broker = broker
        self.handler: BusHandler | None = None
        self.rooms: set[str] = set()

    @property
    def healthy(self) -> bool:
        return self.handler is not None and self.broker.up

    def notify(self, healthy: bool) -> None:
        if self.handler is not None:
            self.handler.on_bus_state(healthy)

    async def start(self, handler: BusHandler) -> None:
        self.handler = handler
        self.broker.buses.append(self)

    async def close(self) -> None:
        self.handler = None
        if self in self.broker.buses:
            self.broker.buses.remove(self)

    async def publish(self, room: str, payload: bytes, *, history: bool = False) -> int | None:
        b = self.broker
        b.check()
        if b.delay:
            await asyncio.sleep(b.rng.uniform(0, b.delay))
            b.check()
        offset = b.history.append(room, payload) if history else None
        for bus in list(b.buses):
            if bus.handler is not None and room in bus.rooms:
                bus.handler.on_bus_message(room, payload, offset)
        return offset

    async def subscribe(self, room: str) -> None:
        self.broker.check()
        self.rooms.add(room)

    async def unsubscribe(self, room: str) -> None:
        self.rooms.discard(room)


class SharedHistory:
    def __init__(self, broker: SharedBroker) -> None:
        self.broker = broker

    async def read(self, room: str, after: int | None, limit: int) -> HistoryPage:
        self.broker.check()
        return await self.broker.history.read(room, after, limit)

    async def position(self, room: str) -> tuple[int, str]:
        self.broker.check()
        return await self.broker.history.position(room)


class SharedPresence:
    def __init__(self, broker: SharedBroker) -> None:
        self.broker = broker

    async def join(self, room: str, entry: PresenceEntry) -> bool:
        self.broker.check()
        return await self.broker.presence.join(room, entry)

    async def leave(self, room: str, session: str) -> str | None:
        self.broker.check()
        return await self.broker.presence.leave(room, session)

    async def members(self, room: str) -> list[PresenceEntry]:
        self.broker.check()
        return await self.broker.presence.members(room)

    async def count(self, room: str) -> PresenceCount:
        self.broker.check()
        return await self.broker.presence.count(room)

    async def page(self, room: str, after: str | None, limit: int) -> PresencePage:
        self.broker.check()
        return await self.broker.presence.page(room, after, limit)

    def on_departed(self, callback: DepartedListener) -> None:
        self.broker.presence.on_departed(callback)


class SharedState:
    def __init__(self, broker: SharedBroker) -> None:
        self.broker = broker

    async def get(self, room: str) -> tuple[int, Any] | None:
        self.broker.check()
        await asyncio.sleep(0)  # a real store answers later: let other commits interleave
        return await self.broker.state.get(room)

    async def compare_and_set(self, room: str, expected_version: int, document: Any) -> int:
        self.broker.check()
        await asyncio.sleep(0)
        return await self.broker.state.compare_and_set(room, expected_version, document)

    async def delete(self, room: str) -> None:
        self.broker.check()
        await self.broker.state.delete(room)


def create_backend(options: Mapping[str, Any], key: str) -> Backend:
    opts = parse_block(SharedOptions, options, key)
    b = BROKERS.get(opts.broker)
    if b is None:
        b = BROKERS[opts.broker] = SharedBroker(opts.delay, opts.seed)
    return Backend(bus=SharedBus(b), history=SharedHistory(b), presence=SharedPresence(b), state=SharedState(b),
                   name="shared")


@hookimpl
def wirehub_register_buses() -> Mapping[str, BusFactory]:
    return {"shared": create_backend}
