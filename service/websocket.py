"""The WebSocket endpoint: checks before the upgrade, then decode and dispatch to the handler plugin.

Before the 101 every refusal is an HTTP status with a JSON body ``{"error", "reason"}``:
400/426 for a request that is not a WebSocket upgrade, 503 while draining, 403 for a foreign
Origin, 401 from the authenticator, 429 over a connection limit. After the upgrade, problems are
``error`` frames or close codes from :mod:`service.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tornado.concurrent import Future
from tornado.websocket import WebSocketClosedError, WebSocketHandler, WebSocketProtocol, WebSocketProtocol13

from service.auth import AuthError, Identity
from service.protocol import SUBPROTOCOL, CloseCode, close_reason
from service.session import Session
from service.transport import StreamTransport

if TYPE_CHECKING:
    from service.app import Wirehub
    from service.config import EndpointConfig
    from service.handler import Handler

log = logging.getLogger("wirehub.session")

#: close codes a peer may send (RFC 6455 section 7.4); anything else fails the connection with 1002
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))


def _valid_close_code(code: int) -> bool:
    return code in _VALID_CLOSE or 3000 <= code <= 4999


class _Protocol(WebSocketProtocol13):
    """Tornado's protocol, failing the connection on invalid close frames and invalid UTF-8.

    Tornado echoes any close code back, and drops the TCP connection without a close frame on
    invalid UTF-8; RFC 6455 wants 1002 and 1007 (Autobahn cases 7.9.x, 7.3.2, 7.5.1 and 6.x).
    Once the server has sent its Close frame, data frames are dropped unread: the echo and the
    fan-out write through :class:`StreamTransport`, which Tornado's closing state does not stop,
    and nothing may follow a Close frame (section 5.5.1). tests/test_autobahn.py checks all this.
    """

    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        if self.client_terminated:
            return None
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
    """One endpoint path. Collaborators arrive through :meth:`initialize`."""

    def initialize(self, app: Wirehub, endpoint: EndpointConfig, handler: Handler,
                   max_message_size: int) -> None:
        self.app = app
        self.endpoint = endpoint
        self.handler = handler
        self._max_message_size = max_message_size
        self.identity: Identity | None = None
        self.session: Session | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._counted: tuple[str, str] | None = None
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
        return urlsplit(origin).netloc.lower() == host.lower()

    async def get(self, *args: Any, **kwargs: Any) -> None:
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
        remote_ip = self.request.remote_ip or ""
        limit = self.app.connections.admit(identity.user, remote_ip)
        if limit is not None:
            self.app.metrics.auth_failures.labels(limit).inc()
            self.set_header("Retry-After", "5")
            return self._refuse(429, "too_many_connections", limit)
        self._counted = (identity.user, remote_ip)
        self.identity = identity
        try:
            await super().get(*args, **kwargs)
        finally:
            if self.session is None and self._counted is not None and self.get_status() != 101:
                self.app.connections.release(*self._counted)
                self._counted = None

    def check_origin(self, origin: str) -> bool:
        return True  # checked in get(), with a JSON answer

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # Browsers may carry a token as "bearer.<token>" beside it; that one is never echoed.
        return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        if self.request.headers.get("Sec-WebSocket-Version") not in ("7", "8", "13"):
            return None
        params = _websocket_params(self)
        return _Protocol(self, False, params)

    @property
    def max_message_size(self) -> int:
        return self._max_message_size

    @property
    def ping_interval(self) -> float | None:
        return self.app.config.server.ping_interval or None

    @property
    def ping_timeout(self) -> float | None:
        return self.app.config.server.ping_timeout or None

    # -- the session ----------------------------------------------------------------------------------

    async def open(self, *args: str, **kwargs: str) -> None:
        assert self.identity is not None and self.ws_connection is not None
        self.set_nodelay(True)
        session = Session(
            StreamTransport(self.ws_connection, self.close),
            self.identity,
            endpoint=self.endpoint.path,
            node=self.app.node,
            max_queue_bytes=self.app.config.server.send_queue_bytes,
            remote_ip=self.request.remote_ip or "",
            metrics=self.app.metrics,
        )
        self.session = session
        self.app.session_opened(session, self)
        session.on_identity_changed = self._schedule_expiry
        self._schedule_expiry()
        await self.handler.on_open(session)
        await self.app.hooks.session_opened(session)

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
        except Exception:
            log.exception("handler %s failed on a message from %r", self.endpoint.handler, session)
            from service.protocol import ErrorCode

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
        if self._counted is not None:
            self.app.connections.release(*self._counted)
            self._counted = None
        session = self.session
        if session is None:
            return
        code, reason = self.close_code, self.close_reason
        if session.close_code is not None:
            code = session.close_code
            reason = reason or close_reason(code)
        self.app.session_closing(session, self, code, reason)


_EAGER_TURN = 16


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


def _websocket_params(handler: WebSocketHandler) -> Any:
    from tornado.websocket import _WebSocketParams

    return _WebSocketParams(
        ping_interval=handler.ping_interval,
        ping_timeout=handler.ping_timeout,
        max_message_size=handler.max_message_size,
        compression_options=None,  # no permessage-deflate: fan-out writes one encoding to everyone
    )
