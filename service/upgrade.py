"""The lean upgrade path: a WebSocket handshake without Tornado's RequestHandler.

Tornado serves an upgrade through a full ``RequestHandler`` (response headers with a Date, the
``_execute`` task awaiting the connection for its whole life, the request kept alive in it) and
that was most of what a connection cost, and its HTTP/1 connection (a task per connection, header
parsing) most of the rest. Here, the first head of a new connection, read by the accept path, is looked
at first (:meth:`LeanRouter.take_head`, with service/head.py's strict reader), and the head of every
request Tornado reads next (:class:`UpgradeDelegate`): a well-formed RFC 6455 version 13 upgrade for an
endpoint, whose Origin is allowed and while the replica is not draining, is upgraded right here. The same checks
as :class:`~wirehub.websocket.WirehubSocket` run, in the same order, with the same answers (the
authenticator's refusal, 500 for a broken authenticator, 429 over a connection limit), then the 101
is written, the HTTP connection is detached and the frames are read by
:class:`~wirehub.frames.Protocol` for a :class:`LeanSocket` (slots only).

Everything else, plain HTTP and every refusal before authentication (not an upgrade, a foreign
Origin, draining, an old WebSocket version), goes to Tornado's application unchanged: its answers
are the documented ones. A first head refused after authentication is replayed into Tornado's path
with the outcome (:class:`_Handover`), which answers it as before without authenticating again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Coroutine, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tornado import httputil
from tornado.escape import parse_qs_bytes
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream

from wirehub.accept import EdgeServer, EdgeStream
from wirehub.auth import AuthError
from wirehub.eager import Continued
from wirehub.frames import Protocol
from wirehub.handler import BadUrlJoin, url_joins
from wirehub.head import parse_head
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
        #: handshakes whose authentication suspended and frame readers whose open hooks suspended (most
        #: never do), held until they are done
        self.handshakes: set[asyncio.Future[None]] = set()
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

    def take_head(self, server: EdgeServer, stream: EdgeStream, address: Any, head: bytes) -> bool:
        """The accept path's first request head on a new connection: True when it is a version-13 upgrade
        served here; False for anything else, which the caller then hands to Tornado as it arrived."""
        started = time.monotonic()
        parsed = parse_head(head)
        if parsed is None:
            return False
        start_line, headers, fields = parsed  # the checks read ``fields``: no name normalised per lookup
        app = self.app
        path = start_line.path.partition("?")[0]
        target = self.find(path)
        if target is None or app.draining or not _is_upgrade(start_line, fields):
            return False
        origin = fields.get("Origin") or fields.get("Sec-Websocket-Origin")
        if origin is not None and not _origin_allowed(app, origin, fields.get("Host", "")):
            return False
        connection = server.head_connection(stream, address, headers)
        host = fields["Host"]  # _is_upgrade checked it is there
        try:
            if _PLAIN_HOST.fullmatch(host):
                request: httputil.HTTPServerRequest = _PlainRequest(connection, start_line, headers, host)
            else:
                request = httputil.HTTPServerRequest(connection=connection, start_line=start_line, headers=headers)
            joins = url_joins(target.handler, request.query_arguments)
        except (httputil.HTTPInputError, BadUrlJoin):
            # such as a Host header or a query Tornado refuses, or a malformed join: Tornado's path answers it
            # (400 with a JSON body), as documented
            return False
        _run_eagerly(self._handshake(server, stream, address, head, target, request, path, started, joins),
                     self.handshakes)
        return True

    async def _handshake(self, server: EdgeServer, stream: EdgeStream, address: Any, head: bytes,
                         target: _Target, request: httputil.HTTPServerRequest, path: str, started: float,
                         joins: tuple[dict[str, Any], ...]) -> None:
        app = self.app
        remote_ip = request.remote_ip or ""
        try:
            identity, refusal = await _authenticate(app, request)
            if stream.closed():  # the client went away during authentication: no session to open
                if refusal is not None:
                    _refusal(app, refusal, path, remote_ip)  # counted and logged as on Tornado's path
                return
            if refusal is None:
                limit = app.connections.admit(identity.user, remote_ip)
                if limit is None:
                    _open(app, target, identity, remote_ip, stream, request.headers, path, started,
                          self.handshakes, joins)
                    return
            # A refusal is answered by Tornado's path (UpgradeDelegate), which then serves the connection's
            # next requests as keep-alive; it takes the outcome instead of authenticating again.
            stream.handover = _Handover(identity, refusal)
            server.replay(stream, address, head)
        except Exception:
            log.exception("upgrade on %s from %s failed", path, remote_ip)
            stream.close()

    def on_close(self, server_conn: object) -> None:
        self.application.on_close(server_conn)


def _is_upgrade(start_line: httputil.RequestStartLine, headers: Mapping[str, str]) -> bool:
    """Names are given in Http-Header-Case, so that ``headers`` may also be a plain dict of such names."""
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
        conn = self.request_conn
        handed = None
        if isinstance(conn, HTTP1Connection) and isinstance(conn.stream, EdgeStream):
            # only the request the accept path handed on, the first on its connection, carries one
            handed, conn.stream.handover = conn.stream.handover, None
        path = start_line.path.partition("?")[0]
        target = self.router.find(path)
        if (target is None or app.draining or not isinstance(conn, HTTP1Connection)
                or not _is_upgrade(start_line, headers)):
            return self._pass(start_line, headers)
        origin = headers.get("Origin") or headers.get("Sec-Websocket-Origin")
        if origin is not None and not _origin_allowed(app, origin, headers.get("Host", "")):
            return self._pass(start_line, headers)  # Tornado's path refuses it (403) and counts it
        try:
            request = httputil.HTTPServerRequest(connection=conn, start_line=start_line, headers=headers)
            joins = url_joins(target.handler, request.query_arguments)
        except (httputil.HTTPInputError, BadUrlJoin):
            return self._pass(start_line, headers)  # Tornado's path answers it (400)
        return self._upgrade(target, request, path, handed if isinstance(handed, _Handover) else None, joins)

    async def _upgrade(self, target: _Target, request: httputil.HTTPServerRequest, path: str,
                       handed: _Handover | None, joins: tuple[dict[str, Any], ...]) -> None:
        app = self.router.app
        conn = self.request_conn
        assert isinstance(conn, HTTP1Connection)
        started = time.monotonic()
        headers = request.headers
        remote_ip = request.remote_ip or ""
        if handed is not None:  # the accept path authenticated this request and handed it on to refuse it here
            identity, refusal = handed.identity, handed.refusal
        else:
            identity, refusal = await _authenticate(app, request)
        if refusal is not None:
            status, error, reason, extra = _refusal(app, refusal, path, remote_ip)
            return self._refuse(status, error, reason, extra, path, remote_ip, started)
        if self.gone or conn.stream is None or conn.stream.closed():
            return  # the client went away during authentication: nothing to count, no session to open
        limit = app.connections.admit(identity.user, remote_ip)
        if limit is not None:
            app.metrics.auth_failures.labels(limit).inc()
            return self._refuse(429, "too_many_connections", limit, {"Retry-After": "5"}, path, remote_ip, started)
        stream = conn.detach()
        assert isinstance(stream, IOStream)
        _open(app, target, identity, remote_ip, stream, headers, path, started, self.router.handshakes, joins)

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


#: a Host header that Tornado's request accepts (a subset of its ABNF: a name or an IP, and a port)
_PLAIN_HOST = re.compile(r"(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")


class _PlainRequest(httputil.HTTPServerRequest):
    """What ``HTTPServerRequest.__init__`` makes of a plain upgrade head (a GET without a body, with a plain
    Host), set directly: its header lookups, Host checks and deep copy were a tenth of the lean path. A query
    string (a token, joins) is parsed as Tornado parses it, with the same field limit; its arguments are
    copied list by list (the values are bytes: a deep copy makes the same). tests/test_upgrade_head.py
    compares the two attribute by attribute."""

    def __init__(self, connection: httputil.HTTPConnection, start_line: httputil.RequestStartLine,
                 headers: httputil.HTTPHeaders, host: str) -> None:
        self.method, self.uri, self.version = start_line
        self.headers = headers
        self.body = b""
        context = connection.context  # type: ignore[attr-defined]
        self.remote_ip = context.remote_ip
        self.protocol = context.protocol
        self.host = host
        self.host_name = httputil.split_host_and_port(host.lower())[0]
        self.files = {}
        self.connection = connection
        self.server_connection = None
        self._start_time = time.time()
        self._finish_time = None
        self.path, _, self.query = start_line.path.partition("?")
        if self.query:
            try:
                self.arguments = parse_qs_bytes(self.query, keep_blank_values=True, max_num_fields=_max_query_fields())
            except Exception as exc:
                raise httputil.HTTPInputError(f"Invalid query string: {exc}") from exc
            self.query_arguments = {name: list(values) for name, values in self.arguments.items()}
        else:
            self.arguments = {}
            self.query_arguments = {}
        self.body_arguments = {}


def _max_query_fields() -> int | None:
    """Tornado's limit on query fields (6.5 on; read each time: an app may change it)."""
    config = getattr(httputil, "_DEFAULT_PARSE_BODY_CONFIG", None)
    return getattr(getattr(config, "urlencoded", None), "max_arguments", None)


class _Handover:
    """What the accept path learned of a request it hands to Tornado's path to be refused there."""

    __slots__ = ("identity", "refusal")

    def __init__(self, identity: Any, refusal: Exception | None) -> None:
        self.identity, self.refusal = identity, refusal


async def _authenticate(app: Wirehub, request: httputil.HTTPServerRequest) -> tuple[Any, Exception | None]:
    """The identity, or what the authenticator raised (an :class:`AuthError`, or a plugin's bug)."""
    try:
        return await app.authenticator.authenticate(request), None
    except Exception as exc:
        return None, exc


def _refusal(app: Wirehub, exc: Exception, path: str, remote_ip: str) -> tuple[int, str, str, dict[str, str]]:
    """Count and log a failed authentication; the answer's status, error, reason and extra headers."""
    if isinstance(exc, AuthError):
        app.metrics.auth_failures.labels(exc.reason).inc()
        log.info("refused upgrade on %s from %s: %s", path, remote_ip, exc)
        extra = {"WWW-Authenticate": f'Bearer realm="wirehub", error="{exc.error}"'} if exc.status == 401 else {}
        return exc.status, exc.error, exc.reason, extra
    # a broken authenticator plugin: reported, and nothing was counted yet
    app.hooks.failures.report(app.auth_plugin, "authenticate", exc)
    return 500, "internal", "internal error", {}


def _open(app: Wirehub, target: _Target, identity: Any, remote_ip: str, stream: IOStream,
          headers: httputil.HTTPHeaders, path: str, started: float, pending: set[asyncio.Future[None]],
          joins: tuple[dict[str, Any], ...] = ()) -> None:
    """Open the session on a detached stream, write the 101 with what the open hooks sent (the welcome, and
    the replies to the URL's ``joins`` when they did not suspend) in one ``send``, and start reading frames.
    A frame reader that still waits (open hooks that suspended) runs as a task held in ``pending`` until it
    is done."""
    key = headers["Sec-Websocket-Key"].encode()
    accept = base64.b64encode(hashlib.sha1(key + _MAGIC).digest())
    head = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n")
    offered = headers.get("Sec-Websocket-Protocol")
    if offered and SUBPROTOCOL in (s.strip() for s in offered.split(",")):
        # Browsers may carry a token as "bearer.<token>" beside it; that one is never echoed.
        head += b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\n"
    socket_side = LeanSocket(app, target, identity, remote_ip)
    protocol = Protocol(socket_side, False, target.params)
    protocol.stream = stream
    socket_side.ws_connection = protocol
    head += b"\r\n"
    if app.config.logging.access_log:
        access_log.info("%d %s %s %s %.1fms", 101, "GET", path, remote_ip, 1000 * (time.monotonic() - started))
    # The 101 goes out with the open hooks' first frames, straight to the kernel when the socket buffer is
    # empty (StreamTransport's flush, as with every frame); a send that fails closes the stream, and the frame
    # reader below then ends the session as for any connection lost.
    opened = socket_side._start_session(protocol, remote_ip, path, joins, head)
    reading = protocol._receive_frame_loop(opened)
    if not isinstance(reading, asyncio.Future):  # a coroutine: the usual case returns a done Future
        task = asyncio.ensure_future(reading)
        pending.add(task)
        task.add_done_callback(pending.discard)


def _run_eagerly(coro: Coroutine[Any, Any, None], tasks: set[asyncio.Future[None]]) -> None:
    """Run ``coro`` now, in this callback, and as a task only from its first real suspension on: most
    handshakes (the anonymous authenticator, a JWT checked against a known key) never suspend, and a
    task per handshake was a visible share of one. Such tasks are held in ``tasks`` until done."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return
    task = asyncio.get_running_loop().create_task(Continued(coro, yielded))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


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

    __slots__ = ("_closed", "close_code", "close_reason", "remote_ip", "ws_connection")

    def __init__(self, app: Wirehub, target: _Target, identity: Any, remote_ip: str) -> None:
        self._setup(app, target.endpoint, target.handler)
        self.identity = identity
        self.remote_ip = remote_ip
        self.ws_connection: Protocol | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
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
        self._end_session(close_code, close_reason)

    def on_ping(self, data: bytes) -> None:
        return None

    def on_pong(self, data: bytes) -> None:
        return None

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        log.error("WebSocket connection failed", exc_info=(typ, value, tb))
