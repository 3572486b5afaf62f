"""The join's cheaper paths must say what the general ones say: the roster's first page kept up to date by
every change equals the page built from scratch; the memory backend's join and first page at once
(``join_now`` / ``head_now``) give ``joined`` the same bytes as its async ``join`` and ``page``; the
per-room presence rule cache answers as the rules do; ``authorize_now``'s cached plan follows plugins
registered after a first call and implementations that take their arguments in another order."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, cast

import pytest

from wirehub import Hub, Identity, PresenceCount, PresenceEntry, PresenceMember, PresencePage, Session, hookimpl
from wirehub.builtins.bus._roster import Roster
from wirehub.builtins.bus.memory import MemoryPresence
from wirehub.builtins.handlers import chat_presence
from wirehub.builtins.handlers.chat_presence import (
    ChatPresence,
    NameInfo,
    PresenceRule,
    PresenceRules,
    RoomPresence,
)
from wirehub.plugins import build_plugin_manager
from wirehub.testing import FakeTransport

ODD = 'quo"te\\ Ünïcødé 名前 \U0001f600'


class Reference:
    """What a roster must show: users sorted, each with their connections and the info of the connection
    that brought them in."""

    def __init__(self) -> None:
        self.sessions: dict[str, str] = {}
        self.users: dict[str, list[Any]] = {}  # user -> [connections, info]

    def add(self, entry: PresenceEntry) -> None:
        if entry.session in self.sessions:
            return
        self.sessions[entry.session] = entry.user
        if entry.user in self.users:
            self.users[entry.user][0] += 1
        else:
            self.users[entry.user] = [1, entry.info]

    def remove(self, session: str) -> None:
        user = self.sessions.pop(session)
        self.users[user][0] -= 1
        if not self.users[user][0]:
            del self.users[user]

    def page(self, limit: int) -> tuple[list[PresenceMember], str | None, PresenceCount]:
        ordered = sorted(self.users)
        first = [PresenceMember(u, self.users[u][0], self.users[u][1]) for u in ordered[:limit]]
        cursor = first[-1].user if len(ordered) > limit and first else None
        return first, cursor, PresenceCount(len(self.users), len(self.sessions))


@pytest.mark.parametrize("seed", range(6))
def test_the_first_page_kept_up_to_date_is_the_page_built_from_scratch(seed: int) -> None:
    """Joins and leaves before, on and after the first page, second connections of users on it, the last
    user of a full page leaving, and reads with another limit (the kept page follows the last limit)."""
    rng = random.Random(seed)
    roster, ref = Roster(), Reference()
    sessions: list[str] = []
    limits = (1, 3, 20)
    limit = rng.choice(limits)
    for step in range(2500):
        if sessions and rng.random() < 0.35:
            session = sessions.pop(rng.randrange(len(sessions)))
            roster.remove(session)
            ref.remove(session)
        else:
            user = f"u{rng.randrange(60 if seed % 2 else 600):03d}"  # odd seeds: many second connections
            name = rng.choice(["", "Name", ODD])
            entry = PresenceEntry(user, f"s{step}", "n1", NameInfo(name) if name else {})
            sessions.append(entry.session)
            roster.add(entry)
            ref.add(entry)
        if rng.random() < 0.02:
            limit = rng.choice(limits)
        page = roster.page(None, limit)
        members, cursor, count = ref.page(limit)
        assert (list(page.members), page.cursor, page.count) == (members, cursor, count), step
        assert roster.page(None, limit).members is page.members  # the same list while it holds


def test_a_member_leaving_a_full_first_page_lets_the_next_user_on() -> None:
    roster = Roster()
    for user in ("a", "b", "c", "d"):
        roster.add(PresenceEntry(user, "s-" + user, "n1", NameInfo(user.upper())))
    assert [m.user for m in roster.page(None, 2).members] == ["a", "b"]
    roster.remove("s-b")
    page = roster.page(None, 2)
    assert [(m.user, m.info) for m in page.members] == [("a", {"name": "A"}), ("c", {"name": "C"})]
    assert page.cursor == "c"
    roster.remove("s-d")
    roster.remove("s-a")
    assert (page := roster.page(None, 2)).members == [PresenceMember("c", 1, NameInfo("C"))] and page.cursor is None


class OnlyAsync:
    """A memory presence seen through the async contract only (no ``join_now`` / ``head_now``)."""

    def __init__(self) -> None:
        self.inner = MemoryPresence()

    async def join(self, room: str, entry: PresenceEntry) -> bool:
        return await self.inner.join(room, entry)

    async def leave(self, room: str, session: str) -> str | None:
        return await self.inner.leave(room, session)

    async def count(self, room: str) -> PresenceCount:
        return await self.inner.count(room)

    async def page(self, room: str, after: str | None, limit: int) -> PresencePage:
        return await self.inner.page(room, after, limit)

    def on_departed(self, callback: Any) -> None:
        self.inner.on_departed(callback)


def chat_presence_on(presence: object, rules: Sequence[PresenceRule] = ()) -> ChatPresence:
    # events "off" and presence-off rooms never reach the hub: no hub is needed
    return ChatPresence(PresenceRules(rules, "off", 4), 1000, cast(Hub, None), cast(Any, presence))


def session(user: str, name: str = "") -> Session:
    return Session(FakeTransport(), Identity(user=user, name=name, rooms=("*",)), endpoint="/ws/chat", node="n1",
                   max_queue_bytes=1 << 20)


async def test_the_memory_join_at_once_gives_joined_the_bytes_of_the_async_join() -> None:
    rules = [PresenceRule("none-*", presence_limit=0), PresenceRule("off-*", presence=False)]
    fast, slow = chat_presence_on(MemoryPresence(), rules), chat_presence_on(OnlyAsync(), rules)
    assert fast._now is not None and slow._now is None
    rng = random.Random(5)
    joined: list[tuple[str, Session]] = []
    for i in range(300):
        room = rng.choice(["lobby", "none-x", "off-x"])
        if joined and rng.random() < 0.3:
            room, s = joined.pop(rng.randrange(len(joined)))
            await fast.leave(s, room)
            await slow.leave(s, room)
            continue
        s = session(f"u{rng.randrange(40):02d}", rng.choice(["", ODD]))
        got = await fast.join(s, room)
        assert got == await slow.join(s, room), i
        joined.append((room, s))
        if room == "off-x":
            assert got == (b"", b"")


async def test_the_memory_head_at_once_is_the_first_page() -> None:
    presence = MemoryPresence()
    assert presence.head_now("nobody", 3) == ([], None, 0, 0)
    for i, user in enumerate(["c", "a", "b", "a", "d"]):
        presence.join_now("r", PresenceEntry(user, f"s{i}", "n1"))
    members, cursor, users, connections = presence.head_now("r", 3)
    page = await presence.page("r", None, 3)
    assert (members, cursor, PresenceCount(users, connections)) == (page.members, page.cursor, page.count)
    assert [(m.user, m.connections) for m in members] == [("a", 2), ("b", 1), ("c", 1)]


def test_the_rule_of_a_room_is_kept_and_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_presence, "RULE_CACHE_ROOMS", 3)
    rules = PresenceRules([PresenceRule("ticker-*", presence=False), PresenceRule("big-*", events="batched",
                                                                                   presence_limit=7)], "each", 50)
    expect = {"ticker-1": RoomPresence(False, "off", 1.0, 50), "big-1": RoomPresence(True, "batched", 1.0, 7),
              "lobby": RoomPresence(True, "each", 1.0, 50)}
    for _ in range(3):
        for room in [*expect, "big-2", "other"]:
            assert rules.for_room(room) == expect.get(room, rules._match(room))
            assert len(rules._known) <= 3


# -- authorize_now's plan ---------------------------------------------------------------------------------


class RoomOnly:
    """Takes fewer arguments, in another order: called with keywords, not in the hookspec's order."""

    @hookimpl(tryfirst=True)
    def wirehub_authorize(self, room: str, identity: Identity) -> bool | None:
        return False if room == "closed" else None


class Grants:
    @hookimpl
    def wirehub_authorize(self, identity: Identity, action: str, room: str) -> bool | None:
        return True if room.startswith("vip-") else None


def test_authorize_now_follows_plugins_registered_and_unregistered_after_a_first_call() -> None:
    host = build_plugin_manager()
    alice = Identity(user="alice", rooms=("team-*", "closed"))
    assert host.authorize_now(alice, "join", "closed") is True  # the built-in policy alone
    assert host.authorize_now(alice, "join", "vip-1") is False
    host.pm.register(RoomOnly(), name="room-only")
    host.pm.register(Grants(), name="grants")
    assert host.authorize_now(alice, "join", "closed") is False
    assert host.authorize_now(alice, "join", "vip-1") is True
    assert host.authorize_now(alice, "join", "team-a") is True
    host.pm.unregister(name="room-only")
    assert host.authorize_now(alice, "join", "closed") is True
    host.pm.unregister(name="grants")
    assert host.authorize_now(alice, "join", "vip-1") is False
