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
of a delivery's cost. A Close frame is preceded by everything queued before it.

Under write saturation the cork is held a little longer (``server.write_coalesce_ms``, the cap), as
Linux's TCP autocorking holds small writes while earlier ones are still queued: a connection whose
frames left in the last flush round, when that round ended less than its own CPU time ago (the loop
spends more than half its time in ``send``), gets its next frames at the round's end plus that time, at
most the cap. Input that arrives meanwhile (the next publishes) joins the same ``send``.
A connection that was not in the last round (a lone message after a quiet spell), and every connection
while flush rounds are short next to the time between them, is flushed after one pass as above: no
delay is added to a replica that keeps up.

Before the frame reader takes the socket over this reads ``IOStream._write_buffer``; setup.cfg pins
Tornado below 7 for that reason and tests/test_transport.py fails if the attribute changes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from time import thread_time
from typing import Any

from tornado.websocket import WebSocketProtocol

from wirehub.session import OutFrame
from wirehub.stream import SocketStream, buffered, send_now

log = logging.getLogger("wirehub.transport")

#: ``server.write_coalesce_ms``'s default
DEFAULT_COALESCE_MS = 5.0


@functools.lru_cache(maxsize=8)
def _seconds(ms: float) -> float:
    """``ms`` in seconds, one float object per value (a connection holds a reference, not a float)."""
    return ms / 1000


class _Round:
    """One flush round: when it ended (loop time; 0 while it runs) and the CPU time of its sends (seconds)."""

    __slots__ = ("cost", "end")

    def __init__(self) -> None:
        self.end = 0.0
        self.cost = 0.0


class _Flusher:
    """Sends what the transports of one event loop corked, once per loop iteration, after one more pass
    of the loop's I/O callbacks: input that had already arrived (the next publish, the next bus messages,
    the other frames of a client's burst) adds its frames to the same ``send`` of each connection.
    Transports held under saturation (the module docstring) are sent by a timer instead."""

    __slots__ = ("__weakref__", "_dirty", "_held", "_held_due", "_loop", "_scheduled", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[StreamTransport] = []
        self._scheduled = False
        #: transports held for a later round, that round's loop time and its timer
        self._held: list[StreamTransport] = []
        self._held_due = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, transport: StreamTransport) -> None:
        cap = transport._coalesce
        last = transport._last
        if cap and last is not None:
            # Its last frames left in a round that ended less than its own CPU time ago (writes take more
            # than half the loop's time): hold these until that round's end plus that time, at most cap.
            cost = last.cost
            due = last.end + (cap if cap < cost else cost)
            if self._loop.time() < due:
                self._held.append(transport)
                timer = self._timer
                if timer is None or due < self._held_due:
                    if timer is not None:
                        timer.cancel()
                    self._held_due = due
                    self._timer = self._loop.call_at(due, self._run_held)
                return
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
        self._flush(dirty)

    def _run_held(self) -> None:
        self._timer = None
        held, self._held = self._held, []
        self._flush(held)

    def _flush(self, transports: list[StreamTransport]) -> None:
        # The round's cost is the CPU time of its sends, so that a replica that is only preempted by other
        # work on its host (its round's wall time long, its CPU time not) is not taken for saturated.
        start = thread_time()
        r = _Round()
        for transport in transports:
            transport._last = r
            transport.flush()
        r.cost = thread_time() - start
        r.end = self._loop.time()


_flushers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = weakref.WeakKeyDictionary()


def _flusher() -> _Flusher:
    loop = asyncio.get_running_loop()
    flusher = _flushers.get(loop)
    if flusher is None:
        flusher = _flushers[loop] = _Flusher(loop)
    return flusher


class StreamTransport:
    """:class:`wirehub.session.Transport` over a WebSocket connection's stream (Tornado's until the frame
    reader takes the socket over, then a :class:`~wirehub.stream.SocketStream`)."""

    __slots__ = ("_close", "_coalesce", "_corked", "_corked_bytes", "_flusher", "_last", "_protocol")

    def __init__(self, protocol: WebSocketProtocol, close: object, coalesce_ms: float = DEFAULT_COALESCE_MS) -> None:
        self._protocol = protocol
        self._close = close
        #: the most a flush may be held under saturation, seconds (0: never held)
        self._coalesce = _seconds(coalesce_ms)
        #: the flush round that last sent this transport's frames
        self._last: _Round | None = None
        #: wire frames queued in this loop iteration, sent by flush() (None: nothing queued)
        self._corked: list[bytes] | None = None
        self._corked_bytes = 0
        self._flusher: _Flusher | None = None

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
        corked = self._corked
        if corked is None:
            self._corked = [wire]
            flusher = self._flusher
            if flusher is None:
                flusher = self._flusher = _flusher()
            flusher.add(self)
        else:
            corked.append(wire)
        self._corked_bytes += len(wire)

    def offer(self, frame: OutFrame, cap: int) -> int:
        """The fan-out's :meth:`send_frame` with the session's byte-cap check in the same call (see
        :class:`wirehub.session.OfferingTransport`): 1 queued, 0 dropped (closed), -1 over ``cap``."""
        protocol = self._protocol
        if protocol.server_terminated:
            return 0
        stream: Any = protocol.stream
        if type(stream) is SocketStream:  # after the takeover: the usual case
            if stream.closed():
                return 0
            queued = stream.buffered()
        else:
            if stream.closed():
                return 0
            queued = buffered(stream)
        corked_bytes = self._corked_bytes
        if queued + corked_bytes + len(frame.payload) > cap:
            return -1
        wire = frame.wire
        corked = self._corked
        if corked is None:
            self._corked = [wire]
            flusher = self._flusher
            if flusher is None:
                flusher = self._flusher = _flusher()
            flusher.add(self)
        else:
            corked.append(wire)
        self._corked_bytes = corked_bytes + len(wire)
        return 1

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
        stream: Any = protocol.stream
        data = corked[0] if len(corked) == 1 else b"".join(corked)
        if type(stream) is SocketStream:
            stream.send(data)
        else:
            send_now(stream, data)

    def close(self, code: int, reason: str) -> None:
        self.flush()
        close = self._close
        assert callable(close)
        close(code, reason)
