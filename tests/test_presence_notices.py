"""The truncated notices of ``each`` rooms (``StaleNotices``), against a fake hub: a dead replica's departures
are followed by one even when the bus fails on the way, many rooms are read NOTICE_BATCH at a time (also when
they are tried again once the bus is back), and a closing replica gives pending notices one try."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import pytest

from wirehub import BusUnavailable, PresenceCount, PresencePage
from wirehub.builtins.bus.memory import MemoryPresence
from wirehub.builtins.handlers import chat_events
from wirehub.builtins.handlers.chat_presence import ChatPresence, PresenceRules


class Hub:
    def __init__(self) -> None:
        self.healthy = True
        self._up = asyncio.Event()
        self._up.set()
        self.fail = False
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.delivered: list[tuple[str, dict[str, Any]]] = []

    def down(self) -> None:
        self.healthy, self.fail = False, True
        self._up.clear()

    def up(self) -> None:
        self.healthy, self.fail = True, False
        self._up.set()

    async def bus_up(self) -> None:
        await self._up.wait()

    async def publish(self, room: str, frame: bytes, *, origin: Any = None) -> None:
        if self.fail:
            raise BusUnavailable("down")
        self.published.append((room, json.loads(frame)))

    def deliver_here(self, room: str, frame: bytes) -> None:
        self.delivered.append((room, json.loads(frame)))

    def is_member(self, room: str, session: Any) -> bool:
        return False


async def test_departures_the_bus_failed_on_are_followed_by_the_notice_once_it_is_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dead replica's departures are followed by a truncated presence.diff naming nobody (docs/protocol.md),
    also when the bus fails on the first leave: the leaves are told by their checks, the notice once the bus is
    back."""
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 0.05)
    hub = Hub()
    chat = ChatPresence(PresenceRules([], "each", 100), 1000, cast(Any, hub), MemoryPresence())
    hub.down()
    await chat.departed("lobby", ["ghost-1", "ghost-2"])  # logged: told once the bus is back
    await asyncio.sleep(0.1)
    hub.up()
    for _ in range(40):
        await asyncio.sleep(0.05)
    ops = [(f["op"], f.get("user"), f.get("truncated")) for _, f in hub.published]
    assert ("presence.leave", "ghost-1", None) in ops and ("presence.leave", "ghost-2", None) in ops
    assert ("presence.diff", None, True) in ops, "no truncated notice after a dead replica's departures"
    await chat.close()


class CountingLookup(MemoryPresence):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.top = 0

    async def lookup(self, room: str, users: Any) -> PresencePage:
        self.now += 1
        self.top = max(self.top, self.now)
        try:
            await asyncio.sleep(0.01)
            return PresencePage([], None, PresenceCount())
        finally:
            self.now -= 1


async def test_restored_rooms_are_read_notice_batch_at_a_time() -> None:
    """A broker that lost everything: the backend reports on_restored room by room, and the rooms are read at most
    NOTICE_BATCH at a time, each told once."""
    hub, presence = Hub(), CountingLookup()
    chat = ChatPresence(PresenceRules([], "each", 100), 1000, cast(Any, hub), presence)
    rooms = [f"r{i}" for i in range(2000)]
    for room in rooms:  # as RedisPresence._restore / NatsPresence._report_restored call it (sync listener)
        chat.restored(room, ["u"])
    for _ in range(100):
        await asyncio.sleep(0.02)
        if len(hub.published) == len(rooms):
            break
    assert presence.top <= chat_events.NOTICE_BATCH, presence.top
    assert sorted(room for room, _ in hub.published) == sorted(rooms)
    await chat.close()


async def test_notices_tried_again_once_the_bus_is_back_are_read_notice_batch_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same with the bus down meanwhile: once it is back the rooms are read NOTICE_BATCH at a time too."""
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 0.05)
    hub, presence = Hub(), CountingLookup()
    chat = ChatPresence(PresenceRules([], "each", 100), 1000, cast(Any, hub), presence)
    hub.down()
    for i in range(1000):
        chat.restored(f"r{i}", ["u"])
    await asyncio.sleep(0.2)
    presence.top = 0
    hub.up()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if len(hub.published) == 1000:
            break
    assert presence.top <= chat_events.NOTICE_BATCH, presence.top
    assert len(hub.published) == 1000
    await chat.close()


class SlowHub(Hub):
    async def publish(self, room: str, frame: bytes, *, origin: Any = None) -> None:
        await asyncio.sleep(0.02)  # a bus round trip
        await super().publish(room, frame, origin=origin)


async def test_a_closing_replica_gives_a_pending_notice_one_try() -> None:
    """A notice told just before the drain (bus up) gets its try, within CLOSE_WAIT, like the checks."""
    hub = SlowHub()
    chat = ChatPresence(PresenceRules([], "each", 100), 1000, cast(Any, hub), MemoryPresence())
    await chat.departed("lobby", ["ghost-1"])  # the leave is published; the notice is on its way
    await chat.close()
    ops = [(f["op"], f.get("truncated")) for _, f in hub.published]
    assert ("presence.diff", True) in ops, ops


async def test_a_room_that_keeps_failing_does_not_delay_the_notices_of_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """One room whose publish keeps failing (its Redis Cluster shard down, the hub up) waits out its own back-off:
    a notice told for another room meanwhile goes out at once."""
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 0.2)
    loop = asyncio.get_running_loop()
    sent: dict[str, float] = {}

    async def read(room: str) -> PresenceCount:
        return PresenceCount(3, 3)

    async def send(room: str, frame: bytes) -> None:
        if room == "stuck":
            raise BusUnavailable("the room's shard is down")
        sent[room] = loop.time()

    notices = chat_events.StaleNotices(cast(Any, Hub()), read, send, drop_when_down=False)
    notices.tell(["stuck"])
    await asyncio.sleep(0.7)  # tries at 0, 0.2 and 0.6: now waiting 0.8 s
    told = loop.time()
    notices.tell(["other"])
    for _ in range(100):
        if "other" in sent:
            break
        await asyncio.sleep(0.01)
    assert sent["other"] - told < 0.1
    await notices.close()
