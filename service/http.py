"""Plain HTTP on the service's port: health, readiness, metrics, plugin listing, JSON 404s."""

from __future__ import annotations

import json
import logging
import os
from types import TracebackType
from typing import TYPE_CHECKING, Any

import tornado.web

if TYPE_CHECKING:
    from wirehub.app import Wirehub

_log = logging.getLogger("wirehub.http")


class JsonHandler(tornado.web.RequestHandler):
    """Base of the core's HTTP handlers: every answer, errors included, is JSON."""

    def initialize(self, app: Wirehub | None = None) -> None:
        self.app = app

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def write_json(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        # A request that makes a handler fail can be repeated at will: one traceback per interval.
        if self.app is None or isinstance(value, tornado.web.HTTPError):
            return super().log_exception(typ, value, tb)
        self.app.logs.log(_log, logging.ERROR, "uncaught exception in %s %s", self.request.method,
                          self.request.path, exc_info=(typ, value, tb))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Tracebacks go to the log, never into the response.
        write_json_error(self, status_code)


def write_json_error(handler: tornado.web.RequestHandler, status_code: int) -> None:
    """The JSON body of an error answer (``send_error`` has set the status and cleared the headers)."""
    reason = {400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}.get(
        status_code, "error")
    handler.set_header("Content-Type", "application/json")
    handler.finish(json.dumps({"error": reason, "reason": handler._reason}))


class NotFoundHandler(JsonHandler):
    """Any unknown path, including WebSocket upgrades, gets 404 before any upgrade."""

    def prepare(self) -> None:
        self.write_json(404, {"error": "not_found", "reason": f"no route for {self.request.path}"})


class HealthHandler(JsonHandler):
    """Liveness: answers while the process serves its loop; with several workers, 503 naming any other worker
    of the pod whose loop is stuck (a probe reaches one worker, but a stuck one must fail the pod's probe)."""

    def get(self) -> None:
        assert self.app is not None
        stalled = self.app.stalled_workers()
        if stalled:
            self.write_json(503, {"status": "worker_stalled", "node": self.app.node, "stalled": stalled})
            return
        self.write_json(200, {"status": "ok", "node": self.app.node})


class ReadyHandler(JsonHandler):
    """Readiness: 503 until the bus is up, while it is down, while draining, and while another worker of the
    pod is stuck."""

    def get(self) -> None:
        app = self.app
        assert app is not None
        stalled = app.stalled_workers() if app.ready else []
        if app.ready and not stalled:
            self.write_json(200, {"status": "ready", "node": app.node})
            return
        if stalled:
            self.write_json(503, {"status": "not_ready", "reason": "worker_stalled", "node": app.node,
                                  "stalled": stalled})
            return
        reason = "draining" if app.draining else "starting" if not app.started else "bus_down"
        self.write_json(503, {"status": "not_ready", "reason": reason, "node": app.node})


class MetricsHandler(tornado.web.RequestHandler):
    def initialize(self, app: Wirehub) -> None:
        self.app = app

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.app.render_metrics())


class PluginsHandler(JsonHandler):
    """The loaded plugins, their sources, hooks and registered names (as ``wirehub plugins``)."""

    def get(self) -> None:
        assert self.app is not None
        self.write_json(200, {"plugins": [
            {"name": p.name, "source": p.source, "module": p.module, "hooks": list(p.hooks),
             "registers": {k: list(v) for k, v in p.registers.items()}}
            for p in self.app.hooks.describe()
        ]})


#: the demo page and the JS client (service/static/, shipped as package data)
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


#: path parts under static/ that the wheel leaves out (setup.cfg package_data), so never served
_UNSHIPPED = frozenset({"node_modules", "test"})


class StaticHandler(tornado.web.StaticFileHandler):
    """``/static/*`` and the demo page at ``/``; revalidated on every load (the client is small)."""

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Content-Type-Options", "nosniff")

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        # A path no file can have (a NUL byte: os.path.realpath raises ValueError) is not found, not a 500.
        try:
            valid = super().validate_absolute_path(root, absolute_path)
        except ValueError:
            raise tornado.web.HTTPError(404) from None
        # A source checkout serves what the wheel ships and no more: the JS package's tests, its
        # node_modules and dotfiles stay private (404, as in an installed wheel).
        parts = self.path.replace(os.sep, "/").split("/")  # as requested, not resolved: links don't matter
        if any(part in _UNSHIPPED or part.startswith(".") for part in parts):
            raise tornado.web.HTTPError(404)
        return valid

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        write_json_error(self, status_code)


def core_routes(app: Wirehub) -> list[Any]:
    from wirehub.publish import PublishHandler  # it subclasses JsonHandler from here
    from wirehub.sse import SseHandler

    kwargs = {"app": app}
    server = app.config.server
    routes: list[Any] = [
        (r"/healthz", HealthHandler, kwargs),
        (r"/readyz", ReadyHandler, kwargs),
        (r"/api/publish", PublishHandler, kwargs),
        (r"/sse", SseHandler, kwargs),
        (r"/static/(.*)", StaticHandler, {"path": STATIC_DIR}),
    ]
    if server.demo_page:
        routes.append((r"/()", StaticHandler, {"path": STATIC_DIR, "default_filename": "index.html"}))
    if server.plugin_listing:
        routes.append((r"/api/plugins", PluginsHandler, kwargs))
    if app.config.metrics.enabled:
        routes.append((r"/metrics", MetricsHandler, kwargs))
    return routes
