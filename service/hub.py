"""Rooms -> local sessions, one bus subscription per room per process, and the fan-out.

The hub owns the bus envelope: ``b"<origin> <ts_ms>\\n" + frame`` where ``frame`` is the JSON
object every member receives, ``origin`` the id of a session that must not get its own message
(empty for none) and ``ts_ms`` the publish time for the latency metric. A bus message is encoded
into an :class:`OutFrame` once per process and the same bytes are written to every local member.
A frame that is not a JSON object (it does not start with ``{``: the yjs handler's binary frames)
reaches members as it is, without an offset spliced in; they get the offset as ``deliver``'s argument.

When the bus comes back after an outage, the hub repairs each local room from history: it reads
what was published after the last offset it delivered and replays it in order before live
messages; when history cannot cover the gap, members get ``gap {room, epoch, offset}`` and know to
reload. A lost history (a new epoch) is a gap for the old epoch only: the new one is replayed from
its start when its history is complete. The replay reads history on another connection than the live
messages come on, so the live copy of a message it replayed may arrive after it ended: such copies (at or
below the replay's last offset, before a newer one) are dropped. What the bus carried meanwhile without
history (a chat's presence events) is not replayed: :meth:`Hub.on_resumed` listeners learn which rooms
missed it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wirehub.bus import Backend, BusUnavailable
from wirehub.inflight import InFlight
from wirehub.metrics import Metrics
from wirehub.protocol import dumps
from wirehub.session import OutFrame, Session

log = logging.getLogger("wirehub.hub")

#: a listener of :meth:`Hub.on_resumed`: the rooms that have members here
ResumedListener = Callable[[Sequence[str]], None]

#: messages per history read of a repair
REPAIR_PAGE = 10_000
#: a repair that finds the bus unavailable tries again after this many seconds (once it is up) ...
REPAIR_RETRY = 0.2
#: ... and, while the bus stays up, gives up after this many attempts with a ``gap``
REPAIR_ATTEMPTS = 5
#: seconds after a repair during which late live copies of replayed messages are dropped (they come within a
#: round trip; a room's history restarts without an outage only after its meta TTL, over a minute idle)
REPAIR_FLOOR = 10.0
#: seconds a member is a newcomer: the fan-out takes the newcomers after the rest, in join order (see
#: :meth:`_Room.rebuild`)
SETTLE = 30.0


@dataclass(eq=False)
class _Room:
    name: str
    members: dict[bytes, Session] = field(default_factory=dict)
    subscribed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: newest history offset fanned out here; the repair after an outage starts from it
    last_offset: int | None = None
    #: the history epoch when the room was subscribed: a repair across a lost history must say gap
    epoch: str | None = None
    #: while repairing: live messages kept back until the history replay is done
    backlog: list[tuple[bytes, int | None]] | None = None
    #: after a repair, ``(offset, until)``: live messages at or below ``offset`` are late copies of replayed
    #: ones (history reads and pub/sub are different connections: a message the replay read may still be on
    #: its way live when the repair ends), dropped until a newer one passes (the bus delivers a room's
    #: messages in order) or until ``until`` (monotonic), long before an idle room's history could restart
    floor: tuple[int, float] | None = None
    #: the members and what the fan-out calls for each (:meth:`Session.receiver`) as :meth:`rebuild` made it
    #: last: the settled ones (the first ``_n_settled``), then the newcomers. Rebuilt on the first message
    #: after a membership change (``stale``) or after a newcomer settled, so a message costs no copy of
    #: ``members``
    _receivers: tuple[tuple[Session, Callable[[str, OutFrame, int | None], None]], ...] = ()
    _n_settled: int = 0
    stale: bool = True
    #: the newcomers (joined less than ``SETTLE`` seconds ago, as far as the last rebuild knew): when each
    #: joined (monotonic, one stamp per second), in join order; None when there is none (no dict kept)
    newcomers: dict[bytes, float] | None = None
    #: when the oldest newcomer settles, so the order must be rebuilt (0.0: no newcomer)
    settle_at: float = 0.0

    def add(self, session: Session, at: float) -> None:
        """Add ``session``, a newcomer since ``at`` (monotonic)."""
        key = session.id_bytes
        self.members[key] = session
        newcomers = self.newcomers
        if newcomers is None:
            newcomers = self.newcomers = {}
        newcomers.pop(key, None)  # a newcomer again, in join order
        newcomers[key] = at
        self.stale = True

    def discard(self, session: Session) -> bool:
        """Remove ``session``; False when it was not a member."""
        if self.members.pop(session.id_bytes, None) is None:
            return False
        if self.newcomers:
            self.newcomers.pop(session.id_bytes, None)
        self.stale = True
        return True

    def receivers(self) -> tuple[tuple[Session, Callable[[str, OutFrame, int | None], None]], ...]:
        return self.rebuild() if self.stale else self._receivers

    def rebuild(self) -> tuple[tuple[Session, Callable[[str, OutFrame, int | None], None]], ...]:
        """The settled members by address (CPython's id), then the newcomers in join order.

        A connection's objects are allocated together when it opens, so in address order the fan-out walks
        the sessions, their streams and sockets (and the kernel's, in accept order) about as they lie in
        memory; in join order, members who joined in another order than they connected cost 1.7x the CPU per
        delivery in cache and TLB misses (18,000 members; bench/README.md, session 29). The newcomers come
        last so that a storm of rejoins (new sessions, wherever the allocator put them) does not delay the
        members who were there before it. The settled order is kept from the last rebuild: the members who
        left drop out of it and the ones who settled since are sorted in (one sorted run and a short tail).
        """
        members, newcomers = self.members, self.newcomers
        # the kept settled order, without who left and who left and joined again since (a newcomer now)
        joined_since = newcomers or ()
        settled = [s for s, _ in self._receivers[: self._n_settled]
                   if members.get(s.id_bytes) is s and s.id_bytes not in joined_since]
        fresh: list[Session] = []
        if newcomers:
            now = time.monotonic()
            ripe: list[bytes] = []
            for key, at in newcomers.items():  # in join order, so in the order of their stamps
                if now - at < SETTLE:
                    break
                ripe.append(key)
            for key in ripe:
                del newcomers[key]
                settled.append(members[key])
            if ripe:
                settled.sort(key=id)
            if newcomers:
                self.settle_at = next(iter(newcomers.values())) + SETTLE
                fresh = [members[key] for key in newcomers]
        if not newcomers:  # none left (settled, or the last ones left): no dict kept, nothing to wait for
            self.newcomers, self.settle_at = None, 0.0
        receivers = tuple((s, s.receiver()) for s in settled)
        if fresh:
            receivers += tuple((s, s.receiver()) for s in fresh)
        self._receivers, self._n_settled, self.stale = receivers, len(settled), False
        return receivers


def envelope(frame: bytes, origin: Session | None = None, ts: float | None = None) -> bytes:
    """Wrap an encoded frame for the bus (see the module docstring)."""
    ts_ms = int((ts if ts is not None else time.time()) * 1000)
    oid = origin.id_bytes if origin is not None else b""
    return b"%s %d\n%s" % (oid, ts_ms, frame)


def split_envelope(payload: bytes) -> tuple[bytes, int, bytes]:
    """``(origin, ts_ms, frame)`` of a bus payload."""
    nl = payload.index(b"\n")
    origin, _, ts = payload[:nl].partition(b" ")
    return origin, int(ts or 0), payload[nl + 1 :]


class Hub:
    """Implements :class:`wirehub.bus.BusHandler` for one process."""

    def __init__(self, backend: Backend, metrics: Metrics) -> None:
        self.backend = backend
        self.bus = backend.bus
        self.metrics = metrics
        self._rooms: dict[str, _Room] = {}
        self._bus_was_down = False
        self._repairs: set[asyncio.Task[None]] = set()
        #: bus outages so far, and set while the bus is up: a repair retries after both
        self._outages = 0
        self._bus_up = asyncio.Event()
        self.healthy = False
        #: publishes handed to the bus and not answered yet (the drain waits for them)
        self.publishing = InFlight()
        #: the join time a room's newcomers get (:meth:`_join_stamp`)
        self._stamp = 0.0
        self._resumed: list[ResumedListener] = []

    # -- membership --------------------------------------------------------------------------------

    def _join_stamp(self) -> float:
        """Now (monotonic), to the second: the joins of a second share one float (a storm's newcomers keep
        none of their own)."""
        now = time.monotonic()
        if now - self._stamp >= 1.0:
            self._stamp = now
        return self._stamp

    def members(self, room: str) -> list[Session]:
        r = self._rooms.get(room)
        return list(r.members.values()) if r else []

    def rooms(self) -> list[str]:
        return [name for name, r in self._rooms.items() if r.members]

    async def bus_up(self) -> None:
        """Return once the bus is up (at once while it is)."""
        await self._bus_up.wait()

    def on_resumed(self, listener: ResumedListener) -> None:
        """Register ``listener``, called with the rooms that have members here when this replica's link to the bus
        is back after an outage (every such room), or when only some rooms' subscriptions were interrupted and are
        back (those of them). What the bus carried meanwhile is lost for these members but what history replays:
        a listener tells them of the rest. Called before the bus pushes anything newer; it must not block. One
        that raises is logged and does not stop the others."""
        self._resumed.append(listener)

    def _report_resumed(self, rooms: list[str]) -> None:
        if not rooms:
            return
        for listener in list(self._resumed):
            try:
                listener(rooms)
            except Exception:
                log.exception("an on_resumed listener failed for %d rooms", len(rooms))

    def deliver_here(self, room: str, frame: bytes) -> None:
        """Send the encoded JSON object ``frame`` to this replica's members of ``room`` only: not through the bus,
        not in history (what only they need, such as a notice that they missed something)."""
        r = self._rooms.get(room)
        if r is None:
            return
        out = OutFrame(frame)
        for s in list(r.members.values()):
            s.deliver(room, out, None)

    def is_member(self, room: str, session: Session) -> bool:
        """Whether ``session`` is a member of ``room`` here now, O(1)."""
        r = self._rooms.get(room)
        return r is not None and r.members.get(session.id_bytes) is session

    def join_now(self, room: str, session: Session) -> bool:
        """:meth:`join` when it needs no wait, without a coroutine (a join into a room this replica has
        subscribed already: every join of a big room but its first here): True when ``session`` is now a
        member; False when it is not (nothing was done): then :meth:`join` it."""
        r = self._rooms.get(room)
        if r is not None and r.subscribed and r.backlog is None and not r.lock.locked():
            # The room is subscribed and nobody holds its lock (no first join subscribing, no last leave
            # unsubscribing): being a member is all that is left, and no await may come between the
            # check and the add. A leave that waits for the lock sees this member and keeps the room.
            session.add_room(room)
            r.add(session, self._join_stamp())
            return True
        return False

    async def join(self, room: str, session: Session) -> None:
        """Add ``session`` to ``room``; subscribes the bus on the first local member.

        When it returns, every message published to ``room`` afterwards reaches the session.
        Raises BusUnavailable (the session is then not a member).
        """
        if self.join_now(room, session):
            return
        session.add_room(room)
        try:
            while True:
                r = self._rooms.get(room)
                if r is None:
                    r = self._rooms[room] = _Room(room)
                    self.metrics.rooms.set(len(self._rooms))
                r.add(session, self._join_stamp())
                async with r.lock:
                    if self._rooms.get(room) is not r:
                        # the last member's leave retired this room while we waited: use the new one
                        r.discard(session)
                        continue
                    if not r.subscribed:
                        # position first: when it fails, nothing is half done (subscribed, no epoch)
                        top, epoch = await self.backend.history.position(room)
                        await self.bus.subscribe(room)
                        r.subscribed, r.epoch = True, epoch
                        if r.last_offset is None:
                            # a repair after an outage starts here even if nothing was delivered yet
                            r.last_offset = top
                    return
        except BaseException:
            await self.leave(room, session)
            raise

    def position(self, room: str) -> tuple[int, str] | None:
        """``(offset, epoch)`` of the newest message fanned out here, or None when unknown (not subscribed,
        no offset yet, a repair running). For a member whose live messages are held
        (:meth:`Session.hold`): every message fanned out after this call has a greater offset (the bus
        delivers a room's messages in order), so a join may start from it without a history read."""
        r = self._rooms.get(room)
        if r is None or not r.subscribed or r.backlog is not None or r.last_offset is None or r.epoch is None:
            return None
        return r.last_offset, r.epoch

    def behind(self, room: str, epoch: str, offset: int) -> bool:
        """May a live message of ``room`` at or below ``offset`` (in ``epoch``) still be fanned out
        here? False once this replica has fanned out up to ``offset`` (or had read its position past
        it when it subscribed), since the bus delivers a room's messages in order: a join that recovered
        up to ``offset`` then needs no duplicate floor (:meth:`Session.release`). True when unsure
        (another epoch, a repair running)."""
        r = self._rooms.get(room)
        return (r is None or r.epoch != epoch or r.last_offset is None or r.last_offset < offset
                or r.backlog is not None)

    async def leave(self, room: str, session: Session) -> None:
        """Remove ``session`` from ``room``; unsubscribes the bus after the last local member."""
        session.left(room)
        r = self._rooms.get(room)
        if r is None or not r.discard(session) or r.members:
            return
        async with r.lock:
            if not r.members and r.subscribed:
                r.subscribed = False
                try:
                    await self.bus.unsubscribe(room)
                except BusUnavailable:
                    log.debug("unsubscribe %s while the bus is down; it resubscribes nothing it lost", room)
            # Retired under the lock: a join waiting on it sees the room is gone and uses a new one.
            if not r.members and not r.subscribed and self._rooms.get(room) is r:
                del self._rooms[room]
                self.metrics.rooms.set(len(self._rooms))

    async def leave_all(self, session: Session) -> None:
        """Leave every room; one failing room does not keep the session in the others."""
        for room in list(session.rooms):
            try:
                await self.leave(room, session)
            except Exception:
                log.exception("room %s: leaving %r failed", room, session)

    # -- publishing and fan-out --------------------------------------------------------------------

    async def publish(
        self, room: str, frame: bytes, *, origin: Session | None = None, history: bool = False,
        dedupe_key: str | None = None, dedupe_window: float = 0.0,
    ) -> int | None:
        """Publish an encoded JSON object ``frame`` to ``room`` on every replica.

        ``origin`` does not receive it. With ``history=True`` the message is stored and every
        member gets it with ``"offset"`` spliced in; its offset is returned. ``dedupe_key``: see
        :meth:`wirehub.bus.Bus.publish`. Raises BusUnavailable (PublishOutcomeUnknown: maybe
        published). Counted in :attr:`publishing` until the bus answered: the drain waits for it.
        """
        payload = envelope(frame, origin)
        publishing = self.publishing
        publishing.begin()  # InFlight.track() without its generator: once per publish
        try:
            if dedupe_key is None:  # buses written before dedupe_key need not know the keyword
                return await self.bus.publish(room, payload, history=history)
            return await self.bus.publish(room, payload, history=history, dedupe_key=dedupe_key,
                                          dedupe_window=dedupe_window)
        finally:
            publishing.end()

    def on_bus_message(self, room: str, payload: bytes, offset: int | None) -> None:
        r = self._rooms.get(room)
        if r is None:
            return
        if r.backlog is not None:
            r.backlog.append((payload, offset))
            return
        floor = r.floor
        if floor is not None and offset is not None:
            if offset <= floor[0] and time.monotonic() < floor[1]:
                return  # a late live copy of what the repair's replay fanned out
            r.floor = None
        self._fan_out(r, payload, offset)

    def _fan_out(self, r: _Room, payload: bytes, offset: int | None) -> None:
        # Once per bus message (in the spread layout, for about one delivery): split_envelope and with_offset
        # are inlined, each call costs about as much as its work.
        head, nl, frame = payload.partition(b"\n")
        origin, _, ts = head.partition(b" ")
        try:
            if not nl:
                raise ValueError("no newline")
            ts_ms = int(ts or 0)
        except ValueError:
            log.error("dropped a malformed bus message in room %s", r.name)
            self.metrics.dropped.labels("malformed").inc()
            return
        metrics = self.metrics
        metrics.bus_received.n += 1
        if ts_ms:
            latency = time.time() - ts_ms / 1000
            metrics.latency.observe(latency if latency > 0.0 else 0.0)
        # Only JSON objects get the offset spliced in; other frames (the yjs handler's binary ones)
        # go to members as they are, and a member reads the offset from deliver()'s argument.
        if offset is not None:
            r.last_offset = offset
            if frame[:1] == b"{":
                frame = b'%s,"offset":%d}' % (frame[:-1], offset)  # with_offset
        out = OutFrame(frame)
        skip = r.members.get(origin) if origin else None
        # A snapshot: a member that joins or leaves while this runs (a close from inside a delivery) does
        # not change who gets this message, as with a copy of ``members``.
        receivers = r._receivers
        if r.stale or (r.settle_at and time.monotonic() >= r.settle_at):
            receivers = r.rebuild()
        name = r.name
        for s, receive in receivers:
            if s is not skip:
                receive(name, out, offset)
        metrics.delivered.n += len(receivers) - (skip is not None)

    # -- bus health and repair ---------------------------------------------------------------------

    def on_bus_state(self, healthy: bool) -> None:
        self.healthy = healthy
        self.metrics.bus_up.set(1 if healthy else 0)
        if not healthy:
            self._bus_was_down = True
            self._outages += 1
            self._bus_up.clear()
            for r in self._rooms.values():
                if r.backlog:  # a repair is running: it reads these again from history, in order
                    r.backlog.clear()
            return
        self._bus_up.set()
        if self._bus_was_down:
            self._bus_was_down = False
            self.metrics.bus_reconnects.inc()
            for r in list(self._rooms.values()):
                self._start_repair(r)
            self._report_resumed([r.name for r in self._rooms.values() if r.members])

    def on_bus_rooms_resumed(self, rooms: list[str]) -> None:
        """Only these rooms' subscriptions were interrupted, and are back (a Redis Cluster shard
        failed over, a slot moved) while the bus stayed up: repair them as after an outage. The bus
        calls it before it pushes anything of the new subscriptions."""
        resumed = []
        for name in rooms:
            r = self._rooms.get(name)
            if r is not None:
                self._start_repair(r)
                if r.members:
                    resumed.append(name)
        self._report_resumed(resumed)

    def _start_repair(self, r: _Room) -> None:
        if r.members and r.last_offset is not None and r.backlog is None:
            r.backlog = []  # now, before the bus pushes anything newer
            r.floor = None  # the backlog's release sets the new one
            task = asyncio.ensure_future(self._repair(r))
            self._repairs.add(task)
            task.add_done_callback(self._repairs.discard)

    async def _repair(self, r: _Room) -> None:
        """Replay what the room's members missed during the outage, then release the live backlog.

        When the bus fails again meanwhile, the attempt starts over from what members have got once
        it is back (the backlog was emptied on the failure: those messages are read from history).
        """
        attempts = 0
        try:
            while r.members:
                outages = self._outages
                try:
                    await self._replay(r)
                except BusUnavailable:
                    attempts += 1
                    if attempts >= REPAIR_ATTEMPTS and self.healthy:
                        raise
                    log.info("room %s: repair postponed, the bus is unavailable", r.name)
                    await asyncio.sleep(REPAIR_RETRY)
                    await self._bus_up.wait()
                    continue
                if outages == self._outages:
                    return
        except Exception:
            log.exception("room %s: repair after the outage failed; members are told", r.name)
            self._gap(r, r.epoch or "", self._live_from(r, None, r.last_offset or 0))
        finally:
            backlog, r.backlog = r.backlog or [], None
            for payload, live_offset in backlog:
                if live_offset is None or r.last_offset is None or live_offset > r.last_offset:
                    self._fan_out(r, payload, live_offset)
            if r.last_offset is not None:
                r.floor = (r.last_offset, time.monotonic() + REPAIR_FLOOR)

    async def _replay(self, r: _Room) -> None:
        """One attempt, paged, from ``last_offset``. Same epoch: the pages after it. Another epoch
        (the broker lost the old history): the old epoch's tail is really lost, so members get
        ``gap {epoch, offset: 0}`` and then the new epoch from its start, which is complete when it
        was all published after the restart (while this replica was still reconnecting). When
        history was trimmed past what members got, ``gap`` covers only the trimmed part and what
        history still holds follows it."""
        history = self.backend.history
        page = await history.read(r.name, r.last_offset, REPAIR_PAGE)
        if r.epoch is None:
            r.epoch = page.epoch
        elif page.epoch != r.epoch:
            log.warning("room %s: history epoch %s was lost; epoch %s is replayed from its start",
                        r.name, r.epoch, page.epoch)
            page = await history.read(r.name, 0, REPAIR_PAGE)
            if page.complete:
                self._gap(r, page.epoch, 0)
        # pages until the top of the read: a partial replay would be a silent gap
        while page.complete and page.epoch == r.epoch and page.messages:
            for offset, payload in page.messages:
                self._fan_out(r, payload, offset)
            if page.messages[-1][0] >= page.top:
                break
            page = await history.read(r.name, page.messages[-1][0], REPAIR_PAGE)
        if not (page.complete and page.epoch == r.epoch):
            # trimmed (by count or age): the gap is only what is gone; what history still holds follows
            log.warning("room %s: history does not cover the outage; members are told", r.name)
            done = (r.last_offset or 0) if page.epoch == r.epoch else 0
            newest = await history.read(r.name, None, REPAIR_PAGE)
            kept = [(offset, payload) for offset, payload in newest.messages if offset > done]
            if not kept:
                self._gap(r, newest.epoch, self._live_from(r, newest.top, done))
                return
            self._gap(r, newest.epoch, kept[0][0] - 1)
            for offset, payload in kept:
                self._fan_out(r, payload, offset)

    @staticmethod
    def _live_from(r: _Room, top: int | None, done: int) -> int:
        """Where a ``gap`` leaves members who have got ``done``: ``top`` (None: unknown), or just
        before the first newer live message kept back, which is then sent (never dropped)."""
        for _, offset in r.backlog or ():
            if offset is not None and offset > done:
                return offset - 1 if top is None else max(done, min(top, offset - 1))
        return done if top is None else max(done, top)

    def _gap(self, r: _Room, epoch: str, offset: int) -> None:
        """Tell the members that messages are lost: their position is now ``(offset, epoch)``, and
        the messages that follow continue it."""
        r.epoch, r.last_offset = epoch, offset
        gap = OutFrame(dumps({"op": "gap", "room": r.name, "epoch": epoch, "offset": offset}).encode())
        for s in list(r.members.values()):
            s.rebase(r.name)  # a join's duplicate floor belongs to the old offsets
            s.deliver(r.name, gap, None)

    async def close(self) -> None:
        for task in list(self._repairs):
            task.cancel()
