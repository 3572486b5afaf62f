"""The WebSocket endpoint: checks before the upgrade, then decode and dispatch to the handler plugin.

Before the 101 every refusal is an HTTP status with a JSON body ``{"error", "reason"}``:
400/426 for a request that is not a WebSocket upgrade (400 too for a malformed ``join`` parameter),
503 while draining, 403 for a foreign Origin, 401 from the authenticator, 429 over a connection limit.
After the upgrade, problems are ``error`` frames or close codes from :mod:`wirehub.protocol`.
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

from tornado.websocket import WebSocketClosedError, WebSocketHandler, WebSocketProtocol

from wirehub.auth import AuthError, Identity
from wirehub.eager import Continued, Resumed
from wirehub.frames import Protocol
from wirehub.handler import BadUrlJoin, OpHandler, url_joins
from wirehub.protocol import SUBPROTOCOL, CloseCode, ErrorCode, close_reason
from wirehub.session import Session
from wirehub.transport import StreamTransport

if TYPE_CHECKING:
    from wirehub.app import Wirehub
    from wirehub.config import EndpointConfig
    from wirehub.handler import Handler

log = logging.getLogger("wirehub.session")

class SessionSide:
    """What a WebSocket connection does once upgraded, whichever path upgraded it: Tornado's
    :class:`WirehubSocket`, or the lean path (:class:`wirehub.upgrade.LeanSocket`)."""

    __slots__ = ("_expiry", "_messages_in", "_protocol", "app", "endpoint", "handler", "identity",
                 "session")

    def _setup(self, app: Wirehub, endpoint: EndpointConfig, handler: Handler) -> None:
        self.app = app
        self.endpoint = endpoint
        self.handler = handler
        #: set once admitted: counted in ``app.connections`` (its user and the remote IP) until released
        self.identity: Identity | None = None
        self.session: Session | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._protocol: Protocol | None = None
        # looked up once, and counted without a lock (folded in at scrape time)
        self._messages_in = app.metrics.messages_in_tally(endpoint.path)

    if TYPE_CHECKING:  # provided by the subclass (a stub here would shadow Tornado's close in the MRO)
        def close(self, code: int | None = None, reason: str | None = None) -> None: ...

        def _remote_ip(self) -> str: ...

    def _release(self) -> None:
        if self.identity is not None:
            self.app.connections.release(self.identity.user, self._remote_ip())
            self.identity = None

    def _start_session(self, protocol: Protocol, remote_ip: str, path: str,
                       joins: tuple[dict[str, Any], ...] = (), head: bytes | None = None) -> Awaitable[None] | None:
        """Open the session on ``protocol`` and run the open hooks eagerly: what is left of them when
        they suspend is returned, to be awaited before the first frame is read. ``joins`` are the upgrade
        URL's (:func:`wirehub.handler.url_joins`), handled by the handler's ``on_open``. ``head``, the 101
        not yet written (the lean path), leaves in one ``send`` with what the open hooks sent before their
        first suspension: the welcome and, on a bus that does not suspend, the URL joins' replies."""
        assert self.identity is not None
        protocol.set_nodelay(True)
        self._protocol = protocol
        transport = StreamTransport(protocol, self.close)
        if head is not None:
            transport.lead_with(head)  # flushed below, in this call
        session = Session(
            transport,
            self.identity,
            endpoint=self.endpoint.path,
            node=self.app.node,
            max_queue_bytes=self.app.config.server.send_queue_bytes,
            remote_ip=remote_ip,
            metrics=self.app.metrics,
            path=path,
        )
        self.session = session
        self.app.session_opened(session, self)
        if self.app.keepalive is not None:
            self.app.keepalive.add(protocol)
        session.on_identity_changed = self._schedule_expiry
        self._schedule_expiry()
        if joins and isinstance(self.handler, OpHandler):
            self.handler.give_url_joins(session, joins)
        coro = self._opened(session)
        try:
            first = coro.send(None)
        except StopIteration:
            first = _DONE
        if head is not None:
            transport.flush()
        if first is _DONE:
            return None
        # No frame is read until the open hooks are done (URL joins waiting for the bus, in a reconnect storm
        # maybe for long): the keepalive must not take the unread pong for a dead client meanwhile, as it does
        # not while a frame's handler works. _opened clears it.
        protocol.busy = True
        return Resumed(coro, first)

    async def _opened(self, session: Session) -> None:
        """The open hooks; one that raises closes the session with 1011 (reported by the app), and
        :meth:`on_close` then releases everything as for any other close."""
        try:
            try:
                await self.handler.on_open(session)
            except Exception as exc:
                self.app.handler_failed(session, "on_open", exc)
                session.close(CloseCode.INTERNAL)
                return
            if not await self.app.hooks.session_opened(session) and not session.closed:
                session.close(CloseCode.INTERNAL)
            elif isinstance(self.handler, OpHandler) and not session.closed:
                await self.handler.run_url_joins(session)
        finally:
            if self._protocol is not None:
                self._protocol.busy = False  # set while they were pending (_start_session)

    def on_message(self, message: str | bytes) -> Any:
        session = self.session
        if session is None or session.closed:
            return None
        self._messages_in.n += 1
        # Run the handler eagerly: most messages complete without suspending, and then need no
        # Task, and the next buffered frame is parsed in the same read callback (so the replies and
        # broadcasts of several frames leave in one send). Fairness between connections is the
        # frame reader's: one recv per callback, and a turn for the others after 256 KiB of work.
        coro = self._dispatch(session, message)
        # Its first step as the first item of its iterator: when it completes (no suspension: most frames), the loop
        # just ends, without the StopIteration that ``coro.send(None)`` raises (an exception, and for its traceback
        # a frame object of this function: about 1k instructions per frame).
        for first in coro.__await__():
            # a Task of its own: Tornado waits for it as is (an awaitable would get a wrapper coroutine and a
            # Task through gen.convert_yielded and asyncio.ensure_future: a third of a suspended join's dispatch)
            return asyncio.get_running_loop().create_task(Continued(coro, first))
        return None

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

    def _end_session(self, code: int | None, reason: str | None) -> None:
        """The connection is closed: release its counts and timers, and close the session."""
        if self._protocol is not None and self.app.keepalive is not None:
            self.app.keepalive.discard(self._protocol)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._release()
        session = self.session
        if session is None:
            return
        if session.close_code is not None:
            code = session.close_code
            reason = reason or close_reason(code)
        self.app.session_closing(session, self, code, reason)


class WirehubSocket(SessionSide, WebSocketHandler):  # type: ignore[misc]
    """One endpoint path. Collaborators arrive through :meth:`initialize`.

    wirehub's own attributes are slots: Tornado's handler and its WebSocket detach already set 27
    instance attributes, and past 30 names an instance dict stops sharing its keys with the class
    and costs about 1 kB more per connection.
    """

    __slots__ = ("_max_message_size", "_url_joins")

    def initialize(self, app: Wirehub, endpoint: EndpointConfig, handler: Handler,
                   max_message_size: int) -> None:
        self._setup(app, endpoint, handler)
        self._max_message_size = max_message_size
        self._url_joins: tuple[dict[str, Any], ...] = ()

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
            self._url_joins = url_joins(self.handler, self.request.query_arguments)
        except BadUrlJoin as exc:
            return self._refuse(400, "bad_request", str(exc))
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

    def _remote_ip(self) -> str:
        return self.request.remote_ip or ""

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
        return Protocol(self, False, _websocket_params(self.max_message_size))

    @property
    def max_message_size(self) -> int:
        return self._max_message_size

    @property
    def ping_interval(self) -> float | None:
        """None: Tornado's task per connection stays off; :class:`~wirehub.keepalive.Keepalive` pings
        for the whole app."""
        return None

    @property
    def ping_timeout(self) -> float | None:
        return None

    # -- the session ----------------------------------------------------------------------------------

    def open(self, *args: str, **kwargs: str) -> Awaitable[None] | None:
        # Not a coroutine: Tornado keeps what open() returns for the connection's life (a local of
        # its accept coroutine), and the open hooks usually complete without suspending.
        assert self.identity is not None and isinstance(self.ws_connection, Protocol)
        if self._on_close_called:  # gone before the 101 was out: on_close already ran, once
            self._release()
            return None
        joins, self._url_joins = self._url_joins, ()
        return self._start_session(self.ws_connection, self.request.remote_ip or "", self.request.path, joins)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        with contextlib.suppress(WebSocketClosedError):
            super().close(code, reason)

    def on_close(self) -> None:
        self._end_session(self.close_code, self.close_reason)


_NO_KWARGS: Mapping[str, Any] = types.MappingProxyType({})
#: what _start_session's eager step yields when the open hooks completed without suspending
_DONE = object()


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
