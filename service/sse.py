"""``GET /sse?rooms=a,b``: room messages as Server-Sent Events, for clients that never send.

The same authentication as a WebSocket upgrade (``app.authenticator``; 401 with a JSON body on
failure), then ``wirehub_authorize(identity, "subscribe", room)`` for every room (403). The
stream carries the very frames chat members get, one event each::

    id: lobby=12_3f9c...&news=4_3f9c...
    event: message
    data: {"op":"message","room":"lobby","from":"ann","ts":1732.5,"data":{...},"offset":12}

The ``id`` encodes the position ``<offset>_<epoch>`` of *every* room of the stream (URL-encoded,
like a query string), so one ``Last-Event-ID`` recovers several rooms. ``EventSource`` sends it
back by itself when it reconnects; the replay after it is gap-free and duplicate-free (live
messages are held while history is replayed, as a chat ``join {since}`` does). A
``last_event_id`` query parameter is accepted too, for clients that cannot set the header.

Each room starts with an ``event: joined`` (``{op, room, offset, epoch, recovered}``, and an
``id``); other room frames keep their ``op`` as the event name (``presence.join``,
``presence.leave``, ``gap``) and carry no ``id``. Comments (``: keepalive``) keep proxies from
timing the stream out. A stream whose send queue passes ``server.send_queue_bytes`` is ended (the
4008 of WebSocket sessions); the browser reconnects with its Last-Event-ID and recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import weakref
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import tornado.web
from tornado.iostream import StreamClosedError

from wirehub.auth import AuthError
from wirehub.bus import BusUnavailable
from wirehub.hub import split_envelope
from wirehub.plugins import PluginFailed
from wirehub.protocol import CloseCode, ProtocolError, dumps, with_offset
from wirehub.rooms import Since, recover
from wirehub.session import OutFrame, Session

if TYPE_CHECKING:
    from wirehub.app import Wirehub

log = logging.getLogger("wirehub.sse")

#: the ``endpoint`` of SSE sessions (metrics labels, hooks)
SSE_PATH = "/sse"
#: most rooms one stream may follow
MAX_ROOMS = 100
#: most messages replayed per room after a Last-Event-ID; more missed -> ``recovered: false``
RECOVERY_LIMIT = 1000
#: seconds between keepalive comments (and checks for a drain)
KEEPALIVE = 15.0


#: open streams per app, for :func:`close_streams`
_STREAMS: weakref.WeakKeyDictionary[Wirehub, set[SseHandler]] = weakref.WeakKeyDictionary()


def open_streams(app: Wirehub) -> list[SseHandler]:
    return list(_STREAMS.get(app, ()))


def close_streams(app: Wirehub, reconnect_jitter: float | None = None) -> int:
    """End every open stream of ``app`` now, telling each browser to reconnect after a random
    0..``reconnect_jitter`` seconds (default: ``drain.reconnect_jitter``); for a drain.
    Returns how many were ended."""
    jitter = app.config.drain.reconnect_jitter if reconnect_jitter is None else reconnect_jitter
    streams = open_streams(app)
    for handler in streams:
        handler.go_away(int(random.uniform(0, jitter) * 1000))
    return len(streams)


def encode_position(positions: dict[str, tuple[int, str]]) -> str:
    """The event id for ``{room: (offset, epoch)}``: ``room=<offset>_<epoch>&...``, URL-encoded."""
    return urlencode([(room, f"{offset}_{epoch}") for room, (offset, epoch) in sorted(positions.items())])


def decode_position(text: str) -> dict[str, Since]:
    """Parse a Last-Event-ID made by :func:`encode_position`; garbage entries are skipped."""
    out: dict[str, Since] = {}
    for room, value in parse_qsl(text or "", keep_blank_values=False):
        offset, sep, epoch = value.partition("_")
        if sep and offset.isdigit() and epoch:
            out[room] = Since(int(offset), epoch)
    return out


class RoomFrame(OutFrame):
    """A room frame tagged with its room and history offset, for the event id."""

    __slots__ = ("offset", "op", "room")

    def __init__(self, payload: bytes, room: str, offset: int | None, op: str = "message") -> None:
        super().__init__(payload)
        self.room = room
        self.offset = offset
        self.op = op


class SseSession(Session):
    """A session whose room deliveries keep their room and offset up to the transport."""

    def deliver(self, room: str, frame: OutFrame, offset: int | None) -> None:
        super().deliver(room, RoomFrame(frame.payload, room, offset, _op_of(frame.payload)), offset)


def _op_of(payload: bytes) -> str:
    """The ``op`` of a frame; room frames start with ``{"op":"<name>"`` (protocol.dumps)."""
    if payload.startswith(b'{"op":"'):
        end = payload.find(b'"', 7)
        if end > 7:
            return payload[7:end].decode(errors="replace")
    return "message"


class SseTransport:
    """:class:`wirehub.session.Transport` writing SSE events to a RequestHandler's response."""

    def __init__(self, handler: SseHandler) -> None:
        self.handler = handler
        self.positions: dict[str, tuple[int, str]] = {}
        self.epochs: dict[str, str] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self.handler.request.connection is None or self.handler.finished_stream

    def buffered(self) -> int:
        stream = getattr(self.handler.request.connection, "stream", None)
        buf = getattr(stream, "_write_buffer", None)
        return len(buf) if buf is not None else 0

    def event_id(self) -> str:
        return encode_position(self.positions)

    def send_frame(self, frame: OutFrame) -> None:
        if self.closed:
            return
        if isinstance(frame, RoomFrame):
            lines = []
            epoch = self.epochs.get(frame.room)
            if frame.offset is not None and epoch is not None:
                self.positions[frame.room] = (frame.offset, epoch)
                lines.append(b"id: " + self.event_id().encode())
            elif frame.op == "gap" and self._gap(frame):
                lines.append(b"id: " + self.event_id().encode())
            lines.append(b"event: " + frame.op.encode())
            lines.append(b"data: " + frame.payload)
            self.handler.write_raw(b"\n".join(lines) + b"\n\n")
        else:  # an error frame or the like: a plain event of its own
            self.handler.write_raw(b"event: " + _op_of(frame.payload).encode() + b"\ndata: " + frame.payload + b"\n\n")

    def _gap(self, frame: RoomFrame) -> bool:
        """The hub lost messages of this room: take the new epoch, and the ``offset`` the messages
        after the gap continue from as the position (True), else forget the position (False)."""
        self.positions.pop(frame.room, None)
        with contextlib.suppress(ValueError):
            gap = json.loads(frame.payload)
            epoch, offset = gap.get("epoch"), gap.get("offset")
            if isinstance(epoch, str):
                self.epochs[frame.room] = epoch
                if isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0:
                    self.positions[frame.room] = (offset, epoch)
                    return True
        return False

    def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.handler.end_stream(code, reason)


class SseHandler(tornado.web.RequestHandler):
    """One event stream. Collaborators arrive through :meth:`initialize`."""

    def initialize(self, app: Wirehub, keepalive: float | None = None) -> None:
        self.app = app
        self.keepalive = keepalive if keepalive is not None else KEEPALIVE
        self.session: SseSession | None = None
        self.finished_stream = False
        self._done = asyncio.Event()
        self._flushes: set[Awaitable[None]] = set()

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def _refuse(self, status: int, error: str, reason: str, **extra: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": error, "reason": reason, **extra}))

    def _rooms(self) -> list[str] | None:
        from wirehub.publish import room_rules

        rules = room_rules(self.app)
        raw = [r.strip() for arg in self.get_arguments("rooms") for r in arg.split(",")]
        rooms = list(dict.fromkeys(r for r in raw if r))
        if not rooms:
            self._refuse(400, "bad_request", "give the rooms to follow: /sse?rooms=a,b")
            return None
        if len(rooms) > MAX_ROOMS:
            self._refuse(400, "bad_request", f"at most {MAX_ROOMS} rooms per stream")
            return None
        for room in rooms:
            try:
                rules.room({"room": room})
            except ProtocolError as exc:
                self._refuse(400, "bad_request", exc.message, room=room)
                return None
        return rooms

    async def get(self) -> None:
        app = self.app
        if app.draining:
            self.set_header("Retry-After", "1")
            return self._refuse(503, "unavailable", "draining")
        try:
            identity = await app.authenticator.authenticate(self.request)
        except AuthError as exc:
            app.metrics.auth_failures.labels(exc.reason).inc()
            return self._refuse(exc.status, exc.error, exc.reason)
        rooms = self._rooms()
        if rooms is None:
            return
        for room in rooms:
            try:
                allowed = await app.hooks.authorize(identity, "subscribe", room)
            except PluginFailed:  # reported (log line, metric) by the plugin host
                return self._refuse(500, "internal", "internal error")
            if not allowed:
                return self._refuse(403, "forbidden", "not_allowed", room=room)
        last_id = self.request.headers.get("Last-Event-ID") or self.get_argument("last_event_id", "")
        since = decode_position(last_id)

        transport = SseTransport(self)
        session = SseSession(transport, identity, endpoint=SSE_PATH, node=app.node,
                             max_queue_bytes=app.config.server.send_queue_bytes,
                             remote_ip=self.request.remote_ip or "", metrics=app.metrics)
        self.session = session
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")
        self.write_raw(b": wirehub " + session.id.encode() + b"\nretry: 1000\n\n")
        app.metrics.sessions.labels(SSE_PATH).inc()
        app.metrics.sessions_opened.labels(SSE_PATH).inc()
        streams = _STREAMS.setdefault(app, set())
        streams.add(self)
        for room, pos in since.items():
            if room in rooms:  # the resume position of rooms not joined yet stays in the ids
                transport.positions[room] = (pos.offset, pos.epoch)
        try:
            for room in rooms:
                if session.closed:
                    break
                await self._join(session, transport, room, since.get(room))
            while not session.closed and not self._done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), self.keepalive)
                if app.draining and not session.closed:
                    self.go_away(int(random.uniform(0, app.config.drain.reconnect_jitter) * 1000))
                elif not session.closed:
                    self.write_raw(b": keepalive\n\n")
        except asyncio.CancelledError:
            pass  # the loop is shutting down (a stop without a drain): end the stream below
        except BusUnavailable:
            if not session.closed:
                self.write_raw(b"event: error\ndata: " + dumps(
                    {"op": "error", "code": "unavailable", "message": "the message bus is unavailable; retry later"}
                ).encode() + b"\n\n")
                session.close(CloseCode.INTERNAL)
        finally:
            streams.discard(self)
            await app.hub.leave_all(session)
            app.metrics.sessions.labels(SSE_PATH).dec()
            app.metrics.sessions_closed.labels(SSE_PATH, str(session.close_code)).inc()
            self.end_stream(session.close_code or CloseCode.NORMAL, "")

    async def _join(self, session: SseSession, transport: SseTransport, room: str, since: Since | None) -> None:
        """Join ``room`` gap-free: hold live messages, replay history after ``since``, release."""
        app = self.app
        session.hold(room)
        try:
            await app.hub.join(room, session)
            recovery = await recover(app.backend.history, room, since, RECOVERY_LIMIT)
        except BaseException:
            session.drop_held(room)
            raise
        replay: list[tuple[int, bytes]] = []
        for offset, payload in recovery.messages:
            with contextlib.suppress(ValueError):  # a malformed entry: the hub drops it too
                replay.append((offset, with_offset(split_envelope(payload)[2], offset)))
        recovered = recovery.recovered
        if sum(len(frame) for _, frame in replay) > session.max_queue_bytes // 2:
            replay, recovered = [], False  # it would end the stream as a slow consumer (as chat does)
        transport.epochs[room] = recovery.epoch
        # The client's position: where it resumed from (the replay moves it on), else "now".
        start = since.offset if since is not None and recovered else recovery.top
        transport.positions[room] = (start, recovery.epoch)
        joined = {"op": "joined", "room": room, "offset": recovery.top, "epoch": recovery.epoch,
                  "recovered": recovered}
        self.write_raw(b"id: %s\nevent: joined\ndata: %s\n\n" % (transport.event_id().encode(), dumps(joined).encode()))
        for offset, frame in replay:
            session.send_frame(RoomFrame(frame, room, offset, _op_of(frame)))
        session.release(room, recovery.messages[-1][0] if replay else recovery.top)

    def go_away(self, retry_ms: int) -> None:
        """End the stream like a drain's 1001: the browser reconnects after ``retry_ms``."""
        session = self.session
        if session is None or session.closed:
            return
        self.write_raw(b"retry: %d\n\n" % max(retry_ms, 1))
        session.close(CloseCode.GOING_AWAY)

    # -- writing --------------------------------------------------------------------------------------

    def write_raw(self, data: bytes) -> None:
        """Write and flush one chunk now; a vanished client ends the stream."""
        if self.finished_stream or self.request.connection is None:
            return
        try:
            self.write(data)
            fut = self.flush()
        except StreamClosedError:
            self._done.set()
            return
        fut.add_done_callback(self._flushed)

    def _flushed(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self._done.set()

    def end_stream(self, code: int, reason: str) -> None:
        """End the response (idempotent); the client's EventSource reconnects by itself."""
        self._done.set()
        if self.finished_stream:
            return
        self.finished_stream = True
        if self.session is not None and self.session.close_code is None:
            self.session.close_code = code
        with contextlib.suppress(Exception):
            if self.request.connection is not None and not self._finished:
                self.finish()

    def on_connection_close(self) -> None:
        self._done.set()
        if self.session is not None and self.session.close_code is None:
            self.session.close_code = 1001
