"""The spread layout's receiving side: CPU per bus message of a replica whose rooms each hold ONE local member,
this tree and a before tree measured over the same seconds (issue 15).

    python -m bench.spread_pair --before /tmp/before --members 2000 --rate 1000 --windows 6

With groups spread over many pods by a random balancer, a group message reaches up to 10 replicas and each
delivers it to about one member: the fixed cost of a bus message on a replica (the Redis read, the hub, the
frame, the write) is most of the bill (docs/scaling.md). Here two ``wirehub serve`` replicas, one per tree,
share one Redis and one key prefix; each holds ``--members`` connections, member ``i`` of either replica
joined to room ``i`` alone. A publisher in this process (a Redis bus of this tree, as another replica's
publish would) sends ``--rate`` history publishes per second to random rooms, so every publish is one bus
message and one delivery on each replica, at the same instant. Each ``--windows`` window of ``--window``
seconds reports both replicas' CPU per bus message (``/proc/<pid>/stat``) and their ratio: the machine's load
weighs on both alike. The last line of stdout is a JSON object with every window and the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.loadgen import WsClient, connect_many, cpu_seconds, new_event_loop, raise_nofile
from bench.procs import start_replicas, stop, tree_path
from wirehub.brokers import RedisServer
from wirehub.builtins.bus.redis import create_backend
from wirehub.hub import envelope
from wirehub.rooms import message_frame
from wirehub.testing import Recorder

perf = time.perf_counter
CHAT: dict[str, Any] = {"path": "/ws/chat", "handler": "chat",
                        "options": {"publish_rate": 1e9, "publish_burst": 1_000_000_000, "presence_events": False}}


class Member(WsClient):
    """Joins one room; counts the messages it gets."""

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port, "/ws/chat")
        self.got = 0
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(self, data: bytes, start: int, end: int) -> None:
        frame = bytes(data[start:end])
        if frame.startswith(b'{"op":"message"'):
            self.got += 1
        elif frame.startswith(b'{"op":"joined"') and not self.joined.done():
            self.joined.set_result(None)
        elif frame.startswith(b'{"op":"error"') and not self.joined.done():
            self.joined.set_exception(ConnectionError(frame.decode(errors="replace")[:200]))


async def run(a: argparse.Namespace) -> dict[str, Any]:
    redis = RedisServer()
    redis.start()
    procs = []
    members: dict[str, list[Member]] = {}
    publisher = None
    try:
        prefix, runid = f"sp{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
        bus = {"plugin": "redis", "redis": {"url": redis.url, "key_prefix": prefix}}
        with tempfile.TemporaryDirectory(prefix="wirehub-spread-pair-") as tmp:
            workdir = Path(tmp)
            trees: dict[str, Path | None] = {"before": a.before, "after": None}
            pids: dict[str, int] = {}
            for label, tree in trees.items():
                (proc,), (port,) = start_replicas(workdir, [f"spread-{label}"], bus, CHAT,
                                                  wirehub_path=tree_path(workdir, tree) if tree else None)
                procs.append(proc)
                pids[label] = proc.pid
                clients, _, failures = await connect_many(lambda port=port: Member(port), "127.0.0.1", port,
                                                          a.members, 50)
                if failures:
                    raise RuntimeError(f"{label}: {len(failures)} connections failed: {failures[0]}")
                for i, m in enumerate(clients):
                    m.send(json.dumps({"op": "join", "room": f"{runid}-{i}", "id": "j"}).encode())
                await asyncio.wait_for(asyncio.gather(*(m.joined for m in clients)), 120)
                members[label] = clients
            backend = create_backend(bus["redis"], "bus.redis")
            publisher = backend.bus
            await publisher.start(Recorder())
            rooms = [f"{runid}-{i}" for i in range(a.members)]
            inflight: set[asyncio.Future[Any]] = set()

            async def publish_for(seconds: float) -> int:
                """Paced by the time elapsed, every 10 ms; returns the publishes made."""
                n, t0 = 0, perf()
                while (elapsed := perf() - t0) < seconds:
                    while n < a.rate * elapsed:
                        room = random.choice(rooms)
                        frame = message_frame(room, "bench", b'{"t":%.6f}' % perf(), round(time.time(), 3))
                        fut = asyncio.ensure_future(publisher.publish(room, envelope(frame), history=True))
                        inflight.add(fut)
                        fut.add_done_callback(inflight.discard)
                        n += 1
                    await asyncio.sleep(0.01)
                return n

            await publish_for(a.warmup)
            windows = []
            for w in range(a.windows):
                got0 = {k: sum(m.got for m in ms) for k, ms in members.items()}
                cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
                t0 = perf()
                sent = await publish_for(a.window)
                await asyncio.sleep(0.3)  # the last ones arrive
                cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
                got = {k: sum(m.got for m in ms) - got0[k] for k, ms in members.items()}
                wall = perf() - t0
                row = {"window": w, "published": sent, "wall_s": round(wall, 2), "load": os.getloadavg()[0]}
                for k in pids:
                    row[f"{k}_delivered"] = got[k]
                    row[f"{k}_cpu_pct"] = round(100 * cpu[k] / wall, 1)
                    row[f"{k}_us_per_msg"] = round(cpu[k] / max(1, got[k]) * 1e6, 2)
                row["ratio"] = round(row["after_us_per_msg"] / row["before_us_per_msg"], 3)
                windows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            await asyncio.gather(*inflight, return_exceptions=True)
            ratios = [r["ratio"] for r in windows]
            return {"members": a.members, "rate": a.rate, "windows": windows,
                    "median_ratio": round(statistics.median(ratios), 3),
                    "before_us_per_msg": [r["before_us_per_msg"] for r in windows],
                    "after_us_per_msg": [r["after_us_per_msg"] for r in windows]}
    finally:
        if publisher is not None:
            await publisher.close()
        for ms in members.values():
            for m in ms:
                m.close()
        for proc in procs:
            stop(proc)
        redis.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="a wirehub tree (its service folder is imported)")
    p.add_argument("--members", type=int, default=2000, help="connections per replica, one room each")
    p.add_argument("--rate", type=float, default=1000.0, help="publishes per second (one bus message each)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--window", type=float, default=8.0)
    p.add_argument("--windows", type=int, default=6)
    a = p.parse_args()
    raise_nofile()
    loop = new_event_loop()
    try:
        print(json.dumps(loop.run_until_complete(run(a))))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
