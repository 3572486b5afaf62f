"""Records lifecycle hook calls and adds an HTTP route, for the core's tests."""

from __future__ import annotations

from typing import Any

import tornado.web

from wirehub import hookimpl

CALLS: list[tuple[str, Any]] = []


class HelloHandler(tornado.web.RequestHandler):
    def initialize(self, greeting: str) -> None:
        self.greeting = greeting

    def get(self) -> None:
        self.finish({"hello": self.greeting})


@hookimpl
def wirehub_configure(config: Any) -> None:
    CALLS.append(("configure", dict(config.extensions.get("lifecycle", {}))))


@hookimpl
def wirehub_routes(app: Any) -> list[tuple[str, type, dict[str, Any]]]:
    return [("/hello", HelloHandler, {"greeting": app.node})]


@hookimpl
async def wirehub_startup(app: Any) -> None:
    CALLS.append(("startup", app.node))


@hookimpl
async def wirehub_shutdown(app: Any) -> None:
    CALLS.append(("shutdown", app.node))


@hookimpl
def wirehub_session_opened(session: Any) -> None:
    CALLS.append(("opened", session.endpoint))


@hookimpl
async def wirehub_session_closed(session: Any, code: int | None) -> None:
    CALLS.append(("closed", code))
