"""Chat presence on its failure paths, against a fake hub: a dead replica's departures whose count read fails
(bus down or otherwise), a mass departure from a room known big, a join whose first page read fails after its
entry was written (the generic path, NATS's), and the StaleNotices worker (bus down, a room's shard down,
close while waiting, a room told again, drop when down): no busy loop, nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests.test_join_fast_path import OnlyAsync
from tests.test_presence_notices import Hub
from wirehub import BusUnavailable, PresenceCount, PresenceEntry, PresencePage
from wirehub.builtins.bus.memory import MemoryPresence
from wirehub.builtins.handlers import chat_events
from wirehub.builtins.handlers.chat_presence import ChatPresence, PresenceRules

EACH_MAX = 4


class FlakyCount(MemoryPresence):
    """Memory presence whose count fails while ``fail`` is set (the bus down at reap time)."""

    def __init__(self, exc: Exception | None = None) -> None:
        super().__init__()
        self.exc = exc

    async def count(self, room: str) -> PresenceCount:
        if self.exc is not None:
            raise self.exc
        return await super().count(room)


async def _settle(seconds: float = 0.3) -> None:
    for _ in range(int(seconds / 0.02)):
        await asyncio.sleep(0.02)



@pytest.mark.parametrize("events", ["each", "auto"])
async def test_departures_whose_count_read_found_the_bus_down_are_told_once_it_is_back(
    monkeypatch: pytest.MonkeyPatch, events: str,
) -> None:
    """The leaves (by their checks) and the truncated notice go out once the bus is back, with auto as with each."""
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 0.05)
    hub, presence = Hub(), FlakyCount()
    chat = ChatPresence(PresenceRules([], events, 100), 1000, cast(Any, hub), presence, each_max=EACH_MAX)
    hub.down()
    presence.exc = BusUnavailable("down")
    await chat.departed("lobby", ["ghost-1", "ghost-2"])
    await asyncio.sleep(0.1)
    hub.up()
    presence.exc = None
    await _settle(1.5)
    ops = [(f["op"], f.get("user"), f.get("truncated")) for _, f in hub.published]
    assert ("presence.diff", None, True) in ops, f"{events}: departures never told: {ops}"
    await chat.close()


async def test_departures_whose_count_read_failed_otherwise_are_told_in_the_mode_known() -> None:
    hub, presence = Hub(), FlakyCount(TimeoutError("count timed out"))
    chat = ChatPresence(PresenceRules([], "auto", 100), 1000, cast(Any, hub), presence, each_max=EACH_MAX)
    raised = None
    try:
        await chat.departed("lobby", ["ghost-1"])
    except Exception as exc:
        raised = exc
    await _settle(0.3)
    assert raised is None and hub.published, "a failed count read drops the departures"
    await chat.close()



async def test_a_mass_departure_from_a_room_known_big_stays_batched() -> None:
    """each_max 4. The room had 2 live users and 20 on the dead replica, and this replica knew it big. The backend
    removed the 20 entries before reporting them, so the count read is 2: the room is sized as it was before (22),
    and the departures go out in a diff, not 20 presence.leave."""
    hub, presence = Hub(), MemoryPresence()
    chat = ChatPresence(PresenceRules([], "auto", 100), 1000, cast(Any, hub), presence, each_max=EACH_MAX)
    for u in ("a", "b"):
        await presence.join("big", PresenceEntry(u, f"s-{u}", "n0"))
    rule = chat.rules.for_room("big")
    chat._sized("big", rule, 22)  # read above the limit earlier (it was big)
    assert chat.mode("big", rule) is chat.modes["batched"]
    ghosts = [f"ghost{i}" for i in range(20)]
    await chat.departed("big", ghosts)
    await _settle(1.5)
    ops = [f["op"] for _, f in hub.published]
    assert ops.count("presence.leave") == 0, f"{ops.count('presence.leave')} presence.leave for a mass departure"
    await chat.close()



class Generic(OnlyAsync):
    """A presence with no join_now / join_page (the NATS path through ChatPresence.join's generic branch), whose
    next page read fails (once ``gate`` is set, if there is one)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.fail_next_page = False

    async def page(self, room: str, after: str | None, limit: int) -> PresencePage:
        if self.fail_next_page:
            self.fail_next_page = False
            gate = self.gate
            if gate is not None:
                await gate.wait()
            raise BusUnavailable("page read failed")
        return await self.inner.page(room, after, limit)

    async def lookup(self, room: str, users: Sequence[str]) -> PresencePage:
        return await self.inner.lookup(room, users)


def _session(user: str, sid: str) -> Any:
    return SimpleNamespace(identity=SimpleNamespace(user=user, name=""), id=sid, node="n0")


async def test_a_join_whose_page_read_failed_is_told_while_a_second_tab_joined() -> None:
    """bob's tab 1 joins (first connection) and its page read fails; meanwhile tab 2 joined (not first, no event).
    The handler rolls tab 1 back (leave: bob still has tab 2, no leave). bob is in the room; no presence.join
    was ever told: the arrival is told all the same when the read fails."""
    hub, presence = Hub(), Generic()
    chat = ChatPresence(PresenceRules([], "each", 100), 1000, cast(Any, hub), cast(Any, presence))
    presence.gate = asyncio.Event()
    presence.fail_next_page = True
    s1, s2 = _session("bob", "s1"), _session("bob", "s2")
    t1 = asyncio.ensure_future(chat.join(s1, "lobby"))
    await asyncio.sleep(0.01)  # s1 written, waiting on its page read
    await chat.join(s2, "lobby")  # not first: no event
    presence.gate.set()
    with pytest.raises(BusUnavailable):
        await t1
    await chat.leave(s1, "lobby")  # what ChatHandler.op_join's rollback does (_leave)
    await _settle(0.5)
    count = await presence.count("lobby")
    ops = [(f["op"], f.get("user")) for _, f in hub.published]
    assert count.users == 1
    assert ("presence.join", "bob") in ops, "bob is in the room but no member was ever told"
    await chat.close()


async def test_a_join_whose_page_read_failed_alone_is_told_then_left() -> None:
    """Single tab: the read fails; the arrival is told, then the rollback's leave."""
    hub, presence = Hub(), Generic()
    chat = ChatPresence(PresenceRules([], "each", 100), 1000, cast(Any, hub), cast(Any, presence))
    presence.fail_next_page = True
    s1 = _session("bob", "s1")
    with pytest.raises(BusUnavailable):
        await chat.join(s1, "lobby")
    await chat.leave(s1, "lobby")
    await _settle(0.3)
    assert [(f["op"], f.get("user")) for _, f in hub.published][:2] == [("presence.join", "bob"),
                                                                        ("presence.leave", "bob")]
    await chat.close()



def _notices(hub: Any, fail: Any, drop: bool = False) -> tuple[Any, dict[str, int], dict[str, int]]:
    tries: dict[str, int] = {}
    sent: dict[str, int] = {}

    async def read(room: str) -> PresenceCount:
        return PresenceCount(1, 1)

    async def send(room: str, frame: bytes) -> None:
        tries[room] = tries.get(room, 0) + 1
        if fail(room):
            raise BusUnavailable("down")
        sent[room] = sent.get(room, 0) + 1

    return chat_events.StaleNotices(cast(Any, hub), read, send, drop_when_down=drop), tries, sent


def _count_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    real = chat_events._wake_or_wait

    async def counted(hub: Any, delay: float, bus: bool, closing: asyncio.Event) -> None:
        waits.append(delay)
        await real(hub, delay, bus, closing)

    monkeypatch.setattr(chat_events, "_wake_or_wait", counted)
    return waits


async def test_notices_waiting_for_the_bus_do_not_busy_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 0.1)
    waits = _count_waits(monkeypatch)
    hub = Hub()
    hub.down()
    n, tries, sent = _notices(hub, lambda room: hub.fail)
    n.tell(["a", "b"])
    await asyncio.sleep(1.0)
    assert len(waits) < 20 and tries["a"] <= 6
    hub.up()
    await asyncio.sleep(0.05)
    assert sent == {"a": 1, "b": 1} and not n._retry and n._worker.done()


async def test_notices_of_a_room_whose_shard_is_down_do_not_busy_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 0.1)
    waits = _count_waits(monkeypatch)
    hub = Hub()
    n, _, _ = _notices(hub, lambda room: room == "stuck")
    n.tell(["stuck"])
    for i in range(20):  # told over and over meanwhile
        await asyncio.sleep(0.05)
        n.tell([f"r{i}"])
    assert len(waits) < 60
    await n.close()
    assert n._worker.done()


async def test_close_while_a_notice_waits_tries_it_once_and_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 5.0)
    hub = Hub()
    hub.down()
    n, tries, _ = _notices(hub, lambda room: hub.fail)
    n.tell(["a"])
    await asyncio.sleep(0.05)
    assert tries == {"a": 1}
    loop = asyncio.get_running_loop()
    t = loop.time()
    await n.close()
    took = loop.time() - t
    assert took < 0.2 and tries == {"a": 2} and not n._retry and n._worker.done()


async def test_a_room_told_again_while_it_waits_to_be_tried_again_goes_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 5.0)
    hub = Hub()
    ok = {"v": False}
    n, _, sent = _notices(hub, lambda room: not ok["v"])
    n.tell(["a"])
    await asyncio.sleep(0.05)
    ok["v"] = True
    n.tell(["a"])  # told again while waiting out its 5 s back-off
    await asyncio.sleep(0.05)
    assert sent == {"a": 1} and not n._retry and n._worker.done()
    await n.close()


async def test_local_notices_are_dropped_while_the_bus_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 0.05)
    hub = Hub()
    hub.down()
    n, tries, _ = _notices(hub, lambda room: hub.fail, drop=True)
    n.tell(["a"])
    await asyncio.sleep(0.2)
    assert tries == {"a": 1} and not n._retry and n._worker.done()
