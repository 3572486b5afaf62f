"""The WebSocket endpoint: checks before the upgrade, then decode and dispatch to the handler plugin.

Before the 101 every refusal is an HTTP status with a JSON body ``{"error", "reason"}``:
400/426 for a request that is not a WebSocket upgrade, 503 while draining, 403 for a foreign
Origin, 401 from the authenticator, 429 over a connection limit. After the upgrade, problems are
``error`` frames or close codes from :mod:`wirehub.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import types
from collections.abc import Awaitable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tornado.concurrent import Future
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler, WebSocketProtocol, WebSocketProtocol13

from wirehub.auth import AuthError, Identity
from wirehub.protocol import SUBPROTOCOL, CloseCode, ErrorCode, close_reason
from wirehub.session import Session
from wirehub.transport import StreamTransport

if TYPE_CHECKING:
    from wirehub.app import Wirehub
    from wirehub.config import EndpointConfig
    from wirehub.handler import Handler

log = logging.getLogger("wirehub.session")

#: close codes a peer may send (RFC 6455 section 7.4); anything else fails the connection with 1002
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))


def _valid_close_code(code: int) -> bool:
    return code in _VALID_CLOSE or 3000 <= code <= 4999


class _Protocol(WebSocketProtocol13):
    """Tornado's protocol, failing the connection on invalid close frames and invalid UTF-8, and with a
    1002 Close frame (not a bare TCP close) on frames Tornado rejects: oversized or fragmented control
    frames, reserved bits or opcodes.

    Tornado echoes any close code back, and drops the TCP connection without a close frame on
    invalid UTF-8; RFC 6455 wants 1002 and 1007 (Autobahn cases 7.9.x, 7.3.2, 7.5.1 and 6.x).
    Once the server has sent its Close frame, data frames are dropped unread: the echo and the
    fan-out write through :class:`StreamTransport`, which Tornado's closing state does not stop,
    and nothing may follow a Close frame (section 5.5.1). tests/test_autobahn.py checks all this.
    Every frame read sets ``_received_pong``: :class:`Keepalive` takes any frame as a sign of life.
    """

    #: the task parsing a frame header, while it does (see :meth:`_abort`)
    _parser: asyncio.Task[Any] | None = None

    async def _receive_frame(self) -> None:
        self._parser = asyncio.current_task()
        await super()._receive_frame()

    def _abort(self) -> None:
        # Tornado's frame parser aborts without a Close frame on a protocol violation: a control frame
        # over 125 bytes or fragmented, reserved bits, a continuation with nothing to continue. RFC 6455
        # wants 1002 first. Only aborts from the parser itself qualify (its task, before the frame is
        # handled, nothing sent yet): a keepalive or drain abort, a closed stream, 1009, stay plain aborts.
        if (self._parser is not None and self._parser is asyncio.current_task() and not self.server_terminated
                and self.stream is not None and not self.stream.closed()):
            self._parser = None
            self.client_terminated = True  # read nothing more: close the TCP connection right after ours
            self._fail(CloseCode.PROTOCOL_ERROR, "protocol error")
            return
        super()._abort()

    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        self._parser = None
        if self.client_terminated:
            return None
        # Tornado's "pong since the last ping" flag; here any frame counts (see Keepalive)
        self._received_pong = True
        if opcode == 0x8:
            problem = len(data) == 1
            if len(data) >= 2:
                problem = not _valid_close_code(int.from_bytes(data[:2], "big"))
                try:
                    data[2:].decode("utf-8")
                except UnicodeDecodeError:
                    problem = True
            if problem:
                self.client_terminated = True  # the peer is done: close the TCP connection right after ours
                self._fail(CloseCode.PROTOCOL_ERROR, "invalid close frame")
                return None
        elif opcode not in (0x1, 0x2, 0x9, 0xA):  # a reserved opcode: Tornado would abort with no Close frame
            self.client_terminated = True
            self._fail(CloseCode.PROTOCOL_ERROR, "reserved opcode")
            return None
        elif opcode in (0x1, 0x2) and self.server_terminated:
            return None  # our Close frame is out: no reply may follow it
        elif opcode == 0x1:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(1007, "invalid UTF-8")
                return None
            self._message_bytes_in += len(data)
            return self._run_callback(self.handler.on_message, text)
        return super()._handle_message(opcode, data)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        # Every Close frame, Tornado's own too (the reply to the client's, 1009, a keepalive drop),
        # goes after what the session corked in this loop iteration (transport.py's promise).
        session = self.handler.session if isinstance(self.handler, WirehubSocket) else None
        if session is not None and not self.server_terminated:
            flush = getattr(session.transport, "flush", None)
            if flush is not None:
                flush()
        super().close(code, reason)

    def _fail(self, code: int, reason: str) -> None:
        """Send a Close frame with ``code`` through the session, when there is one, so the session
        counts as closed at once: no room fan-out is written after the Close frame, and
        ``wirehub_session_closed`` reports ``code``."""
        session = self.handler.session if isinstance(self.handler, WirehubSocket) else None
        if session is not None and not session.closed:
            session.close(code, reason)
        else:
            self.close(code, reason)


class WirehubSocket(WebSocketHandler):
    """One endpoint path. Collaborators arrive through :meth:`initialize`.

    wirehub's own attributes are slots: Tornado's handler and its WebSocket detach already set 27
    instance attributes, and past 30 names an instance dict stops sharing its keys with the class
    and costs about 1 kB more per connection.
    """

    __slots__ = ("_eager_run", "_expiry", "_max_message_size", "app", "endpoint", "handler", "identity", "session")

    def initialize(self, app: Wirehub, endpoint: EndpointConfig, handler: Handler,
                   max_message_size: int) -> None:
        self.app = app
        self.endpoint = endpoint
        self.handler = handler
        self._max_message_size = max_message_size
        #: set once admitted: counted in ``app.connections`` (its user and the remote IP) until released
        self.identity: Identity | None = None
        self.session: Session | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._eager_run = 0

    # -- before the upgrade -------------------------------------------------------------------------

    def _refuse(self, status: int, error: str, reason: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish({"error": error, "reason": reason})

    def _origin_allowed(self, origin: str) -> bool:
        allowed = self.app.config.server.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        if allowed:
            return False
        host = self.request.headers.get("Host", "")
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:  # such as "http://[::1": no origin we could allow
            return False
        return netloc.lower() == host.lower()

    async def prepare(self) -> None:
        """The checks before the upgrade (a refusal finishes the request: :meth:`get` is not called)."""
        if self.request.method != "GET":
            return  # Tornado answers 405
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket":
            self.set_header("Upgrade", "websocket")
            return self._refuse(426, "upgrade_required", "this endpoint only speaks WebSocket")
        if "upgrade" not in (s.strip().lower() for s in headers.get("Connection", "").split(",")):
            return self._refuse(400, "bad_request", "the Connection header must include Upgrade")
        if self.app.draining:
            self.set_header("Retry-After", "1")
            return self._refuse(503, "unavailable", "draining")
        origin = headers.get("Origin") or headers.get("Sec-Websocket-Origin")
        if origin is not None and not self._origin_allowed(origin):
            self.app.metrics.auth_failures.labels("origin").inc()
            return self._refuse(403, "forbidden_origin", "origin not allowed")
        try:
            identity = await self.app.authenticator.authenticate(self.request)
        except AuthError as exc:
            self.app.metrics.auth_failures.labels(exc.reason).inc()
            log.info("refused upgrade on %s from %s: %s", self.request.path, self.request.remote_ip, exc)
            if exc.status == 401:
                self.set_header("WWW-Authenticate", f'Bearer realm="wirehub", error="{exc.error}"')
            return self._refuse(exc.status, exc.error, exc.reason)
        except Exception as exc:  # a broken authenticator plugin: reported, and nothing was counted yet
            self.app.hooks.failures.report(self.app.auth_plugin, "authenticate", exc)
            return self._refuse(500, "internal", "internal error")
        if self._on_close_called:
            return  # the client went away during authentication: nothing to count, no session to open
        limit = self.app.connections.admit(identity.user, self.request.remote_ip or "")
        if limit is not None:
            self.app.metrics.auth_failures.labels(limit).inc()
            self.set_header("Retry-After", "5")
            return self._refuse(429, "too_many_connections", limit)
        self.identity = identity

    def get(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, None]:
        """Tornado's ``get`` less the checks :meth:`prepare` made, and not a coroutine itself.

        Tornado's ``_execute`` awaits what ``get`` returns for the connection's whole life: here that
        is the protocol's accept coroutine itself, with no ``get`` frame (and its locals) suspended
        above it for as long.
        """
        self.open_args = args
        self.open_kwargs = kwargs or _NO_KWARGS  # type: ignore[assignment]  # kept for the connection's life
        self.ws_connection = self.get_websocket_protocol()
        if self.ws_connection is None:
            return self._unsupported_version()
        return self.ws_connection.accept_connection(self)

    async def _unsupported_version(self) -> None:
        self.set_status(426, "Upgrade Required")
        self.set_header("Sec-WebSocket-Version", "7, 8, 13")
        await self.finish()

    def _release(self) -> None:
        if self.identity is not None:
            self.app.connections.release(self.identity.user, self.request.remote_ip or "")
            self.identity = None

    def on_finish(self) -> None:
        # The HTTP response is complete: the 101, or Tornado's own refusal of an upgrade that passed
        # prepare() (400 for missing WebSocket headers, 426 for an unknown version), which releases
        # the connection count. After a 101 on_close() releases it.
        if self.get_status() != 101:
            self._release()

    def check_origin(self, origin: str) -> bool:
        return True  # checked in prepare(), with a JSON answer

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # Browsers may carry a token as "bearer.<token>" beside it; that one is never echoed.
        return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        if self.request.headers.get("Sec-WebSocket-Version") not in ("7", "8", "13"):
            return None
        return _Protocol(self, False, _websocket_params(self.max_message_size))

    @property
    def max_message_size(self) -> int:
        return self._max_message_size

    @property
    def ping_interval(self) -> float | None:
        """None: Tornado's task per connection stays off; :class:`Keepalive` pings for the whole app."""
        return None

    @property
    def ping_timeout(self) -> float | None:
        return None

    # -- the session ----------------------------------------------------------------------------------

    def open(self, *args: str, **kwargs: str) -> Awaitable[None] | None:
        # Not a coroutine: Tornado keeps what open() returns for the connection's life (a local of
        # its accept coroutine), and the open hooks usually complete without suspending.
        assert self.identity is not None and self.ws_connection is not None
        if self._on_close_called:  # gone before the 101 was out: on_close already ran, once
            self._release()
            return None
        self.set_nodelay(True)
        session = Session(
            StreamTransport(self.ws_connection, self.close),
            self.identity,
            endpoint=self.endpoint.path,
            node=self.app.node,
            max_queue_bytes=self.app.config.server.send_queue_bytes,
            remote_ip=self.request.remote_ip or "",
            metrics=self.app.metrics,
            path=self.request.path,
        )
        self.session = session
        self.app.session_opened(session, self)
        session.on_identity_changed = self._schedule_expiry
        self._schedule_expiry()
        coro = self._opened(session)
        try:
            first = coro.send(None)
        except StopIteration:
            return None
        return _Resumed(coro, first)

    async def _opened(self, session: Session) -> None:
        """The open hooks; one that raises closes the session with 1011 (reported by the app), and
        :meth:`on_close` then releases everything as for any other close."""
        try:
            await self.handler.on_open(session)
        except Exception as exc:
            self.app.handler_failed(session, "on_open", exc)
            session.close(CloseCode.INTERNAL)
            return
        if not await self.app.hooks.session_opened(session) and not session.closed:
            session.close(CloseCode.INTERNAL)

    def on_message(self, message: str | bytes) -> Any:
        session = self.session
        if session is None or session.closed:
            return None
        self.app.metrics.messages_in.labels(self.endpoint.path).inc()
        # Run the handler eagerly: most messages complete without suspending, and then need no
        # Task, and the next buffered frame is read in the same loop iteration (so the replies and
        # broadcasts of several frames leave in one send). Every _EAGER_TURN frames in a row the
        # connection yields to the loop once, so one busy client cannot starve the others.
        coro = self._dispatch(session, message)
        try:
            first = coro.send(None)
        except StopIteration:
            self._eager_run += 1
            if self._eager_run < _EAGER_TURN:
                return None
            self._eager_run = 0
            return asyncio.sleep(0)
        self._eager_run = 0
        return _Resumed(coro, first)

    async def _dispatch(self, session: Session, message: str | bytes) -> None:
        try:
            await self.handler.on_message(session, message)
        except Exception as exc:
            self.app.handler_failed(session, "on_message", exc)
            session.send_error(ErrorCode.INTERNAL, "internal error")

    def _schedule_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        session = self.session
        if session is None or session.identity.expires_at is None:
            return
        grace = float(getattr(self.app.authenticator, "expiry_grace", 0.0))
        delay = max(0.0, session.identity.expires_at + grace - time.time())
        self._expiry = asyncio.get_running_loop().call_later(delay, self._check_expiry)

    def _check_expiry(self) -> None:
        session = self.session
        self._expiry = None
        if session is None or session.closed:
            return
        grace = float(getattr(self.app.authenticator, "expiry_grace", 0.0))
        expires_at = session.identity.expires_at
        if expires_at is not None and expires_at + grace <= time.time():
            session.close(CloseCode.TOKEN_EXPIRED)
        else:
            self._schedule_expiry()  # refreshed meanwhile

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        with contextlib.suppress(WebSocketClosedError):
            super().close(code, reason)

    def on_close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._release()
        session = self.session
        if session is None:
            return
        code, reason = self.close_code, self.close_reason
        if session.close_code is not None:
            code = session.close_code
            reason = reason or close_reason(code)
        self.app.session_closing(session, self, code, reason)


_EAGER_TURN = 16
_NO_KWARGS: Mapping[str, Any] = types.MappingProxyType({})


class _Resumed:
    """Awaits the rest of a coroutine that was started eagerly and suspended on ``first``."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Any:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # thrown into the awaiting task: pass it on
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class Keepalive:
    """WebSocket pings for every connection of a replica, from one timer instead of a task each.

    Each connection gets a ping every ``interval`` seconds; one that sent nothing (no pong, and no
    other frame either) within ``timeout`` seconds of a ping is dropped: a Close frame 1000 "ping
    timed out", and the TCP connection closed at once. ``timeout`` 0 means ``interval``, as with
    Tornado's own pings, which this replaces (``server.ping_interval`` / ``server.ping_timeout``).

    The connections are split into :attr:`SLICES` groups by session id, and one group is pinged
    every ``interval / SLICES`` seconds, so 10,000 connections are not pinged in one loop
    iteration; a new connection gets its first ping within ``interval`` of opening.
    """

    SLICES = 16

    def __init__(self, sessions: Mapping[Session, WirehubSocket], interval: float, timeout: float) -> None:
        self._sessions = sessions
        self.interval = interval
        self.timeout = timeout or interval
        self._step = interval / self.SLICES
        self._slice = 0
        self._next = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: per slice: the timer of the check of its last ping, and the connections pinged
        self._checks: list[tuple[asyncio.TimerHandle, list[_Protocol]] | None] = [None] * self.SLICES

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
        slices = self.SLICES
        pinged: list[_Protocol] = []
        for session, socket_handler in self._sessions.items():
            if hash(session.id) % slices != n:
                continue
            ws = socket_handler.ws_connection
            if not isinstance(ws, _Protocol) or ws.is_closing():
                continue
            ws._received_pong = False
            try:
                ws.write_ping(b"")
            except StreamClosedError:
                continue
            pinged.append(ws)
        if pinged:
            self._checks[n] = (asyncio.get_running_loop().call_later(self.timeout, self._check, n), pinged)
        return len(pinged)

    def _check(self, n: int) -> None:
        pending, self._checks[n] = self._checks[n], None
        if pending is None:
            return
        for ws in pending[1]:
            if not ws._received_pong and not ws.is_closing():
                session = ws.handler.session if isinstance(ws.handler, WirehubSocket) else None
                log.info("no pong within %gs from %r: dropping the connection", self.timeout, session)
                if session is not None and session.close_code is None:
                    session.close_code = CloseCode.NORMAL  # recorded for the metric and the close hook
                ws.close(CloseCode.NORMAL, "ping timed out")
                ws._abort()


@functools.cache
def _websocket_params(max_message_size: int) -> Any:
    """Tornado's per-connection protocol parameters, shared by the connections with the same size
    limit (Tornado only reads them)."""
    from tornado.websocket import _WebSocketParams

    return _WebSocketParams(
        ping_interval=None,  # Keepalive pings, not a task per connection
        ping_timeout=None,
        max_message_size=max_message_size,
        compression_options=None,  # no permessage-deflate: fan-out writes one encoding to everyone
    )
