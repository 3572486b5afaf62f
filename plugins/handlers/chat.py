"""The chat handler: rooms, broadcast to the other members, acks, presence, history and recovery.

Ops (docs/protocol.md, "Chat endpoint"): ``join {room, since?}``, ``leave {room}``,
``publish {room, data, echo?}``, ``presence {room, after?, limit?, count_only?}``,
``history {room, since?, limit?}``, plus ``ping`` and ``refresh`` from
:class:`wirehub.handler.OpHandler`. Publishing goes through :func:`wirehub.rooms.publish_message`'s halves,
which the HTTP publish API shares; up to ``publish_pipeline`` publishes of a session are in flight at once
(on a bus with ``ordered_handoff``), answered in order. Presence (rules per room pattern, bounded lists, events) is in
:mod:`wirehub.builtins.handlers.chat_presence`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wirehub import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_ROOM_PATTERN,
    BusUnavailable,
    CloseCode,
    ConfigError,
    ErrorCode,
    HandlerContext,
    HandlerFactory,
    Op,
    OpHandler,
    OutFrame,
    Outgoing,
    ProtocolError,
    PublishOutcomeUnknown,
    RoomLimit,
    RoomRules,
    Session,
    TokenBucket,
    encode,
    fit,
    history_frame,
    hookimpl,
    opt,
    ordered_handoff,
    parse_block,
    parse_idempotency_key,
    parse_since,
    prepare_message,
    publish_prepared,
    recover,
    start_publish,
    stored_frames,
)
from wirehub.builtins.handlers.chat_presence import (
    ChatPresence,
    PresenceRule,
    PresenceRules,
    _fragments,
    check_rules,
    json_bytes,
    json_string,
    parse_query,
)

if TYPE_CHECKING:
    from wirehub import Wirehub

log = logging.getLogger("wirehub.chat")


@dataclass(frozen=True)
class ChatOptions:
    #: regular expression a room name must match in full
    room_pattern: str = DEFAULT_ROOM_PATTERN
    #: rooms one session may be in at once
    max_rooms: int = opt(100, min=1)
    #: largest message ``data`` (as compact JSON, in bytes), and per-room-pattern overrides
    max_message_bytes: int = opt(DEFAULT_MAX_MESSAGE_BYTES, min=1)
    room_limits: tuple[RoomLimit, ...] = ()
    #: publishes per second per session (token bucket), and the burst saved up
    publish_rate: float = opt(20.0, min=0.01)
    publish_burst: int = opt(40, min=1)
    #: publishes of one session handed to the bus and not answered yet, at most (1 = one at a time: the
    #: next frame is read once the ack is out); pipelining needs a bus with ordered_handoff
    publish_pipeline: int = opt(16, min=1, max=1024)
    #: rate-limited publishes in a row before the session is closed with 4029 (0 = never)
    rate_limit_close_after: int = opt(50, min=0)
    #: deprecated: false = events "off" for the rooms no presence rule sets them for
    presence_events: bool = True
    #: members listed in joined (then a cursor), and the largest page of the presence op
    presence_limit: int = opt(100, min=0)
    presence_max_limit: int = opt(1000, min=1, max=5000)
    #: per-room-pattern presence: [{pattern, presence, events: auto|each|batched|off, interval, presence_limit}]
    presence_rules: tuple[PresenceRule, ...] = ()
    #: rooms whose events are auto (the default) get each up to this many users, batched above
    presence_each_max: int = opt(1000, min=1)
    #: messages in a history reply when the client gives no limit, and the largest limit allowed
    history_limit: int = opt(50, min=1)
    history_max_limit: int = opt(500, min=1)
    #: most messages replayed by a join with ``since``; more missed -> recovered false
    recovery_limit: int = opt(1000, min=0)
    #: per-endpoint override of server.max_message_size (read by the core)
    max_message_size: int | None = opt(None, min=125)


class _ChatState:
    """Per-session chat state, in ``session.state`` (the core empties ``session.rooms`` before
    ``on_close``, so the rooms to leave presence in are recorded here). One per member of a big
    room, so it is small: slots, one room kept as its name (a tuple for two or more, at most
    ``max_rooms``: a 1-tuple costs 48 bytes, a set 216), and the publish bucket made by the first
    publish."""

    __slots__ = ("_rooms", "bucket", "pending", "strikes")

    def __init__(self) -> None:
        self.bucket: TokenBucket | None = None
        #: pipelined publishes not answered yet, oldest first: (request id, the bus's answer to come)
        self.pending: deque[tuple[Any, asyncio.Future[int]]] | None = None
        self._rooms: str | tuple[str, ...] = ()
        self.strikes = 0

    @property
    def rooms(self) -> tuple[str, ...]:
        rooms = self._rooms
        return (rooms,) if isinstance(rooms, str) else rooms

    def count(self) -> int:
        rooms = self._rooms
        return 1 if isinstance(rooms, str) else len(rooms)

    def has(self, room: str) -> bool:
        rooms = self._rooms
        return rooms == room if isinstance(rooms, str) else room in rooms

    def add(self, room: str) -> None:
        rooms = self._rooms
        self._rooms = room if rooms == () else (*self.rooms, room)

    def discard(self, room: str) -> None:
        if self.has(room):
            left = tuple(r for r in self.rooms if r != room)
            self._rooms = left[0] if len(left) == 1 else left


_STATE = "chat"


class ChatHandler(OpHandler):
    def __init__(self, options: ChatOptions, context: HandlerContext, rules: RoomRules,
                 presence_rules: PresenceRules) -> None:
        super().__init__(context)
        self.options = options
        #: read by the HTTP publish API too
        self.room_rules = rules
        self.presence = ChatPresence(presence_rules, options.presence_max_limit, context.hub,
                                     context.backend.presence, owns=rules.owns,
                                     each_max=options.presence_each_max)
        context.hub.on_resumed(self.presence.resumed)
        ops: dict[str, Op] = {
            "join": self.op_join,
            "leave": self.op_leave,
            "publish": self.op_publish,
            "presence": self.op_presence,
            "history": self.op_history,
        }
        self.ops.update(ops)
        #: publishes of a session in flight at most: pipelined only on a bus that keeps their order
        self.pipeline = options.publish_pipeline if ordered_handoff(context.hub.bus) else 1

    def own_rate_limit(self, op: str) -> bool:
        return op == "publish"  # publish_rate

    def op_error(self, exc: Exception) -> ProtocolError | None:
        """A broker outage is ``error unavailable``: the request did not happen (never "delivered")."""
        if isinstance(exc, PublishOutcomeUnknown):
            return ProtocolError(
                ErrorCode.TIMEOUT,
                "the bus did not confirm the publish in time; it may have been delivered: retry with the same "
                "idempotency_key",
            )
        if isinstance(exc, BusUnavailable):
            return ProtocolError(ErrorCode.UNAVAILABLE, "the message bus is unavailable; retry later")
        return None

    def _state(self, session: Session) -> _ChatState:
        state = session.handler_state()
        st = state.get(_STATE)
        if st is None:
            st = state[_STATE] = _ChatState()
        assert isinstance(st, _ChatState)
        return st

    def _authorize(self, session: Session, action: str, room: str) -> Awaitable[None] | None:
        """None when ``wirehub_authorize`` allowed at once (no coroutine: the built-in policy, every join),
        else what to await: it raises ``error forbidden`` unless the answer is yes."""
        allowed = self.context.hooks.authorize_now(session.identity, action, room)
        return None if allowed is True else _refuse_unless(allowed, action, room)

    # -- join / leave ---------------------------------------------------------------------------------

    async def op_join(self, session: Session, request: dict[str, Any]) -> None:
        # one string for the room's name in every member's state, not one per join request
        room = sys.intern(self.room_rules.room(request))
        since = request.get("since")
        if since is not None:
            since = parse_since(since)
        st = self._state(session)
        if st._rooms:  # in a room already (a new state is in none: nothing to check)
            if st.has(room):
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"already joined room {room!r}")
            if st.count() >= self.options.max_rooms:
                raise ProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"at most {self.options.max_rooms} rooms per connection",
                    reason="room_limit",
                )
        ctx = self.context
        allowed = ctx.hooks.authorize_now(session.identity, "join", room)  # _authorize, inlined: once per join
        if allowed is not True:
            await _refuse_unless(allowed, "join", room)
        st.add(room)
        hub = ctx.hub
        joined = hub.join_now(room, session)  # a room subscribed here already: no coroutine
        # Without `since` the join starts from the hub's live position when it knows one: no history read.
        live = hub.position(room) if joined and since is None else None
        tried = live is not None
        if live is not None:
            # At once when the presence join needs no wait either (memory, events off): then nothing waited since
            # the hub's join, so no message of the room came meanwhile (nothing to hold back), and the position is
            # the hub's own, so none at or below it can follow (no floor: ``hub.behind`` is False).
            try:
                fields = self.presence.join_now(session, room)
            except BaseException:
                await self._leave(session, st, room)
                raise
            if fields is not None:
                presence, members = fields
                after, epoch = live
                session.send_frame(OutFrame(_joined(request.get("id"), room, after, epoch, False, presence, members)))
                # closed meanwhile (the peer gone while an authorize hook waited, or this reply overflowed the
                # queue): on_close may have run already, before this member was in the room
                if session.closed:
                    await self._leave(session, st, room)
                return
        # Gap-free and duplicate-free: live messages are held from the moment the session is a
        # member (nothing waited since the hub's join above); history after `since` is replayed; then the held
        # ones newer than the replay go out.
        session.hold(room)
        try:
            if not joined:
                await hub.join(room, session)
                # Gap-free: the session is held and a member already, so whatever is fanned out after this has a
                # greater offset and is released below (a position read above, after join_now, holds too: nothing
                # waited since).
                live = hub.position(room) if since is None else None
            # O(1) in the room's size, encoded; at once on a backend that never waits (memory), with no event
            fields = None if tried else self.presence.join_now(session, room)
            presence, members = fields if fields is not None else await self.presence.join(session, room)
            recovery = None if live is not None else await recover(ctx.backend.history, room, since,
                                                                    self.options.recovery_limit)
        except BaseException:
            session.drop_held(room)
            await self._leave(session, st, room)
            raise
        if recovery is None:  # the live position (the usual join): nothing to replay
            assert live is not None
            after, epoch = live
            session.send_frame(OutFrame(_joined(request.get("id"), room, after, epoch, False, presence, members)))
        else:
            replay = stored_frames(recovery.messages)
            recovered = recovery.recovered
            if sum(map(len, replay)) > _budget(session):  # it would close the session with 4008
                replay, recovered = [], False
            epoch = recovery.epoch
            session.send_frame(OutFrame(_joined(request.get("id"), room, recovery.top, epoch, recovered,
                                                presence, members)))
            for frame in replay:
                session.send_frame(OutFrame(frame))
            after = recovery.messages[-1][0] if replay else recovery.top
        session.release(room, after, floor=ctx.hub.behind(room, epoch, after))
        if session.closed:  # closed meanwhile; if on_close already ran, it did not see this room joined
            await self._leave(session, st, room)

    async def op_leave(self, session: Session, request: dict[str, Any]) -> None:
        room = self.room_rules.room(request)
        st = self._state(session)
        if not st.has(room):
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not a member of room {room!r}")
        await self._leave(session, st, room)
        self.reply(session, request, "left", room=room)

    async def _leave(self, session: Session, st: _ChatState, room: str) -> None:
        """Leave the hub room and presence. Leaving always succeeds locally: with the bus down, the
        presence entry stays until the backend's TTL expires it."""
        st.discard(room)
        await self.context.hub.leave(room, session)
        try:
            await self.presence.leave(session, room)
        except BusUnavailable:
            log.warning("room %s: presence of %r not removed, the bus is down (it expires)", room, session)

    async def after_refresh(self, session: Session) -> None:
        """A refreshed token may grant fewer rooms: leave the ones it no longer allows."""
        st = self._state(session)
        for room in sorted(st.rooms):
            if not await self.context.hooks.authorize(session.identity, "join", room):
                await self._leave(session, st, room)
                session.send({"op": "left", "room": room, "reason": "forbidden"})

    async def on_close(self, session: Session) -> None:
        st = session.handler_state().get(_STATE)
        if not isinstance(st, _ChatState):
            return
        for room in list(st.rooms):
            await self._leave(session, st, room)

    # -- publish --------------------------------------------------------------------------------------

    async def op_publish(self, session: Session, request: dict[str, Any]) -> None:
        st = self._state(session)
        if self.pipeline <= 1:  # one at a time: the ack before the next frame is read
            message = await self._prepare(session, st, request)
            if message is not None:
                self.reply(session, request, "ack", offset=await publish_prepared(self.context.hub, message))
            return
        # Pipelined (docs/protocol.md, publish, "Pipelining"): the bus takes the message in this call, in the order the
        # frames came (ordered_handoff), and the ack goes out when it answered, after those of the earlier ones.
        pending = st.pending
        try:
            message = await self._prepare(session, st, request)
            if message is None:
                return
            while pending is not None and len(pending) >= self.pipeline:
                await asyncio.wait((pending[0][1],))  # its answer is sent first (its callback came first)
            answer = start_publish(self.context.hub, message)
        except Exception as exc:
            if not pending:  # nothing in flight: answered at once, by the caller
                raise
            answer = asyncio.get_running_loop().create_future()
            answer.set_exception(exc)  # a refusal: in line behind the answers still to come
        self._queue(session, st, request.get("id"), answer)

    def _queue(self, session: Session, st: _ChatState, req_id: Any, answer: asyncio.Future[int]) -> None:
        """``answer`` goes out once it came and after those queued before it."""
        pending = st.pending
        if pending is None:
            pending = st.pending = deque()
        pending.append((req_id, answer))
        if answer.done():
            self._answer(session, pending)
        else:
            answer.add_done_callback(lambda _: self._answer(session, pending))

    def _answer(self, session: Session, pending: deque[tuple[Any, asyncio.Future[int]]]) -> None:
        """Send the answers of the oldest publishes that have one, in the order they were made."""
        while pending and pending[0][1].done():
            req_id, answer = pending.popleft()
            if answer.cancelled():
                continue
            exc = answer.exception()
            if session.closed:
                continue  # nobody to tell; the publish itself was handed over (or refused)
            if exc is None:
                frame: dict[str, Any] = {"op": "ack"} if req_id is None else {"op": "ack", "id": req_id}
                frame["offset"] = answer.result()
                session.send(frame)
            elif isinstance(exc, ProtocolError):
                session.send_error(exc.code, exc.message, exc.req_id if exc.req_id is not None else req_id,
                                   **exc.extra)
            elif isinstance(exc, Exception) and (translated := self.op_error(exc)) is not None:
                session.send_error(translated.code, translated.message, req_id, **translated.extra)
            else:  # a bug, as OpHandler.handle reports one
                self.context.logs.log(log, logging.ERROR, "chat: publish failed for %r", session, exc_info=exc)
                session.send_error(ErrorCode.INTERNAL, "internal error", req_id)

    async def _prepare(self, session: Session, st: _ChatState, request: dict[str, Any]) -> Outgoing | None:
        """The checks of a publish, up to the bus: None when it was refused for the rate (answered here)."""
        if st.bucket is None:
            st.bucket = TokenBucket(self.options.publish_rate, self.options.publish_burst)
        if not st.bucket.take():
            st.strikes += 1
            retry_ms = st.bucket.wait_ms()
            if st.pending:  # in line behind the answers of the publishes in flight
                refused: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                refused.set_exception(ProtocolError(ErrorCode.RATE_LIMITED, "too many publishes; slow down",
                                                    retry_ms=retry_ms))
                self._queue(session, st, request.get("id"), refused)
            else:
                session.send_error(
                    ErrorCode.RATE_LIMITED, "too many publishes; slow down", request.get("id"), retry_ms=retry_ms
                )
            limit = self.options.rate_limit_close_after
            if limit and st.strikes >= limit:
                refill_ms = int(self.options.publish_burst / self.options.publish_rate * 1000)
                session.close(CloseCode.RATE_LIMITED, retry_ms=refill_ms)
            return None
        st.strikes = 0
        room = self.room_rules.room(request)
        if "data" not in request:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "publish needs a field 'data' (any JSON value)")
        echo = request.get("echo", False)
        if not isinstance(echo, bool):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'echo' must be true or false")
        idempotency_key = parse_idempotency_key(request.get("idempotency_key"))
        if not st.has(room):
            raise ProtocolError(ErrorCode.NOT_JOINED, f"join room {room!r} before publishing to it")
        if (refusal := self._authorize(session, "publish", room)) is not None:
            await refusal
        return await prepare_message(
            self.context.hooks,
            self.room_rules,
            room,
            request["data"],
            sender=session.identity.user,
            session=session,
            echo=echo,
            idempotency_key=idempotency_key,
            idempotency_window=self.context.config.api.idempotency_window,
        )

    # -- presence / history ---------------------------------------------------------------------------

    async def _may_read(self, session: Session, action: str, room: str) -> None:
        """Members may read their rooms; others need ``wirehub_authorize(action)``."""
        if not self._state(session).has(room) and (refusal := self._authorize(session, action, room)) is not None:
            await refusal

    async def op_presence(self, session: Session, request: dict[str, Any]) -> None:
        room = self.room_rules.room(request)
        query = parse_query(request, self.presence.rules.for_room(room).limit, self.options.presence_max_limit)
        self.presence.check_enabled(room)
        await self._may_read(session, "presence", room)
        self.reply(session, request, "presence", room=room, **await self.presence.query(room, query))

    async def op_history(self, session: Session, request: dict[str, Any]) -> None:
        room = self.room_rules.room(request)
        since = parse_since(request.get("since"))
        limit = request.get("limit", self.options.history_limit)
        top_limit = self.options.history_max_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= top_limit:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"field 'limit' must be an integer from 1 to {top_limit}"
            )
        await self._may_read(session, "history", room)
        history = self.context.backend.history
        messages: Sequence[tuple[int, bytes]] = []
        if since is None:
            page = await history.read(room, None, limit)
            top, epoch, messages, complete = page.top, page.epoch, page.messages, True
        elif since.usable:
            page = await history.read(room, since.offset, limit)
            complete = page.complete and page.epoch == since.epoch
            top, epoch = page.top, page.epoch
            if complete:
                messages = page.messages
        else:
            top, epoch = await history.position(room)
            complete = False
        head: dict[str, Any] = {"op": "history"}
        if request.get("id") is not None:
            head["id"] = request["id"]
        head.update(room=room, offset=top, epoch=epoch, complete=complete)
        # Capped to fit the send queue; the client pages on with `since` (its last offset < `offset`).
        frames = fit(stored_frames(messages), _budget(session), newest=since is None)
        session.send_frame(OutFrame(history_frame(head, frames)))


async def _refuse_unless(allowed: bool | Awaitable[bool], action: str, room: str) -> None:
    """``error forbidden`` unless ``allowed`` (an answer of ``authorize_now``, awaited when pending)."""
    if not (allowed if isinstance(allowed, bool) else await allowed):
        raise ProtocolError(ErrorCode.FORBIDDEN, f"not allowed to {action} room {room!r}", reason="not_allowed")


def _joined(req_id: Any, room: str, offset: int, epoch: str, recovered: bool, presence: bytes,
            members: bytes = b"") -> bytes:
    """The ``joined`` frame from pre-encoded parts: the bytes ``dumps`` gives for ``{"op": "joined", "id"?,
    "room", "offset", "epoch", "recovered", "count"?, "cursor"?, "presence"?}`` (tests/test_join_frame.py),
    without a dict and a JSON encoder per join. ``presence`` then ``members``: :meth:`ChatPresence.join`'s
    fields (what :func:`joined_fields` gives, in two parts: the big list is copied once, here)."""
    room_json = _fragments.get(room) or json_bytes(room)
    epoch_json = _fragments.get(epoch) or json_bytes(epoch)
    flag = b"true" if recovered else b"false"
    if type(req_id) is int:  # what dumps writes for an int (not a bool: True is an int too); one format per frame
        return b'{"op":"joined","id":%d,"room":%s,"offset":%d,"epoch":%s,"recovered":%s%s%s}' % (
            req_id, room_json, offset, epoch_json, flag, presence, members)
    if req_id is None:
        data = b'{"op":"joined","room":'
    elif type(req_id) is str:
        data = b'{"op":"joined","id":%s,"room":' % json_string(req_id).encode()
    else:
        data = b'{"op":"joined","id":%s,"room":' % encode(req_id)
    return b'%s%s,"offset":%d,"epoch":%s,"recovered":%s%s%s}' % (
        data, room_json, offset, epoch_json, flag, presence, members)


def _budget(session: Session) -> int:
    """Bytes a history reply or a recovery replay may take: half the session's send queue."""
    return session.max_queue_bytes // 2


def _factory(options: Mapping[str, Any], key: str, context: HandlerContext) -> ChatHandler:
    opts = parse_block(ChatOptions, options, key)
    try:
        rules = RoomRules(opts.room_pattern, opts.max_message_bytes, opts.room_limits)
    except re.error as exc:
        raise ConfigError(f"{key}.room_pattern", f"not a valid regular expression: {exc}") from None
    if opts.history_limit > opts.history_max_limit:
        raise ConfigError(
            f"{key}.history_limit",
            f"{opts.history_limit} is above history_max_limit ({opts.history_max_limit})",
        )
    if opts.presence_limit > opts.presence_max_limit:
        raise ConfigError(
            f"{key}.presence_limit",
            f"{opts.presence_limit} is above presence_max_limit ({opts.presence_max_limit})",
        )
    check_rules(opts.presence_rules, opts.presence_max_limit, f"{key}.presence_rules")
    if not opts.presence_events:
        log.warning("%s.presence_events is deprecated: use presence_rules [{pattern: '*', events: off}]", key)
    default_events = "auto" if opts.presence_events else "off"
    presence_rules = PresenceRules(opts.presence_rules, default_events, opts.presence_limit)
    return ChatHandler(opts, context, rules, presence_rules)


@hookimpl
def wirehub_register_handlers() -> Mapping[str, HandlerFactory]:
    return {"chat": _factory}


@hookimpl
async def wirehub_shutdown(app: Wirehub) -> None:
    """Send the presence diffs still pending (a draining replica's leaves)."""
    await asyncio.gather(*(handler.presence.close() for handler in app.handlers.values()
                           if isinstance(handler, ChatHandler)))
