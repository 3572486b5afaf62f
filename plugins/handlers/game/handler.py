"""The game handler: its ops, the members' rooms, the maintenance loop and idle expiry.

:class:`GameHandler` is the endpoint (one per game endpoint of the config). It answers the
client frames (docs/protocol.md, "Game endpoint"): ``join {room}`` -> ``state``; ``leave
{room}`` -> ``left``; ``update {room, patch}`` -> ``ack {id, version}`` or ``error``; ``sync
{room}`` -> ``state``. It owns one :class:`~wirehub.builtins.handlers.game.view._View` per room with
members on this replica (the read side: ``view.py``) and one
:class:`~wirehub.builtins.handlers.game.commit._Committer` per room with writes in flight (the write side:
``commit.py``), and gives both what they share: the store key and bus room of a room, the
unwrapping of a stored document, background tasks, the options and the metrics. A maintenance
task, running while there are views, committers or idle rooms, drives the views' gap and verify
timers, notices bus outages and deletes the state of rooms idle for ``idle_expiry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import re
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from wirehub import (
    BusUnavailable,
    ErrorCode,
    HandlerContext,
    OpHandler,
    OutFrame,
    PresenceEntry,
    ProtocolError,
    Session,
    StateConflict,
    dumps,
    require_str,
    value_depth,
)
from wirehub.builtins.handlers.game.commit import _Committer, _Outcome, _Update
from wirehub.builtins.handlers.game.options import GameOptions, check_patch
from wirehub.builtins.handlers.game.view import _Member, _View

log = logging.getLogger("wirehub.game")

#: session.state keys
_ROOMS = "game.rooms"
_BUCKET = "game.bucket"


@dataclass
class _Idle:
    since: float
    mark: tuple[int, str | None, str | None]


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
        #: the bus was unhealthy at the last maintenance tick (read by the committers: no cached base then)
        self.bus_down = False
        counters = _counters(context.metrics.registry)
        ep = context.endpoint.path
        self.commits = counters["commits"].labels(ep)
        self.conflicts = counters["conflicts"].labels(ep)
        self.resyncs = counters["resyncs"].labels(ep)
        self.coalesced = counters["coalesced"].labels(ep)
        self.expired = counters["expired"].labels(ep)

    def own_rate_limit(self, op: str) -> bool:
        return op in ("update", "sync")  # updates_per_second (0: unlimited, as the operator chose)

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

    async def stored(self, key: str) -> tuple[int, Any] | None:
        """The state store's document at ``key``; one this handler cannot use is replaced first.

        A document that cannot be read (nested too deep for the store's decoder or a copy), that
        this handler did not write, whose state is deeper than ``max_state_depth`` (an older
        release, another writer, a lowered limit) or holds NaN would fail every later read and update. It is
        reset to ``initial_state`` with a new epoch, so members get a fresh ``state``: by a
        compare-and-set when its version can be read, else by deleting it. Logged once per interval.
        """
        store = self.context.backend.state
        for _ in range(self.options.max_retries):
            try:
                found = await store.get(key)
                if found is None:
                    return None
                state = self.unwrap(found)[3]
            except (RecursionError, ValueError, TypeError, KeyError) as exc:
                self.context.logs.error(log, "state %s is unreadable (%s); deleting it", key, type(exc).__name__)
                await store.delete(key)
                return None
            if value_depth(state, self.options.max_state_depth) > self.options.max_state_depth:
                reason = f"nested deeper than max_state_depth ({self.options.max_state_depth})"
            else:
                try:
                    dumps(state)  # what members are sent must be strict JSON
                    return found
                except ValueError:
                    reason = "not strict JSON (NaN or Infinity)"
            self.context.logs.error(log, "state %s is %s; resetting it to initial_state", key, reason)
            document = {"e": uuid.uuid4().hex[:12], "c": uuid.uuid4().hex[:12], "s": copy.deepcopy(self.initial_state)}
            try:
                version = await store.compare_and_set(key, found[0], document)
            except StateConflict:
                continue  # written meanwhile: judge the new document
            return version, document
        raise BusUnavailable(f"state {key} changed on every attempt to reset it")

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
        # a room that never had state has nothing to expire: join/leave churn must leave no record
        has_state = view.version > 0 or view.room in self.committers
        if view.ready and self.options.idle_expiry and has_state:
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
            found = await self.stored(view.key)
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
                    c.flush_now()
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
            committer = self.committers[room] = _Committer(self, room)
            self._ensure_maintainer()
        committer.queue.append(_Update(session, patch, future))
        if committer.task is None:
            committer.task = asyncio.ensure_future(committer.run())
        try:
            version = await future
        except _Outcome as outcome:
            raise ProtocolError(outcome.code, outcome.message, **outcome.extra) from None
        self.reply(session, request, "ack", version=version)

    # -- maintenance: gaps, slow members, checks, idle expiry -----------------------------------------

    async def _maintain(self) -> None:
        last_expiry = 0.0
        try:
            while not self.closed and (self.views or self.idle or self.committers):
                busy = self.views or self.committers
                await asyncio.sleep(self.options.tick if busy else min(1.0, self.options.idle_expiry or 1.0))
                now = self.loop_time()
                for c in list(self.committers.values()):
                    c.forget()
                healthy = self.context.hub.healthy
                force = False
                if not healthy:
                    self.bus_down = True
                    for c in self.committers.values():
                        c.cache = None  # the broker may come back with other data
                elif self.bus_down:
                    self.bus_down = False
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
                found = await self.stored(self.key(room))
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


