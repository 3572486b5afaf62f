"""Runs the JS client package's tests (``npm test`` in service/static/wirehub-client: ``tsc`` type-checks the
JSDoc with ``strict`` on, then Node's built-in runner runs test/*.test.mjs) against real servers.

The package's devDependencies (TypeScript) are pinned in its package-lock.json and installed there with
``npm ci`` when node_modules is missing (the registry is reachable in CI).

This test starts two real wirehub servers in this process (anonymous auth, and JWT auth) plus a
small control endpoint the JS tests use to make the server do what it does in production: close a
session with a close code and reconnect hint (as a drain, a slow consumer, an expired token or a
policy would), restart (drain, then a fresh server on the same port), or hang for a moment (its
event loop blocked, as a stuck process). Nothing about the
protocol is mocked: the client talks to wirehub.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

import wirehub
from wirehub.app import Wirehub
from wirehub.config import config_from_dict
from wirehub.protocol import close_reason
from wirehub.testing import config_for_tests, free_port

PACKAGE = Path(__file__).parent.parent / "service" / "static" / "wirehub-client"
SECRET = "j" * 40
INSTALL = "apt-get install -y nodejs  (Node 20+; .ci/run installs it)"
#: the default endpoints (big-* chat rooms list 3 members in joined and batch presence events: presence.test.mjs),
#: plus a chat endpoint whose publish rate lets one test publish hundreds a second
ENDPOINTS = [
    {"path": "/ws/echo", "handler": "echo"},
    {"path": "/ws/chat", "handler": "chat", "options": {"presence_rules": [
        {"pattern": "big-*", "events": "batched", "interval": 0.2, "presence_limit": 3}]}},
    {"path": "/ws/game", "handler": "game"},
    {"path": "/ws/fastchat", "handler": "chat", "options": {"publish_rate": 5000, "publish_burst": 5000}},
]


class Servers:
    """The anonymous and JWT servers, restartable on their ports."""

    def __init__(self) -> None:
        self.ports = {"anon": free_port(), "jwt": free_port()}
        self.apps: dict[str, Wirehub] = {}

    def config(self, kind: str) -> Any:
        overrides: dict[str, Any] = {"server": {"port": self.ports[kind]},
                                     "drain": {"grace": 2, "reconnect_jitter": 0.2},
                                     "endpoints": ENDPOINTS}
        if kind == "jwt":
            overrides["auth"] = {"plugin": "jwt", "jwt": {"algorithms": ["HS256"], "secret": SECRET,
                                                          "leeway": 0, "expiry_grace": 0}}
        return config_from_dict(config_for_tests(overrides), source=f"<js-{kind}>")

    async def start(self, kind: str) -> None:
        app = Wirehub.build(self.config(kind))
        await app.start(bind_sockets(self.ports[kind], "127.0.0.1"))
        self.apps[kind] = app

    async def stop(self) -> None:
        for app in self.apps.values():
            await app.stop()


class ControlHandler(tornado.web.RequestHandler):
    def initialize(self, servers: Servers) -> None:
        self.servers = servers

    async def post(self, action: str) -> None:
        body = json.loads(self.request.body or b"{}")
        kind = body.get("server", "anon")
        app = self.servers.apps[kind]
        if action == "close":
            closed = 0
            for session in list(app.sessions):
                if session.identity.user == body["user"]:
                    retry = body.get("retry_ms")
                    session.close(int(body["code"]), close_reason(int(body["code"]), retry))
                    closed += 1
            self.finish({"closed": closed})
        elif action == "freeze":
            # The whole server stops answering for a moment (a hung process): its event loop is blocked.
            self.finish({"frozen": _hang(float(body.get("seconds", 1.0)))})
        elif action == "restart":
            await app.drain()
            await self.servers.start(kind)
            self.finish({"restarted": kind})
        else:
            self.set_status(404)
            self.finish({"error": action})


def _hang(seconds: float) -> float:
    seconds = min(seconds, 3.0)
    time.sleep(seconds)
    return seconds


@pytest.fixture
async def servers() -> AsyncIterator[tuple[Servers, int]]:
    servers = Servers()
    await servers.start("anon")
    await servers.start("jwt")
    control = HTTPServer(tornado.web.Application([(r"/(\w+)", ControlHandler, {"servers": servers})]))
    sockets = bind_sockets(0, "127.0.0.1")
    control.add_sockets(sockets)
    try:
        yield servers, sockets[0].getsockname()[1]
    finally:
        control.stop()
        await servers.stop()


def node_binary() -> str | None:
    return shutil.which("node")


def npm_install(npm: str) -> None:
    """``npm ci`` into the package when its node_modules is missing."""
    if (PACKAGE / "node_modules" / "typescript" / "package.json").is_file():
        return
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=PACKAGE, check=True, timeout=300,
                   capture_output=True)


async def test_js_client(servers: tuple[Servers, int]) -> None:
    node, npm = node_binary(), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(f"node and npm are not installed: {INSTALL}")
    await asyncio.to_thread(npm_install, npm)
    srv, control_port = servers
    files = sorted(p.name for p in (PACKAGE / "test").glob("*.test.mjs"))
    assert len(files) >= 5, files
    env = {
        **os.environ,
        "WIREHUB_URL": f"http://127.0.0.1:{srv.ports['anon']}",
        "WIREHUB_JWT_URL": f"http://127.0.0.1:{srv.ports['jwt']}",
        "WIREHUB_JWT_SECRET": SECRET,
        "WIREHUB_CONTROL": f"http://127.0.0.1:{control_port}",
        "NODE_NO_WARNINGS": "1",
    }
    proc = await asyncio.create_subprocess_exec(
        npm, "test", cwd=PACKAGE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        os.killpg(proc.pid, 9)  # npm, tsc and node: the whole group
        out, _ = await proc.communicate()
        pytest.fail("npm test did not finish in 120 s:\n" + out.decode(errors="replace"))
    text = out.decode(errors="replace")
    sys.stdout.write(text)
    assert proc.returncode == 0, text
    assert re.search(r"^\S* ?fail 0$", text, re.MULTILINE), text  # the spec reporter's summary line
    # every test of every file ran (and tsc passed: `npm test` runs it first, with `&&`)
    declared = sum(len(re.findall(r"^test\(", (PACKAGE / "test" / f).read_text(), re.MULTILINE)) for f in files)
    assert re.search(rf"^\S* ?pass {declared}$", text, re.MULTILINE), text


def test_the_package_is_versioned_with_wirehub() -> None:
    meta = json.loads((PACKAGE / "package.json").read_text())
    assert meta["name"] == "wirehub-client" and meta["version"] == wirehub.__version__
    assert meta["scripts"]["test"].startswith("tsc -p tsconfig.json && node ")
    lock = json.loads((PACKAGE / "package-lock.json").read_text())
    assert lock["version"] == meta["version"], "run npm install in the package after a version change"


async def test_the_client_and_the_demo_page_are_served(wirehub_server: Any) -> None:
    server = await wirehub_server()
    js = await server.http("/static/wirehub.js")
    assert js.code == 200
    assert js.headers["Content-Type"].startswith(("application/javascript", "text/javascript"))
    assert js.body == (Path(__file__).parent.parent / "service" / "static" / "wirehub.js").read_bytes()
    # the entry re-exports the package's modules, served next to it
    for module in ("index", "client", "connection", "rooms", "policy", "patch", "types"):
        served = await server.http(f"/static/wirehub-client/{module}.js")
        assert served.code == 200 and served.body == (PACKAGE / f"{module}.js").read_bytes()
    assert (await server.http("/static/wirehub-client/types/index.d.ts")).code == 200
    page = await server.http("/")
    assert page.code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b'<script type="module" src="/static/demo.js">' in page.body
    for asset in ("/static/demo.js", "/static/demo.css"):
        assert (await server.http(asset)).code == 200
    missing = await server.http("/static/nope.js")
    assert missing.code == 404
    traversal = await server.http("/static/../app.py")
    assert traversal.code in (403, 404)
