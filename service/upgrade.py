"""The lean upgrade path: a WebSocket handshake without Tornado's RequestHandler.

Tornado serves an upgrade through a full ``RequestHandler`` (response headers with a Date, the
``_execute`` task awaiting the connection for its whole life, the request kept alive in it) and
that was most of what a connection cost. Here, the request head of every new request is looked at
first (:class:`UpgradeDelegate`): a well-formed RFC 6455 version 13 upgrade for an endpoint, whose
Origin is allowed and while the replica is not draining, is upgraded right here. The same checks
as :class:`~wirehub.websocket.WirehubSocket` run, in the same order, with the same answers (the
authenticator's refusal, 500 for a broken authenticator, 429 over a connection limit), then the 101
is written, the HTTP connection is detached and the frames are read by
:class:`~wirehub.frames.Protocol` for a :class:`LeanSocket` (slots only).

Everything else, plain HTTP and every refusal before authentication (not an upgrade, a foreign
Origin, draining, an old WebSocket version), goes to Tornado's application unchanged: its answers
are the documented ones.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream

from wirehub.auth import AuthError
from wirehub.frames import Protocol
from wirehub.protocol import SUBPROTOCOL
from wirehub.websocket import SessionSide, _websocket_params

if TYPE_CHECKING:
    import tornado.web

    from wirehub.app import Wirehub
    from wirehub.config import EndpointConfig
    from wirehub.handler import Handler

log = logging.getLogger("wirehub.session")
access_log = logging.getLogger("wirehub.access")

_MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class _Target:
    """An endpoint as the lean path serves it."""

    __slots__ = ("endpoint", "handler", "params")

    def __init__(self, endpoint: EndpointConfig, handler: Handler, max_message_size: int) -> None:
        self.endpoint, self.handler = endpoint, handler
        self.params = _websocket_params(max_message_size)


class LeanRouter(httputil.HTTPServerConnectionDelegate):
    """Wraps the Tornado application: each request gets an :class:`UpgradeDelegate` first."""

    def __init__(self, application: tornado.web.Application, app: Wirehub) -> None:
        self.application = application
        self.app = app
        self.exact: dict[str, _Target] = {}
        self.prefixes: list[tuple[re.Pattern[str], _Target]] = []
        from wirehub.app import endpoint_pattern

        for ep in app.config.endpoints:
            max_size = int(ep.options.get("max_message_size", app.config.server.max_message_size))
            target = _Target(ep, app.handlers[ep.path], max_size)
            if ep.path.endswith("/*"):
                self.prefixes.append((re.compile(endpoint_pattern(ep.path)), target))
            else:
                self.exact[ep.path] = target

    def find(self, path: str) -> _Target | None:
        target = self.exact.get(path)
        if target is None:
            for pattern, candidate in self.prefixes:
                if pattern.match(path):
                    return candidate
        return target

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return UpgradeDelegate(self, server_conn, request_conn)

    def on_close(self, server_conn: object) -> None:
        self.application.on_close(server_conn)


def _is_upgrade(start_line: httputil.RequestStartLine, headers: httputil.HTTPHeaders) -> bool:
    if start_line.method != "GET" or headers.get("Sec-Websocket-Version") != "13":
        return False
    if headers.get("Upgrade", "").lower() != "websocket" or not headers.get("Sec-Websocket-Key"):
        return False
    if not headers.get("Host"):
        return False
    return "upgrade" in (s.strip().lower() for s in headers.get("Connection", "").split(","))


class UpgradeDelegate(httputil.HTTPMessageDelegate):
    """One request: upgraded here (see the module docstring), or passed on to Tornado."""

    __slots__ = ("gone", "inner", "request_conn", "router", "server_conn")

    def __init__(self, router: LeanRouter, server_conn: object, request_conn: httputil.HTTPConnection) -> None:
        self.router, self.server_conn, self.request_conn = router, server_conn, request_conn
        self.inner: httputil.HTTPMessageDelegate | None = None
        self.gone = False

    def _pass(self, start_line: httputil.RequestStartLine,
              headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.inner = self.router.application.start_request(self.server_conn, self.request_conn)
        return self.inner.headers_received(start_line, headers)

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        app = self.router.app
        path = start_line.path.partition("?")[0]
        target = self.router.find(path)
        if (target is None or app.draining or not isinstance(self.request_conn, HTTP1Connection)
                or not _is_upgrade(start_line, headers)):
            return self._pass(start_line, headers)
        origin = headers.get("Origin") or headers.get("Sec-Websocket-Origin")
        if origin is not None and not _origin_allowed(app, origin, headers.get("Host", "")):
            return self._pass(start_line, headers)  # Tornado's path refuses it (403) and counts it
        return self._upgrade(target, start_line, headers, path)

    async def _upgrade(self, target: _Target, start_line: httputil.RequestStartLine,
                       headers: httputil.HTTPHeaders, path: str) -> None:
        app = self.router.app
        conn = self.request_conn
        assert isinstance(conn, HTTP1Connection)
        started = time.monotonic()
        request = httputil.HTTPServerRequest(connection=conn, start_line=start_line, headers=headers)
        remote_ip = request.remote_ip or ""
        try:
            identity = await app.authenticator.authenticate(request)
        except AuthError as exc:
            app.metrics.auth_failures.labels(exc.reason).inc()
            log.info("refused upgrade on %s from %s: %s", path, remote_ip, exc)
            extra = {"WWW-Authenticate": f'Bearer realm="wirehub", error="{exc.error}"'} if exc.status == 401 else {}
            return self._refuse(exc.status, exc.error, exc.reason, extra, path, remote_ip, started)
        except Exception as exc:  # a broken authenticator plugin: reported, and nothing was counted yet
            app.hooks.failures.report(app.auth_plugin, "authenticate", exc)
            return self._refuse(500, "internal", "internal error", {}, path, remote_ip, started)
        if self.gone or conn.stream is None or conn.stream.closed():
            return  # the client went away during authentication: nothing to count, no session to open
        limit = app.connections.admit(identity.user, remote_ip)
        if limit is not None:
            app.metrics.auth_failures.labels(limit).inc()
            return self._refuse(429, "too_many_connections", limit, {"Retry-After": "5"}, path, remote_ip, started)
        key = headers["Sec-Websocket-Key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + _MAGIC).digest())
        head = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n")
        offered = headers.get("Sec-Websocket-Protocol")
        if offered and SUBPROTOCOL in (s.strip() for s in offered.split(",")):
            # Browsers may carry a token as "bearer.<token>" beside it; that one is never echoed.
            head += b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\n"
        stream = conn.detach()
        assert isinstance(stream, IOStream)
        socket_side = LeanSocket(app, target, identity, remote_ip)
        protocol = Protocol(socket_side, False, target.params)
        protocol.stream = stream
        socket_side.ws_connection = protocol
        try:
            stream.write(head + b"\r\n")
        except Exception:
            socket_side._release()
            stream.close()
            return
        if app.config.logging.access_log:
            access_log.info("%d %s %s %s %.1fms", 101, "GET", path, remote_ip, 1000 * (time.monotonic() - started))
        opened = socket_side._start_session(protocol, remote_ip, path)
        task = asyncio.ensure_future(protocol._receive_frame_loop(opened))
        socket_side.task = task

    def _refuse(self, status: int, error: str, reason: str, extra: dict[str, str], path: str, remote_ip: str,
                started: float) -> None:
        body = json.dumps({"error": error, "reason": reason}).encode()
        headers = httputil.HTTPHeaders({"Content-Type": "application/json", "Cache-Control": "no-store",
                                        "Content-Length": str(len(body)), **extra})
        self.request_conn.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", status, HTTPStatus(status).phrase), headers, body)
        self.request_conn.finish()
        if self.router.app.config.logging.access_log:
            level = logging.ERROR if status >= 500 and status != 503 else logging.WARNING
            access_log.log(level, "%d %s %s %s %.1fms", status, "GET", path, remote_ip,
                           1000 * (time.monotonic() - started))

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.inner.data_received(chunk) if self.inner is not None else None

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.finish()

    def on_connection_close(self) -> None:
        if self.inner is not None:
            self.inner.on_connection_close()
        else:
            self.gone = True


def _origin_allowed(app: Wirehub, origin: str, host: str) -> bool:
    allowed = app.config.server.allowed_origins
    if "*" in allowed or origin in allowed:
        return True
    if allowed:
        return False
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # such as "http://[::1": no origin we could allow
        return False
    return netloc.lower() == host.lower()


class LeanSocket(SessionSide):
    """What :class:`~wirehub.frames.Protocol` and the app need of an upgraded connection; slots only."""

    __slots__ = ("_closed", "close_code", "close_reason", "remote_ip", "task", "ws_connection")

    def __init__(self, app: Wirehub, target: _Target, identity: Any, remote_ip: str) -> None:
        self._setup(app, target.endpoint, target.handler)
        self.identity = identity
        self.remote_ip = remote_ip
        self.ws_connection: Protocol | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.task: asyncio.Future[None] | None = None
        self._closed = False

    def _remote_ip(self) -> str:
        return self.remote_ip

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if self.ws_connection is not None:
            self.ws_connection.close(code, reason)

    # what Tornado's protocol calls on its handler

    def on_ws_connection_close(self, close_code: int | None = None, close_reason: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_code, self.close_reason = close_code, close_reason
        self.ws_connection = None
        self.task = None
        self._end_session(close_code, close_reason)

    def on_ping(self, data: bytes) -> None:
        return None

    def on_pong(self, data: bytes) -> None:
        return None

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        log.error("WebSocket connection failed", exc_info=(typ, value, tb))
