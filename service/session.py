"""Per-connection state and the bounded send queue; testable without sockets.

The session never touches a socket: it writes through a :class:`Transport` (the WebSocket handler
in production, a fake in unit tests). The send queue is the transport's own buffer, capped in
bytes: past ``max_queue_bytes`` the session is closed with 4008, so a client that stops reading
costs at most the cap in memory.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from wirehub.auth import Identity
from wirehub.protocol import CloseCode, ErrorCode, close_reason, dumps, error_frame

if TYPE_CHECKING:
    from wirehub.metrics import Metrics


#: the 2-byte headers of the frames under 126 bytes, text ([1]) and binary ([0]), by payload length
_SHORT_HEADERS = (tuple(bytes((0x82, n)) for n in range(126)), tuple(bytes((0x81, n)) for n in range(126)))
#: the headers with a 16-bit and a 64-bit payload length (one call, no bytes made per part)
_MEDIUM_HEADER = struct.Struct("!BBH")
_LONG_HEADER = struct.Struct("!BBQ")


class OutFrame:
    """An encoded message, framed for the wire at most once however many sessions get it."""

    __slots__ = ("__dict__", "_wire", "binary", "payload")

    def __init__(self, payload: bytes, binary: bool = False) -> None:
        self.payload = payload
        self.binary = binary
        self._wire: bytes | None = None

    @property
    def wire(self) -> bytes:
        """The unmasked server-to-client WebSocket frame (RFC 6455 section 5.2), built on first use."""
        wire = self._wire
        if wire is None:
            wire = self._wire = self._frame()
        return wire

    def _frame(self) -> bytes:
        payload = self.payload
        n = len(payload)
        first = 0x82 if self.binary else 0x81
        if n < 126:
            return _SHORT_HEADERS[first & 1][n] + payload
        if n < 65536:  # a joined reply with its first page of members, a history page
            return _MEDIUM_HEADER.pack(first, 126, n) + payload
        return _LONG_HEADER.pack(first, 127, n) + payload

    def __len__(self) -> int:
        return len(self.payload)


class Transport(Protocol):
    def send_frame(self, frame: OutFrame) -> None:
        """Queue one text frame; never blocks. A closed transport drops it."""

    def buffered(self) -> int:
        """Bytes queued but not yet handed to the kernel."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; idempotent."""

    @property
    def closed(self) -> bool: ...


class OfferingTransport(Transport, Protocol):
    """A transport with the fan-out's one-call path (:meth:`Session.receiver` uses it when there)."""

    def offer(self, frame: OutFrame, cap: int) -> int:
        """Queue ``frame`` (1), unless the queue would pass ``cap`` bytes (-1: nothing queued); a closed
        transport drops it (0)."""
        ...


class CappedTransport(Transport, Protocol):
    """A transport with :meth:`Session.send_frame`'s one-call path (taken when the transport has it)."""

    def send_capped(self, frame: OutFrame, cap: int) -> int:
        """What :meth:`Session.send_frame` does with :attr:`~Transport.closed`, :meth:`~Transport.buffered` and
        :meth:`~Transport.send_frame`, in one call: as :meth:`OfferingTransport.offer` answers (1 queued, 0 dropped
        as the transport is closed, -1 nothing queued as the queue would pass ``cap`` bytes)."""
        ...


class Session:
    """One WebSocket connection: identity, rooms, handler state and the send queue.

    There is one per connection (and one per member of a big room), so it keeps little: its
    attributes are slots (a subclass without ``__slots__`` may add others), :attr:`state` is created
    on first use (an echo session never needs it), one room is kept as its name (a set only for two
    or more), and the per-room containers of a join (held messages, the duplicate floor) go when
    they are no longer needed.
    """

    __slots__ = ("__weakref__", "_floor", "_held", "_held_bytes", "_rooms", "_state", "close_code", "endpoint",
                 "id", "id_bytes",
                 "identity", "max_queue_bytes", "metrics", "node", "on_identity_changed", "opened_at",
                 "path", "remote_ip", "transport")

    def __init__(
        self,
        transport: Transport,
        identity: Identity,
        *,
        endpoint: str,
        node: str,
        max_queue_bytes: int,
        remote_ip: str = "",
        metrics: Metrics | None = None,
        path: str = "",
    ) -> None:
        self.id = os.urandom(8).hex()  # 16 hex digits, as uuid4().hex[:16] was, at a third of its cost
        self.id_bytes = self.id.encode()
        self.transport = transport
        self.identity = identity
        self.endpoint = endpoint
        #: the upgrade request's path: the endpoint's path, or below it on a prefix endpoint (``/ws/yjs/*``)
        self.path = path or endpoint
        self.node = node
        self.remote_ip = remote_ip
        self.max_queue_bytes = max_queue_bytes
        self.metrics = metrics
        self.opened_at = time.time()
        #: the rooms this session is in: None (none), the name itself (one: the usual case, and a set
        #: costs 216 bytes per member of a big room), or a set (two or more)
        self._rooms: str | set[str] | None = None
        self._state: dict[str, Any] | None = None
        self.close_code: int | None = None
        #: called after :meth:`set_identity` (the WebSocket layer reschedules the 4001 expiry)
        self.on_identity_changed: Callable[[], None] | None = None
        #: rooms whose live messages are kept back, and those messages (None: none held)
        self._held: dict[str, list[tuple[int | None, OutFrame]]] | None = None
        self._held_bytes = 0
        #: per room, the offset a recovery replayed up to: a live copy at or below it is a duplicate
        self._floor: dict[str, int] | None = None

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms this session is a member of on this replica (the hub keeps them: :meth:`add_room`,
        :meth:`left`); a snapshot."""
        rooms = self._rooms
        if rooms is None:
            return frozenset()
        return frozenset((rooms,)) if isinstance(rooms, str) else frozenset(rooms)

    def add_room(self, room: str) -> None:
        """The session is now in ``room`` (the hub calls it)."""
        rooms = self._rooms
        if rooms is None:
            self._rooms = room
        elif isinstance(rooms, str):
            if rooms != room:
                self._rooms = {rooms, room}
        else:
            rooms.add(room)

    def handler_state(self) -> dict[str, Any]:
        """Handler-private state (e.g. the chat handler's rate limiter), made on first use. Also :attr:`state`;
        the core's per-request paths (the op rate, the chat's state) call this: a call costs less than a
        property (the interpreter runs it in the same loop, not through a C call)."""
        state = self._state
        if state is None:
            state = self._state = {}
        return state

    def _set_state(self, state: dict[str, Any]) -> None:
        self._state = state

    #: what :meth:`handler_state` returns, for plugins (``session.state``); settable
    state = property(handler_state, _set_state)

    def set_identity(self, identity: Identity) -> None:
        """Replace the identity (a refreshed token); its expiry takes effect at once."""
        self.identity = identity
        if self.on_identity_changed is not None:
            self.on_identity_changed()

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.identity.user!r} endpoint={self.endpoint}>"

    @property
    def closed(self) -> bool:
        return self.close_code is not None or self.transport.closed

    @property
    def buffered(self) -> int:
        return self.transport.buffered()

    # -- sending -----------------------------------------------------------------------------------

    def send_frame(self, frame: OutFrame) -> bool:
        """Queue ``frame``; False (and the session closed with 4008) when over the byte cap."""
        if self.close_code is not None:
            return False
        transport: Any = self.transport
        capped = getattr(transport, "send_capped", None)
        if capped is not None:  # the checks below and the queueing in one call (a WebSocket's StreamTransport)
            queued = capped(frame, self.max_queue_bytes)
            if queued <= 0:
                if queued < 0:
                    self._overflow()
                return False
        else:
            if transport.closed:
                return False
            if transport.buffered() + len(frame.payload) > self.max_queue_bytes:
                self._overflow()
                return False
            transport.send_frame(frame)
        if self.metrics is not None:
            self.metrics.sent.n += 1
        return True

    def _overflow(self) -> None:
        """Queued plus held-back bytes went over the cap: close with 4008 (slow consumer)."""
        if self.metrics is not None:
            self.metrics.slow_consumers.inc()
            self.metrics.dropped.labels("slow_consumer").inc()
        self.close(CloseCode.SLOW_CONSUMER, retry_ms=1000)

    def send(self, message: dict[str, Any]) -> bool:
        """Encode and queue one JSON object."""
        return self.send_frame(OutFrame(dumps(message).encode()))

    def send_error(self, code: ErrorCode, message: str, req_id: Any = None, **extra: Any) -> bool:
        if self.metrics is not None:
            self.metrics.errors.labels(str(code)).inc()
        return self.send_frame(OutFrame(error_frame(code, message, req_id, **extra).encode()))

    def close(self, code: int, reason: str | None = None, retry_ms: int | None = None) -> None:
        """Close with ``code``; ``reason`` defaults to the close-code table's text plus the hint."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.transport.close(code, reason if reason is not None else close_reason(code, retry_ms))

    # -- fan-out entry, with the join gate used for gap-free recovery ---------------------------

    def receiver(self) -> Callable[[str, OutFrame, int | None], None]:
        """What the hub's fan-out calls for each room message to this session (the hub keeps it until the
        room's membership changes): :meth:`deliver`, or, when a subclass does not override it and the
        transport has ``offer``, the same in one call to the transport per message."""
        if type(self).deliver is Session.deliver and hasattr(self.transport, "offer"):
            return self._deliver_offer
        return self.deliver

    def _deliver_offer(self, room: str, frame: OutFrame, offset: int | None) -> None:
        """:meth:`deliver` through :meth:`OfferingTransport.offer`: the checks of :meth:`send_frame`
        (closed, the byte cap) are the transport's, in the same call that queues the frame."""
        if self._held or self._floor:
            self.deliver(room, frame, offset)
        elif self.close_code is None:
            transport: Any = self.transport
            queued = transport.offer(frame, self.max_queue_bytes)
            if queued > 0:
                metrics = self.metrics
                if metrics is not None:
                    metrics.sent.n += 1
            elif queued < 0:
                self._overflow()

    def deliver(self, room: str, frame: OutFrame, offset: int | None) -> None:
        """A room message from the hub. While ``room`` is held it is kept back, not sent; one at or
        below the offset a recovery replayed up to is a duplicate and dropped."""
        if self._held:
            held = self._held.get(room)
            if held is not None:
                held.append((offset, frame))
                self._held_bytes += len(frame.payload)
                if self._held_bytes + self.transport.buffered() > self.max_queue_bytes:
                    self._held.clear()
                    self._held_bytes = 0
                    self._overflow()
                return
        if self._floor and offset is not None:
            floor = self._floor.get(room)
            if floor is not None:
                if offset <= floor:
                    return
                # a room's messages come in order: none at or below the floor follows a newer one
                self._drop_floor(room)
        self.send_frame(frame)

    def hold(self, room: str) -> None:
        """Keep ``room``'s live messages back (while its history is being replayed)."""
        if self._held is None:
            self._held = {}
        self._held.setdefault(room, [])

    def release(self, room: str, after: int | None, *, floor: bool = True) -> int:
        """Send the held messages with offset > ``after`` (and all without an offset); stop holding.

        Returns how many were sent. Messages at or below ``after`` were already replayed; with
        ``floor``, live copies of them that come later are dropped too (until a newer message
        passes the floor). ``floor=False`` when none can come (:meth:`wirehub.hub.Hub.behind`):
        a floor per member of a big room would cost a dict each.
        """
        held = self.drop_held(room)
        if after is not None and floor:
            if self._floor is None:
                self._floor = {}
            self._floor[room] = after
        sent = 0
        if held:  # usually nothing came while the join ran
            for offset, frame in held:
                if offset is None or after is None or offset > after:
                    self.send_frame(frame)
                    sent += 1
        return sent

    def rebase(self, room: str) -> None:
        """``room``'s offsets start over (the hub announced a gap): forget the join's duplicate floor."""
        self._drop_floor(room)

    def _drop_floor(self, room: str) -> None:
        if self._floor:
            self._floor.pop(room, None)
            if not self._floor:
                self._floor = None  # like _held: an emptied dict keeps its table

    def drop_held(self, room: str) -> list[tuple[int | None, OutFrame]]:
        """Stop holding ``room`` and return what was kept back (discarded by a join that failed)."""
        held = self._held.pop(room, []) if self._held else []
        if not self._held:
            self._held = None  # an emptied dict keeps its table: 184 bytes per member of a big room
        if held:
            self._held_bytes -= sum(len(frame.payload) for _, frame in held)
        return held

    def left(self, room: str) -> None:
        """The session is no longer in ``room`` (the hub calls it): forget its room state."""
        rooms = self._rooms
        if rooms == room:
            self._rooms = None
        elif isinstance(rooms, set):
            rooms.discard(room)
            if len(rooms) == 1:
                self._rooms = next(iter(rooms))
            elif not rooms:
                self._rooms = None
        self.drop_held(room)
        self._drop_floor(room)

    def describe(self) -> dict[str, Any]:
        return {"session": self.id, "user": self.identity.user, "endpoint": self.endpoint, "rooms": sorted(self.rooms)}
