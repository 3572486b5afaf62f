"""WebSocket pings for every connection of a replica, from one timer instead of a task each.

Each connection gets a ping every ``interval`` seconds; one that sent nothing (no pong, and no other
frame either) within ``timeout`` seconds of a ping is dropped: a Close frame 1000 "ping timed out",
and the TCP connection closed at once. ``timeout`` 0 means ``interval``, as with Tornado's own pings,
which this replaces (``server.ping_interval`` / ``server.ping_timeout``). A connection whose handler
is still working on a frame (``Protocol.busy``: the next frame, the pong among them, is not read
until it is done) counts as alive.

Connections are dealt into :attr:`Keepalive.SLICES` groups as they open, and one group is pinged every
``interval / SLICES`` seconds, so 100,000 connections are not pinged in one loop iteration and a tick
touches only its own group. The ping is one pre-built frame handed to the kernel with ``socket.send``
when the stream has nothing queued (no Future, no framing per connection; queued behind what is when
it has, :class:`wirehub.stream.SocketStream`), and the pong is read by the connection's read callback:
one ``recv`` and a 6-byte parse, no Future or task step (see :mod:`wirehub.frames`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from wirehub.protocol import CloseCode
from wirehub.stream import SocketStream, send_now

if TYPE_CHECKING:
    from wirehub.frames import Protocol

log = logging.getLogger("wirehub.session")

#: an unmasked Ping frame with no payload, the same bytes for every connection
PING = b"\x89\x00"


class Keepalive:
    """One timer pinging a slice of the connections per tick (see the module docstring)."""

    SLICES = 16

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout or interval
        self._step = interval / self.SLICES
        self._slice = 0
        self._next = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: the connections of each slice; a new one joins the slice after the last one joined
        self._slices: list[dict[Protocol, None]] = [{} for _ in range(self.SLICES)]
        self._deal = 0
        #: per slice: the timer of the check of its last ping, and the connections pinged
        self._checks: list[tuple[asyncio.TimerHandle, list[Protocol]] | None] = [None] * self.SLICES

    def add(self, ws: Protocol) -> None:
        n = self._deal
        self._deal = (n + 1) % self.SLICES
        ws.keepalive_slice = n
        self._slices[n][ws] = None

    def discard(self, ws: Protocol) -> None:
        n = ws.keepalive_slice
        if n >= 0:
            self._slices[n].pop(ws, None)
            ws.keepalive_slice = -1

    def __len__(self) -> int:
        return sum(len(s) for s in self._slices)

    def start(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._next = loop.time() + self._step
            self._timer = loop.call_at(self._next, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for i, pending in enumerate(self._checks):
            if pending is not None:
                pending[0].cancel()
                self._checks[i] = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._next += self._step
        if self._next <= now:  # the loop was held up: go on from now rather than catch up in a burst
            self._next = now + self._step
        self._timer = loop.call_at(self._next, self._tick)
        n, self._slice = self._slice, (self._slice + 1) % self.SLICES
        self.ping_slice(n)

    def ping_slice(self, n: int) -> int:
        """Ping the open connections of slice ``n`` (what the timer does every ``interval / SLICES``
        seconds, for ``n`` in turn); returns how many were pinged."""
        pending = self._checks[n]
        if pending is not None:  # timeout == interval: the check of the slice's last ping is due too
            pending[0].cancel()
            self._check(n)
        pinged: list[Protocol] = []
        for ws in tuple(self._slices[n]):  # a failed send may close a connection, and so change the slice
            stream: Any = ws.stream
            if ws.client_terminated or ws.server_terminated or stream.closed():
                continue
            ws._received_pong = False
            if type(stream) is SocketStream:
                stream.send(PING)
            else:  # not taken over yet (its 101 still queued)
                send_now(stream, PING)
            pinged.append(ws)
        if pinged:
            self._checks[n] = (asyncio.get_running_loop().call_later(self.timeout, self._check, n), pinged)
        return len(pinged)

    def _check(self, n: int) -> None:
        pending, self._checks[n] = self._checks[n], None
        if pending is None:
            return
        for ws in pending[1]:
            if ws._received_pong or ws.busy or ws.is_closing():
                continue
            session = ws._session()
            log.info("no pong within %gs from %r: dropping the connection", self.timeout, session)
            if session is not None and session.close_code is None:
                session.close_code = CloseCode.NORMAL  # recorded for the metric and the close hook
            ws.close(CloseCode.NORMAL, "ping timed out")
            ws._abort()
