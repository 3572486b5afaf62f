"""The join path's caches and shortcuts (branch joinfast, issue 11) answer as the general paths do:

- a client frame scanned directly gives the value or the error ``JSONDecoder.decode`` gives;
- room names matched once are kept per chat endpoint (one string each, bounded; a bad name is never kept);
- the JSON fragments of a join (room, epoch, cursor) are a bounded cache of a pure function;
- ``authorize_now`` works its plan out again only when plugins change (``register``, ``unregister``,
  ``set_blocked``), without a copy of the implementations per call;
- the first page's encoding after one edit reuses the other members' items (and a Redis-like page of new, equal
  objects is left to the general matching), also when a room was emptied and made again;
- the hub's join at once, and the event loop's flusher remembered;
- WebSocket frame headers at every length boundary.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any, cast

import pytest

from wirehub import Hub, Identity, PresenceCount, PresenceEntry, PresenceMember, Session, hookimpl, inbound, transport
from wirehub.builtins.bus._roster import Roster
from wirehub.builtins.bus.memory import create_backend
from wirehub.builtins.handlers import chat_presence
from wirehub.builtins.handlers.chat_presence import (
    ChatPresence,
    HeadCache,
    NameInfo,
    PresenceRule,
    PresenceRules,
    _one_edit,
    json_bytes,
    member_item,
)
from wirehub.metrics import Metrics
from wirehub.plugins import build_plugin_manager
from wirehub.protocol import ProtocolError, encode
from wirehub.rooms import RoomRules
from wirehub.session import OutFrame
from wirehub.testing import FakeTransport

ODD = 'quo"te\\ Ünïcødé 名前 \U0001f600'


# -- the frame decoder ------------------------------------------------------------------------------------------

FRAMES = [
    '{"op":"join","room":"lobby","id":7}',
    '{"op":"join","room":"lobby","since":{"offset":3,"epoch":"e"}}',
    '{"a":[1,2.5,true,null,"\\u00e9\\ud83d\\ude00"]}',
    '{"op":"x"} ',
    ' {"op":"x"}',
    '{"op":"x"}{"op":"y"}',
    '{"op":"x"} {"op":"y"}',
    '{"op":}',
    '{"op":"x",}',
    '{"n":NaN}',
    '{"n":-Infinity}',
    '{"s":"\\ud800"}',
    '{}',
    '{',
    '}',
    '{"a":{"b":{"c":{}}}}',
    '[1]',
    '"x"',
    "",
]


def _reference(text: str) -> Any:
    """What ``loads`` answered before the direct scan: ``JSONDecoder.decode`` and the same checks."""
    try:
        return ("value", inbound._DECODER.decode(text))
    except inbound.JsonRejected as exc:
        return ("rejected", exc.reason)
    except ValueError:
        return ("rejected", inbound.NOT_JSON)


@pytest.mark.parametrize("text", FRAMES)
def test_the_direct_scan_gives_what_decode_gives(text: str) -> None:
    try:
        got: Any = ("value", inbound._decode(text))
    except inbound.JsonRejected as exc:
        got = ("rejected", exc.reason)
    except ValueError:
        got = ("rejected", inbound.NOT_JSON)
    assert got == _reference(text)


def test_a_request_frame_is_not_decoded_through_the_python_wrappers(monkeypatch: pytest.MonkeyPatch) -> None:
    class Refusing:
        def decode(self, text: str) -> Any:
            raise AssertionError(f"decode({text!r}) called: the frame should have been scanned directly")

    monkeypatch.setattr(inbound, "_DECODER", Refusing())
    assert inbound.loads('{"op":"join","room":"lobby","id":7}') == {"op": "join", "room": "lobby", "id": 7}
    with pytest.raises(AssertionError):  # whitespace around it: the general path, which says what is wrong
        inbound.loads(' {"op":"join"}')


# -- room names -------------------------------------------------------------------------------------------------


def test_a_valid_room_name_is_kept_as_one_string_and_a_bad_one_never() -> None:
    rules = RoomRules()
    first, second = json.loads('{"room":"lobby-1"}'), json.loads('{"room":"lobby-1"}')
    assert first["room"] is not second["room"]
    assert rules.room(first) == "lobby-1"
    assert rules.room(second) is rules.room(first)  # one string per room for every member's state
    for bad in ({"room": "no spaces"}, {"room": ""}, {"room": 5}, {}, {"room": ["lobby-1"]}):
        for _ in range(2):
            with pytest.raises(ProtocolError) as exc:
                rules.room(bad)
            assert exc.value.code == "bad_request"
    assert set(rules._valid) == {"lobby-1"}
    other = RoomRules(r"^team-[a-z]+$")  # another endpoint's pattern: its own cache
    with pytest.raises(ProtocolError):
        other.room({"room": "lobby-1"})
    assert other.room({"room": "team-a"}) == "team-a"


def test_the_room_name_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from wirehub import rooms

    monkeypatch.setattr(rooms, "ROOM_NAME_CACHE", 3)
    rules = RoomRules()
    for i in range(10):
        assert rules.room({"room": f"r{i}"}) == f"r{i}"
        assert len(rules._valid) <= 3
    assert rules.room({"room": "r9"}) == "r9"


# -- JSON fragments ---------------------------------------------------------------------------------------------


def test_json_fragments_are_the_json_of_their_text_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_presence, "JSON_FRAGMENTS", 4)
    monkeypatch.setattr(chat_presence, "_fragments", {})
    texts = ["lobby", ODD, "", "e-1", "x\n\"y", ODD, "lobby"]
    for text in texts * 2:
        assert json_bytes(text) == json.dumps(text, ensure_ascii=False).encode()
        assert len(chat_presence._fragments) <= 4


# -- authorize_now's plan ---------------------------------------------------------------------------------------


class Closed:
    @hookimpl(tryfirst=True)
    def wirehub_authorize(self, identity: Identity, action: str, room: str) -> bool | None:
        return False if room == "closed" else None


def test_the_authorize_plan_is_kept_until_plugins_change(monkeypatch: pytest.MonkeyPatch) -> None:
    host = build_plugin_manager()
    alice = Identity(user="alice", rooms=("*",))
    asked = []

    class Counting:  # the hook caller, counting the copies of its implementations asked for
        def __init__(self, real: Any) -> None:
            self.real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        def get_hookimpls(self) -> Any:
            asked.append(1)
            return self.real.get_hookimpls()

    monkeypatch.setattr(host.pm.hook, "wirehub_authorize", Counting(host.pm.hook.wirehub_authorize))

    def steady(answer: bool) -> None:
        assert host.authorize_now(alice, "join", "closed") is answer
        before = len(asked)
        for _ in range(5):
            assert host.authorize_now(alice, "join", "closed") is answer
        assert len(asked) == before  # worked out once, not copied per call

    steady(True)
    host.pm.register(Closed(), name="closed")
    steady(False)
    host.pm.set_blocked("closed")  # unregisters
    steady(True)


# -- the first page after one edit -------------------------------------------------------------------------------


def _items(members: list[PresenceMember]) -> list[bytes]:
    return [encode(member_item(m)) for m in members]


def test_one_edit_of_the_page_reuses_the_other_items() -> None:
    a, b, c, d = (PresenceMember(u, 1, NameInfo(u.upper())) for u in "abcd")
    old = [a, b, c]
    items = _items(old)
    b2 = PresenceMember("b", 2, b.info)
    cases = {
        "came onto a page not full": [a, b, c, d],
        "came onto the full page, the last went off": [a, d, b],
        "left, nobody moved up": [a, c],
        "left, the next user came on at the end": [b, c, d],
        "connections changed": [a, b2, c],
        "the last one replaced": [a, b, d],
    }
    for what, new in cases.items():
        edited = _one_edit(old, items, new)
        assert edited == _items(new), what
        for m, item in zip(new, edited, strict=True):  # the unchanged members' items are the same objects
            if any(m is o for o in old):
                assert item is items[[o for o in old].index(m)], what
    assert _one_edit(old, items, [a]) is None  # two edits: the general path
    assert _one_edit(old, items, [d, c, b, a]) is None
    equal_copies = [PresenceMember(m.user, m.connections, m.info) for m in [a, b, c, d]]
    assert _one_edit(old, items, equal_copies) is None  # new, equal objects (Redis): the general matching


def test_the_page_after_random_edits_and_a_room_made_again_encodes_as_from_scratch() -> None:
    rng = random.Random(3)
    heads = HeadCache()
    for generation in range(3):  # the room emptied and made again: a new roster, the old page still cached
        roster, sessions = Roster(), []
        for i in range(400):
            if sessions and rng.random() < 0.4:
                roster.remove(sessions.pop(rng.randrange(len(sessions))))
            else:
                user = f"u{rng.randrange(60):03d}"
                sessions.append(f"s{generation}-{i}")
                roster.add(PresenceEntry(user, sessions[-1], "n1", NameInfo(rng.choice(["N", ODD]))))
            members, _ = roster.head(8)
            assert heads.encoded("room", members) == encode([member_item(m) for m in members]), (generation, i)
        for s in sessions:
            roster.remove(s)


# -- the chat endpoint's presence at once -------------------------------------------------------------------------


def _session(user: str) -> Session:
    return Session(FakeTransport(), Identity(user=user, name=user, rooms=("*",)), endpoint="/ws/chat", node="n1",
                   max_queue_bytes=1 << 20)


async def test_the_presence_join_at_once_is_taken_only_when_nothing_waits() -> None:
    from wirehub.builtins.bus.memory import MemoryPresence

    rules = PresenceRules([PresenceRule("quiet-*", events="off"), PresenceRule("none-*", events="off",
                                                                                presence_limit=0),
                           PresenceRule("off-*", presence=False)], "each", 3)
    fast = ChatPresence(rules, 1000, cast(Hub, None), MemoryPresence())
    slow = ChatPresence(rules, 1000, cast(Hub, None), MemoryPresence())
    for i, user in enumerate(["c", "a", "b", "a", "d"]):
        s = _session(user)
        got = fast.join_now(s, "quiet-1")
        assert got is not None and got == await slow.join(s, "quiet-1"), i
    s = _session("e")
    assert fast.join_now(s, "off-1") == (b"", b"")
    assert fast.join_now(s, "lobby") is None  # events each: the user's arrival is announced (async)
    assert await fast.presence.count("lobby") == PresenceCount(0, 0)  # nothing was joined
    for i, user in enumerate(["c", "a", "c"]):  # a count only: at once too, the count as the async join's
        s = _session(user)
        got = fast.join_now(s, "none-1")
        assert got is not None and got == await slow.join(s, "none-1") == (
            b',"count":{"users":%d,"connections":%d},"presence":' % (min(i + 1, 2), i + 1), b"[]"), i


# -- the hub's join at once --------------------------------------------------------------------------------------


async def test_the_hub_joins_at_once_only_a_room_it_has_subscribed() -> None:
    backend = create_backend({}, "bus.memory")
    hub = Hub(backend, Metrics())
    await backend.bus.start(hub)
    hub.on_bus_state(True)
    first, second, third = _session("a"), _session("b"), _session("c")
    assert hub.join_now("r", first) is False  # nobody here yet: the first join subscribes (async)
    assert first.rooms == frozenset() and hub.members("r") == []
    await hub.join("r", first)
    assert hub.join_now("r", second) is True
    assert second.rooms == frozenset({"r"}) and hub.members("r") == [first, second]
    r = hub._rooms["r"]
    async with r.lock:  # a first join or a last leave under way: wait for it (async)
        assert hub.join_now("r", third) is False
    assert hub.members("r") == [first, second]
    await backend.bus.close()


# -- the loop's flusher and the frame headers ---------------------------------------------------------------------


def test_the_flusher_given_last_is_answered_without_a_lookup_and_each_loop_has_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = []

    class Counting(dict):  # type: ignore[type-arg]
        def get(self, key: Any, default: Any = None) -> Any:
            lookups.append(key)
            return super().get(key, default)

    monkeypatch.setattr(transport, "_flushers", Counting())
    monkeypatch.setattr(transport, "_last", None)

    async def twice() -> tuple[object, object]:
        return transport._flusher(), transport._flusher()

    loop_a, loop_b = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        a1, a2 = loop_a.run_until_complete(twice())
        b1, b2 = loop_b.run_until_complete(twice())
        a3, _ = loop_a.run_until_complete(twice())
    finally:
        loop_a.close()
        loop_b.close()
    assert a1 is a2 is a3 and b1 is b2 and a1 is not b1
    assert len(lookups) == 3  # the first ask of each loop, and loop a's again after b's: not one per ask


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("binary", [False, True])
def test_frame_headers_at_every_length_boundary(n: int, binary: bool) -> None:
    payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
    first = 0x82 if binary else 0x81
    if n < 126:
        head = bytes((first, n))
    elif n < 65536:
        head = bytes((first, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 127)) + n.to_bytes(8, "big")
    assert OutFrame(payload, binary).wire == head + payload

