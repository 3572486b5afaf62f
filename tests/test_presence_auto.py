"""Presence events ``auto`` (the default): ``each`` in a room of at most ``presence_each_max`` users, ``batched`` in
a bigger one, as each replica reads the room's count (tests/test_presence.py has the switch both ways)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from tests.test_presence import CHAT, ServerFactory, member, start_replicas
from tests.test_presence_notices import Hub
from wirehub.builtins.bus.memory import MemoryPresence
from wirehub.builtins.handlers import chat_presence
from wirehub.builtins.handlers.chat import ChatHandler
from wirehub.builtins.handlers.chat_presence import ChatPresence, PresenceRules
from wirehub.testing import unique_room

EACH_MAX = 4


async def drain(ws: Any, seconds: float) -> list[dict[str, Any]]:
    out = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            out.append(await asyncio.wait_for(ws.recv(), left))
        except TimeoutError:
            break
    return out


@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_a_join_storm_through_a_replica_that_never_read_a_big_room_goes_batched(
    request: pytest.FixtureRequest, kind: str, wirehub_server: ServerFactory,
) -> None:
    """r0 knows the room is big (7 users > presence_each_max 4). r1 never read its count: 8 users join through r1
    at once (a reconnect storm after a restart or a rolling deploy). Each join's own read decides: diffs, no
    presence.join (on NATS too, whose join reads the page after its write)."""
    r0, r1 = await _two(request, wirehub_server, kind)
    room = unique_room()
    watcher, _ = await member(r0, "w", room)
    for i in range(6):
        await member(r0, f"base{i}", room)
    await drain(watcher, 1.5)  # whatever came of the fill
    h1 = r1.app.handlers[CHAT]
    assert isinstance(h1, ChatHandler) and room not in h1.presence._big
    storm = await asyncio.gather(*(member(r1, f"storm{i}", room) for i in range(8)))
    assert all(j["count"]["users"] > EACH_MAX for _, j in storm)
    frames = await drain(watcher, 1.5)
    ops = [f["op"] for f in frames]
    assert "presence.join" not in ops, f"{ops.count('presence.join')} presence.join in a room of 15 > {EACH_MAX}"


async def _two(request: pytest.FixtureRequest, wirehub_server: ServerFactory, kind: str) -> list[Any]:
    return await start_replicas(request, wirehub_server, kind, 2, {"presence_each_max": EACH_MAX})


@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_a_dead_replica_s_users_of_a_big_room_leave_in_a_diff_on_a_reaper_that_never_read_it(
    request: pytest.FixtureRequest, kind: str, wirehub_server: ServerFactory,
) -> None:
    """The reaper is whichever replica wins the claim: r1 here, with no member in the room. It reads the room's
    count first: the dead replica's users of a room of 7 (> presence_each_max 4) leave in a presence.diff, not
    in an event each."""
    r0, r1 = await _two(request, wirehub_server, kind)
    room = unique_room()
    watcher, _ = await member(r0, "w", room)
    for i in range(6):
        await member(r0, f"base{i}", room)
    await drain(watcher, 1.5)
    h1 = r1.app.handlers[CHAT]
    assert isinstance(h1, ChatHandler)
    ghosts = [f"ghost{i}" for i in range(20)]
    await h1.presence.departed(room, ghosts)  # what r1's reaper reports
    frames = await drain(watcher, 1.5)
    ops = [f["op"] for f in frames]
    assert ops.count("presence.leave") == 0, f"{ops.count('presence.leave')} presence.leave in a big room"


async def test_the_big_rooms_known_are_bounded_forgetting_the_one_read_longest_ago(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chat_presence, "BIG_ROOMS", 3)
    chat = ChatPresence(PresenceRules([], "auto", 100), 1000, cast(Any, Hub()), MemoryPresence())
    rule = chat.rules.for_room("a")
    for room in ("a", "b", "c"):
        chat._sized(room, rule, 1001)
    chat._sized("a", rule, 5000)  # read again: the most recent
    chat._sized("d", rule, 1001)  # one too many: b, read longest ago, goes
    assert [room for room in "abcd" if chat.mode(room, rule) is chat.modes["batched"]] == ["a", "c", "d"]
    chat._sized("c", rule, 900)  # 9/10 of the limit: each again
    chat._sized("d", rule, 950)  # between: stays batched
    assert [room for room in "abcd" if chat.mode(room, rule) is chat.modes["batched"]] == ["a", "d"]
    await chat.close()
