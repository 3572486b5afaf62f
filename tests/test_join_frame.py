"""The join's fast path: the ``joined`` frame spliced from pre-encoded parts must be exactly what ``dumps``
gives for the same fields; the cached first page must encode as the whole list does after every change;
``authorize_now`` must answer as the hook contract says, whether implementations are sync or async."""

from __future__ import annotations

import random
from typing import Any

import pytest

from wirehub import Identity, PresenceCount, PresenceEntry, PresenceMember, hookimpl
from wirehub.builtins.bus._roster import Roster
from wirehub.builtins.handlers.chat import _joined
from wirehub.builtins.handlers.chat_presence import HeadCache, NameInfo, joined_fields, member_item
from wirehub.plugins import PluginFailed, PluginHost, build_plugin_manager
from wirehub.protocol import dumps, encode

ODD = 'quo"te\\back\nslash\x00\x1f\u2028 Ünïcødé 名前 \U0001f600'


def expected(req_id: Any, room: str, offset: int, epoch: str, recovered: bool, count: PresenceCount | None,
             cursor: str | None, members: list[dict[str, Any]] | None) -> bytes:
    head: dict[str, Any] = {"op": "joined"}
    if req_id is not None:
        head["id"] = req_id
    head.update(room=room, offset=offset, epoch=epoch, recovered=recovered)
    if count is not None:
        head["count"] = {"users": count.users, "connections": count.connections}
        if cursor is not None:
            head["cursor"] = cursor
        head["presence"] = members
    return dumps(head).encode()


@pytest.mark.parametrize("req_id", [None, "r-1", 7, 0, True, 1.5, ODD, {"a": [1, "b"]}, [1, 2]])
@pytest.mark.parametrize("room", ["lobby", ODD])
@pytest.mark.parametrize("cursor", [None, "user-0099", ODD])
def test_joined_is_the_json_of_its_fields(req_id: Any, room: str, cursor: str | None) -> None:
    members = [{"user": "a", "connections": 2, "name": ODD}, {"user": ODD, "connections": 1}]
    count = PresenceCount(1234, 5678)
    for recovered in (True, False):
        fields = joined_fields(count, cursor, encode(members))
        got = _joined(req_id, room, 42, "ep-" + room, recovered, fields)
        assert got == expected(req_id, room, 42, "ep-" + room, recovered, count, cursor, members)


def test_joined_without_presence_and_with_an_empty_list() -> None:
    assert _joined("x", "r", 0, "e", False, b"") == expected("x", "r", 0, "e", False, None, None, None)
    fields = joined_fields(PresenceCount(3, 4), None, b"[]")
    assert _joined(None, "r", 9, "e", True, fields) == expected(None, "r", 9, "e", True, PresenceCount(3, 4),
                                                                None, [])


def test_the_cached_first_page_encodes_as_the_whole_list_after_every_change() -> None:
    """A big room's joins move users onto and off the first page; the cache reuses the items of those who
    stay. Every encoded page must equal the list encoded from scratch (names, counts, order)."""
    rng = random.Random(11)
    roster, heads, limit = Roster(), HeadCache(), 20
    sessions: list[str] = []
    for i in range(600):
        if sessions and rng.random() < 0.3:
            roster.remove(sessions.pop(rng.randrange(len(sessions))))
        else:
            user = f"u{rng.randrange(400):04d}"  # some users get a second connection
            name = rng.choice(["", "Name", ODD])
            info = NameInfo(name) if name else {}
            sessions.append(f"s{i}")
            roster.add(PresenceEntry(user, f"s{i}", "n1", info))
        page = roster.page(None, limit)
        assert heads.encoded("room", page.members) == encode([member_item(m) for m in page.members])


def test_an_equal_page_from_another_read_reuses_the_items() -> None:
    """The Redis backend returns a new, equal list per read: equal infos are reused too."""
    heads = HeadCache()
    first = [PresenceMember("a", 1, {"name": "A"}), PresenceMember("b", 2, {})]
    assert heads.encoded("r", first) == encode([member_item(m) for m in first])
    moved = [PresenceMember("a", 1, {"name": "A"}), PresenceMember("b", 3, {}), PresenceMember("c", 1, {"name": "C"})]
    assert heads.encoded("r", moved) == encode([member_item(m) for m in moved])
    renamed = [PresenceMember("a", 1, {"name": "A2"}), PresenceMember("d", 1, {"name": 5}),
               PresenceMember(ODD, 1, {"name": ["x", ODD]})]  # another replica's info may hold any JSON
    assert heads.encoded("r", renamed) == encode([member_item(m) for m in renamed])


# -- authorize_now ----------------------------------------------------------------------------------------


class SyncNoOpinion:
    @hookimpl
    def wirehub_authorize(self, identity: Identity, action: str, room: str) -> bool | None:
        return None


class AsyncAnswer:
    def __init__(self, answer: bool | None) -> None:
        self.answer = answer

    @hookimpl
    async def wirehub_authorize(self, identity: Identity, action: str, room: str) -> bool | None:
        return self.answer


class AwaitableFromPlainFunction:
    @hookimpl
    def wirehub_authorize(self, identity: Identity, action: str, room: str) -> Any:
        async def later() -> bool:
            return room == "granted"

        return later()


class Raises:
    @hookimpl
    def wirehub_authorize(self, identity: Identity, action: str, room: str) -> bool:
        raise RuntimeError("policy store down")


def host_with(*plugins: object) -> PluginHost:
    host = build_plugin_manager()
    for i, plugin in enumerate(plugins):
        host.pm.register(plugin, name=f"test-{i}")
    return host


async def answer(host: PluginHost, room: str, identity: Identity) -> bool:
    now = host.authorize_now(identity, "join", room)
    result = now if isinstance(now, bool) else await now
    assert result == await host.authorize(identity, "join", room)
    return result


async def test_authorize_now_answers_synchronously_with_the_built_in_policy() -> None:
    host = host_with(SyncNoOpinion())
    alice = Identity(user="alice", rooms=("team-*",))
    assert host.authorize_now(alice, "join", "team-a") is True
    assert host.authorize_now(alice, "join", "other") is False
    assert host.authorize_now(Identity(user="bob", rooms=("read:team-*",)), "publish", "team-a") is False


@pytest.mark.parametrize("verdict", [True, False])
async def test_an_async_answer_wins_over_the_built_in_policy(verdict: bool) -> None:
    host = host_with(AsyncAnswer(verdict))
    alice = Identity(user="alice", rooms=("*",))
    pending = host.authorize_now(alice, "join", "r")
    assert not isinstance(pending, bool)  # the async implementation answers first
    assert await pending is verdict
    assert await answer(host, "r", alice) is verdict


async def test_an_async_no_opinion_falls_through_to_the_next_implementations() -> None:
    host = host_with(AsyncAnswer(None))
    assert await answer(host, "team-a", Identity(user="a", rooms=("team-*",))) is True
    assert await answer(host, "other", Identity(user="a", rooms=("team-*",))) is False


async def test_a_plain_function_may_return_an_awaitable() -> None:
    host = host_with(AwaitableFromPlainFunction())
    nobody = Identity(user="a")
    assert await answer(host, "granted", nobody) is True
    assert await answer(host, "refused", Identity(user="a", rooms=("*",))) is False


async def test_a_raising_implementation_is_reported_as_plugin_failed() -> None:
    host = host_with(Raises())
    with pytest.raises(PluginFailed):
        host.authorize_now(Identity(user="a", rooms=("*",)), "join", "r")
    with pytest.raises(PluginFailed):
        await host.authorize(Identity(user="a", rooms=("*",)), "join", "r")


@pytest.mark.parametrize("entry", [PresenceEntry(ODD, "s1", ODD, NameInfo(ODD)), PresenceEntry("a", "b", "c")])
def test_the_redis_entry_json_is_the_json_of_the_entry(entry: PresenceEntry) -> None:
    from wirehub.builtins.bus._presence_json import encode as _encode
    from wirehub.builtins.bus.redis_presence import _entry_json

    whole = _encode({"user": entry.user, "session": entry.session, "node": entry.node, "info": dict(entry.info)})
    assert _entry_json(entry) == whole
    assert _entry_json(entry, _encode(dict(entry.info))) == whole
