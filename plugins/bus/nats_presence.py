"""Presence on NATS JetStream KV: this replica's connections of a room written in batches (one message per
room, node and loop iteration in a join storm), node liveness by heartbeat.

Buckets (``<P>`` = the subject prefix with ``.`` as ``_``); keys are made of base64url tokens
(:func:`wirehub.builtins.bus._broker.encode_room`), so any room, node or session name is one valid token:

- ``<P>_members`` (no TTL): key ``<room>.<node>.<tag><n>`` -> up to ``BUCKET`` entries of that node
  (:mod:`~wirehub.builtins.bus.nats_buckets`: the joins of one loop iteration share keys, a key is
  rewritten only by its replica, with its whole remaining state). When its last entry leaves, the key
  is PURGEd with a rollup (the value is gone at once) and the marker carries a per-message TTL
  (``Nats-TTL``), so after the last leave of a room nothing of it is left;
- ``<P>_nodes`` (no TTL): key ``<node>``, put once per ``presence_interval`` by the replica that
  owns the node: the ONE upkeep round trip of a replica, whatever the number of its entries;
- ``<P>_claims`` (TTL ``presence_ttl``): key ``<node>``, created (an atomic "create if absent")
  by the one live replica that removes a dead node's entries.

Every replica watches ``<P>_nodes`` (a push consumer: no round trip) and notes when it last saw
each node's heartbeat. A node not seen for ``presence_ttl`` is dead: the replica that wins its
claim finds its keys by the key filter ``*.<node>.*``, purges them in batches, purges the
node's key and reports the users who left (no connection of theirs remains in the room) to its
``on_departed`` listeners. So a dead replica's entries go within ``presence_ttl`` plus one interval.

Reads: while this replica has members in a room it keeps a live copy of the room in a
:class:`~wirehub.builtins.bus._roster.Roster` (O(1) count, O(limit + log n) pages) without a JetStream
consumer: the members stream republishes each write it stores (``RePublish`` to ``<prefix>.pm.>``, set
in :meth:`NatsPresence.open`; headers ``Nats-Sequence`` and ``Nats-Last-Sequence``, the key's previous
write), and the copy is one core subscription to ``<prefix>.pm.<room>.>`` per room and replica. It
subscribes first, then reads the room's keys by batched direct gets (nats-server 2.11+; any stream
replica answers, so the read is repeated until it reached the leader's newest sequence of the room),
then applies the writes that arrived meanwhile. A write is applied unless the copy holds its key's
write or a later one (duplicates are dropped); each write carries its key's whole state, so one that
reveals a missed write of its key (``Nats-Last-Sequence`` newer than what the copy holds) repairs the
key itself. A lost republish that no later write of its key follows is found by the next read:
:meth:`NatsPresence._sync` asks the leader's newest sequence of the room's keys (one request per room
and loop iteration) and waits until the copy got that far; a copy still behind after ``grace`` with
nothing queued reads the room again. The copy is also read again when nats-py dropped messages of its
subscription (a slow consumer) and when the members stream elected a new leader (it republishes what it
applies as leader only); a broken connection starts new copies on the new one.
Own joins enter the copy at their write's echo, before the join returns (read your writes); own keys'
echoes are not parsed (each write carries its id in a ``Wh-W`` header); another replica's rewrite of
a key is applied as the difference to that key's last value. A leave is decided at the echo of the
write that removed it (see :class:`~wirehub.builtins.bus.nats_buckets.Write`). A join asks nothing
before its write: its entries enter the copy at the echo of their write, where the copy holds every
earlier write of the room's keys that reached it and no later one, and "first of its user" is decided
there (:meth:`NatsPresence._settle`): one round trip per join, and of two first connections of one
user, on any replicas, exactly one is first. A room where this replica has no member is read once the
same way as a copy starts (O(n), no consumer). Writes go through :mod:`~wirehub.builtins.bus.nats_acks`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from wirehub import BusUnavailable, DepartedListener, PresenceCount, PresenceEntry, PresencePage
from wirehub.builtins.bus._broker import cancel_and_wait, encode_room
from wirehub.builtins.bus._roster import Departures, Roster
from wirehub.builtins.bus.nats_buckets import BUCKET, HDR_WRITE, Bucket, Write, encode_entries, fail, parse_entries
from wirehub.builtins.bus.nats_bus import _name
from wirehub.builtins.bus.nats_live import NO_MESSAGE

if TYPE_CHECKING:
    from wirehub.builtins.bus.nats_bus import NatsBus

log = logging.getLogger("wirehub.bus.nats")

#: purges sent concurrently while removing a dead node's entries
REAP_BATCH = 256
PURGE_HEADERS = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
#: messages per batched direct get of a snapshot (a page)
PAGE = 1024
#: purged keys a copy remembers (to drop late duplicates of their writes)
GONE = 1024
#: messages a copy's subscription may hold unprocessed (nats-py's default); past it nats-py drops them
#: and reports a slow consumer, and the copy is read again (:meth:`NatsPresence.dropped`)
SUB_PENDING = 512 * 1024


def _decode(token: str) -> str:
    if token == "_":
        return ""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


def _is_value(msg: Any) -> bool:
    hdr = msg.headers or {}
    return bool(msg.data) and "KV-Operation" not in hdr and "Nats-Marker-Reason" not in hdr


def _expire(waiter: asyncio.Future[bool | None]) -> None:
    """A read's wait for the copy timed out: it reads the copy as it is."""
    if not waiter.done():
        waiter.set_result(True)


class _LiveRoom:
    """A replica's live copy of one room (see the module docstring)."""

    # one per room this replica has members in: no instance dict unless one is set outside these (a test's
    # stand-in method)
    __slots__ = ("__dict__", "again", "buffer", "conn", "duplicates", "gaps", "gone", "incomplete", "keys",
                 "last_seq", "next_sync", "own", "resync", "resyncs", "roster", "seqs", "sub", "tag", "waiters")

    def __init__(self, conn: Any, tag: str, own: Callable[[str, Any], None]) -> None:
        self.conn = conn  # the connection it belongs to: a new connection needs a new copy
        #: this replica's keys end in ``<tag><n>``; ``own(key, msg)`` takes their echoes
        self.tag = tag
        self.own = own
        self.roster = Roster()
        #: the newest stream sequence applied (of any key of the room)
        self.last_seq = 0
        #: key -> stream sequence of its last write applied (own and other replicas' keys)
        self.seqs: dict[str, int] = {}
        #: keys whose last write was a purge -> its sequence (bounded: see GONE)
        self.gone: dict[str, int] = {}
        #: another replica's key -> the sessions of its last value (a rewrite applies the difference)
        self.keys: dict[str, tuple[str, ...]] = {}
        #: the core subscription to the room's republished writes
        self.sub: Any = None
        #: (key, seq, last seq of the key, msg) received while a snapshot is read, applied after it;
        #: None when no snapshot is under way
        self.buffer: list[tuple[str, int, int, Any]] | None = []
        #: the re-read under way (one per copy at a time)
        self.resync: asyncio.Future[None] | None = None
        #: read again after the re-read under way (messages were dropped while it ran)
        self.again = False
        #: the last read of the room's keys ran out of time before it reached the leader's newest sequence:
        #: writes stored before the subscription may be missing, so the next read of the copy reads it again
        self.incomplete = False
        #: counters (diagnostics, tests): writes found missed, duplicates dropped, re-reads
        self.gaps = 0
        self.duplicates = 0
        self.resyncs = 0
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

    def echo(self, key: str, seq: int, msg: Any) -> None:
        """A republished write (or purge) of ``key``, stream sequence ``seq``."""
        try:
            last = int(msg.headers.get("Nats-Last-Sequence") or 0)  # the key's previous write (0: none)
        except (AttributeError, TypeError, ValueError):
            last = 0
        if self.buffer is not None:
            self.buffer.append((key, seq, last, msg))
        else:
            self.apply(key, seq, last, msg)

    def newest(self) -> int:
        """The newest sequence the copy holds or has buffered."""
        top = self.last_seq
        if self.buffer:
            top = max(top, max(item[1] for item in self.buffer))
        return top

    def apply(self, key: str, seq: int, last: int, msg: Any) -> None:
        """Apply a write of ``key`` unless the copy holds it or a later one. Each write carries the key's
        whole state (nats_buckets), so a write that reveals a missed one (``last`` newer than what the
        copy holds of the key) is itself the key's newest state: applying it repairs the key."""
        applied = self.seqs.get(key) or self.gone.get(key, 0)
        if seq <= applied:
            self.duplicates += 1
            return
        if last > applied:
            self.gaps += 1
            log.info("presence: a write of %s (seq %d) was missed; the copy takes its newer state", key, last)
        if _is_value(msg):
            self.seqs[key] = seq
            self.gone.pop(key, None)
        else:
            self.seqs.pop(key, None)
            self.gone[key] = seq
            if len(self.gone) > GONE:  # the oldest purges: their late duplicates are long past
                for old in list(self.gone)[:GONE // 2]:
                    del self.gone[old]
        if seq > self.last_seq:
            self.last_seq = seq
            if self.waiters:
                self.reached()
        if key[key.rfind(".") + 1:].startswith(self.tag):
            self.own(key, msg)
        else:
            self.foreign(key, msg)

    def reconcile(self, found: dict[str, tuple[int, Any]], top: int) -> None:
        """Apply a snapshot of the room's keys (key -> (seq, last message)), complete up to ``top``: a key
        of another replica that the copy holds and the broker no longer has is gone (purged, and its
        marker expired)."""
        for key in list(self.keys):
            if key not in found and self.seqs.get(key, 0) <= top:
                self.seqs.pop(key, None)
                self.gone[key] = top  # a late duplicate of its writes must not bring it back
                self.foreign(key, None)
        for key, (seq, msg) in sorted(found.items(), key=lambda item: item[1][0]):
            self.apply(key, seq, 0, msg)
        if top > self.last_seq:
            self.last_seq = top
            if self.waiters:
                self.reached()

    def foreign(self, key: str, msg: Any) -> None:
        """Another replica's write of ``key`` (None: gone): its new value (or none) replaces the last one."""
        entries: list[PresenceEntry] = []
        if msg is not None and _is_value(msg):
            try:
                entries = parse_entries(msg.data)
            except (ValueError, KeyError, TypeError):
                log.warning("presence: unreadable value of %s ignored", key)
        old = self.keys.pop(key, ())
        roster = self.roster
        if old:
            keep = {e.session for e in entries}
            for session in old:
                if session not in keep:
                    roster.remove(session)
        was = set(old)
        for e in entries:
            if e.session not in was:
                roster.add(e)
        if entries:
            self.keys[key] = tuple(e.session for e in entries)


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
        #: the members stream republishes every write there (``<dest><room>.<node>.<tag><n>``), outside the
        #: stream's subjects and the bus's (``<prefix>.r.*.*``, ``<prefix>.q.*``)
        self.dest = f"{bus.prefix}.pm."
        self.direct = f"$JS.API.DIRECT.GET.KV_{self.members_bucket}"
        #: a purge: the value goes at once, its marker after marker_ttl (as js.publish(msg_ttl=) sends it)
        self.purge_headers = {**PURGE_HEADERS, "Nats-TTL": str(int(self.marker_ttl))}
        self.members_kv: Any = None
        self.nodes_kv: Any = None
        self.claims_kv: Any = None
        self._departures = Departures()
        self._restorations = Departures("on_restored")
        #: keys written again after the broker lost them, not reported to ``on_restored`` yet (their write failed:
        #: once a write of them goes through)
        self._unreported: set[Bucket] = set()
        #: room -> session -> the key (bucket) holding it: this replica's connections
        self._local: dict[str, dict[str, Bucket]] = {}
        #: room -> key -> this replica's keys of the room (with entries, or writes under way)
        self._own: dict[str, dict[str, Bucket]] = {}
        #: (room, node) -> the key this loop iteration's joins fill
        self._open: dict[tuple[str, str], Bucket] = {}
        #: keys this loop iteration's joins filled up
        self._full: list[Bucket] = []
        #: keys with a write scheduled for the end of this loop iteration
        self._dirty: list[Bucket] = []
        self._flushing = False
        #: set by close(): a flush already scheduled then writes nothing
        self._closed = False
        #: this replica's keys end in ``<tag><n>``: the tag is random per process, so no other replica
        #: writes a key this one does (and the copy knows its own keys' echoes)
        self._tag = os.urandom(4).hex()
        self._keys = 0
        self._writes = 0
        self._rooms: dict[str, asyncio.Future[_LiveRoom]] = {}
        #: a copy's core subscription -> its room (a slow consumer's report names the subscription)
        #: a copy's subscription -> (room, copy), from before the copy's first read
        self._subs: dict[Any, tuple[str, _LiveRoom]] = {}
        #: the reply subject prefix of this connection's batched direct gets, and the batches under way:
        #: token -> (messages so far, the batch's end: (pending after it, its last sequence))
        self._inbox = ""
        self._pages: dict[str, tuple[list[Any], asyncio.Future[tuple[int, int]]]] = {}
        self._page_n = 0
        #: a read waits this long for the copy to reach the leader's sequence before it re-reads the room
        self.grace = max(0.05, bus.op_timeout / 5)
        #: node ids of this replica's entries (normally one) -> revision of its last heartbeat
        self._nodes: dict[str, int] = {}
        #: node -> time.monotonic() of its last heartbeat seen through the nodes watch
        self._seen: dict[str, float] = {}
        self._nodes_sub: Any = None
        self._reaping: set[str] = set()
        self._reapers: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: time.monotonic() of this replica's last heartbeat
        self._last_beat = 0.0
    # -- connection -----------------------------------------------------------------------------------

    async def open(self, storage: Any) -> None:
        """On each new connection (from the bus's ``_open``): buckets, and the nodes watch."""
        bus = self.bus
        self.members_kv = await bus._bucket(self.members_bucket, None, storage)
        self.nodes_kv = await bus._bucket(self.nodes_bucket, None, storage)
        self.claims_kv = await bus._bucket(self.claims_bucket, self.ttl, storage)
        await self._republish()
        self._rooms, self._subs = {}, {}  # the old copies' subscriptions died with the old connection
        self._seen = {}
        api = bus.nats.js.api
        nc = bus.nc
        self._inbox = f"{nc.new_inbox()}."
        self._pages = {}
        await nc.subscribe(self._inbox + "*", cb=self._on_page)
        # a new leader of the members stream may not have republished the last writes the old one
        # took (it republishes what it applies as leader): every copy is re-read
        await nc.subscribe(f"$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.KV_{self.members_bucket}",
                           cb=self._on_leader)
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
        self._closed = True
        self._open, self._full, self._dirty = {}, [], []
        await cancel_and_wait(log, [*self._reapers, *self._tasks])
        # writes that will not be sent now: their joins and leaves must not wait for ever
        closed = BusUnavailable("the presence is closed")
        for own in self._own.values():
            for bucket in own.values():
                fail(bucket.joined, closed)
                for write in bucket.writes.values():
                    if write.firsts is not None:
                        fail(write.firsts, closed)
                if bucket.next is not None:
                    for _, fut in bucket.next.left:
                        fail(fut, closed)
                    fail(bucket.next.done, closed)

    # -- reading ---------------------------------------------------------------------------------------

    async def _republish(self) -> None:
        """The members stream republishes each write (to :attr:`dest`, headers ``Nats-Sequence`` and
        ``Nats-Last-Sequence``: the key's previous write) and answers batched direct gets."""
        bus = self.bus
        js, api, stream = bus.js, bus.nats.js.api, f"KV_{self.members_bucket}"
        src, dest = f"$KV.{self.members_bucket}.>", f"{self.dest}>"
        config = (await js.stream_info(stream)).config
        have = config.republish
        if have is None or have.src != src or have.dest != dest or have.headers_only or not config.allow_direct:
            await js.update_stream(dataclasses.replace(config, republish=api.RePublish(src=src, dest=dest),
                                                       allow_direct=True))

    async def _on_page(self, msg: Any) -> None:
        """A reply of a batched direct get: a message, or the batch's end (status 204 EOB, 404: none)."""
        batch = self._pages.get(msg.subject[len(self._inbox):])
        if batch is None:
            return
        msgs, end = batch
        if end.done():
            return
        hdr = msg.headers or {}
        status = hdr.get("Status")
        if status is None:
            if "Nats-Num-Pending" not in hdr:  # a server before 2.11 answers a batch with one message
                end.set_exception(BusUnavailable("presence needs nats-server 2.11 or newer (batched direct gets)"))
                return
            msgs.append(msg)
        elif status == "204":
            end.set_result((int(hdr.get("Nats-Num-Pending") or 0), int(hdr.get("Nats-Last-Sequence") or 0)))
        elif status == "404":
            end.set_result((0, 0))
        else:
            end.set_exception(BusUnavailable(f"presence read: status {status} {hdr.get('Description', '')}"))

    async def _page(self, pattern: str, start: int) -> tuple[list[Any], int, int]:
        """One batched direct get: the messages of keys matching ``pattern`` from sequence ``start`` on
        (the bucket keeps one message per key, so these are the keys' last writes), how many follow, and
        the sequence to go on after."""
        self._page_n += 1
        token = str(self._page_n)
        msgs: list[Any] = []
        end: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._pages[token] = (msgs, end)
        req = json.dumps({"seq": start, "next_by_subj": self.pre + pattern, "batch": PAGE}).encode()
        try:
            await self.bus.nc.publish(self.direct, req, reply=self._inbox + token)
            pending, last = await end
        finally:
            self._pages.pop(token, None)
        return msgs, pending, last

    async def _read_keys(self, pattern: str) -> tuple[dict[str, tuple[int, Any]], int, bool]:
        """key -> (seq, last message) of every members key matching ``pattern`` (purge markers too), the
        sequence it is complete up to, and whether it reached the leader's newest sequence of the pattern.
        Read without a consumer, by batched direct gets paged by sequence. Any replica of the stream may
        answer one, and a follower may be a few writes behind the leader: so the leader's newest sequence
        of the pattern is asked beside it, and the read is done again until the read itself reached it.
        (A copy's subscription holding newer writes proves nothing about the writes stored before it
        subscribed, which only the read has.)"""
        bus = self.bus
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(bus.op_timeout, 1.0)
        leader = asyncio.ensure_future(self._leader_seq(pattern))
        delay = 0.005
        try:
            while True:
                found: dict[str, tuple[int, Any]] = {}
                top, start = 0, 1
                while True:
                    msgs, pending, last = await bus.call("presence", lambda start=start: self._page(pattern, start))
                    for msg in msgs:
                        hdr = msg.headers
                        key, seq = hdr["Nats-Subject"][len(self.pre):], int(hdr["Nats-Sequence"])
                        if seq > found.get(key, (0, None))[0]:
                            found[key] = (seq, msg)
                        top = max(top, seq)
                    if not pending or not last:
                        break
                    start = last + 1
                target = await leader
                if top >= target:
                    return found, top, True
                if loop.time() > deadline:  # e.g. the leader's newest was a purge marker that expired since
                    log.info("presence: a read of %s reached sequence %d, not the leader's %d", pattern, top, target)
                    return found, top, False
                await asyncio.sleep(delay)  # a follower answered: it catches up within milliseconds
                delay = min(0.1, delay * 2)
        finally:
            if not leader.done():
                leader.cancel()
            elif not leader.cancelled():
                leader.exception()

    async def _scan(self, pattern: str) -> list[tuple[str, PresenceEntry]]:
        """(key, entry) of every entry of every members key matching ``pattern``."""
        self.bus._check()
        found, _, _ = await self._read_keys(pattern)
        out: list[tuple[str, PresenceEntry]] = []
        for key, (_, msg) in sorted(found.items()):
            if _is_value(msg):
                try:
                    out += [(key, e) for e in parse_entries(msg.data)]
                except (ValueError, KeyError, TypeError):
                    log.warning("presence: unreadable value of %s ignored", key)
        return out

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
        """Subscribe to the room's republished writes, then read its keys: the writes that arrive meanwhile
        wait in the copy's buffer and are applied after the snapshot, each unless the copy holds its key's
        write or a later one."""
        bus = self.bus
        live = _LiveRoom(bus.nc, self._tag, lambda key, msg: self._echoed(room, live, key, msg))
        skip = len(self.dest)

        for bucket in self._own.get(room, {}).values():  # this replica's own keys: its state, not their echoes
            if not bucket.pending and not any(w.joins is not None for w in bucket.writes.values()):
                for entry in bucket.entries:
                    live.roster.add(entry)

        def on_msg(msg: Any) -> None:
            try:
                seq = int(msg.headers["Nats-Sequence"])
            except (KeyError, TypeError, ValueError):
                log.warning("presence: a message on %s without its stream sequence ignored", msg.subject)
                return
            live.echo(msg.subject[skip:], seq, msg)

        # the subscription goes out before the reads on the same connection: the server has it when it
        # answers them, so every write it takes after the snapshot comes through it
        lanes = bus.lanes
        if lanes is None:
            raise BusUnavailable("presence: the broker is unreachable")
        # a lane of the connection's one dispatcher (nats_acks.Lanes), with its own pending limit (dropped)
        live.sub = await bus.call("presence", lambda: lanes.subscribe(f"{self.dest}{encode_room(room)}.>", on_msg,
                                                                      pending_msgs_limit=SUB_PENDING))
        self._subs[live.sub] = (room, live)  # before the read: drops while the copy starts count too
        try:
            await self._load(live, room)
        except BaseException:
            self._subs.pop(live.sub, None)
            task = asyncio.ensure_future(live.sub.unsubscribe())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise
        return live

    async def _load(self, live: _LiveRoom, room: str) -> None:
        """Read the room's keys into the copy (its start, or a re-read of a copy that may have missed a
        write), then apply what its subscription buffered meanwhile."""
        if live.buffer is None:
            live.buffer = []
        live.incomplete = False  # set again by a read that falls short, or a drop while this one runs
        try:
            found, top, complete = await self._read_keys(f"{encode_room(room)}.>")
            live.reconcile(found, top)
            if not complete:
                live.incomplete = True
        except BaseException:
            live.incomplete = True  # not read: the next read of the copy tries again
            raise
        finally:
            buffered, live.buffer = live.buffer, None
            for item in buffered:
                live.apply(*item)

    def _resync(self, live: _LiveRoom, room: str, why: str, *, again: bool = False) -> asyncio.Future[None]:
        """Re-read the room into its copy (one at a time per copy; ``again``: once more after the one under
        way, which may have read the broker before what it must cover). A failed re-read leaves the copy
        as it was, and the next read that finds it behind the leader tries again."""
        if live.resync is not None and not live.resync.done():
            live.again = live.again or again
            return live.resync
        log.info("presence: re-reading the copy of %r (%s)", room, why)

        async def run() -> None:
            while True:
                live.again = False
                live.resyncs += 1
                try:
                    await self._load(live, room)
                except Exception as exc:
                    log.info("presence: re-reading the copy of %r failed: %s", room, exc)
                    return
                if not live.again:
                    return

        task = live.resync = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def dropped(self, sub: Any) -> None:
        """nats-py dropped messages of subscription ``sub`` (a slow consumer): if it is a copy's, re-read it."""
        held = self._subs.get(sub)
        if held is None:
            return
        room, live = held
        if live.buffer is not None and live.resync is None:
            live.incomplete = True  # the copy is starting: its first read of the room is read again
        else:
            self._resync(live, room, "its subscription dropped messages", again=True)

    async def _on_leader(self, msg: Any) -> None:
        rooms = [room for room in self._rooms if self._current_live(room) is not None]
        if rooms:
            log.warning("presence: new leader of the members stream; re-reading %d rooms", len(rooms))
        for i in range(0, len(rooms), REAP_BATCH):
            batch = [(live, room) for room in rooms[i:i + REAP_BATCH]
                     if (live := self._current_live(room)) is not None]
            await asyncio.gather(*(self._resync(live, room, "new stream leader") for live, room in batch))

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
        if live.resync is not None:
            live.resync.cancel()
        if live.conn is self.bus.nc and live.sub is not None:
            self._subs.pop(live.sub, None)
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
        """Wait until the copy holds every write the broker acknowledged before this read began: without
        this, a replica could miss a leave that another replica already reported done (its republish
        still on the way). One request (the leader's newest sequence of the room's keys) serves every
        read of one loop iteration; when the broker does not answer, the copy is read as it is. A copy
        still behind after :attr:`grace` with nothing queued missed a write: the room is read again."""
        loop = asyncio.get_running_loop()
        readers = live.next_sync
        if readers is None:
            readers = live.next_sync = []
            loop.call_soon(self._ask_sync, live, room, readers)  # after every read of this iteration began
        mine = loop.create_future()
        readers.append(mine)
        target = await mine
        if live.incomplete:  # its last read ran out of time short of the leader: read it again
            await asyncio.shield(self._resync(live, room, "its last read did not reach the leader's sequence"))
            return
        if live.last_seq >= target:
            return
        if not await self._wait_for(live, target, self.grace):
            return
        if live.sub.pending_msgs and not await self._wait_for(live, target, self.bus.op_timeout):
            return  # a busy loop: its subscription's queue held the writes
        # still behind the leader with nothing queued: a republished write was lost (see the module
        # docstring), so the room is read again
        await asyncio.shield(self._resync(live, room, f"behind the leader's sequence {target}"))

    @staticmethod
    async def _wait_for(live: _LiveRoom, target: int, timeout: float) -> bool:
        """Wait until the copy reached ``target``; True when ``timeout`` passed first."""
        if live.last_seq >= target:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool | None] = loop.create_future()
        live.waiters.append((target, waiter))  # set to None when the copy reached it (_LiveRoom.reached)
        timer = loop.call_later(timeout, _expire, waiter)  # a timer, not a wait_for's machinery
        try:
            return bool(await waiter)
        finally:
            timer.cancel()

    def _ask_sync(self, live: _LiveRoom, room: str, readers: list[asyncio.Future[int]]) -> None:
        if live.next_sync is readers:
            live.next_sync = None
        task = asyncio.ensure_future(self._leader_seq(f"{encode_room(room)}.>"))

        def done(t: asyncio.Task[int]) -> None:
            seq = 0 if t.cancelled() or t.exception() is not None else t.result()
            for fut in readers:
                if not fut.done():
                    fut.set_result(seq)

        task.add_done_callback(done)

    async def _leader_seq(self, pattern: str) -> int:
        """The stream leader's newest sequence of the keys matching ``pattern`` (0: none)."""
        req = json.dumps({"last_by_subj": f"{self.pre}{pattern}"}).encode()
        answer = await self.bus.request("presence", f"$JS.API.STREAM.MSG.GET.KV_{self.members_bucket}", req,
                                        absent=NO_MESSAGE)
        return int(answer.get("message", {}).get("seq", 0))

    # -- writing ---------------------------------------------------------------------------------------

    def _new_key(self, room: str, node: str) -> Bucket:
        self._keys += 1
        bucket = Bucket(room, f"{encode_room(room)}.{encode_room(node)}.{self._tag}{self._keys:x}")
        self._own.setdefault(room, {})[bucket.key] = bucket
        return bucket

    def _schedule(self) -> None:
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """End of a loop iteration: one write per key that changed (joins: per room after one sync)."""
        self._flushing = False
        if self._closed:
            return
        opened, self._open = self._open, {}
        full, self._full = self._full, []
        dirty, self._dirty = self._dirty, []
        rooms: dict[str, list[Bucket]] = defaultdict(list)
        for bucket in (*full, *opened.values()):
            rooms[bucket.room].append(bucket)
        for room, buckets in rooms.items():
            self._spawn(self._write_joins(room, buckets))
        for bucket in dirty:
            self._spawn(self._send(bucket))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # a failed write is settled by upkeep, and its waiters got the error
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _write_joins(self, room: str, buckets: list[Bucket]) -> None:
        """One loop iteration's joins of ``room``: write each key once; "first of its user" is decided at
        the write's echo in the copy (:meth:`_settle`), so no leader request comes before the write."""
        try:
            if self._current_live(room) is None and await self._live(room) is None:
                raise BusUnavailable("every connection left the room meanwhile")
        except BaseException as exc:
            for bucket in buckets:
                self._fail_joins(bucket, exc, written=False)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for bucket in buckets:
            bucket.pending = False
            if not bucket.entries:  # every join of it left before the write
                bucket.firsts = set()
                self._joined(bucket)
                self._forget_key(bucket)
                continue
            self._spawn(self._finish_joins(bucket))

    async def _finish_joins(self, bucket: Bucket) -> None:
        write = bucket.next or Write()
        bucket.next = None
        write.joins = list(bucket.entries)
        firsts = write.firsts = asyncio.get_running_loop().create_future()
        try:
            await self._send(bucket, write)
            # the echo (or op_timeout after the acknowledgement: the copy as it is) decides "first"
            bucket.firsts = await firsts
        except BaseException as exc:
            self._fail_joins(bucket, exc, written=True)
            return
        self._joined(bucket)

    def _joined(self, bucket: Bucket) -> None:
        bucket.joined.set_result(None)
        # the joins read their outcome when they wake up, in this loop iteration's callbacks before this one
        asyncio.get_running_loop().call_soon(setattr, bucket, "firsts", None)

    def _fail_joins(self, bucket: Bucket, exc: BaseException, *, written: bool) -> None:
        """The write of a key's joins failed (or timed out: it may have landed, so upkeep writes the key
        again without them): they are not members."""
        bucket.pending = False
        live = self._current_live(bucket.room)
        local = self._local.get(bucket.room)
        for entry in bucket.entries:
            if live is not None:
                live.roster.remove(entry.session)
            if local is not None and local.get(entry.session) is bucket:
                del local[entry.session]
        bucket.entries.clear()
        bucket.firsts = None
        fail(bucket.joined, exc if isinstance(exc, Exception) else BusUnavailable("presence write cancelled"))
        if written:
            bucket.unsettled = True
        else:
            self._forget_key(bucket)
        if local is not None and not local:
            del self._local[bucket.room]

    async def _send(self, bucket: Bucket, write: Write | None = None) -> int:
        """Write ``bucket``'s current state (a purge when it is empty) with the leaves waiting for it."""
        if write is None:
            write = bucket.next or Write()
            bucket.next = None
        self._writes += 1
        wid = str(self._writes)
        bucket.writes[wid] = write
        loop = asyncio.get_running_loop()
        subject = self.pre + bucket.key
        try:
            if bucket.entries:
                seq = await self.bus.write("presence", subject, encode_entries(bucket.entries[0].node, bucket.entries),
                                           {HDR_WRITE: wid})
            else:
                seq = await self.bus.write("presence", subject, b"", {**self.purge_headers, HDR_WRITE: wid})
        except BaseException as exc:
            bucket.writes.pop(wid, None)
            bucket.unsettled = True
            live = self._current_live(bucket.room)
            error = exc if isinstance(exc, Exception) else BusUnavailable("presence write cancelled")
            for session, fut in write.left:  # gone here at once; upkeep's rewrite settles the key
                if live is not None:
                    live.roster.remove(session)
                fail(fut, error)
            fail(write.done, error)
            if write.firsts is not None:
                fail(write.firsts, error)
            raise
        bucket.unsettled = False
        write.done.set_result(seq)
        if wid in bucket.writes and (write.left or write.joins is not None):
            # not echoed yet: decide without the echo if it never comes
            write.timer = loop.call_later(self.bus.op_timeout, self._no_echo, bucket, wid)
        elif wid in bucket.writes:
            del bucket.writes[wid]  # nothing waits for its echo
        if bucket.idle():
            self._forget_key(bucket)
        return seq

    def _echoed(self, room: str, live: _LiveRoom, key: str, msg: Any) -> None:
        """The echo of one of this replica's writes: its joins and leaves are decided against the copy as it
        is now."""
        bucket = self._own.get(room, {}).get(key)
        if bucket is None:
            return
        headers = msg.headers or {}
        wid = headers.get(HDR_WRITE)
        if wid is not None and wid in bucket.writes:
            self._settle(bucket, wid, live)
        elif wid is None and headers.get("KV-Operation") in ("PURGE", "DEL") and bucket.entries:
            # another replica removed a key of ours: it reaped our node, taken for dead in a stall of ours (its
            # heartbeat purge, which tells us too, may yet fail). Upkeep writes it again and reports its users.
            bucket.unsettled = True
            self._unreported.add(bucket)

    def _no_echo(self, bucket: Bucket, wid: str) -> None:
        """No echo within op_timeout (the copy's consumer is being reset): the copy as it is."""
        if wid in bucket.writes:
            self._settle(bucket, wid, self._current_live(bucket.room))

    def _settle(self, bucket: Bucket, wid: str, live: _LiveRoom | None) -> None:
        """Decide the writes of ``bucket`` up to ``wid`` (sent in this order: the echo of a later one means
        the copy holds the earlier ones too, e.g. a consumer restarted with the key's last value only).
        A join is added to the copy here, so a leave of it, written later, is always decided after it."""
        for key in list(bucket.writes):
            write = bucket.writes.pop(key)
            if write.timer is not None:
                write.timer.cancel()
            if write.joins is not None:
                firsts = {e.session for e in write.joins if live.roster.add(e)} if live is not None else set()
                if write.firsts is not None and not write.firsts.done():
                    write.firsts.set_result(firsts)
            for session, fut in write.left:
                user = live.roster.remove(session) if live is not None else None
                if not fut.done():
                    fut.set_result(user)
            if key == wid:
                break
        if bucket.idle():
            self._forget_key(bucket)

    async def _purge(self, key: str) -> int:
        """Remove a members key (the value at once; the marker after ``marker_ttl``); its stream seq."""
        return await self.bus.write("presence", self.pre + key, b"", self.purge_headers)

    def _forget_key(self, bucket: Bucket) -> None:
        own = self._own.get(bucket.room)
        if own is not None and own.get(bucket.key) is bucket:
            del own[bucket.key]
            if not own:
                del self._own[bucket.room]

    # -- Presence --------------------------------------------------------------------------------------

    async def join(self, room: str, entry: PresenceEntry) -> bool:
        self.bus._check()
        if entry.node not in self._nodes:  # once per node: an entry's node must be known to be reapable
            self._nodes[entry.node] = 0
            await self._beat()
        if entry.session in self._local.get(room, ()):
            await self.leave(room, entry.session)  # joined again: the new entry replaces the old one
        if room not in self._local:
            self._local[room] = {}
        if self._current_live(room) is None:  # a big room's joins find it running: no coroutine per join
            try:
                await self._live(room)
            except BaseException:
                if not self._local.get(room, True):
                    del self._local[room]
                raise
        slot = (room, entry.node)
        bucket = self._open.get(slot)
        if bucket is None or len(bucket.entries) >= BUCKET:
            if bucket is not None:
                self._full.append(bucket)
            bucket = self._open[slot] = self._new_key(room, entry.node)
            self._schedule()
        bucket.entries.append(entry)
        local = self._local.get(room)
        if local is None:  # (every other member left while the copy started)
            local = self._local[room] = {}
        local[entry.session] = bucket
        try:
            await bucket.joined
        except asyncio.CancelledError:
            if self._local.get(room, {}).get(entry.session) is bucket:  # gone with the joiner: settled by a write
                await asyncio.shield(self._leave_quietly(room, entry.session))
            raise
        firsts = bucket.firsts
        return firsts is not None and entry.session in firsts

    async def _leave_quietly(self, room: str, session: str) -> None:
        try:
            await self.leave(room, session)
        except Exception as exc:  # upkeep rewrites the key
            log.info("presence: the leave of a cancelled join failed: %s", exc)

    async def leave(self, room: str, session: str) -> str | None:
        local = self._local.get(room)
        bucket = local.pop(session, None) if local is not None else None
        if bucket is not None and not local:
            del self._local[room]
        try:
            if bucket is None:
                return None  # not a connection of this replica (never joined, or left already)
            entry = bucket.take(session)
            if entry is None:
                return None
            if bucket.pending:  # not written yet: it never was a member (its join returns False)
                return None
            fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            if bucket.next is None:
                bucket.next = Write()
                self._dirty.append(bucket)
                self._schedule()
            bucket.next.left.append((session, fut))
            if self._current_live(room) is None:  # no copy to see the echo in: decide by a read after the write
                write = bucket.next
                fut.set_result(None)
                await asyncio.shield(write.done)
                roster = await self._roster(room)
                return None if roster.has_user(entry.user) else entry.user
            return await asyncio.shield(fut)
        finally:
            # the last local members leave together: the copy goes with the last of them (the
            # others still wait for the echoes of their writes in it)
            if room not in self._local and not any(b.writes or b.next is not None
                                                   for b in self._own.get(room, {}).values()):
                self._drop_live(room)

    async def count(self, room: str) -> PresenceCount:
        return (await self._roster(room)).count()

    async def page(self, room: str, after: str | None, limit: int) -> PresencePage:
        return (await self._roster(room)).page(after, limit)

    async def lookup(self, room: str, users: Sequence[str]) -> PresencePage:
        roster = await self._roster(room)
        return PresencePage(roster.lookup(users), None, roster.count())

    async def joined_page(self, room: str, limit: int) -> PresencePage:
        """The first page (``limit`` 0: the count alone) right after this replica's :meth:`join` into ``room``
        (the chat's ``joined``):
        the join returned at its write's echo in the copy, so the copy holds every write the stream took
        before the join's, hence every write acknowledged before the join began, and the join's own; a
        write acknowledged meanwhile is concurrent with the join, so the copy is read without a sync (a
        leader request and, in a join storm, a wait for the echoes of the other joins' writes)."""
        live = self._current_live(room)
        if live is None:
            return await self.page(room, None, limit)
        return live.roster.page(None, limit)

    def on_departed(self, callback: DepartedListener) -> None:
        self._departures.add(callback)

    def on_restored(self, callback: DepartedListener) -> None:
        self._restorations.add(callback)

    async def members(self, room: str) -> list[PresenceEntry]:
        return (await self._roster(room)).entries()

    async def stored_keys(self, room: str) -> list[str]:
        """The members keys holding a value for ``room`` (diagnostics, tests): empty once it is empty."""
        return sorted({k for k, _ in await self._scan(f"{encode_room(room)}.>")})

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
        buckets = [b for own in self._own.values() for b in own.values() if b.entries and not b.pending]
        log.warning("presence: re-writing %d keys (%d entries) the broker no longer had",
                    len(buckets), sum(len(b.entries) for b in buckets))
        self._unreported.update(await self._gone(buckets))
        await self._rewrite(buckets)
        await self._report_restored()

    async def _gone(self, buckets: list[Bucket]) -> list[Bucket]:
        """Those of ``buckets`` whose key the broker no longer holds (reaped, or lost): their users are back once
        written. All of them when the keys cannot be listed (a join told twice rather than none)."""
        try:
            stored = {key for node in self._nodes for key, _ in await self._scan(f"*.{encode_room(node)}.*")}
        except Exception as exc:
            log.info("presence: our keys could not be listed before writing them again: %s", exc)
            return buckets
        return [b for b in buckets if b.key not in stored]

    async def _rewrite(self, buckets: list[Bucket]) -> None:
        for i in range(0, len(buckets), REAP_BATCH):
            await asyncio.gather(*(self._send(b) for b in buckets[i:i + REAP_BATCH]), return_exceptions=True)

    async def _report_restored(self) -> None:
        """Report to ``on_restored`` the users of the keys written again after a loss whose write went through
        (upkeep's rewrite, or any write of the key since: it writes the key's whole state)."""
        rooms: dict[str, dict[str, None]] = {}  # room -> its users written again, in order
        for bucket in list(self._unreported):
            if bucket.unsettled:  # its last write failed: upkeep writes it again
                continue
            self._unreported.discard(bucket)
            rooms.setdefault(bucket.room, {}).update(dict.fromkeys(e.user for e in bucket.entries))
        for room, users in rooms.items():
            if users:
                await self._restorations.report(room, list(users))

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
        # rare: only after a write the broker did not take (down, timeout): its key's current state again
        unsettled = [b for own in self._own.values() for b in own.values() if b.unsettled and not b.pending]
        if unsettled:
            await self._rewrite(unsettled[:REAP_BATCH])
        if self._unreported:
            await self._report_restored()

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
            if self._seen.get(node, 0.0) > time.monotonic() - self.ttl:
                return  # it heartbeat again since the upkeep that found it dead (a stall): alive
            log.warning("presence: node %s stopped heartbeating; removing its entries", node)
            dead = await self._scan(f"*.{token}.*")
            rooms: dict[str, list[PresenceEntry]] = defaultdict(list)
            for key, entry in dead:
                rooms[key.split(".", 1)[0]].append(entry)
            keys = sorted({key for key, _ in dead})
            for i in range(0, len(keys), REAP_BATCH):
                if self._seen.get(node, 0.0) > time.monotonic() - self.ttl:
                    return  # it heartbeat again (a stall): alive; what was purged it writes again (_echoed)
                await asyncio.gather(*(self._purge(key) for key in keys[i:i + REAP_BATCH]))
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
