"""Runs tests/js/yjs (Node's test runner, the real ``yjs``, ``y-websocket`` and ``ws`` packages) against
two ``wirehub serve`` replicas on Redis, and again on NATS.

The packages are pinned in tests/js/yjs/package.json and its lockfile; they are installed into that
folder (``npm ci``) when node_modules is missing. A small control server lets the JS tests restart every
replica (SIGTERM, then start again), or SIGKILL one.
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

import jwt
import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tests.helpers import ServerProcess, bus_block, write_config
from wirehub.brokers import BrokerProcess
from wirehub.testing import free_port

JS_DIR = Path(__file__).parent / "js" / "yjs"
SECRET = "y" * 40
AWARENESS_TTL = 2.0


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (Node 20+; .ci/run installs it)")
    return node


def npm_install() -> None:
    """``npm ci`` into tests/js/yjs when its node_modules is missing (the registry is reachable in CI)."""
    if (JS_DIR / "node_modules" / "y-websocket").is_dir():
        return
    npm = shutil.which("npm")
    assert npm is not None, "npm is needed to install tests/js/yjs (it comes with Node)"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=300,
                   capture_output=True)


def token(rooms: list[str]) -> str:
    return jwt.encode({"sub": f"user-{rooms[0]}", "rooms": rooms, "exp": int(time.time() + 3600)}, SECRET,
                      algorithm="HS256")


class Replicas:
    def __init__(self, tmp: Path, kind: str, broker: BrokerProcess) -> None:
        prefix = f"yjsnode{os.getpid()}{kind}{int(time.time() * 1000) % 100000}"
        self.procs: list[ServerProcess] = []
        for i in range(2):
            port = free_port()
            config = {
                "server": {"port": port, "host": "127.0.0.1", "node_id": f"{kind}-{i}"},
                "drain": {"grace": 3, "reconnect_jitter": 0.1},
                "auth": {"plugin": "jwt", "jwt": {"algorithms": ["HS256"], "secret": SECRET}},
                "bus": bus_block(kind, broker, prefix),
                "endpoints": [{"path": "/ws/yjs/*", "handler": "yjs",
                               "options": {"awareness_ttl": AWARENESS_TTL, "idle_unload": 1}}],
            }
            self.procs.append(ServerProcess(write_config(tmp / f"{kind}-{i}.yaml", config), port))

    async def start(self) -> None:
        for p in self.procs:
            p.start()
        for p in self.procs:
            await p.wait_ready()

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in self.procs))


class Control(tornado.web.RequestHandler):
    def initialize(self, replicas: Replicas) -> None:
        self.replicas = replicas

    async def post(self, action: str) -> None:
        body = json.loads(self.request.body or b"{}")
        procs = self.replicas.procs
        if action == "restart":
            await self.replicas.stop()
            await self.replicas.start()
        elif action == "kill":
            await asyncio.to_thread(procs[int(body["replica"])].kill)
        elif action == "start":
            await procs[int(body["replica"])].start_ready()
        else:
            self.set_status(404)
        self.finish({"done": action})


@pytest.fixture
async def replicas_on(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Replicas, int]]:
    kind = request.param
    broker: BrokerProcess = request.getfixturevalue(f"{kind}_server")
    replicas = Replicas(tmp_path, kind, broker)
    await replicas.start()
    control = HTTPServer(tornado.web.Application([(r"/(\w+)", Control, {"replicas": replicas})]))
    sockets = bind_sockets(0, "127.0.0.1")
    control.add_sockets(sockets)
    try:
        yield replicas, sockets[0].getsockname()[1]
    finally:
        control.stop()
        await replicas.stop()


@pytest.mark.parametrize("replicas_on", ["redis", "nats"], indirect=True)
async def test_yjs_with_the_real_y_websocket_provider(replicas_on: tuple[Replicas, int]) -> None:
    node = node_or_skip()
    await asyncio.to_thread(npm_install)
    replicas, control_port = replicas_on
    env: dict[str, Any] = {
        **os.environ,
        "WIREHUB_REPLICAS": ",".join(f"http://127.0.0.1:{p.port}" for p in replicas.procs),
        "WIREHUB_CONTROL": f"http://127.0.0.1:{control_port}",
        "TOKEN_RW": token(["*"]),
        "TOKEN_RO": token(["read:*"]),
        "AWARENESS_TTL": str(AWARENESS_TTL),
        "NODE_NO_WARNINGS": "1",
    }
    proc = await asyncio.create_subprocess_exec(
        node, "--test", "--test-concurrency=1", "--test-reporter=spec", str(JS_DIR / "yjs.test.mjs"),
        cwd=JS_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 100)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        pytest.fail("node --test did not finish in 100 s:\n" + out.decode(errors="replace"))
    text = out.decode(errors="replace")
    sys.stdout.write(text)
    logs = "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in replicas.procs)
    assert proc.returncode == 0, text + logs
    assert re.search(r"^\S* ?pass 5$", text, re.MULTILINE), text
    assert re.search(r"^\S* ?fail 0$", text, re.MULTILINE), text
