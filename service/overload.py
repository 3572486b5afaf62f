"""Admission control: new connections wait while the event loop lags, so that open sessions are served first.

A replica's sessions and a flood of new connections (the members of a killed replica reconnecting, each
with a handshake, a 101 and a join that replays history) share one event loop, and without a priority the
deliveries of the open sessions queue behind the handshakes: seconds, in a reconnect storm. Here
(``server.admission_lag``, 0 = off):

- one timer measures its own lateness every :data:`TICK` seconds: the loop's lag, the time any callback
  (a delivery from the bus, a client's frame) waits for the loop (``wirehub_loop_lag_seconds``);
- when the mean lag over :data:`WINDOW` seconds is over ``server.admission_lag`` (the mean: one long
  callback, such as a fan-out to a big room, is one late tick among many in time), the first request head of
  each new connection (read by the accept path, service/accept.py) waits in a FIFO queue instead of being
  served at once;
- the queue is served once per pass of the loop, for at most ``server.admission_slice`` seconds (at least
  one connection): whatever else the pass holds (deliveries, open sessions' frames) comes first, and a
  delivery waits for at most one slice of handshakes. A busy loop passes seldom, so new connections then
  get a small share of it; an idle one often, so they take what is left. What an admitted connection brings
  a round trip later (its join, the history replay) is bounded by the same slice: about as many joins
  arrive per pass as handshakes were served;
- probes (the accept path's ``PROBE_PATHS``) are never queued: a busy replica stays live and ready in its
  probes' eyes;
- a queued connection whose client went away is dropped at its turn without any work; one queued for
  longer than ``server.header_timeout`` is answered 503 ``overloaded`` with ``Retry-After`` (its client
  retries with backoff, as at the connection cap);
- after :data:`CALM_AFTER` s with the lag within the bound and the queue empty, heads are served at once again.

Connections are accepted and their heads read as before (a few tens of microseconds each, a small part of a
rejoin): deferring at the head rather than in the kernel's listen backlog keeps the probes and the order
of arrival, and lets a queued connection that was given up on be skipped.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wirehub.accept import EdgeStream
    from wirehub.metrics import Metrics

#: seconds between two lag measurements
TICK = 0.01
#: seconds of ticks whose mean lag is compared with the bound
WINDOW = 0.2
#: seconds with the mean lag within the bound and the queue empty before heads are served at once again
CALM_AFTER = 1.0

perf = time.perf_counter
log = logging.getLogger("wirehub.edge")


def request_path(head: bytes) -> bytes:
    """The path in the request line of ``head``, without the query (b"" when there is none)."""
    parts = head[:head.find(b"\n")].split(b" ", 2)
    return parts[1].partition(b"?")[0] if len(parts) > 1 else b""


def peer_gone(sock: socket.socket) -> bool:
    """Whether the client closed (or reset) ``sock`` (non-blocking): a peek, nothing is read."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class Admission:
    """Measures the loop's lag and, while it is over ``lag_bound``, serves new connections' first heads
    from a queue, ``slice`` seconds of them per pass of the loop (see the module docstring)."""

    def __init__(self, lag_bound: float, slice_: float, max_wait: float, metrics: Metrics,
                 refuse: Callable[[EdgeStream], None], probes: Collection[bytes]) -> None:
        self.bound = lag_bound
        self.slice = slice_
        self.max_wait = max_wait
        self.metrics = metrics
        self.refuse = refuse
        #: paths served at once whatever the lag (what a kubelet and a scraper ask for)
        self.probes = probes
        self.limiting = False
        self.queue: deque[tuple[EdgeStream, Callable[[], None], float]] = deque()
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self._due = now + TICK
        self._judged = now
        self._last_late = now
        self._lag_sum = 0.0
        self._ticks = 0
        #: the release of the queue is scheduled for the next pass of the loop
        self._releasing = False
        self._timer: asyncio.TimerHandle | None = self.loop.call_at(self._due, self._tick)
        metrics.connections_deferred_now.set_function(lambda: len(self.queue))
        metrics.admission_limiting.set_function(lambda: 1.0 if self.limiting else 0.0)

    def admit_now(self, head: bytes) -> bool:
        """Whether the first head of a new connection is served now; if not, the caller :meth:`defer` s it."""
        return not self.limiting or request_path(head) in self.probes

    def defer(self, stream: EdgeStream, serve: Callable[[], None]) -> None:
        """Queue ``serve`` (the connection's first head) for a coming pass of the loop."""
        self.metrics.connections_deferred.inc()
        self.queue.append((stream, serve, self.loop.time()))
        if not self._releasing:
            self._releasing = True
            self.loop.call_soon(self._release)

    def stop(self) -> None:
        """Stop measuring; close the queued connections (the server stops listening)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.queue:
            self.queue.popleft()[0].close()

    def _tick(self) -> None:
        now = self.loop.time()
        lag = max(0.0, now - self._due)
        self.metrics.loop_lag.observe(lag)
        self._lag_sum += lag
        self._ticks += 1
        if now - self._judged >= WINDOW:
            if self._lag_sum / self._ticks > self.bound:
                self.limiting = True
                self._last_late = now
            elif self.limiting and not self.queue and now - self._last_late >= CALM_AFTER:
                self.limiting = False
            self._lag_sum, self._ticks, self._judged = 0.0, 0, now
        self._due = now + TICK
        self._timer = self.loop.call_at(self._due, self._tick)

    def _release(self) -> None:
        """One pass's slice of the queue: at least one connection served, then as many as fit in the slice."""
        self._releasing = False
        queue = self.queue
        now = self.loop.time()
        deadline = perf() + self.slice
        while queue:
            stream, serve, queued = queue.popleft()
            if stream.closed() or peer_gone(stream.socket):
                stream.close()
            elif now - queued > self.max_wait:
                self.refuse(stream)
            else:
                try:
                    serve()  # the accept path's: it logs and closes on its own failures
                except Exception:  # one connection's bug must not strand the rest of the queue
                    log.exception("admission: serving a queued connection failed")
                    stream.close()
                if perf() >= deadline:
                    break
        if queue:
            self._releasing = True
            self.loop.call_soon(self._release)
