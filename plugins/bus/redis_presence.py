"""Presence on Redis: entries written once (join) and deleted once (leave), node liveness by heartbeat.

Per room (one hash tag per room, ``{<room>}``, so a Redis Cluster keeps a room in one slot):

- ``<p>:pm:{r}``: ZSET of user ids, all with score 0, paged with ZRANGEBYLEX from the cursor;
- ``<p>:pc:{r}``: HASH user -> ``"<connections>:<info json>"``;
- ``<p>:ps:{r}``: HASH session -> entry JSON (user, session, node, info);
- ``<p>:ph:{r}``: HASH, the version of the room's first page (bumped by a change to a user on the
  largest first page read): a replica re-reads its cached first page only when it changed.

They change together in one Lua script at join and leave; Redis deletes a hash or set when it
empties (and the leave script the head version), so a room without members leaves no key. Per
node: ``<p>:pn:<node>`` (cluster: ``<p>:pn:{<node>}``), a SET of ``[room, session]`` JSON pairs,
updated in the same pipeline (one round trip; on a cluster one per shard touched, in parallel) as the
room script. The commands asked for in one loop iteration (a join storm's writes and reads, with the
history positions) go out as one pipeline (:mod:`wirehub.builtins.bus.redis_batch`), and the first-page
reads of one room in it are one script run. A room's writes (join, leave, upkeep's retried leaves, a restore,
a reaping) name the room, so they reach Redis in the order they were asked for whatever pipelines they go in
(redis_batch's "Order": a leave and the rejoin of its session are never run the other way round).

Liveness: ``<p>:presence:nodes``, a ZSET node -> last heartbeat (Redis server time, ms). Each
replica runs ONE script per interval that stamps its node(s) and returns the nodes whose stamp is
older than ``presence_ttl``: one round trip whatever the number of entries. For a dead node a live
replica takes ``<p>:presence:claim:<node>`` (SET NX PX ttl): only one replica wins; it removes
the node's entries in batches through the room leave script, drops the node, and reports the
users who left to its ``on_departed`` listeners; before each batch it renews the claim and stops
when the node heartbeat again since (a stall, not a death) or the claim ran out. A replica that finds
its own stamp missing or expired (a broker that lost its data, or a stall longer than the TTL that may
have had it reaped) writes its entries again once no claim of its node is left, at every beat until all
are written, and reports the users who were gone to its ``on_restored`` listeners. Each reaping batch
counts itself in ``<p>:presence:reaped:<node>`` in its own pipeline, which the node's replica reads at
its heartbeat: entries that a reaper stalled past its checks removed after the node came back are
written again at the next beat.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from wirehub import DepartedListener, PresenceCount, PresenceEntry, PresenceMember, PresencePage
from wirehub.builtins.bus._broker import cancel_and_wait
from wirehub.builtins.bus._presence_json import info_json as _info_json
from wirehub.builtins.bus._presence_json import string as _string
from wirehub.builtins.bus._roster import Departures
from wirehub.builtins.bus.redis_batch import Command, Group, Parse

if TYPE_CHECKING:
    from wirehub.builtins.bus.redis import RedisBus

log = logging.getLogger("wirehub.bus.redis")

#: entries removed per reaping round trip
REAP_BATCH = 500
#: how long a node's count of reaped batches is kept when its replica never comes back to clear it (ms)
REAPED_TTL_MS = 3_600_000
#: rooms whose first page a replica keeps
HEAD_CACHE_ROOMS = 1024
# The head of a room, KEYS[4], a HASH: ``d``, the largest first page a replica caches (set by the page
# script), and ``v``, its version, bumped when a user at a lower rank than ``d`` arrives, leaves or
# changes their count. ``v`` starts from the server's clock (microseconds): a room emptied and filled
# again never repeats a version.
_NEW_VERSION = """
local function new_version()
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[4], 'v', t[1] .. string.sub('00000' .. t[2], -6))
end
"""
_BUMP = _NEW_VERSION + """
local function bump(user)
  local d = tonumber(redis.call('HGET', KEYS[4], 'd') or '0')
  if d == 0 then return end
  local r = redis.call('ZRANK', KEYS[1], user)
  if r and r < d then
    if redis.call('HINCRBY', KEYS[4], 'v', 1) == 1 then new_version() end
  end
end
"""

# KEYS: users zset, user hash, session hash, head version; ARGV: per join (several: the joins of one loop
# iteration into the room, in order) session, user, entry json, info json -> per join 1 if first of user, else 0
_JOIN = _BUMP + """
local out = {}
for i = 1, #ARGV, 4 do
  local first = 0
  if redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 2]) == 1 then
    local user = ARGV[i + 1]
    local cur = redis.call('HGET', KEYS[2], user)
    if cur then
      local n, info = string.match(cur, '^(%d+):(.*)$')
      redis.call('HSET', KEYS[2], user, (tonumber(n) + 1) .. ':' .. info)
    else
      redis.call('HSET', KEYS[2], user, '1:' .. ARGV[i + 3])
      redis.call('ZADD', KEYS[1], 0, user)
      first = 1
    end
    bump(user)
  end
  out[#out + 1] = first
end
return out
"""

# KEYS: as _JOIN; ARGV: sessions -> {node, user or '' (still present), ...} per removed session.
# The head version goes with the room's last member.
_LEAVE = _BUMP + """
local out = {}
for i = 1, #ARGV do
  local raw = redis.call('HGET', KEYS[3], ARGV[i])
  if raw then
    redis.call('HDEL', KEYS[3], ARGV[i])
    local e = cjson.decode(raw)
    local gone = ''
    local cur = redis.call('HGET', KEYS[2], e['user'])
    if cur then
      local n, info = string.match(cur, '^(%d+):(.*)$')
      n = tonumber(n) - 1
      bump(e['user'])
      if n <= 0 then
        redis.call('HDEL', KEYS[2], e['user'])
        redis.call('ZREM', KEYS[1], e['user'])
        gone = e['user']
      else
        redis.call('HSET', KEYS[2], e['user'], n .. ':' .. info)
      end
    end
    out[#out + 1] = e['node']
    out[#out + 1] = gone
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[4]) end
return out
"""

# KEYS: as _JOIN; ARGV: after ('' = from the start), limit, the head version the caller holds ('' = none)
# -> {users, connections, more, version, u1, v1, u2, v2, ...}: no members when the caller's version holds
_PAGE = _NEW_VERSION + """
local lo = '-'
if ARGV[1] ~= '' then lo = '(' .. ARGV[1] end
local limit = tonumber(ARGV[2])
local users = redis.call('ZCARD', KEYS[1])
local out = {users, redis.call('HLEN', KEYS[3]), 0, ''}
if limit <= 0 then return out end
if ARGV[1] == '' and users > 0 then
  if limit > tonumber(redis.call('HGET', KEYS[4], 'd') or '0') then redis.call('HSET', KEYS[4], 'd', limit) end
  if redis.call('HEXISTS', KEYS[4], 'v') == 0 then new_version() end
  out[4] = redis.call('HGET', KEYS[4], 'v')
  if ARGV[3] == out[4] then
    if users > limit then out[3] = 1 end
    return out
  end
end
local page = redis.call('ZRANGEBYLEX', KEYS[1], lo, '+', 'LIMIT', 0, limit + 1)
if #page > limit then
  out[3] = 1
  page[#page] = nil
end
if #page == 0 then return out end
local vals = redis.call('HMGET', KEYS[2], unpack(page))
for i = 1, #page do
  out[#out + 1] = page[i]
  out[#out + 1] = vals[i] or '0:{}'
end
return out
"""

# KEYS: as _PAGE's; ARGV: users -> {users, connections, {each user's "<connections>:<info json>" or nil}}
_LOOKUP = """
local found = {}
for i = 1, #ARGV, 1000 do  -- unpack takes at most about 8,000 values
  local part = redis.call('HMGET', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  for j = 1, #part do found[#found + 1] = part[j] end
end
return {redis.call('ZCARD', KEYS[1]), redis.call('HLEN', KEYS[3]), found}
"""

# KEYS: nodes zset; ARGV: ttl_ms, node...
# -> {{nodes of ARGV without a live stamp (none, or older than the TTL: maybe reaped)}, {dead nodes}}
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = now - tonumber(ARGV[1])
local missing = {}
for i = 2, #ARGV do
  local stamp = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if not stamp or tonumber(stamp) <= horizon then missing[#missing + 1] = ARGV[i] end
  redis.call('ZADD', KEYS[1], now, ARGV[i])
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon, 'LIMIT', 0, 16)
return {missing, dead}
"""

# KEYS: nodes zset; ARGV: node, ttl_ms -> 1 when the node was dropped (still dead). The caller saw its
# index empty just before (a Redis Cluster keeps the two keys on different slots: one script cannot
# see both); a node that wrote an entry in between is alive, finds its stamp gone and writes again.
_FORGET_NODE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stamp = redis.call('ZSCORE', KEYS[1], ARGV[1])
if stamp and tonumber(stamp) > now - tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""

# KEYS: nodes zset; ARGV: node, ttl_ms -> 1 when the node heartbeat within the TTL (a reaper that claimed it
# after it came back leaves it be)
_ALIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stamp = redis.call('ZSCORE', KEYS[1], ARGV[1])
if stamp and tonumber(stamp) > now - tonumber(ARGV[2]) then return 1 end
return 0
"""

# KEYS: a node's reaped count; ARGV: the count its replica read before writing its entries again -> 1 when
# cleared (no batch came since)
_CLEAR_REAPED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

SCRIPTS = {
    "presence_join": _JOIN,
    "presence_leave": _LEAVE,
    "presence_page": _PAGE,
    "presence_lookup": _LOOKUP,
    "presence_beat": _BEAT,
    "presence_forget_node": _FORGET_NODE,
    "presence_alive": _ALIVE,
    "presence_clear_reaped": _CLEAR_REAPED,
}


def _entry_json(entry: PresenceEntry, info: str | None = None) -> str:
    """``_encode`` of the entry as a dict (user, session, node, info), spliced; ``info``: ``_encode`` of
    its info when the caller has it already (a join sends it as an argument too)."""
    if info is None:
        info = _info_json(entry.info)
    return f'{{"user":{_string(entry.user)},"session":{_string(entry.session)},"node":{_string(entry.node)},' \
        f'"info":{info}}}'


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _replies(replies: list[Any]) -> list[Any]:
    return replies


#: a join as :class:`_Joins` takes it: the join script's arguments (session, user, entry json, info json),
#: encoded by its caller (an info JSON cannot hold fails that join, not the others of its script run)
JoinArgs = tuple[str, str, str, str]


class _Joins(Group):
    """The joins into a room queued while no leave of the room was (key ``("join", room, node, limit)``;
    items :data:`JoinArgs`): one run of the join script and one ``SADD`` of their node index items, and unless
    ``limit`` is None one read of the first page after them in the same pipeline (``limit`` 0: the count
    only); per join (True when it was its user's first, the page or None)."""

    __slots__ = ("presence",)

    def __init__(self, presence: RedisPresence) -> None:
        self.presence = presence

    def commands(self, key: Any, items: list[JoinArgs]) -> tuple[Sequence[Command], Any]:
        _, room, node, limit = key
        p = self.presence
        keys = p._keys(room)
        commands = [p._script("presence_join", keys, [a for args in items for a in args]),
                    ("SADD", p._node_index(node), *[p._index_item(room, args[0]) for args in items])]
        if limit is None:
            return commands, None
        # after the joins in the pipeline: the page holds them, and every write acknowledged before them
        head = p._heads.get(room)
        held = head if head is not None and head[1] == limit else None
        commands.append(p._script("presence_page", keys, ["", limit, held[0] if held is not None else ""]))
        return commands, held

    def results(self, key: Any, items: list[JoinArgs], replies: list[Any],
                held: tuple[str, int, list[PresenceMember]] | None) -> Sequence[tuple[bool, PresencePage | None]]:
        limit = key[3]
        page = self.presence._parse_page(key[1], None, limit, held, replies[2]) if limit is not None else None
        return [(bool(first), page) for first in replies[0]]


class RedisPresence:
    """The :class:`wirehub.bus.Presence` of the Redis backend (see the module docstring)."""

    def __init__(self, bus: RedisBus, ttl: float) -> None:
        self.bus = bus
        self.ttl_ms = int(ttl * 1000)
        self._departures = Departures()
        self._restorations = Departures("on_restored")
        #: this replica's entries: room -> session -> entry; written again only if the broker lost them
        #: (per room, not keyed by a (room, session) tuple: 56 B less per member of a big room)
        self._local: dict[str, dict[str, PresenceEntry]] = {}
        #: the node ids this replica's entries carry (normally one): the heartbeat stamps them
        self._nodes: set[str] = set()
        #: nodes stamped at least once (a node is stamped before its first entry is written)
        self._stamped: set[str] = set()
        #: our entries must be written again (a stamp was lost, or a reaping removed some) and have not all been
        #: yet: each beat tries
        self._unrestored = False
        #: node -> the count of reaped batches the last beat read (cleared after the restore if unchanged)
        self._reaped: dict[str, str] = {}
        #: dead nodes being reaped by this replica
        self._reaping: set[str] = set()
        self._reapers: set[asyncio.Task[None]] = set()
        #: leaves the broker did not take (down, timeout): retried by upkeep (entries are never
        #: refreshed, so a lost leave would otherwise stay until this replica dies)
        self._unleft: dict[tuple[str, str], PresenceEntry] = {}
        #: room -> (head version, limit, members) of the first page last read (callers must not change it)
        self._heads: dict[str, tuple[str, int, list[PresenceMember]]] = {}
        #: room -> the members of that first page by their raw reply (user, "<n>:<info>")
        self._memo: dict[str, dict[tuple[bytes, bytes], PresenceMember]] = {}
        #: room -> its keys (:meth:`_keys`)
        self._room_keys: dict[str, list[str]] = {}
        self._joins = _Joins(self)

    # -- naming ----------------------------------------------------------------------------------------

    def _keys(self, room: str) -> list[str]:
        """The room's four keys (callers must not change the list: it is kept, a big room asks per join)."""
        keys = self._room_keys.get(room)
        if keys is None:
            if len(self._room_keys) >= HEAD_CACHE_ROOMS:
                self._room_keys.clear()
            bus = self.bus
            keys = self._room_keys[room] = [bus.key("pm", room), bus.key("pc", room), bus.key("ps", room),
                                            bus.key("ph", room)]
        return keys

    def _node_index(self, node: str) -> str:
        return self.bus.node_index_key(node)

    @property
    def _nodes_key(self) -> str:
        return f"{self.bus.prefix}:presence:nodes"

    def _claim_key(self, node: str) -> str:
        return f"{self.bus.prefix}:presence:claim:{node}"

    def _reaped_key(self, node: str) -> str:
        """How many batches of ``node``'s entries a reaping removed (its replica clears it once it wrote them
        again)."""
        return f"{self.bus.prefix}:presence:reaped:{node}"

    @staticmethod
    def _index_item(room: str, session: str) -> str:
        """``_encode([room, session])``, spliced (the same text: a leave removes what any replica wrote)."""
        return f"[{_string(room)},{_string(session)}]"

    # -- plumbing --------------------------------------------------------------------------------------

    async def _pipeline(self, *commands: Command, share: Hashable | None = None, parse: Parse | None = None,
                        rooms: Sequence[str] = ()) -> Any:
        """The replies of ``commands`` (or ``parse`` of them), sent with the bus's other commands of this
        loop iteration in one pipeline (:mod:`wirehub.builtins.bus.redis_batch`). ``rooms``: those it writes,
        whose writes reach Redis in the order they were asked for (a join is the ``scope`` of its gather)."""
        return await self.bus.batch.run(commands, share=share, parse=parse or _replies, rooms=rooms)

    def _script(self, name: str, keys: list[str], args: Sequence[Any]) -> Command:
        return self.bus.batch.script(SCRIPTS[name], keys, args)

    # -- Presence ---------------------------------------------------------------------------------------

    async def join(self, room: str, entry: PresenceEntry) -> bool:
        first, _ = await self._join(room, entry, None)
        return first

    async def join_page(self, room: str, entry: PresenceEntry, limit: int) -> tuple[bool, PresencePage]:
        """:meth:`join`, and the first page of ``limit`` members right after it (the chat's ``joined``; 0: the
        count only): read after the join in the same pipeline, so it holds the join and every write acknowledged
        before the join began. One round trip instead of the two of ``join`` then ``page`` (or ``count``)."""
        first, page = await self._join(room, entry, limit)
        assert page is not None
        return first, page

    async def _join(self, room: str, entry: PresenceEntry, limit: int | None) -> tuple[bool, PresencePage | None]:
        info = _info_json(entry.info)  # first: an info JSON cannot hold fails this join alone, before any state
        args: JoinArgs = (entry.session, entry.user, _entry_json(entry, info), info)
        if entry.node not in self._stamped:  # once per node: an entry's node must be known to be reapable
            self._nodes.add(entry.node)
            await self._beat()
        local = self._local.get(room)
        if local is None:
            local = self._local[room] = {}
        local[entry.session] = entry
        self._unleft.pop((room, entry.session), None)
        try:
            # with the other joins into the room queued since its last leave: one script run, one reply
            out: tuple[bool, PresencePage | None] = await self.bus.batch.gather(
                ("join", room, entry.node, limit), args, self._joins, scope=room)
        except BaseException:
            self._drop_local(room, entry.session)
            self._unleft[(room, entry.session)] = entry  # a join that timed out may still have run
            raise
        return out

    def _drop_local(self, room: str, session: str) -> PresenceEntry | None:
        local = self._local.get(room)
        if local is None:
            return None
        entry = local.pop(session, None)
        if not local:
            del self._local[room]
        return entry

    async def leave(self, room: str, session: str) -> str | None:
        entry = self._drop_local(room, session)  # first: never written again, whatever happens next
        # a join into the room asked for after this leave goes behind it, not into a script run queued before it
        self.bus.batch.seal(room)
        keys, item = self._keys(room), self._index_item(room, session)
        if entry is not None:
            idx = self._node_index(entry.node)
            try:
                out = await self._pipeline(self._script("presence_leave", keys, [session]), ("SREM", idx, item),
                                           rooms=(room,))
            except BaseException:
                # it may not have run: the upkeep retries it, unless the session joined again meanwhile (its join
                # ran after this pipeline ended: a retry would remove a joined member)
                if session not in self._local.get(room, ()):
                    self._unleft[(room, session)] = entry
                raise
            removed = out[0]
        else:  # another replica's connection (or one this replica forgot): learn its node first
            removed = (await self._pipeline(self._script("presence_leave", keys, [session]), rooms=(room,)))[0]
            if removed:
                await self._pipeline(("SREM", self._node_index(_text(removed[0])), item), rooms=(room,))
        if not removed:
            return None
        user = _text(removed[1])
        return user or None

    async def count(self, room: str) -> PresenceCount:
        keys = self._keys(room)
        users, connections = await self._pipeline(("ZCARD", keys[0]), ("HLEN", keys[2]))
        return PresenceCount(int(users), int(connections))

    async def page(self, room: str, after: str | None, limit: int) -> PresencePage:
        """A page. The first one is read only when the room's head version changed since this
        replica last read it: in a big room a join rarely changes it, so there is no page to read
        or parse (the same list is returned while it holds)."""
        keys = self._keys(room)
        head = self._heads.get(room) if after is None else None
        known = head[0] if head is not None and head[1] == limit else ""
        # the page reads of one room in one batch (a join storm) are one script run, parsed once
        page: PresencePage = await self.bus.batch.run(
            lambda: [self._script("presence_page", keys, [after or "", max(0, limit), known])],
            share=("page", room, after, limit, known),
            parse=lambda replies: self._parse_page(room, after, limit, head if known else None, replies[0]))
        return page

    def _parse_page(self, room: str, after: str | None, limit: int,
                    held: tuple[str, int, list[PresenceMember]] | None, out: list[Any]) -> PresencePage:
        version = _text(out[3])
        if held is not None and version == held[0]:
            members = held[2]
        else:
            # a first page that moved mostly holds the members it held: those are not parsed again
            first = after is None and bool(version) and limit > 0
            memo = self._memo.get(room, {}) if first else {}
            seen: dict[tuple[bytes, bytes], PresenceMember] = {}
            members = []
            for i in range(4, len(out), 2):
                raw = (out[i], out[i + 1])
                member = memo.get(raw)
                if member is None:
                    n, _, info = _text(raw[1]).partition(":")
                    member = PresenceMember(_text(raw[0]), int(n), json.loads(info or "{}"))
                seen[raw] = member
                members.append(member)
            if first:
                if len(self._heads) >= HEAD_CACHE_ROOMS:
                    self._heads.clear()
                    self._memo.clear()
                self._heads[room] = (version, limit, members)
                self._memo[room] = seen
        cursor = members[-1].user if int(out[2]) and members else None
        return PresencePage(members, cursor, PresenceCount(int(out[0]), int(out[1])))

    async def lookup(self, room: str, users: Sequence[str]) -> PresencePage:
        keys, wanted = self._keys(room), list(dict.fromkeys(users))
        # one script run: the count and the users' records of one moment (a pipeline could interleave a join)
        out = await self._pipeline(self._script("presence_lookup", keys, wanted))
        users_n, connections, found = out[0]
        members = []
        for user, raw in zip(wanted, found, strict=True):
            if raw:
                n, _, info = _text(raw).partition(":")
                members.append(PresenceMember(user, int(n), json.loads(info or "{}")))
        return PresencePage(members, None, PresenceCount(int(users_n), int(connections)))

    def on_departed(self, callback: DepartedListener) -> None:
        self._departures.add(callback)

    def on_restored(self, callback: DepartedListener) -> None:
        self._restorations.add(callback)

    async def members(self, room: str) -> list[PresenceEntry]:
        key = self._keys(room)[2]
        raw = (await self._pipeline(("HVALS", key)))[0]
        out = []
        for item in raw:
            d = json.loads(item)
            out.append(PresenceEntry(d["user"], d["session"], d["node"], d.get("info") or {}))
        return out

    async def stored_keys(self, room: str) -> list[str]:
        """The broker keys holding ``room``'s presence (diagnostics, tests): empty once it is empty."""
        keys = self._keys(room)
        found = await self._pipeline(*(("EXISTS", k) for k in keys))
        return [k for k, n in zip(keys, found, strict=True) if int(n)]

    # -- upkeep -------------------------------------------------------------------------------------------

    async def _beat(self) -> list[str]:
        """Stamp this replica's node(s); the dead nodes. Restores our entries if a stamp was lost."""
        nodes = sorted(self._nodes)
        args = [self.ttl_ms, *nodes]
        out, *reaped = await self._pipeline(self._script("presence_beat", [self._nodes_key], args),
                                            *(("GET", self._reaped_key(node)) for node in nodes))
        lost = {_text(n) for n in out[0]} & self._stamped
        self._stamped.update(nodes)
        # a reaping removed entries of ours (each batch counts itself in the key): they are written again, then the
        # count is cleared unless a batch came meanwhile (one stalled past its check of the node)
        self._reaped = {node: _text(n) for node, n in zip(nodes, reaped, strict=True) if n is not None}
        if lost or self._reaped:
            self._unrestored = True
        if self._unrestored:
            await self._restore()
        return [_text(n) for n in out[1]]

    async def upkeep(self) -> None:
        """One round trip: stamp this replica's node(s), learn the dead ones; reap those in the
        background (claimed, so one replica does it)."""
        for node in await self._beat():
            if node in self._nodes or node in self._reaping:
                continue
            self._reaping.add(node)
            task = asyncio.ensure_future(self._reap(node))
            self._reapers.add(task)
            task.add_done_callback(self._reapers.discard)
        if self._unleft:  # rare: only after a leave the broker did not take
            await self._retry_leaves()

    async def _retry_leaves(self) -> None:
        batch = list(self._unleft.items())[:REAP_BATCH]
        commands: list[Command] = []
        for (room, session), e in batch:
            self.bus.batch.seal(room)  # as in leave: a join asked for after it runs after it
            commands.append(self._script("presence_leave", self._keys(room), [session]))
            commands.append(("SREM", self._node_index(e.node), self._index_item(room, session)))
        await self._pipeline(*commands, rooms=list({room for (room, _), _ in batch}))
        for key, e in batch:
            if self._unleft.get(key) is e:  # not a join of the session given up meanwhile
                del self._unleft[key]

    async def _restore(self) -> None:
        """The broker lost our entries (restart without persistence) or we were declared dead: write them
        again, in batches (rare; O(entries)), and report the users who were gone from a room and are back to
        ``on_restored``. Not while a replica reaps one of our nodes (it would remove what is written): the next
        beat tries again, as after a batch that failed."""
        if not self._local and not self._reaped:
            self._unrestored = False
            return
        claims = await self._pipeline(*(("EXISTS", self._claim_key(node)) for node in sorted(self._nodes)))
        if any(int(n) for n in claims):
            log.info("presence: our entries are written again once the reaping of our node is over")
            return
        keys = [(room, session) for room, local in self._local.items() for session in local]
        log.warning("presence: re-writing %d entries the broker no longer had", len(keys))
        for i in range(0, len(keys), REAP_BATCH):
            batch = []
            for room, session in keys[i:i + REAP_BATCH]:
                e = self._local.get(room, {}).get(session)
                if e is not None:  # not left meanwhile (its leave found nothing to remove: no ghost)
                    batch.append((room, e))
            commands: list[Command] = []
            for room, e in batch:
                info = _info_json(e.info)  # as a join wrote it (compact)
                commands.append(self._script("presence_join", self._keys(room),
                                             [e.session, e.user, _entry_json(e, info), info]))
                commands.append(("SADD", self._node_index(e.node), self._index_item(room, e.session)))
            out = await self._pipeline(*commands, rooms=list({room for room, _ in batch}))
            back: dict[str, dict[str, None]] = {}  # room -> the users it had not (first connection again)
            for (room, e), firsts in zip(batch, out[::2], strict=True):
                if int(firsts[0]):
                    back.setdefault(room, {})[e.user] = None
            for room, users in back.items():
                await self._restorations.report(room, list(users))
        if self._reaped:
            await self._pipeline(*(self._script("presence_clear_reaped", [self._reaped_key(node)], [count])
                                   for node, count in self._reaped.items()))
            self._reaped = {}
        self._unrestored = False

    async def _reap(self, node: str) -> None:
        departed: dict[str, list[str]] = defaultdict(list)
        try:
            await self._remove_node(node, departed)
        except Exception as exc:
            log.info("presence: reaping node %s failed (its claim expires, then a replica retries): %s", node, exc)
        finally:
            self._reaping.discard(node)
        for room, users in departed.items():  # what was removed is reported, even after a failure
            await self._departures.report(room, users)

    async def _remove_node(self, node: str, departed: dict[str, list[str]]) -> None:
        """Claim ``node``, remove its entries batch by batch (adding who left to ``departed``), drop it.

        Before each batch the claim is renewed and the node checked: one that heartbeat again since the beat that
        found it dead (a stall) is alive, and it writes its entries again once no claim of its node is left, so
        the reaping stops there (as when the claim ran out: a replica so slow may have been overtaken)."""
        bus = self.bus
        claim = self._claim_key(node)
        won = (await self._pipeline(("SET", claim, "1", "NX", "PX", self.ttl_ms)))[0]
        if not won:
            return
        idx = self._node_index(node)
        held = True
        started = False
        while bus.healthy:
            renewed, alive = await self._pipeline(
                ("PEXPIRE", claim, self.ttl_ms), self._script("presence_alive", [self._nodes_key], [node, self.ttl_ms]))
            held = bool(int(renewed))
            if not held or int(alive):
                break
            items = (await self._pipeline(("SRANDMEMBER", idx, REAP_BATCH)))[0]
            if not items:
                break
            if not started:
                started = True
                log.warning("presence: node %s stopped heartbeating; removing its entries", node)
            rooms: dict[str, list[str]] = defaultdict(list)
            for item in items:
                room, session = json.loads(item)
                rooms[room].append(session)
            order = list(rooms)
            commands = [self._script("presence_leave", self._keys(room), rooms[room]) for room in order]
            reaped = self._reaped_key(node)  # tells the node, should it be alive, to write its entries again
            out = await self._pipeline(*commands, ("SREM", idx, *items), ("INCR", reaped),
                                       ("PEXPIRE", reaped, REAPED_TTL_MS), rooms=order)
            for room, removed in zip(order, out, strict=False):
                departed[room] += [u for u in (_text(x) for x in removed[1::2]) if u]
        if not held:
            return  # not ours any more: another replica's (or none)
        if bus.healthy and not int((await self._pipeline(("SCARD", idx)))[0]):
            await self._pipeline(self._script("presence_forget_node", [self._nodes_key], [node, self.ttl_ms]))
        await self._pipeline(("DEL", claim))

    async def close(self) -> None:
        """Stop reaping (the bus is closing); entries stay until their node is declared dead."""
        await cancel_and_wait(log, list(self._reapers))
