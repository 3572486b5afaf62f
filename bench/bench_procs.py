"""How ``server.processes`` spreads connections over its workers, per way of sharing the port.

One ``wirehub serve`` with ``--processes`` workers on a Redis of its own, per ``--modes`` entry
(``reuseport``: a listening socket per worker with SO_REUSEPORT; ``shared``: one socket bound before the
fork). ``--connections`` chat clients connect, ``--burst`` handshakes at a time; the node id in each
``welcome`` frame names the worker that took it. Reported per mode and burst: the connections per worker,
and max / mean (1.00 = even). With ``--busy``, worker 0 has a CPU hog in its room first (a client
publishing to many members on it), to show which mode steers new connections away from a loaded worker.

    python -m bench.bench_procs --processes 2 --connections 1000 --bursts 1,100 --modes reuseport,shared

The last line of stdout is a JSON list with one result object per (mode, burst).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClosedError

from bench.procs import free_port as bench_free_port
from bench.procs import spawn, stop
from wirehub.brokers import RedisServer
from wirehub.testing import WsClient, ws_connect


async def spread(port: int, connections: int, burst: int) -> Counter[str]:
    """Open ``connections`` chat clients (``burst`` at a time), count their welcome nodes, close them."""
    sem = asyncio.Semaphore(burst)
    clients: list[WsClient] = []

    async def one() -> str:
        async with sem:
            client = await ws_connect(f"ws://127.0.0.1:{port}/ws/chat", timeout=30)
            clients.append(client)
            welcome = await client.recv(30)
            return str(welcome["node"])

    nodes = await asyncio.gather(*(one() for _ in range(connections)))
    for client in clients:
        client.close()
    await asyncio.sleep(0.5)
    return Counter(nodes)


async def hog(port: int, node: str, members: int, tasks: list[asyncio.Future[None]]) -> list[WsClient]:
    """``members`` clients on worker ``node`` in one room, one of them publishing without pause (its worker's
    core busy with the fan-out); returns them (close them to stop)."""
    got: list[WsClient] = []
    strays: list[WsClient] = []
    room = f"hog-{uuid.uuid4().hex[:6]}"
    while len(got) < members:
        client = await ws_connect(f"ws://127.0.0.1:{port}/ws/chat")
        if (await client.recv())["node"] != node:
            strays.append(client)
            continue
        await client.request({"op": "join", "room": room})
        got.append(client)
    for client in strays:
        client.close()

    async def publish() -> None:
        with contextlib.suppress(WebSocketClosedError):
            while True:
                await got[0].send({"op": "publish", "room": room, "data": "x" * 100})
                await asyncio.sleep(0.001)

    async def drain(client: WsClient) -> None:  # a member that reads is never a slow consumer
        with contextlib.suppress(Exception):
            while await client.conn.read_message() is not None:
                pass

    tasks.append(asyncio.ensure_future(publish()))
    tasks.extend(asyncio.ensure_future(drain(c)) for c in got)
    await asyncio.sleep(1.0)
    return got


async def run(mode: str, a: argparse.Namespace, workdir: Path, redis: RedisServer) -> list[dict[str, Any]]:
    port = bench_free_port()
    name = f"procs-{mode}"
    config = {
        "server": {"host": "127.0.0.1", "port": port, "node_id": name, "backlog": 4096, "ping_interval": 0,
                   "processes": a.processes, "process_listen": mode},
        "logging": {"level": "warning", "access_log": False},
        "drain": {"grace": 2},
        "bus": {"plugin": "redis", "redis": {"url": redis.url, "key_prefix": f"b{uuid.uuid4().hex[:6]}"}},
        "endpoints": [{"path": "/ws/chat", "handler": "chat",
                       "options": {"publish_rate": 1e9, "publish_burst": 1_000_000_000, "presence_events": False}}],
    }
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config))
    proc = spawn([sys.executable, "-m", "wirehub.cli", "--config", str(path), "serve"], port, workdir / f"{name}.log",
                 name=name)
    results = []
    hogs: list[WsClient] = []
    tasks: list[asyncio.Future[None]] = []
    try:
        await asyncio.sleep(1.5)  # every worker listening
        if a.busy:
            hogs = await hog(port, f"{name}-w0", a.busy, tasks)
        for burst in (int(b) for b in a.bursts.split(",")):
            counts = await spread(port, a.connections, burst)
            per = [counts.get(f"{name}-w{i}", 0) for i in range(a.processes)]
            mean = a.connections / a.processes
            results.append({"mode": mode, "processes": a.processes, "burst": burst, "busy_worker0": bool(a.busy),
                            "connections": a.connections, "per_worker": per,
                            "max_over_mean": round(max(per) / mean, 2), "min_over_mean": round(min(per) / mean, 2)})
    finally:
        for task in tasks:
            task.cancel()
        for client in hogs:
            client.close()
        stop(proc)
    return results


async def main_async(a: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis:
        for mode in a.modes.split(","):
            results += await run(mode, a, Path(tmp), redis)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--bursts", default="1,100", help="handshakes in flight at a time, one run per value")
    p.add_argument("--modes", default="reuseport,shared")
    p.add_argument("--busy", type=int, default=0, help="members of a busy room on worker 0 (0 = none)")
    a = p.parse_args(argv)
    results = asyncio.run(main_async(a))
    print("| mode | busy worker 0 | burst | connections per worker | max / mean | min / mean |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['busy_worker0']} | {r['burst']} | {', '.join(map(str, r['per_worker']))} | "
              f"{r['max_over_mean']} | {r['min_over_mean']} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
