"""Live room delivery on NATS (:class:`LiveRooms`, a part of :class:`~wirehub.builtins.bus.nats_bus.NatsBus`):
RePublish following, the subscription's baseline, gap and duplicate checks, fills from the stream's leader,
hold-and-release, and the reads again after a stream leader change (see the docstring of nats_bus).

A mixin rather than a part object: the connection, the acks inbox and the stream's name are the bus's, and
tests and the presence part reach the live state through the bus.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import calendar
import functools
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from wirehub import BusUnavailable
from wirehub.builtins.bus._broker import Supervised, encode_room
from wirehub.builtins.bus.nats_acks import AckRefused, Acks, Dropped, Lanes
from wirehub.builtins.bus.nats_tail import Tails

if TYPE_CHECKING:
    from wirehub.builtins.bus.nats import NatsOptions

log = logging.getLogger("wirehub.bus.nats")

#: headers of a history message: its offset, and the mark of a run start (see nats_bus)
HDR_OFFSET = "Wh-Off"
HDR_START = "Wh-Start"
#: "no message found" (a leader get past the subject's last message)
NO_MESSAGE = 10037
#: the stream republishes ``<p>.r.<r>.<kind>`` to ``<p>.<LIVE>.<r>.<kind>``
LIVE = "rl"
#: messages, and payload bytes (the server sends one message past it), per batched direct get of a gap fill
FILL_BATCH = 256
FILL_BYTES = 1 << 20
#: batches of a gap fill lost in a row (each asks for half as many messages) before the fill fails
FILL_DROPS = 12
#: followed rooms read per upkeep after a leader change, while they stay quiet (the others are read at
#: their next message)
VERIFY_PER_UPKEEP = 500
#: room streams whose RePublish each upkeep checks, in turn (one STREAM.INFO each): O(1) per upkeep
REPUBLISH_PER_UPKEEP = 2
#: the kind of a verifying fill (:meth:`LiveRooms._verify_all`): each subject is also read from its own last
#: delivered message, as one of it may have been missed while a newer message of the other was delivered
VERIFY = "*"
#: the room token of the subscription barriers' probes: "~" is never base64url, so never a room
BARRIER = "~"


class RoomStream:
    """One of the install's room streams (``room_streams`` of them, rooms hashed over them by name): its names
    and, on this connection, its config, epoch and subscription barrier. With one stream the names are those of
    the layout before there could be several."""

    __slots__ = ("barrier_next", "barrier_seen", "barrier_subject", "barrier_waiters", "config", "dedupe_window",
                 "epoch", "index", "live", "name", "token")

    def __init__(self, prefix: str, name: str, index: int, count: int) -> None:
        self.index = index
        suffix = "" if count == 1 else f"{index}of{count}"
        #: the stream ``<P>_rooms`` (``<P>_rooms_<i>of<N>``) stores ``<p>.<token>.<room>.<kind>``
        self.name = name + (suffix and "_" + suffix)
        self.token = "r" + suffix
        #: ... and republishes it to ``<p>.<live>.<room>.<kind>``
        self.live = LIVE + suffix
        self.config: Any = None
        #: derived from the stream's creation time (a stream made again is a new epoch of its rooms)
        self.epoch = ""
        #: the stream's duplicate_window in seconds as this replica set it (0: the server's default, 2 min)
        self.dedupe_window = 0.0
        self.barrier_subject = f"{prefix}.{self.token}.{BARRIER}.{uuid.uuid4().hex[:12]}"
        self.barrier_next: asyncio.Future[int] | None = None
        self.barrier_seen = 0
        self.barrier_waiters: list[tuple[int, asyncio.Future[None]]] = []


class _Live:
    """One followed room's live delivery on one connection."""

    __slots__ = ("base", "filling", "held", "kinds", "lost", "need", "received", "seq", "stream", "sub", "verify")

    def __init__(self, stream: RoomStream) -> None:
        #: the room's stream
        self.stream = stream
        #: the room's last stream sequence when this replica began to follow it (nothing up to it is delivered)
        self.base = 0
        #: newest stream sequence delivered; -1 while the baseline is unknown
        self.seq = -1
        #: subject kind ("h", "e") -> newest stream sequence of it delivered
        self.kinds: dict[str, int] = {}
        #: messages received while the baseline is unknown or a gap is being filled; None: delivering
        self.held: list[Any] | None = []
        self.filling = False
        #: nats-py dropped a message of the subscription: read the room from the stream (again)
        self.lost = False
        #: messages the subscription's callback got; past ``need``, one that came after the last drop
        self.received = 0
        self.need = 0
        #: the stream's leader changed since the last delivery: read the room before the next message
        self.verify = False
        self.sub: Any = None


@functools.lru_cache(maxsize=64)
def _second(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def _stamp(text: str) -> float:
    """An RFC 3339 UTC time as JetStream writes it (``2026-12-05T03:41:39.702316293Z``), in epoch seconds."""
    try:
        frac = text[19:].rstrip("Z")
        return _second(text[:19]) + (float(frac) if frac else 0.0)
    except ValueError:
        return time.time()


def _sequence(msg: Any) -> int | None:
    """The stream sequence of a republished message; None when it has none readable."""
    try:
        return int((msg.headers or {})["Nats-Sequence"])
    except (KeyError, ValueError):
        return None


def _headers(raw: bytes) -> dict[str, str]:
    """The headers of a leader get's message (``NATS/1.0\r\nName: value\r\n...``)."""
    out: dict[str, str] = {}
    for line in raw.decode(errors="replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


class LiveRooms(Supervised):
    """The live delivery of the rooms a replica follows; :class:`NatsBus` provides the connection."""

    opts: NatsOptions
    nats: Any
    nc: Any
    acks: Acks | None
    lanes: Lanes | None
    prefix: str
    streams: list[RoomStream]
    tails: Tails

    @abc.abstractmethod
    def _remember(self, room: str, seq: int, offset: int) -> None:
        """Note the room's newest history message (stream sequence, offset) for the next history publish."""

    @abc.abstractmethod
    def stream_of(self, room: str) -> RoomStream:
        """The stream that holds ``room``."""

    @abc.abstractmethod
    def _head(self, room: str, seq: int, offset: int, at: float) -> None:
        """Note the room's newest history message for :meth:`NatsBus.position`."""

    def _init_live(self) -> None:
        #: followed room -> its live delivery on this connection (messages of an older one are dropped)
        self._followed: dict[str, _Live] = {}
        #: followed room -> its subscription, once its baseline is known (see position)
        self._subs: dict[str, Any] = {}
        #: subscription id -> room (nats-py names a full subscription by its sid)
        self._by_sid: dict[int, str] = {}
        #: connected to a cluster: a subscription's baseline is a probe through the stream (see _barrier)
        self._clustered = False
        #: gap fills and barriers under way (cancelled with the connection)
        self._tasks: set[asyncio.Task[Any]] = set()
        #: per room subscription: messages nats-py queues before it drops one (then the room is read again)
        self.pending_msgs_limit = 100_000
        #: followed rooms not read since the stream's leader changed (the upkeep reads them, paced)
        self._unverified: set[str] = set()
        #: counters for tests and operators: gaps filled from the stream (and their round trips to the
        #: broker), RePublish put back
        self.gap_fills = 0
        self.fill_requests = 0
        self.republish_restored = 0
        #: the room stream whose RePublish the next upkeep checks first
        self._republish_next = 0

    async def _open_live(self, nc: Any) -> None:
        """On a new connection: the barrier and leader subscriptions, then every room followed again."""
        self._followed, self._subs, self._by_sid = {}, {}, {}
        info = nc._server_info
        self._clustered = self.opts.replicas > 1 or bool(info.get("cluster") or info.get("connect_urls"))
        self._unverified = set()
        for rs in self.streams:
            rs.barrier_seen, rs.barrier_waiters = 0, []
            # an update (e.g. an older replica's, without RePublish) is checked at once, not at its upkeep turn
            await nc.subscribe(f"$JS.EVENT.ADVISORY.STREAM.UPDATED.{rs.name}",
                               cb=functools.partial(self._updated_cb, rs))
            if self._clustered:
                await nc.subscribe(f"{self.prefix}.{rs.live}.{BARRIER}.{rs.barrier_subject.rpartition('.')[2]}",
                                   cb=functools.partial(self._barrier_cb, rs))
                await nc.subscribe(f"$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{rs.name}",
                                   cb=functools.partial(self._leader_cb, rs))
        rooms = sorted(self._rooms)
        for i in range(0, len(rooms), 256):  # the subscriptions of a batch share one barrier
            done = await asyncio.gather(*(self._consume(room) for room in rooms[i:i + 256]), return_exceptions=True)
            failed = next((r for r in done if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed  # after all of the batch ended: none is left running on a torn-down connection

    def _teardown_live(self) -> None:
        self._followed, self._subs, self._by_sid = {}, {}, {}
        for rs in self.streams:
            rs.barrier_next = None
            for fut in (w for _, w in rs.barrier_waiters):
                if not fut.done():
                    fut.set_exception(ConnectionError("disconnected from NATS"))
            rs.barrier_waiters = []
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()

    def _republish(self, rs: RoomStream) -> Any:
        return self.nats.js.api.RePublish(src=f"{self.prefix}.{rs.token}.>", dest=f"{self.prefix}.{rs.live}.>")

    async def _consume(self, room: str) -> None:
        """Subscribe to the room's republished messages; return once every message stored from now on
        reaches this replica (the baseline is known)."""
        acks, lanes = self.acks, self.lanes
        if acks is None or lanes is None:
            raise ConnectionError("not connected")
        rs = self.stream_of(room)
        st = _Live(rs)
        self._followed[room] = st
        tail = self.tails.start(room)

        def on_msg(msg: Any) -> None:
            if self._followed.get(room) is st:
                st.received += 1
                self._receive(room, st, msg)

        enc = encode_room(room)
        # a lane of the connection's one dispatcher, not a nats-py subscription with a task and queue of its
        # own (nats_acks.Lanes); its pending limit is still per room (_slow)
        st.sub = await lanes.subscribe(f"{self.prefix}.{rs.live}.{enc}.*", on_msg,
                                       pending_msgs_limit=self.pending_msgs_limit)
        self._by_sid[st.sub._id] = room
        try:
            if self._clustered:
                base = await self._barrier(acks, rs)
            else:
                # sent after the SUB on the same connection: every message stored after this answer is
                # republished to a subscription the server already has
                req = b'{"last_by_subj":"%s.%s.%s.*"}' % (self.prefix.encode(), rs.token.encode(), enc.encode())
                got = await acks.get(f"$JS.API.DIRECT.GET.{rs.name}", req)
                base = 0 if got is None else int((got.headers or {})["Nats-Sequence"])
        except AckRefused as exc:
            raise BusUnavailable(f"subscribe: {exc}") from exc
        if self._followed.get(room) is not st:
            return  # left (or the connection went) meanwhile
        st.base = st.seq = base
        self._subs[room] = st.sub
        if tail is not None:
            tail.ready = True
        if st.lost:  # a message was dropped before the baseline was known: it may be newer
            self._start_fill(room, st, None)
        else:
            self._release(room, st)

    async def _barrier_cb(self, rs: RoomStream, msg: Any) -> None:
        self._on_barrier(rs, msg)

    async def _barrier(self, acks: Acks, rs: RoomStream) -> int:
        """In a cluster, the stream's leader may sit on another node, which learns of a new subscription a
        little later. One probe per loop iteration, stored in the stream after the subscriptions were sent:
        its republished copy comes back only once the leader's node knows them (the SUB and the probe went
        the same route), and everything stored after it reaches them. Its sequence is the baseline. (One
        barrier per stream: each has its own leader.)"""
        loop = asyncio.get_running_loop()
        fut = rs.barrier_next
        if fut is None or fut.done():
            fut = rs.barrier_next = loop.create_future()
            loop.call_soon(self._send_barrier, acks, rs, fut)
        return await asyncio.shield(fut)

    def _send_barrier(self, acks: Acks, rs: RoomStream, fut: asyncio.Future[int]) -> None:
        if rs.barrier_next is fut:
            rs.barrier_next = None
        task = asyncio.ensure_future(self._probe_republish(acks, rs))
        self._tasks.add(task)

        def done(t: asyncio.Task[int]) -> None:
            self._tasks.discard(t)
            if fut.done():
                return
            exc = ConnectionError("disconnected from NATS") if t.cancelled() else t.exception()
            if exc is None:
                fut.set_result(t.result())
            else:
                fut.set_exception(exc)
                fut.exception()  # retrieved: every subscriber may have gone

        task.add_done_callback(done)

    async def _probe_republish(self, acks: Acks, rs: RoomStream) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout
        seq = await acks.publish(rs.barrier_subject, b"")
        if await self._republished(rs, seq, self.op_timeout / 4):
            return seq
        # slow, or stored while the stream had no RePublish (an older replica's update; then that probe never
        # comes back, even once the upkeep put the setting back): check it, and probe again (the
        # subscriptions were sent before either probe)
        await self._assert_republish(rs)
        seq = await acks.publish(rs.barrier_subject, b"")
        if await self._republished(rs, seq, deadline - loop.time()):
            return seq
        raise BusUnavailable(f"subscribe: the stream did not republish within {self.op_timeout:g}s")

    async def _republished(self, rs: RoomStream, seq: int, timeout: float) -> bool:
        """Whether the barrier probe at stream sequence ``seq`` came back within ``timeout``."""
        if rs.barrier_seen >= seq:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rs.barrier_waiters.append((seq, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        return True

    def _on_barrier(self, rs: RoomStream, msg: Any) -> None:
        try:
            seq = int((msg.headers or {})["Nats-Sequence"])
        except (KeyError, ValueError):
            return
        rs.barrier_seen = max(rs.barrier_seen, seq)
        waiting = []
        for target, fut in rs.barrier_waiters:
            if target <= seq:
                if not fut.done():
                    fut.set_result(None)
            elif not fut.done():
                waiting.append((target, fut))
        rs.barrier_waiters = waiting

    def _receive(self, room: str, st: _Live, msg: Any) -> None:
        """One republished message of ``room``, in stream order (one publisher: the stream's leader)."""
        if st.held is not None:
            st.held.append(msg)
            return
        hdr = msg.headers or {}
        try:
            seq, last = int(hdr["Nats-Sequence"]), int(hdr.get("Nats-Last-Sequence", 0))
        except (KeyError, ValueError):
            log.warning("room %r: republished message without a readable sequence (%r)", room, hdr)
            return
        kind = msg.subject[msg.subject.rfind(".") + 1:]
        done = st.kinds.get(kind, st.base)
        if seq <= done:
            return  # delivered already, or stored before this replica followed the room
        if st.verify:  # a message the old leader stored and never republished comes first
            st.verify = False
            st.held = [msg]
            self._start_fill(room, st, VERIFY)
            return
        if last > done:  # the previous message of this subject never came: fetch it (and what followed)
            st.held = [msg]
            self._start_fill(room, st, kind)
            return
        self._accept(room, st, seq, kind, hdr, msg.data, _stamp(hdr.get("Nats-Time-Stamp", "")))

    def _accept(self, room: str, st: _Live, seq: int, kind: str, hdr: Any, data: bytes, at: float) -> None:
        st.kinds[kind] = seq
        if seq > st.seq:
            st.seq = seq
        offset = None
        if kind == "h":
            offset = int(hdr.get(HDR_OFFSET, 0)) or None
            if offset is not None:
                self._remember(room, seq, offset)
                self._head(room, seq, offset, at)
                self.tails.add(room, seq, offset, data, HDR_START in hdr, at)
        elif kind != "e":
            return
        self._deliver(room, data, offset)

    def _release(self, room: str, st: _Live) -> None:
        held, st.held = st.held, None
        for msg in held or ():
            self._receive(room, st, msg)  # a new gap holds the rest again

    def _start_fill(self, room: str, st: _Live, kind: str | None) -> None:
        """Hold the room's live messages and read what this replica missed from the stream's leader."""
        if st.held is None:
            st.held = []
        if st.filling:
            st.lost = True  # the running fill reads on to the end once more
            return
        st.filling = True
        task = asyncio.ensure_future(self._fill(room, st, kind))
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None and self._followed.get(room) is st:
                # the gap cannot be filled: the reconnect path resubscribes and the members recover
                self._fail(f"room {room!r}: missed messages could not be read: {t.exception()}")

        task.add_done_callback(done)

    async def _fill(self, room: str, st: _Live, kind: str | None) -> None:
        self.gap_fills += 1
        sub = f"{self.prefix}.{st.stream.token}.{encode_room(room)}"
        # a subject's gap found after a newer message of the room's other subject was delivered (a verifying
        # fill looks for one: the window it reads may have begun before the newest delivered message)
        for k in ("h", "e") if kind == VERIFY else () if kind is None else (kind,):
            done = st.kinds.get(k, st.base)
            if done < st.seq:
                await self._fetch(room, st, f"{sub}.{k}", done + 1, st.seq)
                if st.kinds.get(k, st.base) != done:
                    log.warning("room %r: messages of %r missed before %d found late; delivered out of order",
                                room, k, st.seq)
        while True:
            st.lost = False
            # up to the newest message held meanwhile (the held ones follow it): a busy room's fill ends
            await self._fetch(room, st, f"{sub}.*", st.seq + 1, None, upto_held=True)
            if not st.lost or self._followed.get(room) is not st:
                break
        st.filling = False
        if self._followed.get(room) is st:
            self._release(room, st)

    async def _fetch(self, room: str, st: _Live, subject: str, start: int, stop: int | None, *,
                     upto_held: bool = False) -> None:
        """Deliver the stored messages of ``subject`` from stream sequence ``start`` (up to ``stop``, or with
        ``upto_held`` up to the newest held message once there is one) that this replica has not delivered,
        in order. Read in batches (batched direct gets of :data:`FILL_BATCH` messages): a gap of N messages
        costs about N / FILL_BATCH round trips, not N. Any replica of the stream may answer a direct get, and a
        follower may be a few writes behind the leader (it holds a prefix of the stream, so a batch has no
        holes, but may end early): in a cluster, where a batch ends before ``stop`` (or without one, at its
        end) one leader read (``STREAM.MSG.GET``) decides: nothing there, done; else that message, and the
        next batch. (A stream without direct gets, ``allow_direct`` turned off by hand, fails the fill: the
        replica reconnects, and its connect sets ``allow_direct`` again.) A batch's answers share the acks inbox
        with every other request: where nats-py dropped some of them (:class:`Dropped`: its chain of sequences
        broke, or the inbox overflowed) the intact prefix is delivered and the rest asked for in halves."""
        stream = st.stream.name
        direct = f"$JS.API.DIRECT.GET.{stream}"
        size, dropped = FILL_BATCH, 0
        while self._followed.get(room) is st:
            if upto_held and stop is None and st.held and st.received > st.need:
                stop = _sequence(st.held[-1])  # newer than every dropped message
            if stop is not None and start > stop:
                return
            acks = self.acks
            if acks is None:
                return
            batch = size if stop is None else max(1, min(size, stop - start + 1))  # nothing past stop is kept
            req = {"seq": start, "next_by_subj": subject, "batch": batch, "max_bytes": FILL_BYTES * size // FILL_BATCH}
            self.fill_requests += 1
            try:
                msgs, pending = await acks.batch(direct, json.dumps(req).encode())
                dropped = 0
            except Dropped as exc:
                # the acks inbox overflowed: deliver the intact prefix, ask again in smaller batches
                dropped += 1
                if dropped > FILL_DROPS:
                    raise
                msgs, pending, size = exc.msgs, -1, max(1, size // 2)
                log.info("room %r: a gap fill's batch lost messages (%s); asking for %d at a time", room, exc, size)
            for msg in msgs:
                hdr = msg.headers
                seq = int(hdr["Nats-Sequence"])
                if (stop is not None and seq > stop) or self._followed.get(room) is not st:
                    return
                self._stored(room, st, seq, hdr["Nats-Subject"], hdr, msg.data, hdr.get("Nats-Time-Stamp", ""))
                start = seq + 1
            if pending < 0 or (msgs and pending):
                continue  # lost on the way, or cut at the batch's size: more follow
            if not self._clustered:
                return  # one server: the stream's only copy had nothing more
            if stop is not None and start > stop:
                return
            self.fill_requests += 1
            try:
                answer = await acks.request(f"$JS.API.STREAM.MSG.GET.{stream}",
                                            json.dumps({"seq": start, "next_by_subj": subject}).encode())
            except AckRefused as exc:
                if exc.code == NO_MESSAGE:
                    return
                raise
            msg = answer["message"]
            seq = int(msg["seq"])
            if (stop is not None and seq > stop) or self._followed.get(room) is not st:
                return
            self._stored(room, st, seq, msg["subject"], _headers(base64.b64decode(msg.get("hdrs") or "")),
                         base64.b64decode(msg.get("data") or ""), msg.get("time", ""))
            start = seq + 1

    def _stored(self, room: str, st: _Live, seq: int, subject: str, hdr: Any, data: bytes, stamp: str) -> None:
        """A message read from the stream by a fill: delivered unless this replica delivered it already."""
        kind = subject.rpartition(".")[2]
        if seq > st.kinds.get(kind, st.base):
            self._accept(room, st, seq, kind, hdr, data, _stamp(stamp))

    async def _leader_cb(self, rs: RoomStream, msg: Any) -> None:
        """The stream has a new leader: a message the old one stored but did not republish is missed by
        every replica, and ``Nats-Last-Sequence`` shows it only at the next message of the same subject.
        Each followed room is read from the stream before its next message is delivered (so in order),
        and the upkeep reads the rooms that stay quiet (:data:`VERIFY_PER_UPKEEP` at a time)."""
        log.info("stream %s has a new leader: its followed rooms are read again", rs.name)
        self._verify_all(rs)

    def _verify_all(self, rs: RoomStream) -> None:
        """Read every followed room of ``rs`` from the stream before its next message, and the quiet ones
        from the upkeep, :data:`VERIFY_PER_UPKEEP` at a time (not all at once: tens of thousands of reads
        would time out together and fail the connection)."""
        for room, st in self._followed.items():
            if st.seq >= 0 and st.stream is rs:
                st.verify = True
                self._unverified.add(room)

    def _verify_quiet(self) -> None:
        busy = []
        for _ in range(min(VERIFY_PER_UPKEEP, len(self._unverified))):
            room = self._unverified.pop()
            st = self._followed.get(room)
            if st is None or not st.verify:
                continue
            if st.held is not None:
                busy.append(room)  # a fill that began before the reason to verify: the next upkeep reads it
                continue
            st.verify = False
            self._start_fill(room, st, VERIFY)
        self._unverified.update(busy)

    def _slow(self, sid: int) -> None:
        """nats-py dropped a message of a full subscription (its pending limit): read the room again from
        the stream. Called from the reader before it takes the next message, so nothing newer is
        delivered before the fill holds the room."""
        room = self._by_sid.get(sid)
        st = self._followed.get(room) if room is not None else None
        if room is None or st is None:
            return
        if not (st.filling or st.lost):  # once per fill, not per dropped message
            log.warning("room %r: this replica fell behind its subscription; reading it from the stream", room)
        # the queued messages came before the dropped one: a message received after them came after it
        st.need = st.received + st.sub._pending_queue.qsize()
        if st.seq < 0:
            st.lost = True  # before the baseline: _consume fills once it is known
        else:
            self._start_fill(room, st, None)

    async def _updated_cb(self, rs: RoomStream, msg: Any) -> None:
        """The stream was updated. An older replica's update removes RePublish until some replica puts it
        back, and this one may find it back already (another replica's restore) or fail to put it back
        (its update raced another's): messages stored in between reached no replica, so the followed rooms
        are read again in every case (stream updates are rare: a deploy)."""
        task = asyncio.ensure_future(self._republish_updated(rs))
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.info("stream %s was updated; its RePublish was not checked: %s", rs.name, t.exception())

        task.add_done_callback(done)

    async def _republish_updated(self, rs: RoomStream) -> None:
        try:
            await self._assert_republish(rs)
        finally:
            self._verify_all(rs)  # after the restore (if any): what the reads find was stored before it

    async def _check_republish(self) -> None:
        """The upkeep's RePublish check: :data:`REPUBLISH_PER_UPKEEP` room streams in turn (so a stream's
        turn comes every ``room_streams / REPUBLISH_PER_UPKEEP`` upkeeps), and all of them once one had lost
        it (an older replica's start updates every stream)."""
        streams = self.streams
        first = self._republish_next % len(streams)
        turn = [streams[(first + i) % len(streams)] for i in range(min(REPUBLISH_PER_UPKEEP, len(streams)))]
        self._republish_next = first + len(turn)
        restored = False
        for rs in turn:
            restored = await self._checked_republish(rs) or restored
        if restored:
            for rs in streams:
                if rs not in turn:
                    await self._checked_republish(rs)

    async def _checked_republish(self, rs: RoomStream) -> bool:
        try:
            return await self._assert_republish(rs)
        except (BusUnavailable, TimeoutError, ConnectionError) as exc:
            log.info("upkeep: the RePublish of %s was not checked: %s: %s", rs.name, type(exc).__name__, exc)
            return False

    async def _assert_republish(self, rs: RoomStream) -> bool:
        """Put the stream's RePublish back when it is missing (a replica of an older version updated the
        stream without it); True when it was missing. Messages stored meanwhile were not republished:
        each followed room of it is read again from its last delivered message (:meth:`_verify_all`).

        Through :attr:`acks` (timers, no ``asyncio.wait_for``: Python 3.11's can swallow the cancellation
        that closes the bus, and the upkeep would then run on)."""
        acks = self.acks
        if acks is None:
            raise ConnectionError("not connected")
        try:
            info = await acks.request(f"$JS.API.STREAM.INFO.{rs.name}", b"")
            want = self._republish(rs)
            rp = info.get("config", {}).get("republish") or {}
            if (rp.get("src"), rp.get("dest")) == (want.src, want.dest):
                return False
            log.warning("stream %s: RePublish was %r; restoring it and reading the followed rooms again",
                        rs.name, rp or None)
            try:
                await acks.request(f"$JS.API.STREAM.UPDATE.{rs.name}", json.dumps(rs.config.as_dict()).encode())
            finally:
                self._verify_all(rs)  # also when this update failed: another replica's may have won
        except AckRefused as exc:
            raise BusUnavailable(f"stream {rs.name}: {exc}") from exc
        self.republish_restored += 1
        return True

    def _stop(self, room: str) -> Any:
        """Forget the room's live delivery; its subscription (None if it has none), to unsubscribe."""
        self._subs.pop(room, None)
        st = self._followed.pop(room, None)
        if st is None or st.sub is None:
            return None
        self._by_sid.pop(st.sub._id, None)
        return st.sub
