"""``EachEvent``'s checks on their failure and shutdown paths, against a fake hub and presence (what lands on
the "bus" is a list): the cases a second review found, which a real broker makes slow or hard to time."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from wirehub import BusUnavailable, PresenceCount, PresenceMember, PresencePage, PublishOutcomeUnknown
from wirehub.builtins.handlers import chat_events
from wirehub.builtins.handlers.chat_events import EachEvent
from wirehub.client import Client
from wirehub.client.rooms import Subscription, apply_presence_event, take_presence_snapshot

ROOM = "r"
ROOT = Path(__file__).resolve().parent.parent


class FakePresence:
    """Who is in the room; ``fail``: what every read raises."""

    def __init__(self) -> None:
        self.users: set[str] = set()
        self.reads = 0
        self.fail: BaseException | None = None

    async def lookup(self, room: str, users: Sequence[str]) -> PresencePage:
        self.reads += 1
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        found = [PresenceMember(u, 1) for u in users if u in self.users]
        return PresencePage(found, None, PresenceCount(len(self.users), len(self.users)))


class FakeHub:
    """``bus``: the frames that landed, in bus order; ``fail``: what every publish raises; ``hang``: publishes
    never answer."""

    def __init__(self) -> None:
        self.healthy = True
        self.bus: list[dict[str, Any]] = []
        self.fail: BaseException | None = None
        self.hang = False

    async def publish(self, room: str, frame: bytes, *, origin: Any = None) -> None:
        await asyncio.sleep(0)
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        self.bus.append(json.loads(frame))

    def is_member(self, room: str, session: Any) -> bool:
        return False

    async def bus_up(self) -> None:
        return None


def make() -> tuple[EachEvent, FakeHub, FakePresence]:
    hub, presence = FakeHub(), FakePresence()
    return EachEvent(cast(Any, hub), presence.lookup), hub, presence


def believed(bus: list[dict[str, Any]], user: str) -> bool | None:
    """Whether members who applied ``bus`` list ``user`` (None: never told)."""
    last = [f for f in bus if f.get("user") == user]
    return None if not last else last[-1]["op"] == "presence.join"


async def a_join_the_bus_refused(mode: EachEvent, hub: FakeHub, presence: FakePresence) -> None:
    """u is in the room, and the members were never told (their join's publish failed)."""
    presence.users = {"u"}
    hub.fail = BusUnavailable("down")
    with pytest.raises(BusUnavailable):
        await mode.joined(ROOM, cast(Any, None), "u", "", None)


async def test_a_closed_replica_whose_corrections_fail_stops_checking() -> None:
    """Draining while the bus takes no publish but reads work (a shard down): the check's correction fails,
    and after close() no check runs again."""
    mode, hub, presence = make()
    await a_join_the_bus_refused(mode, hub, presence)
    await asyncio.sleep(0.05)  # its check read u there and its correction failed: waiting to try again
    assert ROOM in mode._checking
    await mode.close()
    reads = presence.reads
    await asyncio.sleep(0.2)
    assert presence.reads == reads and not mode._checking and not mode._told


async def test_a_check_cancelled_by_close_starts_no_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """close() cancels a check stuck in a publish after CLOSE_WAIT: nothing is checked after."""
    monkeypatch.setattr(chat_events, "CLOSE_WAIT", 0.1)
    mode, hub, presence = make()
    await a_join_the_bus_refused(mode, hub, presence)
    hub.fail, hub.hang = None, True  # the correction's publish never answers
    await asyncio.sleep(0.05)
    await mode.close()
    await asyncio.sleep(0.05)
    assert not mode._checking and not mode._told


def test_a_loop_that_ends_with_a_check_stuck_in_a_publish_ends_clean() -> None:
    """``asyncio.run`` around it (warnings as errors): no task destroyed while pending, no error at exit."""
    script = """
import asyncio, gc, warnings
warnings.simplefilter("error")
from tests.test_presence_each_unit import a_join_the_bus_refused, make
from wirehub.builtins.handlers import chat_events
chat_events.CLOSE_WAIT = 0.1

async def main():
    mode, hub, presence = make()
    await a_join_the_bus_refused(mode, hub, presence)
    hub.fail, hub.hang = None, True
    await asyncio.sleep(0.05)
    await mode.close()

asyncio.run(main())
gc.collect()
print("done")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "done" and not out.stderr, out.stdout + out.stderr


async def test_a_correction_whose_publish_keeps_failing_is_given_up_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """An error that is not the bus's, in the correction's publish: given up after GIVE_UP tries, once."""
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 0.01)
    mode, hub, presence = make()
    await a_join_the_bus_refused(mode, hub, presence)
    hub.fail = RuntimeError("a plugin's bug")
    with caplog.at_level(logging.ERROR):
        await asyncio.sleep(0.5)
    assert caplog.text.count("gave up checking") == 1 and not mode._checking and not mode._told
    await mode.close()


async def test_an_unknown_outcome_is_checked_again_after_its_first_check_kept_failing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A's leave of u times out (it may land later); A's check keeps failing past UNSETTLED; u comes back
    through B, then A's leave lands after B's join. The second check goes on from where the first left:
    the members are told u is there."""
    monkeypatch.setattr(chat_events, "UNSETTLED", 0.2)
    monkeypatch.setattr(chat_events, "CHECK_RETRY", 0.5)
    mode, hub, presence = make()
    hub.fail = PublishOutcomeUnknown("timed out")
    presence.fail = BusUnavailable("slow")
    with pytest.raises(PublishOutcomeUnknown):
        await mode.left(ROOM, cast(Any, None), "u", None)
    hub.fail = None
    presence.users = {"u"}  # u back through B
    hub.bus.append({"op": "presence.join", "room": ROOM, "user": "u"})  # B's join
    hub.bus.append({"op": "presence.leave", "room": ROOM, "user": "u"})  # A's leave, landed late
    await asyncio.sleep(0.3)
    presence.fail = None
    await asyncio.sleep(1.0)
    await mode.close()
    assert believed(hub.bus, "u") is True, hub.bus


async def test_an_event_told_during_a_check_that_ends_as_the_replica_closes_is_checked() -> None:
    """b's leave is told while the room's check of a's is reading; that check ends in the loop iteration that
    runs close(), before its done callback: close() still checks b (who came back through another replica,
    whose join went first). Found by a third review."""
    mode, hub, presence = make()
    gate = asyncio.get_running_loop().create_future()

    async def held(room: str, users: Sequence[str]) -> PresencePage:
        await gate
        found = [PresenceMember(u, 1) for u in users if u in presence.users]
        return PresencePage(found, None, PresenceCount(len(presence.users), len(presence.users)))

    mode._lookup = held
    await mode.left(ROOM, cast(Any, None), "a", None)  # its check starts and waits in the read
    await asyncio.sleep(0.01)
    assert ROOM in mode._checking
    await mode.left(ROOM, cast(Any, None), "b", None)
    presence.users = {"b"}
    await asyncio.sleep(0.01)

    async def closing() -> None:
        await gate
        await mode.close()

    closer = asyncio.ensure_future(closing())
    await asyncio.sleep(0)
    gate.set_result(None)  # the check and close() wake in one iteration
    await closer
    await asyncio.sleep(0.05)
    assert believed(hub.bus, "b") is True, hub.bus


def test_a_repeated_events_count_never_goes_below_the_users_listed() -> None:
    """presence_limit 1: w listed, a counted. a leaves through A and comes back through B (B's join first on
    the bus, then A's leave); A reads {w, a} (count 2); z joins meanwhile and lands before A's correction.
    The client lists w, z and a, the whole room: its count is 3, not the correction's 2."""
    sub = Subscription(cast(Client, None), "r", lambda message: None)
    sub.presence = [{"user": "w", "connections": 1}]
    take_presence_snapshot(sub, {"count": {"users": 2, "connections": 2}, "cursor": "w"})
    for frame in ({"op": "presence.join", "room": "r", "user": "a"}, {"op": "presence.leave", "room": "r", "user": "a"},
                  {"op": "presence.join", "room": "r", "user": "z"},
                  {"op": "presence.join", "room": "r", "user": "a", "count": {"users": 2, "connections": 2}}):
        apply_presence_event(sub, frame)
    assert set(sub.members) == {"w", "a", "z"} and sub.count == {"users": 3, "connections": 3}
