"""Assembles one replica: plugins, backend, hub, handlers and the Tornado application; start and drain.

``Wirehub.build(config)`` does everything that needs no I/O (and so backs ``check-config``);
``start()`` starts the bus and listens; ``drain()`` is what SIGTERM runs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tornado.routing
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

import wirehub.logs
from wirehub import __version__, http
from wirehub.accept import make_server
from wirehub.bus import HistoryUsage
from wirehub.config import Config
from wirehub.event_loop import loop_name
from wirehub.handler import HandlerContext
from wirehub.hub import Hub
from wirehub.inflight import InFlight
from wirehub.keepalive import Keepalive
from wirehub.metrics import Metrics
from wirehub.plugins import PluginError, PluginHost, build_plugin_manager
from wirehub.protocol import CLOSE_REASONS, CloseCode, close_reason
from wirehub.upgrade import LeanRouter
from wirehub.websocket import SessionSide, WirehubSocket

if TYPE_CHECKING:
    from wirehub.auth import Authenticator
    from wirehub.bus import Backend
    from wirehub.handler import Handler
    from wirehub.session import Session

log = logging.getLogger("wirehub")
access_log = logging.getLogger("wirehub.access")

#: paths the core serves: a plugin route starting with one of them, or equal to "/", is refused
CORE_PATHS = ("/healthz", "/readyz", "/metrics", "/api/", "/sse", "/static/")


class ConnectionLimits:
    """Open connections per user and per client IP on this replica (0 = unlimited)."""

    def __init__(self, per_user: int, per_ip: int) -> None:
        self.per_user, self.per_ip = per_user, per_ip
        self.users: Counter[str] = Counter()
        self.ips: Counter[str] = Counter()

    def admit(self, user: str, ip: str) -> str | None:
        """Count a new connection, or return the reason it is over a limit."""
        if self.per_user and self.users[user] >= self.per_user:
            return "too_many_connections_for_user"
        if self.per_ip and self.ips[ip] >= self.per_ip:
            return "too_many_connections_from_ip"
        self.users[user] += 1
        self.ips[ip] += 1
        return None

    def release(self, user: str, ip: str) -> None:
        for counter, key in ((self.users, user), (self.ips, ip)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]


class Wirehub:
    """One replica. Attributes are the collaborators handlers get through ``initialize``."""

    def __init__(self, config: Config, hooks: PluginHost) -> None:
        self.config = config
        self.hooks = hooks
        self.node = config.node_id
        self.metrics = Metrics(ep.path for ep in config.endpoints)
        #: the body of GET /metrics (a worker of several answers for the whole pod: service/workers.py)
        self.render_metrics: Callable[[], bytes] = self.metrics.render
        #: the other workers of this pod whose event loop is stuck (service/workers.py); /healthz and /readyz
        #: answer 503 naming them. One process has no other
        self.stalled_workers: Callable[[], list[dict[str, object]]] = list
        hooks.failures.bind(self.metrics.plugin_errors)
        self.draining = False
        self._drain_running = False
        self._drain_started = 0.0
        self.started = False
        self.sessions: dict[Session, SessionSide] = {}
        #: per endpoint, its open-sessions gauge and opened counter (``labels()`` takes a lock and
        #: checks its arguments: a visible share of a handshake)
        self._session_series: dict[str, tuple[Any, Any]] = {}
        #: client-triggerable errors are logged through it: once per interval, with a count
        self.logs = wirehub.logs.LogLimiter(config.server.error_log_interval)
        #: WebSocket pings, one timer for all connections (None: server.ping_interval 0)
        self.keepalive = (Keepalive(config.server.ping_interval, config.server.ping_timeout)
                          if config.server.ping_interval else None)
        self._closing_tasks: set[asyncio.Task[None]] = set()
        self._all_closed = asyncio.Event()
        #: POST /api/publish requests being served; stop() waits for them before closing the bus
        self.api_requests = InFlight()
        #: set by stop(): the bus is about to close, so the publish API refuses (503, nothing published)
        self.stopping = False
        self.connections = ConnectionLimits(
            config.server.max_connections_per_user, config.server.max_connections_per_ip
        )
        registries = hooks.buses(), hooks.authenticators(), hooks.handlers()
        bus_factory = hooks.pick(registries[0], config.bus.plugin, "bus.plugin", "bus")
        auth_factory = hooks.pick(registries[1], config.auth.plugin, "auth.plugin", "authenticator")
        self.backend: Backend = bus_factory(config.bus.options, config.bus.key)
        self.authenticator: Authenticator = auth_factory(config.auth.options, config.auth.key)
        #: the name of the plugin that registered the authenticator (for failure reports)
        self.auth_plugin = registries[1][config.auth.plugin].plugin
        self.hub = Hub(self.backend, self.metrics)
        if isinstance(self.backend.history, HistoryUsage):
            self.metrics.track_history(self.backend.history)
        self.handlers: dict[str, Handler] = {}
        #: endpoint path -> the name of the plugin that registered its handler (for failure reports)
        self.handler_plugins: dict[str, str] = {}
        for i, ep in enumerate(config.endpoints):
            factory = hooks.pick(registries[2], ep.handler, f"endpoints[{i}].handler", "handler")
            self.handler_plugins[ep.path] = registries[2][ep.handler].plugin
            context = HandlerContext(
                config=config,
                endpoint=ep,
                hub=self.hub,
                backend=self.backend,
                hooks=hooks,
                authenticator=self.authenticator,
                metrics=self.metrics,
                node=self.node,
                logs=self.logs,
            )
            self.handlers[ep.path] = factory(ep.options, f"endpoints[{i}].options", context)
        self.application = self._make_application()
        self.server: HTTPServer | None = None
        self.port: int | None = None

    @classmethod
    def build(cls, config: Config) -> Wirehub:
        """Plugins, config hooks and every factory, with no I/O. Raises ConfigError or PluginError."""
        hooks = build_plugin_manager(config.plugins)
        hooks.configure(config)
        return cls(config, hooks)

    # -- the Tornado application ------------------------------------------------------------------------

    def _make_application(self) -> tornado.web.Application:
        routes: list[Any] = http.core_routes(self)
        for ep in self.config.endpoints:
            max_size = int(ep.options.get("max_message_size", self.config.server.max_message_size))
            kwargs = {"app": self, "endpoint": ep, "handler": self.handlers[ep.path], "max_message_size": max_size}
            routes.append((tornado.routing.PathMatches(endpoint_pattern(ep.path)), WirehubSocket, kwargs))
        taken = {ep.path for ep in self.config.endpoints}
        for plugin, (pattern, handler_cls, kwargs) in self.hooks.routes(self):
            if pattern in taken or pattern in ("/", "/()") or any(pattern.startswith(p) for p in CORE_PATHS):
                raise PluginError(f"plugin {plugin!r}: route {pattern!r} collides with a core route or endpoint")
            taken.add(pattern)
            routes.append((pattern, handler_cls, kwargs))
        return tornado.web.Application(
            routes,
            default_handler_class=http.NotFoundHandler,
            log_function=self._log_request,
            websocket_max_message_size=self.config.server.max_message_size,
            xheaders=self.config.server.xheaders,
            compress_response=False,
        )

    def _log_request(self, handler: tornado.web.RequestHandler) -> None:
        # Never the query string or headers: tokens travel there.
        if not self.config.logging.access_log or handler.request.path in ("/healthz", "/readyz"):
            return
        status = handler.get_status()
        # 503 is an answer we choose (draining, bus down), not a server fault
        level = logging.INFO if status < 400 else logging.ERROR if status >= 500 and status != 503 else logging.WARNING
        ms = 1000.0 * handler.request.request_time()
        access_log.log(level, "%d %s %s %s %.1fms", status, handler.request.method, handler.request.path,
                       handler.request.remote_ip, ms)

    # -- lifecycle --------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.backend.bus.healthy

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Start the bus, run startup hooks and listen (on ``sockets``, or host:port from config)."""
        await self.backend.bus.start(self.hub)
        self.hub.on_bus_state(self.backend.bus.healthy)
        await self.hooks.startup(self)
        if sockets is None:
            cfg = self.config.server
            sockets = bind_sockets(cfg.port, cfg.host or None, backlog=cfg.backlog)
        self.server = make_server(LeanRouter(self.application, self), self.config.server, self.metrics)
        self.server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        if self.keepalive is not None:
            self.keepalive.start()
        self.started = True
        loop = loop_name(asyncio.get_running_loop())
        self.metrics.build.info({"version": __version__, "event_loop": loop})
        log.info("wirehub node %s listening on port %d; %s; bus %s; event loop %s; endpoints: %s", self.node,
                 self.port, self.authenticator.describe(), self.config.bus.plugin, loop,
                 ", ".join(f"{ep.path} ({ep.handler})" for ep in self.config.endpoints))
        if not self.config.api.keys:
            log.info("publish API off: no api.keys (set WIREHUB_API_KEY or api.keys to turn it on)")

    def session_opened(self, session: Session, socket_handler: SessionSide) -> None:
        self.sessions[session] = socket_handler
        self._all_closed.clear()
        series = self._session_series.get(session.endpoint)
        if series is None:
            series = self._session_series[session.endpoint] = (self.metrics.sessions.labels(session.endpoint),
                                                               self.metrics.sessions_opened.labels(session.endpoint))
        series[0].inc()
        series[1].inc()
        if self.draining:  # its upgrade passed the draining check just before the drain began
            self._close_going_away(session)
        if log.isEnabledFor(logging.INFO):  # the extra dict is built for nothing at level warning
            log.info("session open %s user=%s endpoint=%s ip=%s", session.id, session.identity.user,
                     session.endpoint, session.remote_ip,
                     extra={"event": "session_open", "session": session.id, "user": session.identity.user,
                            "endpoint": session.endpoint, "ip": session.remote_ip})

    def session_closing(self, session: Session, socket_handler: SessionSide, code: int | None,
                        reason: str | None) -> None:
        task = asyncio.ensure_future(self._finish_session(session, code, reason))
        self._closing_tasks.add(task)
        task.add_done_callback(self._closing_tasks.discard)

    def handler_failed(self, session: Session, method: str, exc: BaseException) -> None:
        """The endpoint's handler raised out of ``method`` (``on_open``, ``on_message``, ``on_close``):
        one rate-limited log line naming its plugin, and ``wirehub_plugin_errors_total``."""
        self.hooks.failures.report(self.handler_plugins.get(session.endpoint, "?"), method, exc)

    async def _finish_session(self, session: Session, code: int | None, reason: str | None) -> None:
        try:
            await self.hub.leave_all(session)
            try:
                await self.handlers[session.endpoint].on_close(session)
            except Exception as exc:
                self.handler_failed(session, "on_close", exc)
        except Exception:
            log.exception("closing %r failed", session)
        finally:
            self.sessions.pop(session, None)
            series = self._session_series.get(session.endpoint)
            (series[0] if series is not None else self.metrics.sessions.labels(session.endpoint)).dec()
            # clients choose codes 3000-4999 freely: label those outside our table "other" (bounded series)
            label = str(code) if code is None or code < 3000 or code in CLOSE_REASONS else "other"
            self.metrics.session_closed(session.endpoint, label).inc()
            if self.draining:
                self.metrics.drain_remaining.set(len(self.sessions))
            if not self.sessions:
                self._all_closed.set()
            duration = time.time() - session.opened_at
            log.info("session close %s user=%s endpoint=%s code=%s duration=%.1fs", session.id,
                     session.identity.user, session.endpoint, code, duration,
                     extra={"event": "session_close", "session": session.id, "user": session.identity.user,
                            "endpoint": session.endpoint, "code": code, "duration": round(duration, 3)})
        await self.hooks.session_closed(session, code, reason)

    def begin_drain(self) -> None:
        """From now on /readyz answers 503 and upgrades are refused; :meth:`drain` does the rest.

        (``serve`` already sets ``draining`` in the Python-level signal handler, which runs before the
        event loop handles anything that arrived after the signal.)"""
        self.draining = True
        if self._drain_started:
            return
        self._drain_started = time.monotonic()
        self.metrics.draining.set(1)
        self.metrics.drain_remaining.set(len(self.sessions))

    def _close_going_away(self, session: Session) -> None:
        """Close with 1001 and a reconnect hint spread over ``drain.reconnect_jitter`` seconds, so that the
        clients of a draining replica do not all come back in the same second."""
        retry_ms = int(random.uniform(0.0, self.config.drain.reconnect_jitter) * 1000)
        session.close(CloseCode.GOING_AWAY, close_reason(CloseCode.GOING_AWAY, retry_ms))

    async def drain(self) -> None:
        """What SIGTERM runs; returns within ``drain.grace`` seconds of :meth:`begin_drain`.

        Readiness 503 and upgrades refused at once; open sessions closed in paced batches
        (``drain.batch_size`` every ``drain.batch_interval`` s, faster when that would not fit in half
        of the grace) with 1001 and a jittered ``retry_ms`` hint; Server-Sent Events streams end with a
        jittered ``retry:``. A close frame is queued behind the session's pending sends, so those are
        flushed first; the close handshakes are awaited until the grace (less a reserve for shutdown)
        is over, then the rest are aborted and the replica stops.
        """
        if self._drain_running:
            return
        self._drain_running = True
        self.begin_drain()
        cfg = self.config.drain
        deadline = self._drain_started + cfg.grace
        reserve = min(2.0, 0.1 * cfg.grace)  # for shutdown hooks and closing the bus
        pending = [s for s in self.sessions if s.close_code is None]
        total = len(pending)
        log.info("draining %d sessions (grace %.1fs)", total, cfg.grace)
        batches = -(-total // cfg.batch_size)
        interval = cfg.batch_interval
        if batches > 1:
            interval = min(interval, 0.5 * cfg.grace / (batches - 1))
        closed = 0
        while pending:
            batch, pending = pending[:cfg.batch_size], pending[cfg.batch_size:]
            for session in batch:
                self._close_going_away(session)
            closed += len(batch)
            log.info("drain: closing %d of %d sessions", closed, max(total, closed),
                     extra={"event": "drain_batch", "closing": closed, "total": max(total, closed)})
            if not pending:  # sessions whose upgrade was already past the draining check
                pending = [s for s in self.sessions if s.close_code is None]
            if pending and interval > 0 and time.monotonic() + interval < deadline - reserve:
                await asyncio.sleep(interval)
        from wirehub.sse import close_streams, open_streams  # Server-Sent Events streams end the same way

        streams = close_streams(self)
        if self.sessions:
            try:
                await asyncio.wait_for(self._all_closed.wait(), max(0.0, deadline - reserve - time.monotonic()))
            except TimeoutError:
                log.warning("drain grace over with %d sessions open; aborting them", len(self.sessions))
                for handler in list(self.sessions.values()):
                    if handler._protocol is not None:
                        handler._protocol._abort()
        # Each stream's handler finishes its response right after the hint; a bounded poll, as the SSE
        # module exposes no completion event.
        while open_streams(self) and time.monotonic() < deadline - reserve:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self._closing_tasks:
            await asyncio.wait(list(self._closing_tasks), timeout=max(0.1, deadline - time.monotonic()))
        log.info("drained %d sessions and %d event streams in %.1fs", total, streams,
                 time.monotonic() - self._drain_started)
        await self.stop(in_flight_timeout=max(0.1, deadline - 0.5 * reserve - time.monotonic()))

    async def stop(self, in_flight_timeout: float = 5.0) -> None:
        """Stop listening, wait (up to ``in_flight_timeout`` s) for publish API requests and chat
        publishes in flight, run shutdown hooks and close the bus. Idempotent.

        Waiting matters: a publish that reached the bus must be answered as published, not with
        the failure a closed bus would give it (see the publish API's outcomes in publish.py).
        """
        self.stopping = True  # from now the publish API answers 503 before publishing anything
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.keepalive is not None:
            self.keepalive.stop()
        if self._closing_tasks:
            await asyncio.wait(list(self._closing_tasks), timeout=5)
        await self._wait_in_flight(in_flight_timeout)
        if self.started:
            self.started = False
            await self.hooks.shutdown(self)
            await self.hub.close()
            await self.backend.bus.close()


    async def _wait_in_flight(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        requests_done = await self.api_requests.wait(timeout)
        publishes_done = await self.hub.publishing.wait(deadline - time.monotonic())
        if requests_done and publishes_done:
            return
        log.warning("stopping with %d publish API requests and %d publishes still in flight after %.1fs; "
                    "their publishers get 504 timeout or 503 unavailable", self.api_requests.count,
                    self.hub.publishing.count, timeout)


def endpoint_pattern(path: str) -> str:
    """The route regex of an endpoint path: exact, or a prefix for a path ending in ``/*``
    (``/ws/yjs/*`` serves ``/ws/yjs/<anything>``; the handler reads the rest from ``session.path``)."""
    import re

    if path.endswith("/*"):
        return re.escape(path[:-1]) + ".+$"
    return re.escape(path) + "$"

