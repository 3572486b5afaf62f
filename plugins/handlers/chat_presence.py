"""Presence of the chat endpoint: per-room-pattern rules, bounded member lists, and join/leave events.

The option ``presence_rules`` (first matching glob wins, like ``room_limits``) decides for each room:

- whether presence is kept at all (``presence: false``: no entry is written, ``joined`` carries no
  presence, the ``presence`` op answers ``forbidden`` with ``reason: "presence_off"``);
- how many members ``joined`` lists (``presence_limit``), always with the room's count and a cursor;
- how join/leave events go out: one of the modes of :mod:`wirehub.builtins.handlers.chat_events` (``each``,
  ``batched``, ``off``), or ``auto`` (the default): ``each`` in a room of at most ``presence_each_max`` users,
  ``batched`` in a bigger one, as last read here (:meth:`ChatPresence.mode`).

A join costs O(1) in the room's size: one presence write and one bounded page (or a count).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, cast

from wirehub import (
    BusUnavailable,
    ConfigError,
    ErrorCode,
    Presence,
    PresenceCount,
    PresenceEntry,
    PresenceMember,
    PresencePage,
    ProtocolError,
    encode,
    opt,
)
from wirehub.builtins.handlers.chat_events import (
    EVENT_MODES,
    EVENTS,
    EventMode,
    StaleNotices,
    count_item,
    lookup_of,
)

if TYPE_CHECKING:
    from wirehub import Hub, Session

log = logging.getLogger("wirehub.chat.presence")

#: how ``dumps`` (``ensure_ascii`` off) writes a string, quotes included
json_string: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]

#: strings a join writes again and again (its room's name and epoch, the first page's cursor), each to its JSON
#: encoding as bytes (``json_string(text).encode()``); at most :data:`JSON_FRAGMENTS`, then started over. A pure
#: function's answers: nothing to invalidate (a room emptied and made again has its new epoch looked up anew).
JSON_FRAGMENTS = 4096
_fragments: dict[str, bytes] = {}


def json_bytes(text: str) -> bytes:
    """``json_string(text).encode()``, remembered (see :data:`JSON_FRAGMENTS`). A caller on the join path looks
    in ``_fragments`` itself first (``_fragments.get(text) or json_bytes(text)``: no call when it is known)."""
    found = _fragments.get(text)
    if found is None:
        if len(_fragments) >= JSON_FRAGMENTS:
            _fragments.clear()
        found = _fragments[text] = json_string(text).encode()
    return found

#: longest ``after`` cursor accepted from a client (backends' cursors are user ids or shorter)
MAX_CURSOR = 1024


@dataclass(frozen=True)
class PresenceRule:
    """One item of ``presence_rules``: what rooms matching ``pattern`` (a glob) get."""

    pattern: str
    #: keep presence entries for these rooms; false: none at all (a ticker has no member list)
    presence: bool = True
    #: auto | each | batched | off; unset: the endpoint's default (auto, or off with presence_events: false)
    events: str | None = opt(None, choices=EVENTS)
    #: seconds between two presence.diff events of one room from one replica (events: batched)
    interval: float = opt(1.0, min=0.05, max=60)
    #: members listed in joined (unset: the endpoint's presence_limit)
    presence_limit: int | None = opt(None, min=0)


@dataclass(frozen=True)
class RoomPresence:
    """What the rules decide for one room."""

    enabled: bool
    events: str
    interval: float
    limit: int


#: rooms whose rule is kept (every join and leave asks; a big room asks for the same one again and again)
RULE_CACHE_ROOMS = 4096
#: rooms known here as big (``auto`` events batched) at most; past it the one read above the limit longest ago
#: is forgotten (a big room that emptied is read no more)
BIG_ROOMS = 4096


class PresenceRules:
    def __init__(self, rules: Sequence[PresenceRule], default_events: str, default_limit: int) -> None:
        self.rules = tuple(rules)
        self.default = RoomPresence(True, default_events, 1.0, default_limit)
        self._known: dict[str, RoomPresence] = {}

    def for_room(self, room: str) -> RoomPresence:
        found = self._known.get(room)
        if found is None:
            if len(self._known) >= RULE_CACHE_ROOMS:
                self._known.clear()
            found = self._known[room] = self._match(room)
        return found

    def _match(self, room: str) -> RoomPresence:
        for rule in self.rules:
            if fnmatch.fnmatchcase(room, rule.pattern):
                events = rule.events or ("off" if not rule.presence else self.default.events)
                limit = self.default.limit if rule.presence_limit is None else rule.presence_limit
                return RoomPresence(rule.presence, events, rule.interval, limit)
        return self.default


def check_rules(rules: Sequence[PresenceRule], max_limit: int, key: str) -> None:
    """Contradictions a single field cannot express; ``key`` is the option's dotted key."""
    for i, rule in enumerate(rules):
        if not rule.pattern:
            raise ConfigError(f"{key}[{i}].pattern", "expected a glob pattern like 'ticker-*', got ''")
        if not rule.presence and rule.events not in (None, "off"):
            raise ConfigError(f"{key}[{i}].events", f"{rule.events!r} needs presence; with presence: false "
                              "events are off (leave events out)")
        if rule.presence_limit is not None and rule.presence_limit > max_limit:
            raise ConfigError(f"{key}[{i}].presence_limit",
                              f"{rule.presence_limit} is above presence_max_limit ({max_limit})")


# -- frames ---------------------------------------------------------------------------------------------


def member_item(member: PresenceMember) -> dict[str, Any]:
    item: dict[str, Any] = {"user": member.user, "connections": member.connections}
    if member.info.get("name"):
        item["name"] = member.info["name"]
    return item


def _member_json(member: PresenceMember) -> bytes:
    """``encode(member_item(member))``, spliced (no dict and no JSON encoder per member)."""
    data = b'{"user":%s,"connections":%d' % (json_string(member.user).encode(), member.connections)
    name = member.info.get("name")
    if name:
        data += b',"name":' + (json_string(name).encode() if type(name) is str else encode(name))
    return data + b"}"


#: rooms whose encoded first page is kept (a big room's joins read the same page again and again)
HEAD_CACHE_ROOMS = 1024


class HeadCache:
    """The encoded member list of each room's first page: a join into a big room re-sends the page
    the previous join sent (it changes only when a user on it comes or goes) without building and
    encoding ``limit`` items again. The memory and NATS backends return the same list object while the
    page holds (an identity check); the Redis backend returns an equal one (an equality check). When
    the page changed by one edit (a user came onto it, left it, or their connections changed: what one
    join or leave does to a big room's page), :func:`_one_edit` finds it with one scan and the members
    unchanged around it keep their items; otherwise the items of the members still on the page are
    reused: the memory and NATS backends keep those member objects, found by identity; a page of new,
    equal objects (Redis) is matched by user, connections and info."""

    def __init__(self) -> None:
        #: room -> (the page's members, its encoded list, their encoded items in order). The cached page keeps
        #: its members alive, so no id of one of them is another object's while it is cached.
        self._rooms: dict[str, tuple[Sequence[PresenceMember], bytes, list[bytes]]] = {}

    def encoded(self, room: str, members: Sequence[PresenceMember]) -> bytes:
        cached = self._rooms.get(room)
        if cached is not None:
            if cached[0] is members or cached[0] == members:
                return cached[1]
            edited = _one_edit(cached[0], cached[2], members)
            if edited is not None:
                return self._keep(room, members, edited)
        ids = [*map(id, members)]
        if cached is not None:
            by_id = dict(zip(map(id, cached[0]), cached[2], strict=True))
            items: list[bytes | None] = [*map(by_id.get, ids)]
        else:
            items = [None] * len(ids)
        missing = [i for i, item in enumerate(items) if item is None] if None in items else []
        if len(missing) > 1 and cached is not None:  # new objects (Redis, a page rebuilt): reuse equal ones
            old = {(m.user, m.connections): (m.info, item) for m, item in zip(cached[0], cached[2], strict=True)}
            for i in missing:
                m = members[i]
                found = old.get((m.user, m.connections))
                items[i] = found[1] if found is not None and (found[0] is m.info or found[0] == m.info) else None
        for i in missing:
            if items[i] is None:
                items[i] = _member_json(members[i])
        return self._keep(room, members, cast("list[bytes]", items))

    def _keep(self, room: str, members: Sequence[PresenceMember], items: list[bytes]) -> bytes:
        # what encode() of the items gives: compact JSON, joined by commas
        data = b"[%s]" % b",".join(items)
        if len(self._rooms) >= HEAD_CACHE_ROOMS:
            self._rooms.clear()
        self._rooms[room] = (members, data, items)
        return data


def _one_edit(old: Sequence[PresenceMember], items: list[bytes],
              new: Sequence[PresenceMember]) -> list[bytes] | None:
    """The encoded items of ``new`` when it is ``old`` (encoded as ``items``) with one edit: a member put in,
    one taken out (and maybe the next one after the page put at its end), or one replaced; None otherwise.
    The members before the edit are found by identity (one scan), the rest compared as slices (in C, equal
    when identical); every case is checked in full, so an item is reused only for an equal member."""
    n_old, n_new = len(old), len(new)
    if not n_old or not -1 <= n_new - n_old <= 1:
        return None
    i, short = 0, min(n_old, n_new)
    while i < short and old[i] is new[i]:
        i += 1
    # Each case first checks by identity the member right after the edit (a page of new, equal objects, as
    # Redis reads, is left to the caller's matching: no compare of every member), then the whole rest.
    if n_new > n_old:  # one came onto a page that was not full
        if (i == n_old or old[i] is new[i + 1]) and old[i:] == new[i + 1:]:
            return [*items[:i], _member_json(new[i]), *items[i:]]
    elif n_new < n_old:  # one left, and nobody after the page moved up
        if (i + 1 == n_old or old[i + 1] is new[i]) and old[i + 1:] == new[i:]:
            return [*items[:i], *items[i + 1:]]
    elif i < n_old:
        if (i + 1 == n_old or old[i + 1] is new[i + 1]) and old[i + 1:] == new[i + 1:]:  # one replaced
            return [*items[:i], _member_json(new[i]), *items[i + 1:]]
        if old[i] is new[i + 1] and old[i:-1] == new[i + 1:]:  # one came onto the full page; its last went off
            return [*items[:i], _member_json(new[i]), *items[i:-1]]
        if old[i + 1] is new[i] and old[i + 1:] == new[i:-1]:  # one left the full page; the next user came on
            return [*items[:i], *items[i + 1:], _member_json(new[-1])]
    return None


def joined_fields(count: PresenceCount, cursor: str | None, members: bytes) -> bytes:
    """The presence fields of ``joined`` as ``dumps`` writes them (``ensure_ascii`` off, compact), after a
    comma: ``count``, ``cursor`` when there is one, then ``presence`` (``members``, encoded)."""
    return _fields(count.users, count.connections, cursor) + members


def _fields(users: int, connections: int, cursor: str | None) -> bytes:
    """:func:`joined_fields` without the members: the count's two numbers and the cursor, up to
    ``"presence":``. The members' list follows it in ``joined`` (one copy of a big list, not two)."""
    if cursor is None:
        return b',"count":{"users":%d,"connections":%d},"presence":' % (users, connections)
    return b',"count":{"users":%d,"connections":%d},"cursor":%s,"presence":' % (
        users, connections, _fragments.get(cursor) or json_bytes(cursor))


@dataclass(frozen=True)
class Query:
    """A validated ``presence`` request: a page (``after``, ``limit``) or only the count."""

    count_only: bool
    after: str | None
    limit: int


def parse_query(request: Mapping[str, Any], default_limit: int, max_limit: int) -> Query:
    count_only = request.get("count_only", False)
    if not isinstance(count_only, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'count_only' must be true or false")
    after, limit = request.get("after"), request.get("limit")
    if count_only and (after is not None or limit is not None):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'count_only' cannot be combined with 'after' or 'limit'")
    if after is not None and (not isinstance(after, str) or not after or len(after) > MAX_CURSOR):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"field 'after' must be the cursor of a presence reply (a string of 1 to {MAX_CURSOR} "
                            "characters)")
    if limit is None:
        limit = max(1, min(default_limit, max_limit))
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= max_limit:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field 'limit' must be an integer from 1 to {max_limit}")
    return Query(count_only, after, limit)


#: an entry's info without a name is this one shared empty mapping (one per member adds up)
_NO_INFO: Mapping[str, Any] = MappingProxyType({})


class NameInfo(Mapping[str, Any]):
    """``{"name": name}`` in 48 bytes instead of a dict's 184: a presence entry's info, one per member."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, key: str) -> Any:
        if key == "name":
            return self.name
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("name",))

    def __len__(self) -> int:
        return 1

    def __repr__(self) -> str:
        return f"{{'name': {self.name!r}}}"


def _info(name: str) -> Mapping[str, Any]:
    return NameInfo(name) if name else _NO_INFO


# -- the chat endpoint's presence ------------------------------------------------------------------------------


class _AtOnce(Protocol):
    """A presence backend whose join and first page never wait (the memory one): ``join_now`` is its
    ``join``, ``head_now`` its ``page(room, None, limit)`` as ``(members, cursor, users, connections)``; with
    ``limit`` 0, ``([], None, users, connections)``: its ``count``, the first page's cache left alone."""

    def join_now(self, room: str, entry: PresenceEntry) -> bool: ...

    def head_now(self, room: str, limit: int) -> tuple[Sequence[PresenceMember], str | None, int, int]: ...


class ChatPresence:
    """Presence entries, snapshots and events of one chat endpoint."""

    def __init__(self, rules: PresenceRules, max_limit: int, hub: Hub, presence: Presence,
                 owns: Callable[[str], bool] = lambda room: True, each_max: int = 1000) -> None:
        self.rules = rules
        #: rooms whose events are ``auto`` get ``each`` up to this many users, ``batched`` above
        self.each_max = each_max
        #: rooms with ``auto`` events whose last count read here was above ``each_max`` (and not below 9/10 of it
        #: since): few, the big ones; a room not known here is taken as small
        self._big: dict[str, None] = {}
        #: whether a room of the hub or the backend is one of this endpoint's (their reports name every room: a
        #: game's ``ns/room`` too, whose members must get no chat event)
        self.owns = owns
        self.max_limit = max_limit
        self.presence = presence
        lookup = lookup_of(presence)  # a bus plugin's presence without lookup: one fallback, one warning
        self.modes = {name: make(hub, lookup) for name, make in EVENT_MODES.items()}
        self.heads = HeadCache()
        #: a backend's read of the first page (limit 0: the count alone) right after its own join, when it
        #: has a cheaper one than ``page`` and ``count`` (NATS: no second sync of its live copy)
        self._joined_page: Callable[[str, int], Awaitable[PresencePage]] | None = getattr(
            presence, "joined_page", None)
        #: a backend's join that reads the first page right after it in the same round trip (Redis)
        self._join_page: Callable[[str, PresenceEntry, int], Awaitable[tuple[bool, PresencePage]]] | None = \
            getattr(presence, "join_page", None)
        #: a backend whose join and first page never wait (memory) answers them without a coroutine
        self._now: _AtOnce | None = presence if callable(getattr(presence, "join_now", None)) and callable(
            getattr(presence, "head_now", None)) else None  # type: ignore[assignment]
        presence.on_departed(self.departed)
        on_restored = getattr(presence, "on_restored", None)  # a bus plugin written before it has none
        if on_restored is not None:
            on_restored(self.restored)
        self._closed = False

        async def deliver_here(room: str, frame: bytes) -> None:
            hub.deliver_here(room, frame)

        #: to this replica's members who missed events (:meth:`resumed`)
        self._missed = StaleNotices(hub, presence.count, deliver_here, drop_when_down=True)

    def mode(self, room: str, rule: RoomPresence) -> EventMode:
        """The events mode of ``room``: its rule's, and for ``auto`` ``each`` or (a room of more than ``each_max``
        users, as last read here) ``batched``: a join or leave in a room of 50,000 must not be an event to
        50,000 members each."""
        events = rule.events
        if events == "auto":
            events = "batched" if room in self._big else "each"
        return self.modes[events]

    def _sized(self, room: str, rule: RoomPresence, users: int) -> None:
        """A count of ``room`` read here: its ``auto`` events follow it (batched above ``each_max`` users, each
        again at or below 9/10 of it: a room around the threshold does not flip at every join)."""
        if rule.events != "auto":
            return
        big = self._big
        if users > self.each_max:
            if room in big:
                del big[room]
            elif len(big) >= BIG_ROOMS:  # the one read above the limit longest ago goes
                del big[next(iter(big))]
            big[room] = None  # last: read most recently
        elif users * 10 <= self.each_max * 9:
            big.pop(room, None)

    def join_now(self, session: Session, room: str) -> tuple[bytes, bytes] | None:
        """:meth:`join` without a coroutine when nothing in it waits: a backend that answers at once (memory),
        and no event to send (the room's events off) or no presence at all; None otherwise, with nothing done
        (then :meth:`join`)."""
        now = self._now
        if now is None:
            return None
        rule = self.rules.for_room(room)
        if not rule.enabled:
            return b"", b""
        if rule.events != "off":  # an arrival to announce (async)
            return None
        identity = session.identity
        now.join_now(room, PresenceEntry(identity.user, session.id, session.node, _info(identity.name)))
        limit = rule.limit
        members, cursor, users, connections = now.head_now(room, limit)
        if not limit:  # the count only (a big room's usual rule)
            return _fields(users, connections, None), b"[]"
        return _fields(users, connections, cursor), self.heads.encoded(room, members)

    async def join(self, session: Session, room: str) -> tuple[bytes, bytes]:
        """Record the session in ``room``'s presence, announce its user if new, and return the
        ``joined`` fields, encoded, in two parts that follow each other (together what
        :func:`joined_fields` gives): ``,"count":{...},"cursor":...,"presence":`` and the list of the
        first members. Both empty when presence is off."""
        rule = self.rules.for_room(room)
        if not rule.enabled:
            return b"", b""
        name = session.identity.name
        entry = PresenceEntry(session.identity.user, session.id, session.node, _info(name))
        now = self._now
        if now is not None:
            first = now.join_now(room, entry)
            members, cursor, users, connections = now.head_now(room, rule.limit)
            self._sized(room, rule, users)
            if first and rule.events != "off":
                await self.mode(room, rule).joined(room, rule, entry.user, name, session)
            if not rule.limit:
                return _fields(users, connections, None), b"[]"
            return _fields(users, connections, cursor), self.heads.encoded(room, members)
        elif (join_page := self._join_page) is not None:  # the page (or with limit 0 the count) in the same trip
            first, page = await join_page(room, entry, rule.limit)
            self._sized(room, rule, page.count.users)
            if first and rule.events != "off":
                await self.mode(room, rule).joined(room, rule, entry.user, name, session)
            if not rule.limit:
                return _fields(page.count.users, page.count.connections, None), b"[]"
            return _fields(page.count.users, page.count.connections, page.cursor), \
                self.heads.encoded(room, page.members)
        first = await self.presence.join(room, entry)
        try:
            page = await self._first_page(room, rule.limit)
        except Exception:
            if first and rule.events != "off":  # the entry is written: its arrival is told all the same
                await self.mode(room, rule).joined(room, rule, entry.user, name, session)
            raise
        self._sized(room, rule, page.count.users)  # before the event: auto goes by this read
        if first and rule.events != "off":
            await self.mode(room, rule).joined(room, rule, entry.user, name, session)
        if not rule.limit:
            return _fields(page.count.users, page.count.connections, None), b"[]"
        return _fields(page.count.users, page.count.connections, page.cursor), self.heads.encoded(room, page.members)

    async def _first_page(self, room: str, limit: int) -> PresencePage:
        """The room's first ``limit`` members and count (limit 0: the count alone), read after a join here."""
        joined_page = self._joined_page
        if joined_page is not None:  # with limit 0 the count of the same read
            return await joined_page(room, limit)
        if limit == 0:
            return PresencePage((), None, await self.presence.count(room))
        return await self.presence.page(room, None, limit)

    async def leave(self, session: Session, room: str) -> None:
        """Remove the session's entry; announce its user's departure after their last connection.
        Raises BusUnavailable when the entry could not be removed (it then expires with the replica's
        heartbeat)."""
        rule = self.rules.for_room(room)
        if not rule.enabled:
            return
        user = await self.presence.leave(room, session.id)
        if user is not None:
            try:
                await self.mode(room, rule).left(room, rule, user, session)
            except BusUnavailable:  # the entry is gone; the event's check tells the members once the bus is back
                log.warning("room %s: the leave of %r was not announced, the bus is down (it is once it is back)",
                            room, user)

    async def departed(self, room: str, users: Sequence[str]) -> None:
        """The backend removed a dead replica's entries: their users' last connections left ``room``."""
        rule = self.rules.for_room(room)
        if not rule.enabled or not self.owns(room) or self._closed:
            return
        if rule.events == "auto":  # the reaper may never have read the room: a leave per user to 50,000?
            try:
                before = (await self.presence.count(room)).users + len(users)
            except Exception as exc:  # the mode known here, then
                log.info("room %s: its count before announcing departures could not be read: %s", room, exc)
            else:
                if before > self.each_max:  # (a mass departure does not make the room small for its own news)
                    self._sized(room, rule, before)
        try:
            await self.mode(room, rule).departed(room, rule, users)
        except BusUnavailable:
            log.warning("room %s: the leaves of %d departed users were not announced, the bus is down (they are "
                        "once it is back)", room, len(users))

    def restored(self, room: str, users: Sequence[str]) -> None:
        """The backend wrote this replica's entries of ``users`` again: it was declared dead in a stall (their
        departure may have been told) or the broker lost them."""
        rule = self.rules.for_room(room)
        if rule.enabled and self.owns(room) and not self._closed:
            self.mode(room, rule).restored(room, rule, users)

    def resumed(self, rooms: Sequence[str]) -> None:
        """The hub's :meth:`~wirehub.Hub.on_resumed`: this replica's members of ``rooms`` missed what the bus
        carried while its link (or those rooms' subscriptions) was down, presence events included (they are not
        in history). Each room with events on gets, on this replica only, a ``presence.diff`` that names nobody
        and says ``truncated`` (its list may be stale: reload it), with the room's count."""
        stale = []
        for room in rooms:
            rule = self.rules.for_room(room)
            if rule.enabled and rule.events != "off" and self.owns(room):
                stale.append(room)
        if not self._closed:
            self._missed.tell(stale)

    def check_enabled(self, room: str) -> None:
        if not self.rules.for_room(room).enabled:
            raise ProtocolError(ErrorCode.FORBIDDEN, f"presence is off for room {room!r}", reason="presence_off")

    async def query(self, room: str, query: Query) -> dict[str, Any]:
        """The fields of a ``presence`` reply."""
        rule = self.rules.for_room(room)
        if query.count_only:
            count = await self.presence.count(room)
            self._sized(room, rule, count.users)
            return {"count": count_item(count)}
        page = await self.presence.page(room, query.after, query.limit)
        self._sized(room, rule, page.count.users)
        fields: dict[str, Any] = {"members": [member_item(m) for m in page.members], "count": count_item(page.count)}
        if page.cursor is not None:
            fields["cursor"] = page.cursor
        return fields

    async def close(self) -> None:
        self._closed = True  # the backend and the hub may report on until they close: nothing is started then
        await asyncio.gather(self._missed.close(), *(mode.close() for mode in self.modes.values()))
