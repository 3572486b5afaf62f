"""Presence on NATS JetStream KV: entries written once (join) and removed once (leave), node liveness
by heartbeat.

Buckets (``<P>`` = the subject prefix with ``.`` as ``_``); keys are made of base64url tokens
(:func:`wirehub.builtins.bus._broker.encode_room`), so any room, node or session name is one valid token:

- ``<P>_members`` (no TTL): key ``<room>.<node>.<session>`` -> entry JSON (user, session, node,
  info). A leave is a PURGE with a rollup (the value is gone at once) whose marker carries a
  per-message TTL (``Nats-TTL``), so after the last leave of a room nothing of it is left;
- ``<P>_nodes`` (no TTL): key ``<node>``, put once per ``presence_interval`` by the replica that
  owns the node: the ONE upkeep round trip of a replica, whatever the number of its entries;
- ``<P>_claims`` (TTL ``presence_ttl``): key ``<node>``, created (an atomic "create if absent")
  by the one live replica that removes a dead node's entries.

Every replica watches ``<P>_nodes`` (a push consumer: no round trip) and notes when it last saw
each node's heartbeat. A node not seen for ``presence_ttl`` is dead: the replica that wins its
claim finds its entries by the key filter ``*.<node>.*``, purges them in batches, purges the
node's key and reports the users who left (no connection of theirs remains in the room) to its
``on_departed`` listeners. So a dead replica's entries go within ``presence_ttl`` plus one interval.

Reads: while this replica has members in a room it keeps a live copy of the room (an ordered
consumer on ``<room>.>``, started once per room and replica) in a
:class:`~wirehub.builtins.bus._roster.Roster`: O(1) count, O(limit + log n) pages. Its own joins are applied at once
(read your writes; the echo of an older write is ignored by stream sequence); a leave waits for the
echo of its purge and decides there whether it was its user's last connection: the copy then holds
every earlier write of every replica and none later, so of two leaves of one user exactly one
reports it. A room where this replica has no member is read by one scan of its keys (O(n)).
The copy's consumer may run on a stream replica that applies writes a little after the leader
acknowledged them, so a read (and a join's "first of its user") first waits until the copy reached
the leader's newest sequence of the room's keys: one request per room and loop iteration
(:meth:`NatsPresence._sync`). Puts and purges go through :mod:`~wirehub.builtins.bus.nats_acks`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from wirehub import DepartedListener, PresenceCount, PresenceEntry, PresencePage
from wirehub.builtins.bus._broker import cancel_and_wait, encode_name, encode_room
from wirehub.builtins.bus._roster import Departures, Roster
from wirehub.builtins.bus.nats_bus import _name

#: compact JSON of an entry's value (one encoder, not one per put)
_encode = json.JSONEncoder(separators=(",", ":")).encode

if TYPE_CHECKING:
    from wirehub.builtins.bus.nats_bus import NatsBus

log = logging.getLogger("wirehub.bus.nats")

#: purges sent concurrently while removing a dead node's entries
REAP_BATCH = 256
PURGE_HEADERS = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
#: JetStream API error code of a message get that found nothing
NO_MESSAGE = 10037
#: stream sequence of an own write not acknowledged yet: every echo is older
UNACKED = 1 << 62


def _decode(token: str) -> str:
    if token == "_":
        return ""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


def _is_value(msg: Any) -> bool:
    hdr = msg.headers or {}
    return bool(msg.data) and "KV-Operation" not in hdr and "Nats-Marker-Reason" not in hdr


def _parse_entry(data: bytes) -> PresenceEntry:
    d = json.loads(data)
    return PresenceEntry(d["user"], d["session"], d["node"], d.get("info") or {})


class _Leave:
    """A leave of this replica waiting for the echo of its purge: the copy as it is at that echo
    (every earlier write of every replica applied, no later one) says whether it was its user's
    last connection, so of two leaves of one user (on any replicas) exactly one reports it."""

    __slots__ = ("done", "results", "seq")

    def __init__(self) -> None:
        self.done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        #: stream sequence of a purge echo of the key -> the user when it removed their last connection
        self.results: dict[int, str | None] = {}
        self.seq = 0

    def echoed(self, seq: int, user: str | None) -> None:
        self.results[seq] = user
        if seq == self.seq and not self.done.done():
            self.done.set_result(user)

    def acked(self, seq: int) -> None:
        self.seq = seq
        if seq in self.results and not self.done.done():
            self.done.set_result(self.results[seq])


def _expire(waiter: asyncio.Future[bool | None]) -> None:
    """A read's wait for the copy timed out: it reads the copy as it is."""
    if not waiter.done():
        waiter.set_result(True)


class _LiveRoom:
    """A replica's live copy of one room (see the module docstring)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn  # the connection it belongs to: a new connection needs a new copy
        self.roster = Roster()
        self.ready = asyncio.Event()
        self.processed = 0
        self.last_seq = 0
        #: key -> stream sequence of this replica's own write, applied before its echo came
        self.pending: dict[str, int] = {}
        #: key -> a leave of this replica waiting for the echo of its purge
        self.leaving: dict[str, _Leave] = {}
        self.sub: Any = None
        #: the leader's newest sequence of the room's keys, asked once for the reads of one loop iteration
        #: (one future per read: a reader that gives up cancels only its own)
        self.next_sync: list[asyncio.Future[int]] | None = None
        #: reads waiting until the copy reached a sequence
        self.waiters: list[tuple[int, asyncio.Future[bool | None]]] = []

    def reached(self) -> None:
        """Release the reads waiting for a sequence the copy has reached."""
        waiting = []
        for seq, fut in self.waiters:
            if seq <= self.last_seq:
                if not fut.done():
                    fut.set_result(None)
            elif not fut.done():
                waiting.append((seq, fut))
        self.waiters = waiting

    def apply(self, key: str, entry: PresenceEntry | None) -> str | None:
        """Apply a put (``entry``) or a removal of ``key``; the user when it was their last connection."""
        if entry is not None:
            self.roster.add(entry)
            return None
        return self.roster.remove(_decode(key.rsplit(".", 1)[-1]))

    def own_write(self, key: str, seq: int, entry: PresenceEntry | None) -> str | None:
        if seq > self.last_seq:
            self.pending[key] = seq
        else:
            self.pending.pop(key, None)
        return self.apply(key, entry)

    def own_write_started(self, key: str, entry: PresenceEntry | None) -> bool | str | None:
        """Apply a put (``entry``) or purge before the broker acknowledged it (its echo may come
        first; and two joins of one user on this replica cannot both be first); echoes of the key
        are held off until :meth:`own_write`. A put: True when first of its user; a purge: the user
        when it was their last connection."""
        self.pending[key] = UNACKED
        if entry is not None:
            return self.roster.add(entry)
        return self.apply(key, None)

    def echo(self, key: str, seq: int, msg: Any) -> None:
        """A message of the room's consumer: a put or a removal of ``key`` (parsed only when it
        is not the echo of this replica's own write, already applied)."""
        if seq > self.last_seq:
            self.last_seq = seq
            if self.waiters:
                self.reached()
        mine = self.pending.get(key)
        if mine is not None:
            if seq < mine:
                return  # older than a write of ours already applied
            del self.pending[key]
            if seq == mine:
                return
        entry: PresenceEntry | None = None
        if _is_value(msg):
            try:
                entry = _parse_entry(msg.data)
            except (ValueError, KeyError):
                entry = None
        user = self.apply(key, entry)
        if entry is None:
            leave = self.leaving.get(key)
            if leave is not None:
                leave.echoed(seq, user)


class NatsPresence:
    """The :class:`wirehub.bus.Presence` of the NATS backend (see the module docstring)."""

    def __init__(self, bus: NatsBus, ttl: float) -> None:
        self.bus = bus
        self.ttl = ttl
        self.marker_ttl = max(1.0, ttl)
        self.members_bucket = _name(bus.prefix, "members")
        self.nodes_bucket = _name(bus.prefix, "nodes")
        self.claims_bucket = _name(bus.prefix, "claims")
        self.pre = f"$KV.{self.members_bucket}."
        #: a purge: the value goes at once, its marker after marker_ttl (as js.publish(msg_ttl=) sends it)
        self.purge_headers = {**PURGE_HEADERS, "Nats-TTL": str(int(self.marker_ttl))}
        self.members_kv: Any = None
        self.nodes_kv: Any = None
        self.claims_kv: Any = None
        self._departures = Departures()
        #: room -> session -> entry: this replica's connections
        self._local: dict[str, dict[str, PresenceEntry]] = {}
        self._rooms: dict[str, asyncio.Future[_LiveRoom]] = {}
        #: node ids of this replica's entries (normally one) -> revision of its last heartbeat
        self._nodes: dict[str, int] = {}
        #: node -> time.monotonic() of its last heartbeat seen through the nodes watch
        self._seen: dict[str, float] = {}
        self._nodes_sub: Any = None
        self._reaping: set[str] = set()
        self._reapers: set[asyncio.Task[None]] = set()
        #: time.monotonic() of this replica's last heartbeat
        self._last_beat = 0.0
        #: leaves the broker did not take (down, timeout): retried by upkeep
        self._unleft: dict[tuple[str, str], PresenceEntry] = {}

    # -- connection -----------------------------------------------------------------------------------

    async def open(self, storage: Any) -> None:
        """On each new connection (from the bus's ``_open``): buckets, and the nodes watch."""
        bus = self.bus
        self.members_kv = await bus._bucket(self.members_bucket, None, storage)
        self.nodes_kv = await bus._bucket(self.nodes_bucket, None, storage)
        self.claims_kv = await bus._bucket(self.claims_bucket, self.ttl, storage)
        self._rooms = {}  # the old copies' consumers died with the old connection
        self._seen = {}
        api = bus.nats.js.api
        pre = f"$KV.{self.nodes_bucket}."

        snapshot_done = False

        async def on_node(msg: Any) -> None:
            nonlocal snapshot_done
            node = _decode(msg.subject[len(pre):])
            if not _is_value(msg):
                self._seen.pop(node, None)
                return
            age = 0.0
            ts = getattr(msg.metadata, "timestamp", None)
            if ts is not None and not snapshot_done:  # the snapshot: as old as its last put (capped:
                age = min(max(0.0, time.time() - ts.timestamp()), self.ttl)  # the broker's clock may differ)
            if msg.metadata.num_pending == 0:
                snapshot_done = True
            self._seen[node] = time.monotonic() - age

        self._nodes_sub = await bus.js.subscribe(f"{pre}>", stream=f"KV_{self.nodes_bucket}", cb=on_node,
                                                 ordered_consumer=True,
                                                 deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
        # self._nodes keeps the revisions of the last heartbeats: a broker that lost its store
        # (restart of a memory store) fails the next update against them, and the entries come back

    async def close(self) -> None:
        await cancel_and_wait(log, list(self._reapers))

    # -- reading ---------------------------------------------------------------------------------------

    async def _scan(self, pattern: str) -> list[tuple[str, PresenceEntry]]:
        """The value of every members key matching ``pattern``, read once with an ordered consumer.
        (nats-py's KV watch can announce "no more values" before values it already received.)"""
        bus = self.bus

        async def scan() -> list[tuple[str, PresenceEntry]]:
            api = bus.nats.js.api
            sub = await bus.js.subscribe(self.pre + pattern, stream=f"KV_{self.members_bucket}",
                                         ordered_consumer=True, deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
            out: list[tuple[str, PresenceEntry]] = []
            try:
                info = await sub.consumer_info()
                if info.num_pending == 0 and not info.delivered.consumer_seq:
                    return out
                while True:
                    msg = await sub.next_msg(timeout=bus.op_timeout)
                    if _is_value(msg):
                        out.append((msg.subject[len(self.pre):], _parse_entry(msg.data)))
                    if msg.metadata.num_pending == 0:
                        return out
            finally:
                await sub.unsubscribe()

        bus._check()
        return await bus.call("presence", scan)  # type: ignore[no-any-return]

    async def _live(self, room: str) -> _LiveRoom | None:
        """The room's live copy when this replica has members there (started on first use)."""
        if room not in self._local:
            return None
        bus = self.bus
        fut = self._rooms.get(room)
        if fut is not None and fut.done() and (fut.exception() is not None or fut.result().conn is not bus.nc):
            self._drop_live(room)
            fut = None
        if fut is None:
            fut = self._rooms[room] = asyncio.get_running_loop().create_future()
            try:
                live: _LiveRoom = await bus.call("presence", lambda: self._start_live(room))
            except BaseException as exc:
                self._rooms.pop(room, None)
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
                    fut.exception()
                raise
            fut.set_result(live)
            if room not in self._local:  # everybody left meanwhile
                self._drop_live(room)
            return live
        return await asyncio.shield(fut)

    async def _start_live(self, room: str) -> _LiveRoom:
        bus = self.bus
        api = bus.nats.js.api
        live = _LiveRoom(bus.nc)
        pre = self.pre

        async def on_msg(msg: Any) -> None:
            live.echo(msg.subject[len(pre):], msg.metadata.sequence.stream, msg)
            live.processed += 1
            if msg.metadata.num_pending == 0:
                live.ready.set()

        live.sub = await bus.js.subscribe(f"{pre}{encode_room(room)}.>", stream=f"KV_{self.members_bucket}",
                                          cb=on_msg, ordered_consumer=True,
                                          deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
        info = await live.sub.consumer_info()
        if info.num_pending == 0 and live.processed >= (info.delivered.consumer_seq or 0):
            live.ready.set()
        await live.ready.wait()
        return live

    def _current_live(self, room: str) -> _LiveRoom | None:
        """The room's live copy if one is running on this connection (never starts one)."""
        fut = self._rooms.get(room)
        if fut is None or not fut.done() or fut.exception() is not None or fut.result().conn is not self.bus.nc:
            return None
        return fut.result()

    def _drop_live(self, room: str) -> None:
        fut = self._rooms.pop(room, None)
        if fut is None or not fut.done() or fut.exception() is not None:
            return
        live = fut.result()
        if live.conn is self.bus.nc and live.sub is not None:
            task = asyncio.ensure_future(live.sub.unsubscribe())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _roster(self, room: str) -> Roster:
        """The room's members: the live copy (once it holds every write acknowledged before this
        read), or one scan of its keys."""
        live = await self._live(room)
        if live is not None:
            await self._sync(live, room)
            return live.roster
        roster = Roster()
        for _, entry in await self._scan(f"{encode_room(room)}.>"):
            roster.add(entry)
        return roster

    async def _sync(self, live: _LiveRoom, room: str) -> None:
        """Wait until the copy holds every write the broker acknowledged before this read began.
        The copy's consumer may run on a stream replica that applies writes milliseconds after the
        leader acknowledged them (JetStream places an ephemeral consumer on any of the stream's
        replicas): without this, a replica could miss a leave that another replica already reported
        done. One request (the leader's newest sequence of the room's keys) serves every read of one
        loop iteration; when the broker does not answer, the copy is read as it is."""
        loop = asyncio.get_running_loop()
        readers = live.next_sync
        if readers is None:
            readers = live.next_sync = []
            loop.call_soon(self._ask_sync, live, room, readers)  # after every read of this iteration began
        mine = loop.create_future()
        readers.append(mine)
        target = await mine
        if live.last_seq >= target:
            return
        waiter: asyncio.Future[bool | None] = loop.create_future()
        live.waiters.append((target, waiter))  # set to None when the copy reached it (_LiveRoom.reached)
        timer = loop.call_later(self.bus.op_timeout, _expire, waiter)  # a timer, not a wait_for's machinery
        try:
            expired = await waiter
        finally:
            timer.cancel()
        if expired:
            log.info("presence: the copy of %r did not reach sequence %d; read as it is", room, target)

    def _ask_sync(self, live: _LiveRoom, room: str, readers: list[asyncio.Future[int]]) -> None:
        if live.next_sync is readers:
            live.next_sync = None
        task = asyncio.ensure_future(self._leader_seq(room))

        def done(t: asyncio.Task[int]) -> None:
            seq = 0 if t.cancelled() or t.exception() is not None else t.result()
            for fut in readers:
                if not fut.done():
                    fut.set_result(seq)

        task.add_done_callback(done)

    async def _leader_seq(self, room: str) -> int:
        """The stream leader's newest sequence of ``room``'s keys (0: none)."""
        req = json.dumps({"last_by_subj": f"{self.pre}{encode_room(room)}.>"}).encode()
        answer = await self.bus.request("presence", f"$JS.API.STREAM.MSG.GET.KV_{self.members_bucket}", req,
                                        absent=NO_MESSAGE)
        return int(answer.get("message", {}).get("seq", 0))

    # -- writing ---------------------------------------------------------------------------------------

    def _key(self, room: str, entry: PresenceEntry) -> str:
        return f"{encode_room(room)}.{encode_room(entry.node)}.{encode_name(entry.session)}"

    async def _purge(self, key: str) -> int:
        """Remove a members key (the value at once; the marker after ``marker_ttl``); its stream seq."""
        return await self.bus.write("presence", self.pre + key, b"", self.purge_headers)

    async def _put(self, room: str, entry: PresenceEntry) -> int:
        value = _encode({"user": entry.user, "session": entry.session, "node": entry.node,
                         "info": dict(entry.info)}).encode()
        return await self.bus.write("presence", self.pre + self._key(room, entry), value)

    # -- Presence --------------------------------------------------------------------------------------

    async def join(self, room: str, entry: PresenceEntry) -> bool:
        self.bus._check()
        if entry.node not in self._nodes:  # once per node: an entry's node must be known to be reapable
            self._nodes[entry.node] = 0
            await self._beat()
        self._local.setdefault(room, {})[entry.session] = entry
        self._unleft.pop((room, entry.session), None)
        key = self._key(room, entry)
        live: _LiveRoom | None = None
        try:
            live = await self._live(room)
            assert live is not None
            await self._sync(live, room)  # "first of its user" against every join acknowledged before
            first = bool(live.own_write_started(key, entry))
            seq = await self._put(room, entry)
        except BaseException:
            if live is not None:
                live.pending.pop(key, None)
                live.roster.remove(entry.session)
            self._forget_local(room, entry.session)
            self._unleft[(room, entry.session)] = entry  # a put that timed out may still have landed
            raise
        live.own_write(key, seq, entry)
        return first

    async def leave(self, room: str, session: str) -> str | None:
        entry = self._forget_local(room, session, keep_live=True)  # never written again, whatever happens next
        try:
            if entry is None:
                self.bus._check()
                found = await self._scan(f"{encode_room(room)}.*.{encode_name(session)}")
                if not found:
                    return None
                entry = found[0][1]
            key = self._key(room, entry)
            live = self._current_live(room)
            if live is None:
                await self._purge_or_retry(room, entry)
                roster = await self._roster(room)
                return None if roster.has_user(entry.user) else entry.user
            return await self._leave_live(live, room, key, entry)
        finally:
            if room not in self._local:
                # the last local members leave together: the copy goes with the last of them (the
                # others still wait for the echoes of their purges in it)
                live = self._current_live(room)
                if live is None or not live.leaving:
                    self._drop_live(room)

    async def _leave_live(self, live: _LiveRoom, room: str, key: str, entry: PresenceEntry) -> str | None:
        """Purge, then decide at the echo of the purge (not before: the copy may not have seen
        another replica's earlier leave or join of the same user yet)."""
        leave = live.leaving[key] = _Leave()
        try:
            try:
                seq = await self._purge_or_retry(room, entry)
            except BaseException:
                live.own_write_started(key, None)  # gone here at once; upkeep's retry settles the key
                raise
            leave.acked(seq)
            try:
                return await asyncio.wait_for(asyncio.shield(leave.done), self.bus.op_timeout)
            except TimeoutError:  # no echo (the copy's consumer is being reset): the copy as it is
                live.apply(key, None)
                return None if live.roster.has_user(entry.user) else entry.user
        finally:
            live.leaving.pop(key, None)

    async def _purge_or_retry(self, room: str, entry: PresenceEntry) -> int:
        """Purge ``entry``'s key; when the broker cannot take it now, upkeep retries (entries are
        never refreshed, so a lost leave would otherwise stay until this replica dies)."""
        try:
            return await self._purge(self._key(room, entry))
        except BaseException:
            self._unleft[(room, entry.session)] = entry
            raise

    async def count(self, room: str) -> PresenceCount:
        return (await self._roster(room)).count()

    async def page(self, room: str, after: str | None, limit: int) -> PresencePage:
        return (await self._roster(room)).page(after, limit)

    async def joined_page(self, room: str, limit: int) -> PresencePage:
        """The first page right after this replica's :meth:`join` into ``room`` (the chat's ``joined``):
        the join synced the copy before its put, so the copy holds every write acknowledged before the
        join began, and the join's own; a write acknowledged meanwhile is concurrent with the join, so
        the copy is read without a second sync (a leader request and, in a join storm, a wait for the
        echoes of the other joins' puts)."""
        live = self._current_live(room)
        if live is None:
            return await self.page(room, None, limit)
        return live.roster.page(None, limit)

    def on_departed(self, callback: DepartedListener) -> None:
        self._departures.add(callback)

    async def members(self, room: str) -> list[PresenceEntry]:
        return (await self._roster(room)).entries()

    async def stored_keys(self, room: str) -> list[str]:
        """The members keys holding a value for ``room`` (diagnostics, tests): empty once it is empty."""
        return [k for k, _ in await self._scan(f"{encode_room(room)}.>")]

    def _forget_local(self, room: str, session: str, *, keep_live: bool = False) -> PresenceEntry | None:
        local = self._local.get(room)
        entry = local.pop(session, None) if local is not None else None
        if local is not None and not local:
            del self._local[room]
            if not keep_live:
                self._drop_live(room)
        return entry

    # -- upkeep ----------------------------------------------------------------------------------------

    async def _beat(self) -> None:
        """One put per node of this replica (normally one). An update against the last revision
        fails when the key was lost (a broker that lost its store, or this node was declared dead
        and purged); then, or after a silence longer than the TTL, the entries are written again."""
        kv, wrong = self.nodes_kv, self.bus.nats.js.errors.KeyWrongLastSequenceError
        # silent longer than the TTL (a stall, a long outage): the node may have been reaped
        lost = bool(self._last_beat) and time.monotonic() - self._last_beat > self.ttl
        for node, rev in list(self._nodes.items()):
            key = encode_room(node)

            async def beat(key: str = key, rev: int = rev) -> tuple[int, bool]:
                if rev:
                    try:
                        return int(await kv.update(key, b"1", last=rev)), False
                    except wrong:
                        pass
                return int(await kv.put(key, b"1")), bool(rev)

            self._nodes[node], gone = await self.bus.call("presence", beat)
            lost = lost or gone
        self._last_beat = time.monotonic()
        if lost and self._local:
            await self._restore()

    async def _restore(self) -> None:
        entries = [(room, e) for room, sessions in self._local.items() for e in sessions.values()]
        log.warning("presence: re-writing %d entries the broker no longer had", len(entries))
        for i in range(0, len(entries), REAP_BATCH):
            await asyncio.gather(*(self._put(room, e) for room, e in entries[i:i + REAP_BATCH]))

    async def upkeep(self) -> None:
        """One heartbeat put; dead nodes come from the nodes watch (no round trip) and are reaped
        in the background by the replica that wins their claim."""
        await self._beat()
        horizon = time.monotonic() - self.ttl
        for node, seen in list(self._seen.items()):
            if seen < horizon and node not in self._nodes and node not in self._reaping:
                self._reaping.add(node)
                task = asyncio.ensure_future(self._reap(node))
                self._reapers.add(task)
                task.add_done_callback(self._reapers.discard)
        if self._unleft:  # rare: only after a leave the broker did not take
            await self._retry_leaves()

    async def _retry_leaves(self) -> None:
        batch = list(self._unleft.items())[:REAP_BATCH]
        for (room, session), _ in batch:
            del self._unleft[(room, session)]
        results = await asyncio.gather(*(self._purge_or_retry(room, e) for (room, _), e in batch),
                                       return_exceptions=True)
        for ((room, _), e), result in zip(batch, results, strict=True):
            live = self._current_live(room)
            if live is not None and isinstance(result, int):
                live.own_write(self._key(room, e), result, None)

    async def _reap(self, node: str) -> None:
        bus = self.bus
        try:
            claims, token = self.claims_kv, encode_room(node)
            wrong = bus.nats.js.errors.KeyWrongLastSequenceError

            async def claim() -> bool:
                try:
                    await claims.create(token, b"1")
                except wrong:
                    return False
                return True

            if not await bus.call("presence", claim):
                return
            log.warning("presence: node %s stopped heartbeating; removing its entries", node)
            dead = await self._scan(f"*.{token}.*")
            rooms: dict[str, list[PresenceEntry]] = defaultdict(list)
            for key, entry in dead:
                rooms[key.split(".", 1)[0]].append(entry)
            for i in range(0, len(dead), REAP_BATCH):
                await asyncio.gather(*(self._purge(key) for key, _ in dead[i:i + REAP_BATCH]))
            js, subject = bus.js, f"$KV.{self.nodes_bucket}.{token}"
            await bus.call("presence", lambda: js.publish(subject, b"", headers=dict(PURGE_HEADERS),
                                                          msg_ttl=self.marker_ttl))
            self._seen.pop(node, None)
            for token_room, entries in rooms.items():
                room = _decode(token_room)
                remaining = {e.user for _, e in await self._scan(f"{token_room}.>")}
                users = sorted({e.user for e in entries} - remaining)
                await self._departures.report(room, users)
        except Exception as exc:
            log.info("presence: reaping node %s failed (its claim expires, then a replica retries): %s", node, exc)
        finally:
            self._reaping.discard(node)
