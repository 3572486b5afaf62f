"""A plugin whose route collides with a core path: the startup must refuse it."""

from __future__ import annotations

from typing import Any

import tornado.web

from wirehub import hookimpl


class Shadow(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish("shadowed")


@hookimpl
def wirehub_routes(app: Any) -> list[tuple[str, type, dict[str, Any]]]:
    return [("/static/evil.js", Shadow, {})]
