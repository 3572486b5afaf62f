"""Writing pre-framed WebSocket messages to a Tornado IOStream, cheaply.

Fan-out writes the same :class:`~wirehub.session.OutFrame` to many sockets. Tornado's
``write_message`` frames the payload again for every recipient and allocates a Future per write;
here a frame is built once and handed straight to the kernel with ``socket.send`` when the stream
has nothing queued (:func:`wirehub.stream.send_now`). Only what the kernel does not take is queued,
in the stream's buffer: that is the session's send queue (its size is what the 4008 cap is checked
against).

Writes are corked until the I/O callbacks of the next event-loop iteration have run: the frames a
connection gets meanwhile (several bus messages, the next publish's fan-out when it had already
arrived, a reply and a broadcast, a history replay) leave in one ``send`` system call, which is most
of a delivery's cost. Frames are never delayed past that (one more ``select`` that does not wait, as
the loop has work ready), and a Close frame is preceded by everything queued before it.

Before the frame reader takes the socket over this reads ``IOStream._write_buffer``; setup.cfg pins
Tornado below 7 for that reason and tests/test_transport.py fails if the attribute changes.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from tornado.websocket import WebSocketProtocol

from wirehub.session import OutFrame
from wirehub.stream import SocketStream, buffered, send_now

log = logging.getLogger("wirehub.transport")


class _Flusher:
    """Sends what the transports of one event loop corked, once per loop iteration, after one more pass
    of the loop's I/O callbacks: input that had already arrived (the next publish, the next bus messages,
    the other frames of a client's burst) adds its frames to the same ``send`` of each connection."""

    __slots__ = ("__weakref__", "_dirty", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[StreamTransport] = []
        self._scheduled = False

    def add(self, transport: StreamTransport) -> None:
        self._dirty.append(transport)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._hop)

    def _hop(self) -> None:
        # Callbacks scheduled now run after the I/O callbacks of the next select (a plain call_soon from
        # the frame's own iteration runs before them).
        self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for transport in dirty:
            transport.flush()


_flushers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = weakref.WeakKeyDictionary()


#: the flusher :func:`_flusher` gave last, weakly (the loops' own are kept by ``_flushers``)
_last: weakref.ReferenceType[_Flusher] | None = None


def _flusher() -> _Flusher:
    """The running loop's flusher. Asked once per connection, by its first corked frame (with the lean
    upgrade that is a join's reply: the welcome leaves with the 101), so the usual answer, the one given
    last, costs no weak reference made for the ``WeakKeyDictionary`` lookup."""
    global _last
    loop = asyncio.get_running_loop()
    flusher = _last() if _last is not None else None
    if flusher is not None and flusher._loop is loop:
        return flusher
    flusher = _flushers.get(loop)
    if flusher is None:
        flusher = _flushers[loop] = _Flusher(loop)
    _last = weakref.ref(flusher)
    return flusher


class StreamTransport:
    """:class:`wirehub.session.Transport` over a WebSocket connection's stream (Tornado's until the frame
    reader takes the socket over, then a :class:`~wirehub.stream.SocketStream`)."""

    __slots__ = ("_close", "_corked", "_corked_bytes", "_flusher", "_protocol", "_taken")

    def __init__(self, protocol: WebSocketProtocol, close: object) -> None:
        self._protocol = protocol
        self._close = close
        #: the wire frames queued in this loop iteration, sent by flush() (None: nothing queued): one frame as it
        #: is, more joined in a bytearray. Neither is tracked by the garbage collector, as a list per cork was:
        #: a fan-out to 18,000 kept 18,000 lists alive until the flush, so collections ran through the heap
        self._corked: bytes | bytearray | None = None
        self._corked_bytes = 0
        self._flusher: _Flusher | None = None
        #: the connection's SocketStream once :meth:`offer` saw the takeover (it is final: kept for the fast path)
        self._taken: SocketStream | None = None

    @property
    def _stream(self) -> Any:
        return self._protocol.stream

    @property
    def closed(self) -> bool:
        # Once our Close frame is out (whoever sent it: us, Tornado on 1009 or a ping timeout),
        # no data frame may follow it (RFC 6455 section 5.5.1).
        stream: Any = self._protocol.stream
        return self._protocol.server_terminated or bool(stream.closed())

    def buffered(self) -> int:
        return buffered(self._protocol.stream) + self._corked_bytes

    def send_frame(self, frame: OutFrame) -> None:
        protocol = self._protocol
        stream: Any = protocol.stream
        if protocol.server_terminated or stream.closed():
            return
        wire = frame.wire
        self._cork(wire)
        self._corked_bytes += len(wire)

    def offer(self, frame: OutFrame, cap: int) -> int:
        """The fan-out's :meth:`send_frame` with the session's byte-cap check in the same call (see
        :class:`wirehub.session.OfferingTransport`): 1 queued, 0 dropped (closed), -1 over ``cap``."""
        # Once per delivery: the taken-over socket is kept here and its fields read directly (no property,
        # no method call), as a call and each object hopped through cost more than the check itself.
        if self._protocol.server_terminated:
            return 0
        stream = self._taken
        if stream is None:
            current: Any = self._protocol.stream
            if type(current) is not SocketStream:
                return self._offer_edge(frame, cap)
            stream = self._taken = current  # taken over (final): kept from this first frame on
        if stream._closed:
            return 0
        out = stream._out
        corked_bytes = self._corked_bytes
        if (len(out) if out is not None else 0) + corked_bytes + len(frame.payload) > cap:
            return -1
        wire = frame._wire
        if wire is None:  # built once per message, by the first member's offer (a call: cheaper than the property)
            wire = frame._wire = frame._frame()
        corked = self._corked  # _cork's body, inlined: this runs once per delivery of a fan-out
        if corked is None:
            self._corked = wire
            flusher = self._flusher
            if flusher is None:
                flusher = self._flusher = _flusher()
            flusher.add(self)
        elif type(corked) is bytes:
            self._corked = bytearray(corked) + wire
        else:
            corked += wire
        self._corked_bytes = corked_bytes + len(wire)
        return 1

    #: :meth:`Session.send_frame`'s one call (:class:`wirehub.session.CappedTransport`): its checks are
    #: :meth:`offer`'s (``closed``; ``buffered()`` plus the payload against the cap), then the same queueing
    send_capped = offer

    def _cork(self, wire: bytes) -> None:
        corked = self._corked
        if corked is None:
            self._corked = wire
            flusher = self._flusher
            if flusher is None:
                flusher = self._flusher = _flusher()
            flusher.add(self)
        elif type(corked) is bytes:
            self._corked = bytearray(corked) + wire
        else:
            corked += wire

    def _offer_edge(self, frame: OutFrame, cap: int) -> int:
        """:meth:`offer` before the socket is taken over (on Tornado's stream)."""
        stream: Any = self._protocol.stream
        if stream.closed():
            return 0
        if buffered(stream) + self._corked_bytes + len(frame.payload) > cap:
            return -1
        self.send_frame(frame)
        return 1

    def lead_with(self, head: bytes) -> None:
        """Put ``head`` (the 101 of the lean path) first in a new transport's cork, so that nothing (a frame, a
        flush by a close) goes before it. Not registered with the loop's flusher: the caller flushes."""
        assert self._corked is None
        self._corked, self._corked_bytes = head, len(head)

    def flush(self) -> None:
        """Hand the corked frames to the kernel (the stream queues what it does not take)."""
        corked = self._corked
        if corked is None:
            return
        self._corked = None
        self._corked_bytes = 0
        protocol = self._protocol
        if protocol.server_terminated:
            return
        data = corked
        stream = self._taken
        if stream is not None:
            stream.send(data)
        else:
            send_now(protocol.stream, data)

    def close(self, code: int, reason: str) -> None:
        self.flush()
        close = self._close
        assert callable(close)
        close(code, reason)
