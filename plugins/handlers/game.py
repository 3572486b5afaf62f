"""The game handler: authoritative, versioned room state synced with batched JSON Patches.

The state of a room lives in the backend's state store as ``{"e": epoch, "c": commit, "s": state}``
(the handler owns that wrapper): ``s`` is the room's JSON document, ``e`` names one lifetime of
the room (it changes when the store lost the room and it starts again at version 1) and ``c`` the
commit that wrote the current version. Versions are the store's compare-and-set versions.

Writes (per room, per replica, one commit in flight: a *group commit*): updates that arrive while
a commit is running wait and are committed together in the next one. A commit reads the state
(or starts from the version this replica wrote last, which its compare-and-set then confirms), runs
every update through ``wirehub_validate_update`` against the state the earlier ones left,
applies it with jsonpatch, checks the size, and stores the result with ``compare_and_set``; on a
conflict it re-reads and re-validates everything (bounded retries, then ``error conflict``).
Each committed version is an entry ``[version, commit, parent_commit, ops, users]``; the
committing replica publishes its entries at most once per tick (the first one after a quiet
tick immediately) as one bus message ``{"op": "commits", ...}``.

Reads (per room, per replica, a *view*): the view subscribes the room on the hub through a
:class:`_RoomTap` (so bus messages reach the handler, not the clients directly), holds the
room's document at the version its members were last sent, puts the entries it receives in
version order (entries of one replica can overtake another's on the bus), checks that each
one continues the commit it holds (epoch and parent commit), applies runs of consecutive
versions and sends each run to its members as one ``patch`` frame, encoded once. A hole that is
not filled within ``gap_timeout``, an entry from another epoch or history, a bus reconnect and
the periodic check against the store (``verify_interval``) all end in a *resync*: the view
reloads the store's state and sends every member a fresh ``state``. A member whose send queue
is over ``slow_client_bytes`` skips patches and gets one fresh ``state`` once it has drained.

Client frames (docs/protocol.md, "Game endpoint"): ``join {room}`` -> ``state``; ``leave
{room}`` -> ``left``; ``update {room, patch}`` -> ``ack {id, version}`` or ``error``; ``sync
{room}`` -> ``state``; events ``patch {room, from_version, version, patch, by}`` and ``state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import random
import re
import time
import uuid
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jsonpatch
import jsonpointer
from prometheus_client import CollectorRegistry, Counter

from service.auth import Identity
from service.bus import BusUnavailable, PresenceEntry, StateConflict
from service.config import ConfigError, opt, parse_block
from service.handler import HandlerContext, OpHandler, require_str
from service.hookspecs import hookimpl
from service.plugins import HandlerFactory, UpdateRejected
from service.protocol import ErrorCode, ProtocolError, dumps
from service.rooms import DEFAULT_ROOM_PATTERN
from service.session import OutFrame, Session

if TYPE_CHECKING:
    from service.app import Wirehub

log = logging.getLogger("wirehub.game")

#: session.state keys
_ROOMS = "game.rooms"
_BUCKET = "game.bucket"

_OPS_NEEDING_VALUE = frozenset(("add", "replace", "test"))
_OPS_NEEDING_FROM = frozenset(("move", "copy"))
_ALL_OPS = _OPS_NEEDING_VALUE | _OPS_NEEDING_FROM | {"remove"}
_APPLY_ERRORS = (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError, IndexError,
                 ValueError, AttributeError)


@dataclass(frozen=True)
class GameOptions:
    #: seconds between batches: a replica publishes its commits of a room at most once per tick
    tick: float = opt(0.05, min=0.001, max=10)
    #: the state of a room that has none yet (any JSON value)
    initial_state: Any = None
    #: largest state of a room, in bytes of compact JSON; an update making it larger -> error too_large
    max_state_bytes: int = opt(65536, min=2)
    #: largest patch of one update, in bytes of compact JSON -> error too_large
    max_patch_bytes: int = opt(16384, min=2)
    #: updates (and syncs) per second per session, with a burst of as many; 0 = unlimited
    updates_per_second: float = opt(30.0, min=0)
    #: seconds a room's state is kept with no members anywhere and no updates; 0 = forever
    idle_expiry: float = opt(600.0, min=0)
    #: compare-and-set attempts of one commit before its updates get error conflict
    max_retries: int = opt(20, min=1)
    #: updates committed together at most (one version)
    max_batch: int = opt(256, min=1)
    #: seconds a view waits for a missing version before it reloads the state from the store
    gap_timeout: float = opt(1.0, min=0.01)
    #: seconds between checks of each view against the store (a lost last message); 0 = only on reconnect
    verify_interval: float = opt(5.0, min=0)
    #: bytes queued to a member above which it skips patches and later gets a fresh state
    slow_client_bytes: int = opt(262144, min=1024)
    #: prefix of the bus room, presence room and state key (two game endpoints with different
    #: namespaces have separate rooms)
    namespace: str = "game"
    #: regular expression a room name must match in full (the chat endpoint's default)
    room_pattern: str = DEFAULT_ROOM_PATTERN
    #: per-endpoint override of server.max_message_size (read by the core)
    max_message_size: int | None = opt(None, min=125)


class _NullTransport:
    """The tap is a hub member that never writes to a socket."""

    def send_frame(self, frame: OutFrame) -> None:
        return None

    def buffered(self) -> int:
        return 0

    def close(self, code: int, reason: str) -> None:
        return None

    @property
    def closed(self) -> bool:
        return False


class _RoomTap(Session):
    """The view's hub membership: bus messages of the room go to the view, not to clients."""

    def __init__(self, view: _View, endpoint: str, node: str) -> None:
        super().__init__(_NullTransport(), Identity(user="game-view"), endpoint=endpoint, node=node,
                         max_queue_bytes=1 << 62)
        self.view = view

    def deliver(self, room: str, frame: OutFrame, offset: int | None) -> None:
        try:
            self.view.on_bus(frame.payload)
        except Exception:
            log.exception("room %s: a bus message could not be handled; resyncing", self.view.room)
            self.view.handler.spawn(self.view.resync())


@dataclass(eq=False)
class _Member:
    session: Session
    #: skips patches until it gets a fresh state (joined, synced or slow)
    need_state: bool = False


# An entry: (epoch, version, commit, parent, ops, users)
_Entry = tuple[str, int, str, "str | None", list[Any], list[str]]


class _View:
    """One room on this replica: its members, the document they were sent, the reorder buffer."""

    def __init__(self, handler: GameHandler, room: str) -> None:
        self.handler = handler
        self.room = room
        self.key = handler.key(room)
        self.members: dict[Session, _Member] = {}
        self.tap = _RoomTap(self, handler.context.endpoint.path, handler.context.node)
        self.lock = asyncio.Lock()
        self.ready = False
        self.busy = False  # loading or resyncing: bus entries are only buffered
        self.epoch: str | None = None
        self.version = 0
        self.head: str | None = None
        self.doc: Any = None
        self._doc_json: str | None = None
        self._state_frame: OutFrame | None = None
        self.recent: dict[int, str] = {}  # version -> commit, the last ones applied
        self._recent_order: deque[int] = deque()
        self.pending: dict[int, _Entry] = {}
        #: a version known to exist (from the store) that the view has not reached yet
        self.known_top = 0
        self.catchup_deadline: float | None = None
        self.next_verify = 0.0
        self.checking = False
        #: syncs waiting for the view to reach a version
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- state ---------------------------------------------------------------------------------------

    def _set(self, found: tuple[int, Any] | None) -> None:
        version, epoch, head, doc = self.handler.unwrap(found)
        self.version, self.epoch, self.head, self.doc = version, epoch, head, doc
        self._doc_json = None
        self._state_frame = None
        self.recent.clear()
        self._recent_order.clear()
        self.pending = {v: e for v, e in self.pending.items() if v > version and (epoch is None or e[0] == epoch)}
        self.known_top = 0
        self.catchup_deadline = None
        self.next_verify = self.handler.loop_time() + self.handler.options.verify_interval
        self.wake(everyone=True)

    def wake(self, everyone: bool = False) -> None:
        if not self.waiters:
            return
        keep = []
        for version, fut in self.waiters:
            if everyone or version <= self.version:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((version, fut))
        self.waiters = keep

    @property
    def doc_json(self) -> str:
        if self._doc_json is None:
            self._doc_json = dumps(self.doc)
        return self._doc_json

    def state_payload(self, req_id: Any = None) -> bytes:
        head = '{"op":"state",' + (f'"id":{dumps(req_id)},' if req_id is not None else "")
        return (f'{head}"room":{dumps(self.room)},"version":{self.version},"state":{self.doc_json}}}').encode()

    def state_frame(self) -> OutFrame:
        if self._state_frame is None:
            self._state_frame = OutFrame(self.state_payload())
        return self._state_frame

    async def load(self) -> None:
        """Subscribe, then read the store: every commit after the read reaches the view."""
        hub = self.handler.context.hub
        self.busy = True
        try:
            await hub.join(self.handler.bus_room(self.room), self.tap)
            try:
                found = await self.handler.context.backend.state.get(self.key)
            except BaseException:
                await hub.leave(self.handler.bus_room(self.room), self.tap)
                raise
            self._set(found)
            self.ready = True
        finally:
            self.busy = False
        self.advance()

    # -- inbound entries -----------------------------------------------------------------------------

    def on_bus(self, payload: bytes) -> None:
        msg = json.loads(payload)
        if msg.get("op") != "commits":
            return
        epoch = msg["epoch"]
        diverged = False
        for version, commit, parent, ops, users in msg["entries"]:
            if self.ready and not self.busy and version <= self.version:
                seen = self.recent.get(version)
                if epoch != self.epoch or (seen is not None and seen != commit):
                    diverged = True
                continue
            self.pending[version] = (epoch, version, commit, parent, ops, users)
        if diverged:
            log.warning("room %s: an entry from another history of the room; resyncing", self.room)
            self.handler.spawn(self.resync())
            return
        if self.ready and not self.busy:
            self.advance()

    def advance(self) -> None:
        """Apply and send the run of consecutive versions that is complete."""
        run: list[_Entry] = []
        version, head, epoch = self.version, self.head, self.epoch
        while (entry := self.pending.get(version + 1)) is not None:
            e_epoch, _, commit, parent, _, _ = entry
            fresh = version == 0 and parent is None
            if not fresh and (e_epoch != epoch or parent != head):
                log.warning("room %s: version %d does not continue commit %s; resyncing", self.room, version + 1,
                            head)
                self.handler.spawn(self.resync())
                break
            del self.pending[version + 1]
            run.append(entry)
            version, head, epoch = version + 1, commit, e_epoch
        if run:
            self._apply_run(run)
        for v in [v for v in self.pending if v <= self.version]:
            del self.pending[v]
        if self.known_top <= self.version and not self.pending:
            self.known_top = 0
            self.catchup_deadline = None
        elif run or self.catchup_deadline is None:
            # something is missing: resync if the view makes no progress for gap_timeout (under a
            # steady load some version is nearly always in flight, so progress resets the clock)
            self.catchup_deadline = self.handler.loop_time() + self.handler.options.gap_timeout

    def _apply_run(self, run: list[_Entry]) -> None:
        ops: list[Any] = []
        users: list[str] = []
        for entry in run:
            ops.extend(entry[4])
            for user in entry[5]:
                if user not in users:
                    users.append(user)
        first, last = run[0][1], run[-1][1]
        # encoded before the ops are applied: applying inserts their values into the document
        frame = OutFrame(dumps({"op": "patch", "room": self.room, "from_version": first, "version": last,
                                "patch": ops, "by": users}).encode())
        doc = self.doc
        try:
            for entry in run:
                doc = jsonpatch.apply_patch(doc, entry[4], in_place=True)
        except _APPLY_ERRORS as exc:
            log.error("room %s: committed version %d does not apply here (%s); resyncing", self.room, last, exc)
            self.handler.spawn(self.resync())
            return
        self.doc = doc
        self._doc_json = None
        self._state_frame = None
        self.epoch = run[-1][0]
        self.version = last
        self.head = run[-1][2]
        for entry in run:
            self.recent[entry[1]] = entry[2]
            self._recent_order.append(entry[1])
        while len(self._recent_order) > 1024:
            self.recent.pop(self._recent_order.popleft(), None)
        self.forward(frame)
        self.wake()

    def forward(self, frame: OutFrame) -> None:
        slow = self.handler.options.slow_client_bytes
        n = 0
        for m in self.members.values():
            if m.need_state:
                continue
            buffered = m.session.buffered
            if buffered and buffered + len(frame) > slow:
                m.need_state = True
                self.handler.coalesced.inc()
                continue
            m.session.send_frame(frame)
            n += 1
        self.handler.context.metrics.deliveries.inc(n)
        self.serve_states()

    def serve_states(self) -> None:
        """Send the current state to members waiting for one whose queue has drained."""
        low = self.handler.options.slow_client_bytes // 2
        for m in self.members.values():
            if m.need_state and m.session.buffered <= low and not m.session.closed:
                m.session.send_frame(self.state_frame())
                m.need_state = False

    # -- repair ------------------------------------------------------------------------------------

    async def resync(self) -> None:
        """Reload the state from the store and send it to every member."""
        if self.busy or not self.ready:
            return
        self.busy = True
        try:
            found = await self.handler.context.backend.state.get(self.key)
        except BusUnavailable:
            self.busy = False
            self.next_verify = self.handler.loop_time() + min(1.0, self.handler.options.gap_timeout)
            self.catchup_deadline = self.next_verify
            return
        except BaseException:
            self.busy = False
            raise
        self.busy = False
        self.handler.resyncs.inc()
        self._set(found)
        for m in self.members.values():
            m.need_state = True
        self.advance()
        self.serve_states()

    async def verify(self) -> None:
        """Compare with the store: equal is fine, ahead waits for the entries, anything else resyncs."""
        if self.checking or self.busy or not self.ready:
            return
        self.checking = True
        try:
            found = await self.handler.context.backend.state.get(self.key)
        except BusUnavailable:
            self.next_verify = self.handler.loop_time() + 1.0
            return
        finally:
            self.checking = False
        now = self.handler.loop_time()
        self.next_verify = now + self.handler.options.verify_interval
        if self.busy:
            return
        version, epoch, head, _ = self.handler.unwrap(found)
        if version == self.version and epoch == self.epoch and head == self.head:
            return
        if version > self.version and (self.epoch is None or epoch == self.epoch):
            self.known_top = max(self.known_top, version)
            if self.catchup_deadline is None:
                self.catchup_deadline = now + self.handler.options.gap_timeout
            return
        log.warning("room %s: the store is at version %d (%s), this replica at %d (%s); resyncing", self.room,
                    version, epoch, self.version, self.epoch)
        await self.resync()

    def maintain(self, now: float, force_verify: bool) -> None:
        if not self.ready:
            return
        if self.catchup_deadline is not None and now >= self.catchup_deadline:
            log.info("room %s: versions after %d did not arrive in time; resyncing", self.room, self.version)
            self.catchup_deadline = None
            self.handler.spawn(self.resync())
        elif force_verify or (self.handler.options.verify_interval and now >= self.next_verify):
            self.handler.spawn(self.verify())
        if any(m.need_state for m in self.members.values()):
            self.serve_states()


@dataclass(eq=False)
class _Update:
    session: Session
    patch: list[Any]
    future: asyncio.Future[int]


@dataclass(eq=False)
class _Committer:
    """One room's writes on this replica: the queue, the commit task and the outbox."""

    room: str
    queue: list[_Update] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    outbox: list[list[Any]] = field(default_factory=list)
    epoch: str | None = None
    last_flush: float = -1e9
    flush_handle: asyncio.TimerHandle | None = None
    flushing: bool = False
    #: (version, epoch, commit, state) this replica wrote last: the base of the next commit, which
    #: then needs no read unless another replica wrote since (its compare-and-set says so)
    cache: tuple[int, str | None, str | None, Any] | None = None

    @property
    def idle(self) -> bool:
        return not self.queue and self.task is None and not self.outbox and not self.flushing and (
            self.flush_handle is None)


@dataclass
class _Idle:
    since: float
    mark: tuple[int, str | None, str | None]


class _Outcome(Exception):
    """An update's final answer other than an ack."""

    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


def check_patch(patch: Any) -> list[Any]:
    """Structural RFC 6902 checks that do not depend on the state; raises ValueError with the reason."""
    if not isinstance(patch, list) or not patch:
        raise ValueError("the patch must be a non-empty list of operations")
    for i, op in enumerate(patch):
        if not isinstance(op, dict):
            raise ValueError(f"op {i}: an operation must be an object")
        name = op.get("op")
        if name not in _ALL_OPS:
            raise ValueError(f"op {i}: unknown op {name!r}; valid: {', '.join(sorted(_ALL_OPS))}")
        for member in ("path", "from") if name in _OPS_NEEDING_FROM else ("path",):
            pointer = op.get(member)
            if not isinstance(pointer, str):
                raise ValueError(f"op {i} ({name}): {member!r} must be a JSON Pointer string")
            try:
                jsonpointer.JsonPointer(pointer)
            except jsonpointer.JsonPointerException as exc:
                raise ValueError(f"op {i} ({name}): {member} {pointer!r} is not a JSON Pointer: {exc}") from None
        if name in _OPS_NEEDING_VALUE and "value" not in op:
            raise ValueError(f"op {i} ({name}): 'value' is missing")
    return patch


class GameHandler(OpHandler):
    def __init__(self, options: GameOptions, context: HandlerContext) -> None:
        super().__init__(context)
        self.options = options
        self.initial_state: Any = {} if options.initial_state is None else copy.deepcopy(options.initial_state)
        self._room_re = re.compile(options.room_pattern)
        self.ops.update({"join": self.op_join, "leave": self.op_leave, "update": self.op_update,
                         "sync": self.op_sync})
        self.views: dict[str, _View] = {}
        self.committers: dict[str, _Committer] = {}
        self.idle: dict[str, _Idle] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        self._maintainer: asyncio.Task[None] | None = None
        self._bus_down = False
        counters = _counters(context.metrics.registry)
        ep = context.endpoint.path
        self.commits = counters["commits"].labels(ep)
        self.conflicts = counters["conflicts"].labels(ep)
        self.resyncs = counters["resyncs"].labels(ep)
        self.coalesced = counters["coalesced"].labels(ep)
        self.expired = counters["expired"].labels(ep)

    # -- helpers -------------------------------------------------------------------------------------

    def key(self, room: str) -> str:
        return f"{self.options.namespace}/{room}"

    def bus_room(self, room: str) -> str:
        # "/" is not allowed in chat room names, so a game room never shares a bus room with a chat one
        return f"{self.options.namespace}/{room}"

    def room_name(self, request: dict[str, Any]) -> str:
        room = require_str(request, "room")
        if not self._room_re.fullmatch(room):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid room name {room!r}: it must match "
                                f"{self.options.room_pattern}")
        return room

    @staticmethod
    def loop_time() -> float:
        return asyncio.get_running_loop().time()

    def unwrap(self, found: tuple[int, Any] | None) -> tuple[int, str | None, str | None, Any]:
        """``(version, epoch, commit, state)`` of a stored document (None: the room has no state)."""
        if found is None:
            return 0, None, None, copy.deepcopy(self.initial_state)
        version, stored = found
        if not isinstance(stored, dict) or "s" not in stored:
            raise ValueError(f"the state store holds a document the game handler did not write: {stored!r:.80}")
        return version, stored.get("e"), stored.get("c"), stored["s"]

    def spawn(self, coro: Any) -> None:
        if self.closed:
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("game task failed", exc_info=task.exception())

    def _ensure_maintainer(self) -> None:
        if self._maintainer is None and not self.closed:
            self._maintainer = asyncio.ensure_future(self._maintain())

    def joined(self, session: Session) -> dict[str, _Member]:
        rooms: dict[str, _Member] = session.state.setdefault(_ROOMS, {})
        return rooms

    def _joined_view(self, session: Session, room: str) -> _View:
        if room not in self.joined(session):
            raise ProtocolError(ErrorCode.NOT_JOINED, f"join room {room!r} first", room=room)
        return self.views[room]

    def _rate_limit(self, session: Session) -> None:
        rate = self.options.updates_per_second
        if not rate:
            return
        now = time.monotonic()
        burst = max(1.0, rate)
        bucket: list[float] = session.state.setdefault(_BUCKET, [burst, now])
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            retry_ms = int((1 - tokens) / rate * 1000) + 1
            raise ProtocolError(ErrorCode.RATE_LIMITED, f"too many updates: at most {rate:g} per second",
                                retry_ms=retry_ms)
        bucket[0] = tokens - 1

    # -- ops -------------------------------------------------------------------------------------------

    async def op_join(self, session: Session, request: dict[str, Any]) -> None:
        room = self.room_name(request)
        if not await self.context.hooks.authorize(session.identity, "join", room):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"you may not join room {room!r}", room=room,
                                reason="not_allowed")
        rooms = self.joined(session)
        if room in rooms:
            view = self.views[room]
        else:
            view = await self._attach(session, room)
        rooms[room].need_state = False
        session.send_frame(OutFrame(view.state_payload(request.get("id"))))

    async def _attach(self, session: Session, room: str) -> _View:
        while True:
            view = self.views.get(room)
            if view is None:
                view = self.views[room] = _View(self, room)
                self.idle.pop(room, None)
                self._ensure_maintainer()
            async with view.lock:
                if self.views.get(room) is not view:
                    continue  # dropped while we waited
                try:
                    if not view.ready:
                        await view.load()
                    await self.context.backend.presence.join(
                        self.bus_room(room), PresenceEntry(session.identity.user, session.id, self.context.node))
                except BaseException as exc:
                    if not view.members:
                        await self._drop_view(view)
                    if isinstance(exc, BusUnavailable):
                        raise ProtocolError(ErrorCode.UNAVAILABLE, "the bus is unavailable; retry",
                                            room=room) from None
                    raise
                if session.closed:
                    if not view.members:
                        await self._drop_view(view)
                    raise ProtocolError(ErrorCode.UNAVAILABLE, "session closed")
                member = _Member(session)
                view.members[session] = member
                self.joined(session)[room] = member
                return view

    async def _detach(self, session: Session, room: str) -> None:
        member = self.joined(session).pop(room, None)
        view = self.views.get(room)
        if member is None or view is None:
            return
        view.members.pop(session, None)
        try:
            await self.context.backend.presence.leave(self.bus_room(room), session.id)
        except BusUnavailable:
            log.debug("room %s: presence leave while the bus is down", room)
        if not view.members:
            async with view.lock:
                if not view.members and self.views.get(room) is view:
                    await self._drop_view(view)

    async def _drop_view(self, view: _View) -> None:
        if self.views.get(view.room) is view:
            del self.views[view.room]
        if view.ready and self.options.idle_expiry:
            self.idle[view.room] = _Idle(self.loop_time(), (view.version, view.epoch, view.head))
            self._ensure_maintainer()
        view.ready = False
        with contextlib.suppress(BusUnavailable):
            await self.context.hub.leave(self.bus_room(view.room), view.tap)

    async def op_leave(self, session: Session, request: dict[str, Any]) -> None:
        room = self.room_name(request)
        if room not in self.joined(session):
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not in room {room!r}", room=room)
        await self._detach(session, room)
        self.reply(session, request, "left", room=room)

    async def op_sync(self, session: Session, request: dict[str, Any]) -> None:
        room = self.room_name(request)
        view = self._joined_view(session, room)
        self._rate_limit(session)
        try:
            found = await self.context.backend.state.get(view.key)
        except BusUnavailable:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the state store is unavailable; retry", room=room) from None
        if view.ready and not view.busy:
            version, epoch, head, _ = self.unwrap(found)
            if version < view.version or (version == view.version and (epoch, head) != (view.epoch, view.head)) or (
                version > view.version and view.epoch is not None and epoch != view.epoch
            ):
                await view.resync()
            elif version > view.version:
                # committed but not here yet (in an outbox or on the bus): wait for it, so the
                # answer is at least as new as the store was when the sync arrived
                view.known_top = max(view.known_top, version)
                if view.catchup_deadline is None:
                    view.catchup_deadline = self.loop_time() + self.options.gap_timeout
                c = self.committers.get(room)
                if c is not None and c.outbox and not c.flushing:
                    self._flush_now(c)
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                view.waiters.append((version, fut))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, 2 * self.options.gap_timeout + 1.0)
        member = self.joined(session).get(room)
        if member is None:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"join room {room!r} first", room=room)
        member.need_state = False
        session.send_frame(OutFrame(view.state_payload(request.get("id"))))

    async def op_update(self, session: Session, request: dict[str, Any]) -> None:
        room = self.room_name(request)
        self._rate_limit(session)
        self._joined_view(session, room)
        patch = request.get("patch")
        try:
            size = len(json.dumps(patch, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode())
        except ValueError:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "invalid JSON Patch: numbers must be finite") from None
        if size > self.options.max_patch_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"the patch is {size} bytes; the limit is {self.options.max_patch_bytes}",
                                max_bytes=self.options.max_patch_bytes)
        try:
            patch = check_patch(patch)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid JSON Patch: {exc}") from None
        if not await self.context.hooks.authorize(session.identity, "update", room):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"you may not update room {room!r}", room=room,
                                reason="not_allowed")
        if self.closed:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the server is stopping")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        committer = self.committers.get(room)
        if committer is None:
            committer = self.committers[room] = _Committer(room)
            self._ensure_maintainer()
        committer.queue.append(_Update(session, patch, future))
        if committer.task is None:
            committer.task = asyncio.ensure_future(self._commit_loop(committer))
        try:
            version = await future
        except _Outcome as outcome:
            raise ProtocolError(outcome.code, outcome.message, **outcome.extra) from None
        self.reply(session, request, "ack", version=version)

    # -- writes --------------------------------------------------------------------------------------

    async def _commit_loop(self, c: _Committer) -> None:
        try:
            while c.queue and not self.closed:
                batch, c.queue = c.queue[: self.options.max_batch], c.queue[self.options.max_batch:]
                try:
                    await self._commit(c, batch)
                except Exception as exc:
                    if not isinstance(exc, BusUnavailable):
                        log.exception("room %s: commit failed", c.room)
                    outcome = (_Outcome(ErrorCode.UNAVAILABLE, "the state store is unavailable; retry")
                               if isinstance(exc, BusUnavailable) else _Outcome(ErrorCode.INTERNAL, "internal error"))
                    for u in batch:
                        if not u.future.done():
                            u.future.set_exception(outcome)
        finally:
            c.task = None
            for u in c.queue:
                if not u.future.done():
                    u.future.set_exception(_Outcome(ErrorCode.UNAVAILABLE, "the server is stopping"))
            c.queue.clear()
            self._forget_committer(c)

    async def _commit(self, c: _Committer, batch: list[_Update]) -> None:
        store = self.context.backend.state
        hooks = self.context.hooks
        todo = list(batch)
        # an attempt on the cached base is extra: max_retries counts attempts on fresh reads
        for attempt in range(self.options.max_retries + (c.cache is not None)):
            # A cached base may be older than some of these updates: judged on it, only what the
            # compare-and-set then confirms stands; refusals wait for that, or for a fresh read.
            fresh = c.cache is None
            if c.cache is not None:
                version, epoch, head, base = c.cache
                c.cache = None
            else:
                version, epoch, head, base = self.unwrap(await store.get(self.key(c.room)))
            work = copy.deepcopy(base)
            accepted: list[tuple[_Update, list[Any]]] = []
            answered: list[tuple[_Update, _Outcome]] = []
            for u in todo:
                try:
                    patch = await hooks.validate_update(c.room, work, u.patch, u.session.identity)
                    if patch is not u.patch:
                        try:
                            check_patch(patch)
                        except ValueError as exc:
                            log.error("room %s: a rules plugin returned an invalid patch: %s", c.room, exc)
                            raise _Outcome(ErrorCode.INTERNAL, "internal error") from None
                    try:
                        work = jsonpatch.apply_patch(work, copy.deepcopy(patch), in_place=True)
                    except _APPLY_ERRORS:
                        work = self._rebuild(base, accepted)
                        raise _Outcome(ErrorCode.CONFLICT, f"the patch does not apply at version {version}: "
                                       f"{_explain(work, patch)}", version=version) from None
                    accepted.append((u, patch))
                except UpdateRejected as exc:
                    answered.append((u, _Outcome(ErrorCode.REJECTED, exc.reason)))
                except _Outcome as exc:
                    answered.append((u, exc))
                except Exception:
                    log.exception("room %s: a rules plugin failed on an update", c.room)
                    work = self._rebuild(base, accepted)
                    answered.append((u, _Outcome(ErrorCode.INTERNAL, "internal error")))
            if accepted:
                size = len(dumps(work).encode())
                if size > self.options.max_state_bytes:
                    work, accepted, too_large = self._fit(base, accepted)
                    answered.extend(too_large)
            if fresh:
                for u, outcome in answered:
                    if not u.future.done():
                        u.future.set_exception(outcome)
                if not accepted:
                    return
            elif not accepted:
                continue  # everything refused on a cached base: judge again on a fresh read
            new_epoch = epoch if version else uuid.uuid4().hex[:12]
            commit = uuid.uuid4().hex[:12]
            try:
                new_version = await store.compare_and_set(self.key(c.room), version,
                                                          {"e": new_epoch, "c": commit, "s": work})
            except StateConflict:
                self.conflicts.inc()
                retry = {id(u) for u, _ in accepted} | (set() if fresh else {id(u) for u, _ in answered})
                todo = [u for u in todo if id(u) in retry]
                # jittered backoff: replicas that lost the race do not collide again in step
                await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2 ** attempt)))
                continue
            self.commits.inc()
            if not fresh:  # the base was current after all
                for u, outcome in answered:
                    if not u.future.done():
                        u.future.set_exception(outcome)
            if not self._bus_down:
                c.cache = (new_version, new_epoch, commit, work)
            ops = [op for _, patch in accepted for op in patch]
            users: list[str] = []
            for u, _ in accepted:
                if u.session.identity.user not in users:
                    users.append(u.session.identity.user)
            if c.epoch != new_epoch:
                self._flush_now(c)  # one bus message carries one epoch
                c.epoch = new_epoch
            c.outbox.append([new_version, commit, head if version else None, ops, users])
            for u, _ in accepted:
                if not u.future.done():
                    u.future.set_result(new_version)
            self._schedule_flush(c)
            return
        for u in todo:
            if not u.future.done():
                u.future.set_exception(_Outcome(ErrorCode.CONFLICT, "too many concurrent updates; retry"))

    @staticmethod
    def _rebuild(base: Any, accepted: list[tuple[_Update, list[Any]]]) -> Any:
        work = copy.deepcopy(base)
        for _, patch in accepted:
            work = jsonpatch.apply_patch(work, copy.deepcopy(patch), in_place=True)
        return work

    def _fit(self, base: Any, accepted: list[tuple[_Update, list[Any]]]
             ) -> tuple[Any, list[tuple[_Update, list[Any]]], list[tuple[_Update, _Outcome]]]:
        """Re-apply one by one, refusing the updates that take the state over the size limit."""
        limit = self.options.max_state_bytes
        work = copy.deepcopy(base)
        kept: list[tuple[_Update, list[Any]]] = []
        refused: list[tuple[_Update, _Outcome]] = []
        for u, patch in accepted:
            candidate = jsonpatch.apply_patch(copy.deepcopy(work), copy.deepcopy(patch), in_place=True)
            size = len(dumps(candidate).encode())
            if size > limit:
                refused.append((u, _Outcome(ErrorCode.TOO_LARGE,
                                            f"the update would make the state {size} bytes; the limit is {limit}",
                                            max_bytes=limit)))
            else:
                work = candidate
                kept.append((u, patch))
        return work, kept, refused

    # -- publishing (at most once per tick per room) -------------------------------------------------

    def _schedule_flush(self, c: _Committer) -> None:
        if c.flush_handle is not None or c.flushing or not c.outbox or self.closed:
            return
        delay = c.last_flush + self.options.tick - self.loop_time()
        if delay <= 0:
            self._flush_now(c)
        else:
            c.flush_handle = asyncio.get_running_loop().call_later(delay, self._flush_timer, c)

    def _flush_timer(self, c: _Committer) -> None:
        c.flush_handle = None
        self._flush_now(c)

    def _flush_now(self, c: _Committer) -> None:
        if not c.outbox or c.epoch is None:
            return
        entries, c.outbox = c.outbox, []
        c.last_flush = self.loop_time()
        if c.flush_handle is not None:
            c.flush_handle.cancel()
            c.flush_handle = None
        frame = dumps({"op": "commits", "room": c.room, "epoch": c.epoch, "entries": entries}).encode()
        c.flushing = True
        self.spawn(self._publish(c, frame))

    async def _publish(self, c: _Committer, frame: bytes) -> None:
        try:
            await self.context.hub.publish(self.bus_room(c.room), frame)
            self.context.metrics.published.labels("game").inc()
        except BusUnavailable:
            # Committed but not broadcast: local members still get it; other replicas resync
            # after the outage (reconnect check, gap or verify).
            view = self.views.get(c.room)
            if view is not None and view.ready:
                view.on_bus(frame)
        finally:
            c.flushing = False
            if c.outbox:
                self._schedule_flush(c)
            self._forget_committer(c)

    def _forget_committer(self, c: _Committer) -> None:
        # kept for a tick after its last flush, so that the next commit still waits for the tick
        if c.idle and self.committers.get(c.room) is c and self.loop_time() - c.last_flush >= self.options.tick:
            del self.committers[c.room]

    # -- maintenance: gaps, slow members, checks, idle expiry -----------------------------------------

    async def _maintain(self) -> None:
        last_expiry = 0.0
        try:
            while not self.closed and (self.views or self.idle or self.committers):
                busy = self.views or self.committers
                await asyncio.sleep(self.options.tick if busy else min(1.0, self.options.idle_expiry or 1.0))
                now = self.loop_time()
                for c in list(self.committers.values()):
                    self._forget_committer(c)
                healthy = self.context.hub.healthy
                force = False
                if not healthy:
                    self._bus_down = True
                    for c in self.committers.values():
                        c.cache = None  # the broker may come back with other data
                elif self._bus_down:
                    self._bus_down = False
                    force = True
                    log.info("bus is back: checking %d game rooms against the store", len(self.views))
                for view in list(self.views.values()):
                    view.maintain(now, force)
                if self.idle and now - last_expiry >= min(1.0, self.options.idle_expiry):
                    last_expiry = now
                    await self._expire(now)
        finally:
            self._maintainer = None
            if not self.closed and (self.views or self.idle or self.committers):
                self._ensure_maintainer()

    async def _expire(self, now: float) -> None:
        backend = self.context.backend
        for room, record in list(self.idle.items()):
            if now - record.since < self.options.idle_expiry or room in self.views:
                continue
            try:
                if await backend.presence.members(self.bus_room(room)):
                    del self.idle[room]  # someone is there; their replica takes over
                    continue
                found = await backend.state.get(self.key(room))
                if found is None:
                    self.idle.pop(room, None)
                    continue
                version, epoch, head, _ = self.unwrap(found)
                if (version, epoch, head) != record.mark:
                    self.idle[room] = _Idle(now, (version, epoch, head))
                    continue
                if room in self.views or self.idle.get(room) is not record:
                    continue
                await backend.state.delete(self.key(room))
            except BusUnavailable:
                continue
            self.idle.pop(room, None)
            self.expired.inc()
            log.info("room %s: idle for %.0fs with no members; state deleted", room, self.options.idle_expiry)

    # -- sessions ---------------------------------------------------------------------------------------

    async def on_close(self, session: Session) -> None:
        for room in list(self.joined(session)):
            await self._detach(session, room)

    async def close(self) -> None:
        """Stop timers and tasks (the app's shutdown)."""
        self.closed = True
        for c in self.committers.values():
            if c.flush_handle is not None:
                c.flush_handle.cancel()
                c.flush_handle = None
            if c.task is not None:
                c.task.cancel()
        tasks = [t for t in (self._maintainer, *self.tasks, *(c.task for c in self.committers.values())) if t]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)


_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Counter]] = weakref.WeakKeyDictionary()


def _counters(registry: CollectorRegistry) -> dict[str, Counter]:
    """The game metrics of one app's registry (created once, shared by its game endpoints)."""
    found = _COUNTERS.get(registry)
    if found is None:
        specs = {
            "commits": "Game state versions committed on this replica",
            "conflicts": "Game commits retried after a compare-and-set conflict",
            "resyncs": "Game views reloaded from the state store",
            "coalesced": "Patches skipped for slow members (a fresh state follows)",
            "expired": "Idle game rooms whose state was deleted",
        }
        found = _COUNTERS[registry] = {
            name: Counter(f"wirehub_game_{name}", text, ["endpoint"], registry=registry) for name, text in specs.items()
        }
    return found


def _explain(state: Any, patch: list[Any]) -> str:
    """Which op of ``patch`` fails on ``state``, and why (for the client's error message)."""
    work = copy.deepcopy(state)
    for i, op in enumerate(patch):
        where = f"op {i} ({op.get('op')} {op.get('path')})"
        try:
            work = jsonpatch.apply_patch(work, [copy.deepcopy(op)], in_place=True)
        except jsonpatch.JsonPatchTestFailed:
            try:
                actual = dumps(jsonpointer.resolve_pointer(work, op["path"]))
            except jsonpointer.JsonPointerException:
                actual = "missing"
            if len(actual) > 60:
                actual = actual[:57] + "..."
            return f"{where}: test failed: the value is {actual}, not {dumps(op.get('value'))[:60]}"
        except _APPLY_ERRORS as exc:
            # jsonpointer names the parent's whole value ("member 'x' not found in {...}"): cut it
            reason = re.sub(r" in [\[{].*$", "", str(exc), flags=re.S)[:200]
            return f"{where}: {reason or type(exc).__name__}"
    return "it failed"


def _factory(options: Mapping[str, Any], key: str, context: HandlerContext) -> GameHandler:
    opts = parse_block(GameOptions, options, key)
    if opts.initial_state is not None:
        try:
            json.dumps(opts.initial_state, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}.initial_state", f"must be a JSON value: {exc}") from None
    initial = {} if opts.initial_state is None else opts.initial_state
    if len(dumps(initial).encode()) > opts.max_state_bytes:
        raise ConfigError(f"{key}.initial_state", f"is larger than max_state_bytes ({opts.max_state_bytes})")
    cap = context.config.server.send_queue_bytes
    if opts.max_state_bytes + opts.slow_client_bytes > cap:
        raise ConfigError(f"{key}.slow_client_bytes",
                          f"slow_client_bytes + max_state_bytes ({opts.slow_client_bytes} + {opts.max_state_bytes}) "
                          f"must fit in server.send_queue_bytes ({cap}), so a fresh state never overflows it")
    try:
        re.compile(opts.room_pattern)
    except re.error as exc:
        raise ConfigError(f"{key}.room_pattern", f"not a regular expression: {exc}") from None
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", opts.namespace):
        raise ConfigError(f"{key}.namespace", f"expected letters, digits, '_' or '-', got {opts.namespace!r}")
    return GameHandler(opts, context)


@hookimpl
def wirehub_register_handlers() -> Mapping[str, HandlerFactory]:
    return {"game": _factory}


@hookimpl
async def wirehub_shutdown(app: Wirehub) -> None:
    for handler in app.handlers.values():
        if isinstance(handler, GameHandler):
            await handler.close()
