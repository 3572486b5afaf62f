"""Presence that scales (issue 11), over real WebSockets: the bounded ``joined``, the paged and count-only
``presence`` op, per-room-pattern rules (presence off, events each / off / batched ``presence.diff``), and
departed users. The replica tests run on memory (one replica, several clients) and on 3 replicas of one
Redis / one NATS."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Cluster, bus_block, run_cli, write_config
from wirehub import BusUnavailable, Presence, PresenceEntry
from wirehub.brokers import BrokerProcess
from wirehub.builtins.handlers.chat import ChatHandler
from wirehub.builtins.handlers.chat_events import BatchedEvents, lookup_of
from wirehub.client import Client
from wirehub.testing import LiveServer, WsClient, unique_room, ws_connect

CHAT = "/ws/chat"
ServerFactory = Callable[..., Awaitable[LiveServer]]
FAST = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "op_timeout": 3.0, "presence_ttl": 3.0}
INTERVAL = 0.2
RULES = [
    {"pattern": "ticker-*", "presence": False},
    {"pattern": "quiet-*", "events": "off"},
    {"pattern": "big-*", "events": "batched", "interval": INTERVAL},
    {"pattern": "drain-*", "events": "batched", "interval": 2.0},  # longer than a drain with grace 1
    {"pattern": "slow-*", "events": "batched", "interval": 1.0},  # timers whose order a test sets
]


def chat_config(bus: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "auth": {"plugin": "test-header"},
        "plugins": {"load": ["tests.plugins_for_tests.chat_auth"]},
        "endpoints": [{"path": CHAT, "handler": "chat",
                       "options": {"publish_rate": 1000, "publish_burst": 1000, "presence_rules": RULES,
                                   **options}}],
    }
    if bus is not None:
        config["bus"] = bus
    return config


@pytest.fixture
async def server(wirehub_server: ServerFactory) -> LiveServer:
    return await wirehub_server(chat_config())


@pytest.fixture(params=["memory", "redis", "nats"])
async def replicas(request: pytest.FixtureRequest, wirehub_server: ServerFactory) -> list[LiveServer]:
    """Three replicas on one broker; on memory one replica three times (clients spread over it)."""
    kind = str(request.param)
    if kind == "memory":
        one = await wirehub_server(chat_config())
        return [one, one, one]
    return await start_replicas(request, wirehub_server, kind, 3)


def shared_bus(request: pytest.FixtureRequest, kind: str) -> dict[str, Any]:
    """A ``bus:`` block on the session's Redis or NATS ("memory": an empty one), under a prefix of its own:
    replicas given the same block share it."""
    prefix = f"pr{uuid.uuid4().hex[:8]}"
    if kind == "memory":
        return {}
    if kind == "redis":
        broker: Any = request.getfixturevalue("redis_server")
        return {"plugin": "redis", "redis": {"url": broker.url, "key_prefix": prefix, **FAST}}
    broker = request.getfixturevalue("nats_server")
    return {"plugin": "nats", "nats": {"servers": [broker.url], "subject_prefix": prefix, "storage": "memory", **FAST}}


async def start_replicas(request: pytest.FixtureRequest, wirehub_server: ServerFactory, kind: str,
                         n: int, chat_options: dict[str, Any] | None = None, **extra: Any) -> list[LiveServer]:
    """``n`` in-process replicas on the session's Redis or NATS, under a prefix of their own; ``chat_options``:
    more options of their chat endpoint."""
    bus = shared_bus(request, kind)
    return [await wirehub_server({**chat_config(bus, **(chat_options or {})), "server": {"node_id": f"r{i}"},
                                  **extra}) for i in range(n)]


async def connect(server: LiveServer, user: str, name: str = "") -> WsClient:
    headers = {"X-User": user, **({"X-Name": name} if name else {})}
    return await server.ws(CHAT, headers=headers, welcome=True)


async def member(server: LiveServer, user: str, room: str) -> tuple[WsClient, dict[str, Any]]:
    ws = await connect(server, user)
    joined = await ws.request({"op": "join", "room": room})
    assert joined["op"] == "joined", joined
    return ws, joined


async def crowd(servers: list[LiveServer], room: str, n: int, prefix: str = "u") -> list[WsClient]:
    """``n`` users (u000, u001, ...) joined to ``room``, spread over ``servers``, 25 at a time."""
    out: list[WsClient] = []
    for start in range(0, n, 25):
        batch = await asyncio.gather(*(member(servers[i % len(servers)], f"{prefix}{i:03d}", room)
                                       for i in range(start, min(n, start + 25))))
        out.extend(ws for ws, _ in batch)
    return out


async def error(ws: WsClient, request: dict[str, Any]) -> dict[str, Any]:
    reply = await ws.request(request)
    assert reply["op"] == "error", reply
    return reply


async def still_served(server: LiveServer) -> None:
    """A bystander pair in a fresh room still chats."""
    room = unique_room()
    a, _ = await member(server, "bystander-a", room)
    b, _ = await member(server, "bystander-b", room)
    ack = await a.request({"op": "publish", "room": room, "data": "still here"})
    assert (await b.recv_op("message"))["offset"] == ack["offset"]


# -- bounded joined, paging, count -------------------------------------------------------------------------


async def test_joined_lists_the_first_100_members_with_count_and_cursor(replicas: list[LiveServer]) -> None:
    room = unique_room()
    await crowd(replicas, room, 249)
    last, joined = await member(replicas[1], "zz-last", room)
    assert joined["count"] == {"users": 250, "connections": 250}
    assert [m["user"] for m in joined["presence"]] == [f"u{i:03d}" for i in range(100)]
    assert all(m["connections"] == 1 for m in joined["presence"])
    assert isinstance(joined["cursor"], str) and joined["cursor"]

    # paging on from joined's cursor, and from the start: every member exactly once, in user order
    seen = [m["user"] for m in joined["presence"]]
    cursor = joined["cursor"]
    while cursor is not None:
        page = await last.request({"op": "presence", "room": room, "after": cursor, "limit": 60})
        assert page["op"] == "presence" and page["count"] == {"users": 250, "connections": 250}
        assert len(page["members"]) <= 60
        seen += [m["user"] for m in page["members"]]
        cursor = page.get("cursor")
    expected = [f"u{i:03d}" for i in range(249)] + ["zz-last"]
    assert seen == expected

    first = await last.request({"op": "presence", "room": room})  # default page: presence_limit
    assert [m["user"] for m in first["members"]] == expected[:100] and first["cursor"]
    count = await last.request({"op": "presence", "room": room, "count_only": True, "id": "c"})
    assert count == {"op": "presence", "id": "c", "room": room, "count": {"users": 250, "connections": 250}}


async def test_a_small_room_has_no_cursor_and_counts_tabs(server: LiveServer) -> None:
    room = unique_room()
    await member(server, "alice", room)
    await member(server, "bob", room)
    _, joined = await member(server, "bob", room)  # bob's second tab
    assert joined["presence"] == [{"user": "alice", "connections": 1}, {"user": "bob", "connections": 2}]
    assert joined["count"] == {"users": 2, "connections": 3} and "cursor" not in joined


async def test_presence_limit_option_and_zero(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(chat_config(presence_limit=2, presence_rules=[
        {"pattern": "count-*", "presence_limit": 0}]))
    room, counted = unique_room(), unique_room("count")
    for user in ("a", "b", "c"):
        await member(server, user, room)
        ws, joined = await member(server, user, counted)
    assert [m["user"] for m in joined["presence"]] == [] and joined["count"]["users"] == 3
    _, joined = await member(server, "d", room)
    assert [m["user"] for m in joined["presence"]] == ["a", "b"] and joined["cursor"]
    page = await ws.request({"op": "presence", "room": counted})  # limit 0 rooms page by 1 by default
    assert [m["user"] for m in page["members"]] == ["a"]


@pytest.mark.parametrize(("fields", "message"), [
    ({"count_only": "yes"}, "field 'count_only' must be true or false"),
    ({"count_only": True, "limit": 5}, "field 'count_only' cannot be combined with 'after' or 'limit'"),
    ({"count_only": True, "after": "x"}, "field 'count_only' cannot be combined with 'after' or 'limit'"),
    ({"after": 5}, "field 'after' must be the cursor of a presence reply (a string of 1 to 1024 characters)"),
    ({"after": ""}, "field 'after' must be the cursor of a presence reply (a string of 1 to 1024 characters)"),
    ({"after": "x" * 1025}, "field 'after' must be the cursor of a presence reply (a string of 1 to 1024 characters)"),
    ({"limit": 0}, "field 'limit' must be an integer from 1 to 1000"),
    ({"limit": 1001}, "field 'limit' must be an integer from 1 to 1000"),
    ({"limit": True}, "field 'limit' must be an integer from 1 to 1000"),
    ({"limit": 2.5}, "field 'limit' must be an integer from 1 to 1000"),
    ({"room": 7}, "field 'room' must be a string"),
])
async def test_presence_request_validation(server: LiveServer, fields: dict[str, Any], message: str) -> None:
    room = unique_room()
    ws, _ = await member(server, "alice", room)
    reply = await error(ws, {"op": "presence", "room": room, "id": "bad", **fields})
    assert reply == {"op": "error", "id": "bad", "code": "bad_request", "message": message}
    assert (await ws.request({"op": "presence", "room": room, "count_only": True}))["count"]["users"] == 1
    await still_served(server)


# -- rules per room pattern ---------------------------------------------------------------------------------


async def test_presence_off_for_a_pattern_writes_nothing(server: LiveServer) -> None:
    room = unique_room("ticker")
    a, joined = await member(server, "alice", room)
    assert set(joined) == {"op", "id", "room", "offset", "epoch", "recovered"}
    b, _ = await member(server, "bob", room)
    assert await server.app.backend.presence.members(room) == []
    assert (await server.app.backend.presence.count(room)).users == 0
    reply = await error(b, {"op": "presence", "room": room, "id": "p"})
    assert reply == {"op": "error", "id": "p", "code": "forbidden", "message": f"presence is off for room {room!r}",
                     "reason": "presence_off"}
    assert (await error(b, {"op": "presence", "room": room, "count_only": True}))["reason"] == "presence_off"
    b.close()
    await a.expect_nothing(0.3)  # no leave event either
    ack = await a.request({"op": "publish", "room": room, "data": 1})  # messages still flow
    assert ack["op"] == "ack"
    other = unique_room()  # a room of another pattern keeps presence
    _, joined = await member(server, "carol", other)
    assert joined["count"] == {"users": 1, "connections": 1}
    await still_served(server)


async def test_events_off_for_a_pattern(server: LiveServer) -> None:
    room = unique_room("quiet")
    a, _ = await member(server, "alice", room)
    b, joined = await member(server, "bob", room)
    assert [m["user"] for m in joined["presence"]] == ["alice", "bob"]
    b.close()
    await a.expect_nothing(0.3)
    assert [m["user"] for m in (await a.request({"op": "presence", "room": room}))["members"]] == ["alice"]


async def test_events_each_stay_the_default(server: LiveServer) -> None:
    room = unique_room()
    a, _ = await member(server, "alice", room)
    await member(server, "bob", room)
    assert await a.recv() == {"op": "presence.join", "room": room, "user": "bob"}


async def test_deprecated_presence_events_false_is_events_off_unless_a_rule_says(
    wirehub_server: ServerFactory,
) -> None:
    server = await wirehub_server(chat_config(presence_events=False))
    plain, big = unique_room(), unique_room("big")
    a, _ = await member(server, "alice", plain)
    bob, _ = await member(server, "bob", plain)
    bob.close()
    await a.expect_nothing(0.3)  # nothing for the plain room...
    await a.request({"op": "join", "room": big})
    await member(server, "carol", big)
    diff = await a.recv_op("presence.diff")  # ...while the rule's batched events still go out
    assert diff["room"] == big and diff["count"]["users"] >= 1


# -- batched diffs ------------------------------------------------------------------------------------------


def apply(members: set[str], diff: dict[str, Any]) -> None:
    """What a client does with a presence.diff: leaves, then joins (both idempotent)."""
    members.difference_update(diff["leaves"])
    members.update(j["user"] for j in diff["joins"])


async def diffs_until(ws: WsClient, members: set[str], want: set[str], timeout: float = 10.0) -> list[dict[str, Any]]:
    """Apply the diffs ``ws`` gets to ``members`` until they are ``want`` and the last diff's count
    says so; any other frame fails the test."""
    got: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (members == want and got and got[-1]["count"]["users"] == len(want)):
        frame = await ws.recv(max(0.01, deadline - loop.time()))
        assert frame["op"] == "presence.diff", frame
        apply(members, frame)
        got.append(frame)
    return got


async def settle(ws: WsClient, members: set[str], want: set[str], quiet: float = INTERVAL * 3) -> list[dict[str, Any]]:
    """:func:`diffs_until`, then every diff still coming until none for ``quiet`` seconds (a few intervals)."""
    got = await diffs_until(ws, members, want)
    while True:
        try:
            frame = await ws.recv(quiet)
        except TimeoutError:
            break
        assert frame["op"] == "presence.diff", frame
        apply(members, frame)
        got.append(frame)
    assert members == want and got[-1]["count"]["users"] == len(want)
    return got


async def watched_room(server: LiveServer) -> tuple[str, WsClient]:
    """A room with batched events and a member, ``watcher``, whose own join's diff was read."""
    room = unique_room("big")
    watcher, _ = await member(server, "watcher", room)
    await watcher.recv_op("presence.diff")
    return room, watcher


async def test_a_user_who_came_and_went_within_one_interval_is_named_as_gone(server: LiveServer) -> None:
    """A diff names each user as they are when it is sent: one who joined and left in the interval is in
    ``leaves`` (they are gone; a client that never listed them deletes nothing), once. (A 1 s interval: the
    join and the close fall in one on a loaded machine too.)"""
    room = unique_room("slow")
    watcher, _ = await member(server, "watcher", room)
    first = await watcher.recv_op("presence.diff")
    assert first == {"op": "presence.diff", "room": room, "joins": [{"user": "watcher"}], "leaves": [],
                     "count": {"users": 1, "connections": 1}}
    ws, _ = await member(server, "flash", room)
    ws.close()
    assert await watcher.recv_op("presence.diff") == {"op": "presence.diff", "room": room, "joins": [],
                                                      "leaves": ["flash"], "count": {"users": 1, "connections": 1}}
    await watcher.expect_nothing(INTERVAL * 3)
    named = await connect(server, "named", name="Named One")
    await named.request({"op": "join", "room": room})
    assert (await watcher.recv_op("presence.diff"))["joins"] == [{"user": "named", "name": "Named One"}]


async def test_a_change_while_a_diff_is_on_its_way_is_named_again_in_the_next(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another replica's change between a diff's read and its publish may reach the members before the diff,
    which then tells the user as they were: a second read after the publish names them in the next diff."""
    room, watcher = await watched_room(server)
    hub, presence = server.app.hub, server.app.backend.presence
    publish = hub.publish

    async def publish_after_a_leave(r: str, frame: bytes, **kw: Any) -> int | None:
        if r == room and b'"u"' in frame:  # u's last connection leaves as on another replica: no event here
            (session,) = [s for s in server.app.sessions if s.identity.user == "u"]
            await presence.leave(room, session.id)
        return await publish(r, frame, **kw)

    monkeypatch.setattr(hub, "publish", publish_after_a_leave)  # before the join: its diff is due in 0.2 s
    await member(server, "u", room)
    stale = await watcher.recv_op("presence.diff")
    assert stale["joins"] == [{"user": "u"}] and stale["count"]["users"] == 2, stale
    assert (await watcher.recv_op("presence.diff"))["leaves"] == ["u"]
    await watcher.expect_nothing(INTERVAL * 3)


async def test_a_closing_replica_sends_at_once_what_changed_while_its_last_diff_was_on_its_way(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A draining replica's last diff says u left; u comes back through another replica before it is
    published: no later diff of this replica would tell it, so it goes out at once."""
    handler = server.app.handlers[CHAT]
    assert isinstance(handler, ChatHandler)
    room, watcher = await watched_room(server)
    u, _ = await member(server, "u", room)
    assert (await watcher.recv_op("presence.diff"))["joins"] == [{"user": "u"}]
    hub, presence = server.app.hub, server.app.backend.presence
    publish, back = hub.publish, []

    async def back_elsewhere(r: str, frame: bytes, **kw: Any) -> int | None:
        if r == room and b'"u"' in frame and not back:  # u joins as on another replica: no event here
            back.append(await presence.join(room, PresenceEntry("u", "elsewhere", "other-node")))
        return await publish(r, frame, **kw)

    monkeypatch.setattr(hub, "publish", back_elsewhere)
    await u.aclose()
    await asyncio.sleep(INTERVAL / 4)  # its leave waits in the pending diff
    await handler.presence.close()  # what the shutdown runs after a drain
    assert (await watcher.recv_op("presence.diff"))["leaves"] == ["u"]
    assert (await watcher.recv_op("presence.diff"))["joins"] == [{"user": "u"}]


async def test_a_count_changed_while_a_diff_was_on_its_way_goes_out_again(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another replica's join between a diff's read and its publish changes the count the diff carries
    (and may have gone out first): the next diff carries the count again, naming nobody."""
    room, watcher = await watched_room(server)
    hub, presence = server.app.hub, server.app.backend.presence
    publish, other = hub.publish, []

    async def other_joins(r: str, frame: bytes, **kw: Any) -> int | None:
        if r == room and b'"x"' in frame and not other:  # counted, not named by this replica
            other.append(await presence.join(room, PresenceEntry("v", "elsewhere", "other-node")))
        return await publish(r, frame, **kw)

    monkeypatch.setattr(hub, "publish", other_joins)
    await member(server, "x", room)
    stale = await watcher.recv_op("presence.diff")
    assert stale["joins"] == [{"user": "x"}] and stale["count"] == {"users": 2, "connections": 2}, stale
    assert await watcher.recv_op("presence.diff") == {"op": "presence.diff", "room": room, "joins": [], "leaves": [],
                                                      "count": {"users": 3, "connections": 3}}
    await watcher.expect_nothing(INTERVAL * 3)


@pytest.mark.parametrize("older", ["no lookup", "the protocol's empty body"])
async def test_a_bus_without_lookup_has_its_diffs_checked_against_its_members(
    server: LiveServer, older: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A bus plugin's presence written before ``Presence.lookup`` (or inheriting its empty body): batched
    diffs read the room's members instead, with a warning, and say the same."""
    presence = server.app.backend.presence

    class Older(*((Presence,) if older != "no lookup" else ())):  # type: ignore[misc]
        async def members(self, room: str) -> list[PresenceEntry]:
            return await presence.members(room)

    mode = BatchedEvents(server.app.hub, lookup_of(Older()))
    room, watcher = await watched_room(server)
    for entry in (PresenceEntry("ann", "s1", "n1", {"name": "Ann"}), PresenceEntry("ann", "s2", "n2", {"name": "Ann"}),
                  PresenceEntry("bob", "s3", "n1")):
        await presence.join(room, entry)
    users = ["zed", "bob", "ann", "bob"]
    assert await mode._lookup(room, users) == await presence.lookup(room, users)
    rule = server.app.handlers[CHAT].presence.rules.for_room(room)  # type: ignore[attr-defined]
    for user in ("ann", "gone"):
        await mode.joined(room, rule, user, "", None)
    assert await watcher.recv_op("presence.diff") == {
        "op": "presence.diff", "room": room, "joins": [{"user": "ann", "name": "Ann"}], "leaves": ["gone"],
        "count": {"users": 3, "connections": 4}}
    assert "has no lookup" in caplog.text
    await mode.close()


async def test_a_bus_that_stays_down_is_logged_once_and_its_diff_goes_out_when_it_is_back(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    room, watcher = await watched_room(server)
    hub = server.app.hub
    publish, tries = hub.publish, []

    async def down_twice(r: str, frame: bytes, **kw: Any) -> int | None:
        if r == room and len(tries) < 2:
            tries.append(asyncio.get_running_loop().time())
            raise BusUnavailable("the bus is down")
        return await publish(r, frame, **kw)

    monkeypatch.setattr(hub, "publish", down_twice)
    await member(server, "u", room)
    assert (await watcher.recv_op("presence.diff", timeout=10))["joins"] == [{"user": "u"}]
    assert len(tries) == 2 and tries[1] - tries[0] >= INTERVAL * 2 * 0.9  # the wait doubles
    assert caplog.text.count("(the bus is down)") == 1


async def test_a_diff_that_keeps_failing_is_given_up_and_the_next_says_truncated(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    room, watcher = await watched_room(server)
    hub = server.app.hub
    publish, tries = hub.publish, []

    async def broken(r: str, frame: bytes, **kw: Any) -> int | None:
        if r == room and b'"u"' in frame:
            tries.append(frame)
            raise RuntimeError("a bug in a plugin")
        return await publish(r, frame, **kw)

    monkeypatch.setattr(hub, "publish", broken)
    await member(server, "u", room)
    await watcher.expect_nothing(INTERVAL * 15)  # tries after 0.2, 0.4 and 0.8 s
    assert len(tries) == 3  # then given up
    await member(server, "v", room)
    diff = await watcher.recv_op("presence.diff")
    assert diff["joins"] == [{"user": "v"}] and diff["truncated"] is True, diff


async def test_batched_diffs_are_ordered_and_add_up_to_the_membership(replicas: list[LiveServer]) -> None:
    """A burst of joins and leaves on two replicas: every member gets the same diffs in the same order, at
    most one per room per interval per replica, and applying them to the joined list gives the true
    membership, with the latest count."""
    room = unique_room("big")
    a, joined_a = await member(replicas[0], "obs-a", room)
    b, joined_b = await member(replicas[1], "obs-b", room)
    seen_a = {m["user"] for m in joined_a["presence"]}
    seen_b = {m["user"] for m in joined_b["presence"]}
    before_a = await settle(a, seen_a, {"obs-a", "obs-b"})
    diffs_b = await settle(b, seen_b, {"obs-a", "obs-b"})

    loop = asyncio.get_running_loop()
    started = loop.time()
    sides = replicas[:2]
    stay = await crowd(sides, room, 30, "in")  # in000..in029, alternating replicas
    quick = await crowd(sides, room, 6, "flash")
    for ws in quick:  # joined and gone within the interval (or just after: then a join and a leave)
        ws.close()
    await asyncio.sleep(INTERVAL * 1.5)
    for ws in stay[:10]:  # in000..in009 leave in a later interval
        ws.close()
    burst = loop.time() - started
    truth = {"obs-a", "obs-b"} | {f"in{i:03d}" for i in range(10, 30)}

    after_a = await settle(a, seen_a, truth)
    diffs_b += await settle(b, seen_b, truth)
    assert diffs_b == (before_a + after_a)[-len(diffs_b):]  # one order on every replica
    # the diffs name only users who came or went, and the last one naming a user has them as they are
    last: dict[str, bool] = {}
    for d in after_a:
        last.update({j["user"]: True for j in d["joins"]} | dict.fromkeys(d["leaves"], False))
    assert set(last) <= {f"in{i:03d}" for i in range(30)} | {f"flash{i:03d}" for i in range(6)}, last
    assert {u for u, there in last.items() if there} == truth - {"obs-a", "obs-b"}
    count = await a.request({"op": "presence", "room": room, "count_only": True})
    assert count["count"] == {"users": len(truth), "connections": len(truth)}
    replica_count = len({id(r) for r in sides})
    assert len(after_a) <= replica_count * (burst / INTERVAL + 3)  # batched, not one event per join


@pytest.mark.parametrize("kind", ["memory", "redis", "nats"])
async def test_auto_events_are_each_in_a_small_room_and_batched_in_a_big_one(
    request: pytest.FixtureRequest, kind: str, wirehub_server: ServerFactory,
) -> None:
    """The default ``auto``: presence.join / presence.leave while a room has at most presence_each_max users (4
    here), one presence.diff per interval above it (a join into a room of 50,000 is not an event to each of them),
    and each again once a read finds it at or below 9/10 of that (not flipping at every join around it)."""
    server = await wirehub_server(chat_config(shared_bus(request, kind) or None, presence_each_max=4))
    room = unique_room()
    watcher, _ = await member(server, "w", room)
    users = {u: (await member(server, u, room))[0] for u in ("u1", "u2", "u3")}
    assert [(f["op"], f["user"]) for f in [await watcher.recv() for _ in range(3)]] == [
        ("presence.join", "u1"), ("presence.join", "u2"), ("presence.join", "u3")]
    for u in ("u4", "u5"):  # 5 users, then 6: past presence_each_max
        users[u] = (await member(server, u, room))[0]
    diff = await watcher.recv_op("presence.diff")
    while "u5" not in [j["user"] for j in diff["joins"]]:
        diff = await watcher.recv_op("presence.diff")
    assert diff["count"] == {"users": 6, "connections": 6}
    for u in ("u1", "u2", "u3", "u4", "u5"):  # leaves read no count: batched until a read finds the room small
        assert (await users[u].request({"op": "leave", "room": room}))["op"] == "left"
    while "u5" not in (await watcher.recv_op("presence.diff"))["leaves"]:
        pass
    await member(server, "q", room)  # 2 users: the room is small again (this join may still go batched)
    await asyncio.sleep(1.5)  # its event or diff
    await member(server, "r", room)
    frame = await watcher.recv()
    while frame.get("user") == "q" or "q" in str(frame.get("joins")):
        frame = await watcher.recv()
    assert frame == {"op": "presence.join", "room": room, "user": "r"}


async def test_departed_users_go_out_as_leaves(server: LiveServer) -> None:
    """What the handler does with the backend's on_departed report (a dead replica's users)."""
    handler = server.app.handlers[CHAT]
    assert isinstance(handler, ChatHandler)
    plain, big = unique_room(), unique_room("big")
    a, _ = await member(server, "alice", plain)
    await a.request({"op": "join", "room": big})
    await a.recv_op("presence.diff")
    await handler.presence.departed(plain, ["ghost-1", "ghost-2"])
    # then the events the dead replica had not sent or checked are lost: the members reload their lists
    assert [await a.recv() for _ in range(3)] == [
        {"op": "presence.leave", "room": plain, "user": "ghost-1"},
        {"op": "presence.leave", "room": plain, "user": "ghost-2"},
        {"op": "presence.diff", "room": plain, "joins": [], "leaves": [], "count": {"users": 1, "connections": 1},
         "truncated": True}]
    await handler.presence.departed(big, ["ghost-3"])
    diff = await a.recv_op("presence.diff")
    # the dead replica's diffs not sent yet are lost: the list may lack one of them, so reload it
    assert diff["leaves"] == ["ghost-3"] and diff["joins"] == [] and diff["truncated"] is True
    await handler.presence.departed(unique_room("ticker"), ["ghost-4"])  # presence off: nothing
    await a.expect_nothing(INTERVAL * 2)
    # a dead replica's 1,200 users: one bounded diff (500 names), flagged as truncated, count exact
    await handler.presence.departed(big, [f"gone-{i:04d}" for i in range(1200)])
    diff = await a.recv_op("presence.diff")
    assert diff["leaves"] == [f"gone-{i:04d}" for i in range(500)] and diff["truncated"] is True
    assert diff["count"] == {"users": 1, "connections": 1}
    await a.expect_nothing(INTERVAL * 2)


async def _two_timers(a: LiveServer, b: LiveServer, room: str) -> None:
    """B's diff of ``room`` falls due 0.3 s before A's (each replica's timer starts at its first change)."""
    await member(b, "p2", room)
    await asyncio.sleep(0.3)
    await member(a, "p1", room)
    await asyncio.sleep(0.2)


async def test_a_user_back_on_another_replica_stays_listed_when_the_diffs_cross(
    request: pytest.FixtureRequest, kind: str, wirehub_server: ServerFactory,
) -> None:
    """u's last connection leaves on A and u comes back on B; B's diff goes out first. Told as events (join,
    then leave) the client's list lost u for good; each diff names u as u is when it is sent."""
    a, b = await start_replicas(request, wirehub_server, kind, 2)
    room = unique_room("slow")
    watcher, joined = await member(a, "watcher", room)
    seen = {m["user"] for m in joined["presence"]}
    first, _ = await member(a, "u", room)
    await diffs_until(watcher, seen, {"watcher", "u"})
    await _two_timers(a, b, room)
    await first.aclose()
    await asyncio.sleep(0.1)
    await member(b, "u", room)
    await settle(watcher, seen, {"watcher", "u", "p1", "p2"}, quiet=2.0)


async def test_two_tabs_on_two_replicas_both_gone_leave_no_ghost_when_the_diffs_cross(
    request: pytest.FixtureRequest, kind: str, wirehub_server: ServerFactory,
) -> None:
    """u's first tab joins on A, a second on B; the first closes, then the second (u's last, on B). B's diff
    (a leave) goes out before A's (a join): told as events the client kept u for good."""
    a, b = await start_replicas(request, wirehub_server, kind, 2)
    room = unique_room("slow")
    watcher, joined = await member(a, "watcher", room)
    seen = {m["user"] for m in joined["presence"]}
    await diffs_until(watcher, seen, {"watcher"})
    await _two_timers(a, b, room)
    tab1, _ = await member(a, "u", room)
    tab2, _ = await member(b, "u", room)
    for tab in (tab1, tab2):
        await tab.aclose()
        await asyncio.sleep(0.05)
    await settle(watcher, seen, {"watcher", "p1", "p2"}, quiet=2.0)


async def test_a_draining_replica_sends_its_pending_leaves(
    request: pytest.FixtureRequest, kind: str, wirehub_server: ServerFactory,
) -> None:
    """SIGTERM's drain closes the sessions, then the shutdown sends the diff of their leaves at once: the
    room's 2 s timer would only fire after the replica closed its bus."""
    going, staying = await start_replicas(request, wirehub_server, kind, 2,
                                          drain={"grace": 1, "reconnect_jitter": 0.1})
    room = unique_room("drain")
    watcher, joined = await member(staying, "watcher", room)
    seen = {m["user"] for m in joined["presence"]}
    goers = [(await member(going, user, room))[0] for user in ("d1", "d2", "d3")]
    await settle(watcher, seen, {"watcher", "d1", "d2", "d3"})
    codes = await asyncio.gather(going.app.drain(), *(ws.wait_closed() for ws in goers))
    assert [code for code, _ in codes[1:]] == [1001, 1001, 1001]
    diff = await watcher.recv_op("presence.diff", timeout=5)
    assert sorted(diff["leaves"]) == ["d1", "d2", "d3"] and diff["count"] == {"users": 1, "connections": 1}


@pytest.fixture
def cluster(kind: str, broker: BrokerProcess, tmp_path: Path) -> Cluster:
    c = Cluster.configure(tmp_path, ["pa", "pb"], {
        "bus": bus_block(kind, broker, f"pk{uuid.uuid4().hex[:6]}"),
        "endpoints": [{"path": CHAT, "handler": "chat", "options": {"presence_rules": RULES}}],
    })
    c.start()
    return c


async def test_a_killed_replicas_users_leave_in_a_diff(cluster: Cluster) -> None:
    """SIGKILL a replica: its users leave the survivors' member list within the TTL, in a presence.diff."""
    opened: list[WsClient] = []

    async def connect_to(replica: int) -> WsClient:
        ws = await ws_connect(cluster.replicas[replica].url(CHAT, "ws"))
        opened.append(ws)
        return ws

    try:
        await cluster.wait_ready()
        room = unique_room("big")
        watcher = await connect_to(0)
        await watcher.recv()
        await watcher.request({"op": "join", "room": room})
        doomed = [await connect_to(1) for _ in range(3)]
        users = {(await ws.recv())["user"] for ws in doomed}
        for ws in doomed:
            assert (await ws.request({"op": "join", "room": room}))["op"] == "joined"
        members = {m["user"] for m in (await watcher.request({"op": "presence", "room": room}))["members"]}
        assert users <= members and len(members) == 4
        cluster.replicas[1].kill()
        left: set[str] = set()
        while not users <= left:  # FAST_BUS presence_ttl is 1.5 s; the read times out long after
            diff = await watcher.recv_op("presence.diff", timeout=10)
            left.update(diff["leaves"])
        assert diff["count"]["users"] == 1
        count = await watcher.request({"op": "presence", "room": room, "count_only": True})
        assert count["count"] == {"users": 1, "connections": 1}
    finally:
        for ws in opened:
            ws.close()
            if ws.conn.stream is not None:
                ws.conn.stream.close()
        cluster.stop()


# -- the Python client --------------------------------------------------------------------------------------


async def test_python_client_count_paging_and_diffs(wirehub_server: ServerFactory) -> None:
    """Guests (anonymous auth) in a batched room listing 3 members in joined."""
    rules = [{"pattern": "big-*", "events": "batched", "interval": INTERVAL, "presence_limit": 3}]
    server = await wirehub_server({"endpoints": [{"path": CHAT, "handler": "chat",
                                                  "options": {"presence_rules": rules}}]})
    room = unique_room("big")
    others: dict[str, WsClient] = {}
    for _ in range(5):
        ws = await server.ws(CHAT)
        others[(await ws.recv())["user"]] = ws
        assert (await ws.request({"op": "join", "room": room}))["op"] == "joined"
    client = Client(server.ws_url(CHAT), ping_interval=0)
    try:
        events: list[dict[str, Any]] = []
        sub = await client.join(room, lambda msg: None, on_presence=events.append)
        assert sub.count == {"users": 6, "connections": 6} and sub.cursor is not None
        assert len(sub.presence) == 3 and set(sub.members) == {m["user"] for m in sub.presence}

        everyone = [m["user"] for m in sub.presence]
        cursor: str | None = sub.cursor
        while cursor is not None:
            page = await client.presence_page(room, after=cursor, limit=2)
            everyone += [m["user"] for m in page["members"]]
            cursor = page.get("cursor")
        assert everyone == sorted({*others, (client.welcome or {})["user"]})
        assert await client.presence_count(room) == {"users": 6, "connections": 6}

        deadline = asyncio.get_running_loop().time() + 5
        while not events:  # the diff of the interval we joined in (it repeats joins we were shown)
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        newcomer = await server.ws(CHAT)
        newcomer_user = (await newcomer.recv())["user"]
        await newcomer.request({"op": "join", "room": room})
        gone = next(m["user"] for m in sub.presence if m["user"] in others)  # listed in joined
        await others[gone].request({"op": "leave", "room": room})
        while not (newcomer_user in sub.members and gone not in sub.members):
            assert asyncio.get_running_loop().time() < deadline, (events, sub.members)
            await asyncio.sleep(0.02)
        await asyncio.sleep(INTERVAL * 2)
        assert sub.count == {"users": 6, "connections": 6}
        assert {e["op"] for e in events} == {"presence.diff"}

        # a truncated diff (a dead replica's unsent diffs lost): the list starts again from the first page
        first = [m["user"] for m in (await client.presence_page(room))["members"]]
        sub.members["ghost"] = {"user": "ghost", "connections": 1}
        client._dispatch({"op": "presence.diff", "room": room, "joins": [], "leaves": [],
                          "count": {"users": 6, "connections": 6}, "truncated": True})
        deadline = asyncio.get_running_loop().time() + 5
        while "ghost" in sub.members:
            assert asyncio.get_running_loop().time() < deadline, sub.members
            await asyncio.sleep(0.02)
        assert sorted(sub.members) == first and sub.reloading is None
    finally:
        await client.close()


# -- config -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "key", "fragment"), [
    ({"presence_rules": [{"pattern": "a-*", "events": "sometimes"}]}, "presence_rules[0].events",
     "'sometimes' is not one of: auto, each, batched, off"),
    ({"presence_rules": [{"pattern": "a-*", "presence": False, "events": "auto"}]}, "presence_rules[0].events",
     "needs presence"),
    ({"presence_each_max": 0}, "presence_each_max", "at least 1"),
    ({"presence_rules": [{"pattern": "a-*", "interval": 0}]}, "presence_rules[0].interval", "at least 0.05"),
    ({"presence_rules": [{"pattern": "a-*", "presence": False, "events": "each"}]}, "presence_rules[0].events",
     "needs presence"),
    ({"presence_rules": [{"events": "off"}]}, "presence_rules[0].pattern", "is required"),
    ({"presence_rules": [{"pattern": "a-*", "presence": "no"}]}, "presence_rules[0].presence",
     "expected true or false"),
    ({"presence_rules": [{"pattern": "a-*", "presence_limit": 2000}]}, "presence_rules[0].presence_limit",
     "above presence_max_limit (1000)"),
    ({"presence_limit": 500, "presence_max_limit": 200}, "presence_limit", "above presence_max_limit (200)"),
    ({"presence_rules": {"pattern": "a-*"}}, "presence_rules", "expected a list"),
])
def test_check_config_rejects_bad_presence_options(tmp_path: Path, options: dict[str, Any], key: str,
                                                   fragment: str) -> None:
    config = write_config(tmp_path / "bad.yaml", {"endpoints": [{"path": CHAT, "handler": "chat",
                                                                   "options": options}]})
    result = run_cli("check-config", str(config))
    assert result.returncode == 2, result.stdout
    assert f"endpoints[0].options.{key}: " in result.stderr and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
