"""The network edge: our own accept path for the listening sockets, with a connection cap.

Tornado's ``netutil.add_accept_handler`` re-raises EMFILE: with the file limit reached, every loop pass
logged a traceback and spun the CPU while the pending connection stayed in the backlog. Here
(everything else stays Tornado's HTTPServer):

- at startup the soft RLIMIT_NOFILE is raised to the hard limit, and the connection cap is derived
  from it (``server.max_connections``, 0 = the limit less ``server.fd_reserve`` for the broker,
  files and the listening sockets);
- at the cap, a new connection takes the place of the one that has waited longest for a request head
  (an idle or slow pre-upgrade connection); when every connection is busy (WebSocket sessions,
  requests in flight), it takes one of :data:`PROBE_SLOTS` slots past the cap, where only
  :data:`PROBE_PATHS` are served and anything else is answered 503; with those busy too, it gets the
  503 JSON answer at the accept and is closed;
- EMFILE/ENFILE (or any other accept error) pauses accepting for :data:`ACCEPT_PAUSE` seconds, with
  one log line per :data:`LOG_INTERVAL` that counts the pauses;
- a connection's first request head is due within ``server.header_timeout`` (one timer for the oldest
  deadline, not one per connection); later ones (keep-alive) within ``server.idle_timeout``, Tornado's
  own head timeout;
- a request head over ``server.max_header_size`` is answered 431 before the close;
- the first head is read here (straight from the socket when it is there at the accept) and shown to the
  application's :class:`HeadTaker` (service/upgrade.py), which serves a plain version-13 upgrade without
  Tornado's HTTP/1 connection; a head it does not take is put back in front of whatever followed it and
  the connection goes to Tornado's ``HTTP1ServerConnection`` as if nothing had been read;
- while the event loop lags beyond ``server.admission_lag``, that first head waits in the
  :class:`~wirehub.overload.Admission` queue (probes excepted), served a slice per pass of the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tornado import httputil
from tornado.concurrent import Future
from tornado.httpserver import HTTPServer, _HTTPRequestContext
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError

from wirehub.overload import Admission

if TYPE_CHECKING:
    from wirehub.config import ServerConfig
    from wirehub.metrics import Metrics

log = logging.getLogger("wirehub.edge")

#: seconds the listening sockets are left alone after an accept error such as EMFILE
ACCEPT_PAUSE = 0.25
#: at most one log line per this many seconds about accept errors (with a count)
LOG_INTERVAL = 10.0
#: a connection answered 431 is read (and its input dropped) for at most this long / this many bytes before
#: the close, and at most this many at once
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1048576
LINGER_MAX = 64
#: paths still served on the few connections accepted past the cap when every connection is busy, so that
#: a full replica answers its liveness probe (and is not restarted for being full) and can be scraped
PROBE_PATHS = frozenset(("/healthz", "/readyz", "/metrics"))
_PROBE_PATHS = frozenset(path.encode() for path in PROBE_PATHS)
PROBE_SLOTS = 16
#: connections accepted per readiness event, as Tornado does, so that accepting cannot starve the loop
ACCEPT_BATCH = 128


def _response(status: int, reason: str, body: dict[str, str], extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode() + data


OVER_CAP_BODY = {"error": "unavailable", "reason": "too_many_connections"}
OVER_CAP = _response(503, "Service Unavailable", OVER_CAP_BODY, "Retry-After: 1\r\n")
BAD_REQUEST = _response(400, "Bad Request", {"error": "bad_request", "reason": "malformed HTTP request"})
#: what Tornado's HTTP/1 server writes for a malformed request head before it closes
TORNADO_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\n\r\n"
#: the end of a request head, as Tornado's HTTP/1 connection finds it
HEAD_END = b"\r?\n\r?\n"
_HEAD_END = re.compile(HEAD_END)
OVERLOADED = _response(503, "Service Unavailable", {"error": "unavailable", "reason": "overloaded"},
                       "Retry-After: 1\r\n")
HEADERS_TOO_LARGE = _response(431, "Request Header Fields Too Large",
                              {"error": "headers_too_large", "reason": "request head over the size limit"})


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit in force (0 = unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file limit from %d to %d: %s", soft, hard, exc)
    return 0 if soft == resource.RLIM_INFINITY else soft


def connection_cap(config: ServerConfig, fd_limit: int) -> int:
    """``server.max_connections``, or the file limit less ``server.fd_reserve`` (0 = no cap)."""
    if config.max_connections or not fd_limit:
        return config.max_connections
    return max(1, fd_limit - config.fd_reserve)


class ConnectionTable:
    """Open connections of one server in accept order, and those waiting for a request head."""

    def __init__(self, cap: int, metrics: Metrics, header_timeout: float) -> None:
        self.cap = cap
        self.metrics = metrics
        self.header_timeout = header_timeout
        self.open: dict[EdgeStream, None] = {}
        #: oldest first: the connection that has waited longest for a head is evicted first
        self.waiting: dict[EdgeStream, None] = {}
        #: connections past the cap that may only ask for PROBE_PATHS, and those of them waiting for a head
        self.probes: dict[EdgeStream, None] = {}
        self.probes_waiting: dict[EdgeStream, None] = {}
        self.lingering: set[_Lingering] = set()
        #: connections still owed their first head -> its deadline; in accept order, so in deadline order
        #: too, which lets one timer for the oldest stand in for a timer per connection
        self.first_heads: dict[EdgeStream, float] = {}
        self._sweep: object | None = None
        metrics.connections.set_function(lambda: len(self.open))
        metrics.connections_max.set(cap)

    def make_room(self) -> bool:
        """Below the cap, or made so by closing the longest-waiting connection; False when all are busy."""
        if not self.cap or len(self.open) - len(self.probes) < self.cap:
            return True
        return self._evict(self.waiting)

    def make_probe_room(self) -> bool:
        """A probe slot is free, or made so by closing the longest-waiting probe connection."""
        return len(self.probes) < PROBE_SLOTS or self._evict(self.probes_waiting)

    def _evict(self, waiting: dict[EdgeStream, None]) -> bool:
        victim = next(iter(waiting), None)
        if victim is None:
            return False
        victim.close()  # leaves every table at once (close_fd)
        self.metrics.connections_evicted.inc()
        return True

    def linger(self, sock: socket.socket) -> None:
        """Close ``sock`` after its answer without a reset: send FIN, then read and drop what the client still
        sends (up to :data:`LINGER_BYTES`, for up to :data:`LINGER_SECONDS`). Closing with unread input would
        send a RST, and the client could lose the answer. At most :data:`LINGER_MAX` at once; the rest get
        the plain close."""
        if len(self.lingering) >= LINGER_MAX:
            return
        sock.shutdown(socket.SHUT_WR)
        self.lingering.add(_Lingering(sock.dup(), self.lingering))

    def expect_head(self, stream: EdgeStream) -> None:
        """``stream`` was just accepted: its first head is due within ``header_timeout``."""
        loop = stream.io_loop
        deadline = loop.time() + self.header_timeout
        self.first_heads[stream] = deadline
        if self._sweep is None:
            self._sweep = loop.call_at(deadline, self._heads_overdue)

    def _heads_overdue(self) -> None:
        """Close the connections whose first head is overdue (oldest first), then wait for the next one."""
        self._sweep = None
        loop = IOLoop.current()
        now = loop.time()
        while self.first_heads:
            stream, deadline = next(iter(self.first_heads.items()))
            if deadline > now:
                self._sweep = loop.call_at(deadline, self._heads_overdue)
                return
            del self.first_heads[stream]
            if not stream.closed():
                self.metrics.connections_refused.labels("header_timeout").inc()
                stream.close()

    def closed(self, stream: EdgeStream) -> None:
        for table in (self.open, self.waiting, self.probes, self.probes_waiting, self.first_heads):
            table.pop(stream, None)


class _Lingering:
    """A duplicate of an answered socket that reads and drops the rest of the client's input, then closes."""

    def __init__(self, sock: socket.socket, registry: set[_Lingering]) -> None:
        self.sock, self.registry, self.left = sock, registry, LINGER_BYTES
        self.loop = IOLoop.current()
        sock.setblocking(False)
        self.loop.add_handler(sock, self._on_readable, IOLoop.READ)
        self.timer = self.loop.call_later(LINGER_SECONDS, self.close)

    def _on_readable(self, fd: Any, events: int) -> None:
        try:
            data = self.sock.recv(min(self.left, 65536))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.left -= len(data)
        if not data or self.left <= 0:
            self.close()

    def close(self) -> None:
        if self in self.registry:
            self.registry.discard(self)
            self.loop.remove_timeout(self.timer)
            self.loop.remove_handler(self.sock)
            self.sock.close()


class _SmallQueue(list):  # type: ignore[type-arg]
    """A list with deque's ``popleft``, for the two queues every IOStream keeps (its write buffers and
    write futures). An empty deque costs 760 bytes (one 64-slot block), an empty list 56, and these
    queues hold a few entries at most (the stream merges small writes), so ``pop(0)`` is cheap."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class EdgeStream(IOStream):
    """An accepted connection that tells its table when it waits for a request head and when it closes.

    Its own attributes are slots: added to IOStream's ~30 in the instance dict they pushed it past
    the size at which it shares its keys with the other instances, about 1.5 KiB per connection.
    """

    __slots__ = ("_head_wait", "_reading_head", "_table", "_waiting", "handover", "probe")

    def __init__(self, sock: socket.socket, table: ConnectionTable, probe: bool = False, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self._write_futures = _SmallQueue()  # type: ignore[assignment]
        self._write_buffer._buffers = _SmallQueue()  # type: ignore[assignment]
        self._table = table
        self.probe = probe
        self._waiting = table.probes_waiting if probe else table.waiting
        self._reading_head = False
        #: (max_bytes, then) of a read_head waiting for its first byte with a plain reader on the loop
        self._head_wait: tuple[int, Callable[[bytes], None]] | None = None
        #: what the lean path learned of the first request before handing it to Tornado (service/upgrade.py)
        self.handover: object | None = None
        table.open[self] = None
        if probe:
            table.probes[self] = None
        self._waiting[self] = None  # it has sent no head yet (Tornado starts reading one in a moment)
        # The first head is due within server.header_timeout; Tornado's own head timeout (server.idle_timeout)
        # is longer, as it is also the keep-alive idle timeout, which must outlast a proxy's.
        table.expect_head(self)

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        # Tornado's HTTP/1 server reads a request head, and nothing else, with read_until_regex.
        self._reading_head = True
        if not self.closed():
            self._waiting[self] = None
        future = super().read_until_regex(regex, max_bytes)
        if isinstance(future, Future):
            future.add_done_callback(self._head_read)
        return future

    def read_head(self, max_bytes: int, then: Callable[[bytes], None]) -> None:
        """Read the first request head, up to where Tornado's HTTP/1 server would find its end, then call
        ``then`` with it; not at all when the connection closes first (the 431 of an oversized head too)."""
        self._reading_head = True
        empty = False
        try:
            chunk: bytes | None = self.socket.recv(self.read_chunk_size)
        except (BlockingIOError, InterruptedError):  # nothing yet
            chunk, empty = None, True
        except OSError:  # an error that Tornado's read below meets again
            chunk = None
        if chunk == b"":
            self.close()  # closed before a request
            return
        if empty and not self._read_buffer_size and not self.closed():
            # Nothing yet: wait for it with a plain reader on the loop, then try again here. Tornado's read
            # (a Future, its buffer and regex machinery, and a loop pass for the Future's callback) was a
            # twelfth of a handshake when, as in a connection burst, the head came a moment after the accept.
            self._head_wait = (max_bytes, then)
            asyncio.get_running_loop().add_reader(self.socket.fileno(), self._head_ready)
            return
        if chunk:
            match = _HEAD_END.search(chunk)
            if match is not None and match.end() <= max_bytes:
                # The usual case in a reconnect storm: the head was in the socket at the accept. Read here
                # without a Future and a pass of the loop; what followed it stays buffered for the reader.
                end = match.end()
                if end < len(chunk):
                    self.unread(chunk[end:])
                self._head_read()
                then(chunk[:end])
                return
            self.unread(chunk)  # a part of it, or over the limit: Tornado's read goes on (and answers 431)
        future = super().read_until_regex(HEAD_END, max_bytes)
        assert isinstance(future, Future)

        def done(future: Future[bytes]) -> None:  # one callback for both: each is a pass of the loop
            self._head_read()
            if not future.cancelled() and future.exception() is None:
                then(future.result())

        future.add_done_callback(done)

    def _head_ready(self) -> None:
        wait = self._head_wait
        self._stop_head_wait()
        if wait is not None and not self.closed():
            self.read_head(*wait)

    def _stop_head_wait(self) -> None:
        if self._head_wait is not None:
            self._head_wait = None
            asyncio.get_running_loop().remove_reader(self.socket.fileno())

    def unread(self, data: bytes) -> None:
        """Put ``data`` in front of what is buffered, to be read again (IOStream's buffer: Tornado 6.5/6.6)."""
        self._read_buffer[:0] = data
        self._read_buffer_size += len(data)

    def _head_read(self, _: object = None) -> None:
        self._reading_head = False
        self._waiting.pop(self, None)
        self._table.first_heads.pop(self, None)

    def write(self, data: bytes | memoryview) -> Future[None]:
        if data == TORNADO_BAD_REQUEST:  # the same answer, with the JSON body every other error has
            data = BAD_REQUEST
        return super().write(data)

    def close(self, exc_info: Any = False) -> None:
        if (self._reading_head and isinstance(exc_info, UnsatisfiableReadError) and not self.closed()
                and not self.writing()):
            # Tornado closes at once on a head over max_header_size; answer it first (a best-effort send:
            # the socket buffer of a connection that is owed no answer is empty), then close gently
            self._table.metrics.connections_refused.labels("headers_too_large").inc()
            with contextlib.suppress(OSError):
                self.socket.send(HEADERS_TOO_LARGE)
                self._table.linger(self.socket)
        super().close(exc_info)

    def close_fd(self) -> None:
        try:
            self._stop_head_wait()  # before the file goes: the loop must not keep a closed descriptor
            super().close_fd()
        finally:
            self._table.closed(self)


class _Acceptor:
    """Accepts on one listening socket; on an accept error, pauses instead of spinning."""

    def __init__(self, sock: socket.socket, server: EdgeServer) -> None:
        self.sock = sock
        self.server = server
        self.loop = IOLoop.current()
        self._timer: object | None = None
        self._stopped = False
        self.loop.add_handler(sock, self._on_readable, IOLoop.READ)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self.loop.remove_timeout(self._timer)
            self._timer = None
        else:
            self.loop.remove_handler(self.sock)

    def _on_readable(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._stopped:
                return
            try:
                conn, address = self.sock.accept()
            except BlockingIOError:
                return
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as exc:
                self._pause(exc)
                return
            self.server.admit(conn, address)

    def _pause(self, exc: OSError) -> None:
        self.loop.remove_handler(self.sock)
        self._timer = self.loop.call_later(ACCEPT_PAUSE, self._resume)
        self.server.accept_failed(exc)

    def _resume(self) -> None:
        self._timer = None
        if not self._stopped:
            self.loop.add_handler(self.sock, self._on_readable, IOLoop.READ)


class _ProbesOnly(httputil.HTTPMessageDelegate):
    """A request on a connection past the cap: passed on for :data:`PROBE_PATHS`, else answered 503."""

    def __init__(self, inner: httputil.HTTPMessageDelegate, conn: httputil.HTTPConnection, metrics: Metrics) -> None:
        self.inner, self.conn, self.metrics = inner, conn, metrics
        self.passed = False

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        if start_line.path.partition("?")[0] in PROBE_PATHS:
            self.passed = True
            return self.inner.headers_received(start_line, headers)
        self.metrics.connections_refused.labels("over_cap").inc()
        body = json.dumps(OVER_CAP_BODY).encode()
        self.conn.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", 503, "Service Unavailable"),
            httputil.HTTPHeaders({"Content-Type": "application/json", "Cache-Control": "no-store",
                                  "Content-Length": str(len(body)), "Retry-After": "1"}),
            body,
        )
        self.conn.finish()
        return None

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.inner.data_received(chunk) if self.passed else None

    def finish(self) -> None:
        if self.passed:
            self.inner.finish()

    def on_connection_close(self) -> None:
        if self.passed:
            self.inner.on_connection_close()


@runtime_checkable
class HeadTaker(Protocol):
    """Takes the first request head of a new connection, or declines it (then Tornado serves it)."""

    def take_head(self, server: EdgeServer, stream: EdgeStream, address: Any, head: bytes) -> bool: ...


class _PeerContext:
    """The remote address and protocol of a connection, as ``HTTPServerRequest`` reads them."""

    __slots__ = ("protocol", "remote_ip")

    def __init__(self, remote_ip: str, protocol: str) -> None:
        self.remote_ip, self.protocol = remote_ip, protocol


class _HeadConnection(httputil.HTTPConnection):
    """The ``connection`` of a request whose head was read by the accept path: its stream and context
    (what an authenticator may look at); nothing is written through it."""

    def __init__(self, stream: EdgeStream, context: _HTTPRequestContext | _PeerContext) -> None:
        self.stream, self.context = stream, context


class EdgeServer(HTTPServer):
    """Tornado's HTTPServer with :class:`_Acceptor` in place of ``add_accept_handler``."""

    def initialize(self, *args: Any, table: ConnectionTable | None = None, admission_lag: float = 0.0,
                   admission_slice: float = 0.001, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        assert table is not None, "EdgeServer needs a ConnectionTable"
        self.table = table
        #: admission control of new connections while the loop lags (None: server.admission_lag 0)
        self.admission = (Admission(admission_lag, admission_slice, table.header_timeout, table.metrics,
                                    self._overloaded, _PROBE_PATHS) if admission_lag else None)
        #: the application's reader of first request heads, if it has one (service/upgrade.py's LeanRouter)
        self.head_taker: HeadTaker | None = (self.request_callback if isinstance(self.request_callback, HeadTaker)
                                             else None)
        self._accept_errors = 0
        self._last_log = -LOG_INTERVAL

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        # as TCPServer.add_sockets, so that its stop() removes our handlers and closes the sockets
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = _Acceptor(sock, self).stop

    def stop(self) -> None:
        super().stop()
        if self.admission is not None:
            self.admission.stop()
        for lingering in list(self.table.lingering):
            lingering.close()

    def admit(self, conn: socket.socket, address: Any) -> None:
        probe = False
        if not self.table.make_room():
            probe = self.table.make_probe_room()
            if not probe:
                self.table.metrics.connections_refused.labels("over_cap").inc()
                with contextlib.suppress(OSError):
                    conn.setblocking(False)
                    conn.send(OVER_CAP)
                conn.close()
                return
        try:
            stream = EdgeStream(conn, self.table, probe, max_buffer_size=self.max_buffer_size,
                                read_chunk_size=self.read_chunk_size)
            if self.head_taker is None or probe:
                self.handle_stream(stream, address)  # HTTPServer's is synchronous
            else:
                # The first head is read here and shown to the head taker; what it does not take is
                # replayed into Tornado's HTTP/1 connection, which then serves the connection as ever.
                stream.read_head(self.conn_params.max_header_size or 65536,
                                 lambda head: self._head_arrived(stream, address, head))
        except Exception:
            log.exception("could not serve a new connection from %s", address)
            conn.close()

    def _head_arrived(self, stream: EdgeStream, address: Any, head: bytes) -> None:
        admission = self.admission
        if admission is None or admission.admit_now(head):
            self._take_head(stream, address, head)
        else:
            admission.defer(stream, lambda: self._take_head(stream, address, head))

    def _overloaded(self, stream: EdgeStream) -> None:
        """A connection that waited too long in the admission queue: 503 ``overloaded``, then the close."""
        self.table.metrics.connections_refused.labels("overloaded").inc()
        with contextlib.suppress(StreamClosedError):
            stream.write(OVERLOADED).add_done_callback(lambda _: stream.close())

    def _take_head(self, stream: EdgeStream, address: Any, head: bytes) -> None:
        assert self.head_taker is not None
        try:
            taken = self.head_taker.take_head(self, stream, address, head)
        except Exception:
            log.exception("could not read a request head from %s", address)
            taken = False
        if not taken:
            self.replay(stream, address, head)

    def replay(self, stream: EdgeStream, address: Any, head: bytes) -> None:
        """Serve ``stream`` with Tornado's HTTP/1 connection, the ``head`` already read put back in front of
        what is buffered (pipelined requests, a body), as if it had never been read."""
        if stream.closed():
            return
        stream.unread(head)
        self.handle_stream(stream, address)

    def head_connection(self, stream: EdgeStream, address: Any, headers: httputil.HTTPHeaders) -> _HeadConnection:
        """What an ``HTTPServerRequest`` built from a head read here takes as its connection: the remote
        address and protocol as Tornado's connection gives them (X-Real-Ip & co. with ``xheaders``)."""
        context: _HTTPRequestContext | _PeerContext
        if self.xheaders:
            proxied = _HTTPRequestContext(stream, address, self.protocol, self.trusted_downstream)
            proxied._apply_xheaders(headers)
            context = proxied
        else:  # what _HTTPRequestContext gives without xheaders, without asking the socket its family
            context = _PeerContext(address[0] if isinstance(address, tuple) else "0.0.0.0", self.protocol or "http")
        return _HeadConnection(stream, context)

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream = getattr(server_conn, "stream", None)
        if isinstance(stream, EdgeStream) and stream.probe:
            return _ProbesOnly(delegate, request_conn, self.table.metrics)
        return delegate

    def accept_failed(self, exc: OSError) -> None:
        self.table.metrics.accept_paused.inc()
        self._accept_errors += 1
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL:
            return
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        log.warning("accept failed (%s: %s): accepts paused for %.2fs (%d times since the last such line); "
                    "%d connections open, cap %d", name, os.strerror(exc.errno or 0), ACCEPT_PAUSE,
                    self._accept_errors, len(self.table.open), self.table.cap)
        self._accept_errors = 0
        self._last_log = now


def make_server(application: httputil.HTTPServerConnectionDelegate, config: ServerConfig,
                metrics: Metrics) -> EdgeServer:
    """Raise the file limit, derive the connection cap and build the server with the pre-upgrade timeouts."""
    fd_limit = raise_fd_limit()
    cap = connection_cap(config, fd_limit)
    log.info("file limit %s; connection cap %s (server.max_connections %d, server.fd_reserve %d)",
             fd_limit or "unlimited", cap or "none", config.max_connections, config.fd_reserve)
    if fd_limit and config.max_connections > fd_limit - config.fd_reserve:
        log.warning("server.max_connections %d is above the file limit %d less server.fd_reserve %d: "
                    "expect accept pauses (EMFILE) before the cap", config.max_connections, fd_limit,
                    config.fd_reserve)
    return EdgeServer(application, xheaders=config.xheaders, idle_connection_timeout=config.idle_timeout,
                      body_timeout=config.body_timeout, max_header_size=config.max_header_size,
                      table=ConnectionTable(cap, metrics, config.header_timeout),
                      admission_lag=config.admission_lag, admission_slice=config.admission_slice)
