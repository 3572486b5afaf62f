"""Game endpoint: members per room vs patch latency, on one replica (memory) and on three (Redis).

``--members`` clients (default 100) join one game room, spread evenly over the replicas, and each
sends ``--rate`` updates per second (default 20; paced, with a random phase per member): a JSON
Patch ``[{"op": "add", "path": "/m<i>", "value": <seq>}]``. The server acks each update with the
version it landed in; every member receives batched ``patch`` frames covering version ranges
(``from_version``..``version``), or a ``state`` if it was coalesced.

Latency of an update is measured from its send to the moment a member read a frame covering the
update's version: reported per delivery (``delivery_*``: each member's read) and to every member
(``all_*``: the last member's read, the figure the issue asks for). Only updates sent inside the
measurement window count. CPU seconds of the replicas, the broker and this load generator are
reported for the window (on a small machine they compete for the same cores).

    python -m bench.bench_game [--members 100] [--rate 20] [--duration 5] [--tick 0.05] [--scenarios memory,redis]

The last line of stdout is a JSON list with one result object per scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.loadgen import WsClient, connect_many, cpu_seconds, percentile, perf, raise_nofile
from bench.procs import start_replica, stop
from wirehub.brokers import BrokerProcess, RedisServer

ROOT = Path(__file__).resolve().parent.parent
GAME_OPTIONS: dict[str, Any] = {"tick": 0.05, "updates_per_second": 40}
GAME_ENDPOINT: dict[str, Any] = {"path": "/ws/game", "handler": "game", "options": GAME_OPTIONS}  # tick set by main


def _int_after(data: bytes, key: bytes, start: int, end: int) -> tuple[int, int]:
    """The integer after ``key`` in ``data[start:end]`` and the position after it (-1 when absent)."""
    i = data.find(key, start, end)
    if i < 0:
        return -1, -1
    i += len(key)
    j = i
    while j < end and 48 <= data[j] <= 57:
        j += 1
    return int(data[i:j]), j


class GameMember(WsClient):
    """One member: sends paced updates, records (from, to, time) of every frame it reads."""

    def __init__(self, host: str, port: int, index: int, room: str) -> None:
        super().__init__(host, port, "/ws/game")
        self.index = index
        self.room = room
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.version = 0
        self.frames: list[tuple[int, int, float]] = []  # (from_version, version, read time)
        self.sent: dict[int, float] = {}  # seq -> send time (inside the window)
        self.acked: dict[int, int] = {}  # seq -> version
        self.ack_times: dict[int, float] = {}  # seq -> ack read time
        self.errors: list[str] = []
        self.seq = 0
        self.recording = False
        self.running = False
        self.interval = 0.05

    def on_message(self, data: bytes, start: int, end: int) -> None:
        now = perf()
        head = data[start:min(end, start + 24)]
        if head.startswith(b'{"op":"patch"'):
            first, pos = _int_after(data, b'"from_version":', start, end)
            last, _ = _int_after(data, b'"version":', pos, end)
            self.frames.append((first, last, now))
            self.version = last
        elif head.startswith(b'{"op":"state"'):
            version, _ = _int_after(data, b'"version":', start, end)
            self.frames.append((self.version + 1, version, now))
            self.version = version
            if not self.joined.done():
                self.joined.set_result(None)
        elif head.startswith(b'{"op":"ack"'):
            msg = json.loads(data[start:end])
            self.acked[int(msg["id"])] = msg["version"]
            self.ack_times[int(msg["id"])] = now
        elif head.startswith(b'{"op":"error"'):
            self.errors.append(data[start:end].decode()[:200])

    def join(self) -> None:
        self.send(json.dumps({"op": "join", "room": self.room, "id": "join"}).encode())

    def start(self, phase: float) -> None:
        self.running = True
        asyncio.get_running_loop().call_later(phase, self._tick)

    def _tick(self) -> None:
        if not self.running or not self.is_open:
            return
        self.seq += 1
        if self.recording:
            self.sent[self.seq] = perf()
        self.send(b'{"op":"update","id":%d,"room":"%s","patch":[{"op":"add","path":"/m%d","value":%d}]}'
                  % (self.seq, self.room.encode(), self.index, self.seq))
        asyncio.get_running_loop().call_later(self.interval, self._tick)


def covered_at(frames: list[tuple[int, int, float]], lasts: list[int], version: int) -> float | None:
    """When the member read the first frame whose range includes ``version``."""
    i = bisect.bisect_left(lasts, version)
    if i == len(frames):
        return None
    return frames[i][2]


async def run(ports: list[int], pids: list[int], *, members: int, rate: float, warmup: float,
              duration: float) -> dict[str, Any]:
    room = f"bench-{uuid.uuid4().hex[:8]}"
    clients: list[GameMember] = []
    share = [members // len(ports) + (1 if i < members % len(ports) else 0) for i in range(len(ports))]
    counter = iter(range(members))
    for port, n in zip(ports, share, strict=True):
        def make(port: int = port) -> GameMember:
            return GameMember("127.0.0.1", port, next(counter), room)

        got, _, failures = await connect_many(make, "127.0.0.1", port, n, 50)
        if failures:
            raise ConnectionError(f"{len(failures)} connections to port {port} failed: {failures[0]}")
        clients.extend(got)
    for c in clients:
        c.join()
    await asyncio.wait_for(asyncio.gather(*(c.joined for c in clients)), 30)
    rng = random.Random(1)
    for c in clients:
        c.interval = 1.0 / rate
        c.start(rng.uniform(0, c.interval))
    await asyncio.sleep(warmup)
    cpu0 = {pid: cpu_seconds(pid) for pid in pids}
    me0 = cpu_seconds(os.getpid())
    t0 = perf()
    for c in clients:
        c.recording = True
    await asyncio.sleep(duration)
    for c in clients:
        c.recording = False
    wall = perf() - t0
    cpu = {pid: round(cpu_seconds(pid) - cpu0[pid], 3) for pid in pids}
    me = cpu_seconds(os.getpid()) - me0
    await asyncio.sleep(2.0)  # let the last frames arrive
    for c in clients:
        c.running = False
    lasts = [[f[1] for f in c.frames] for c in clients]
    every: list[float] = []
    deliveries: list[float] = []
    missing = 0
    sent = 0
    for c in clients:
        for seq, t_send in c.sent.items():
            sent += 1
            version = c.acked.get(seq)
            if version is None:
                missing += 1
                continue
            worst = 0.0
            for other, other_lasts in zip(clients, lasts, strict=True):
                t = covered_at(other.frames, other_lasts, version)
                if t is None:
                    missing += 1
                    worst = float("inf")
                    break
                deliveries.append(t - t_send)
                worst = max(worst, t - t_send)
            if worst != float("inf"):
                every.append(worst)
    every.sort()
    deliveries.sort()
    acks = sorted(c.ack_times[seq] - t for c in clients for seq, t in c.sent.items() if seq in c.ack_times)
    frames = sum(1 for c in clients for f in c.frames if t0 <= f[2] <= t0 + wall)
    errors = [e for c in clients for e in c.errors]
    closed = sum(1 for c in clients if not c.is_open)
    for c in clients:
        c.close()

    def ms(values: list[float], q: float) -> float | None:
        v = percentile(values, q)
        return None if v is None else round(v * 1000, 1)

    return {
        "members": members, "replicas": len(ports), "rate_per_member": rate, "updates_sent": sent,
        "updates_per_s": round(sent / wall, 1), "frames_per_member_per_s": round(frames / wall / members, 1),
        "all_p50_ms": ms(every, 0.5), "all_p99_ms": ms(every, 0.99), "all_max_ms": ms(every, 1.0),
        "delivery_p50_ms": ms(deliveries, 0.5), "delivery_p99_ms": ms(deliveries, 0.99),
        "ack_p50_ms": ms(acks, 0.5), "ack_p99_ms": ms(acks, 0.99),
        "unacked_or_undelivered": missing, "errors": len(errors), "first_error": errors[0] if errors else None,
        "closed": closed, "wall": round(wall, 2), "cpu_by_pid": cpu, "loadgen_cpu": round(me, 2),
    }


async def run_scenario(kind: str, a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    broker: BrokerProcess | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if kind == "redis":
            broker = RedisServer()
            broker.start()
            bus: dict[str, Any] = {"plugin": "redis", "redis": {"url": broker.url,
                                                                "key_prefix": f"bench{uuid.uuid4().hex[:6]}"}}
        else:
            bus = {"plugin": "memory"}
        ports = []
        for i in range(a.replicas if kind != "memory" else 1):
            proc, port, _ = start_replica(workdir, f"{kind}-{i}", bus, GAME_ENDPOINT)
            procs.append(proc)
            ports.append(port)
        pids = [p.pid for p in procs] + ([broker.pid] if broker is not None and broker.pid else [])
        result = await run(ports, pids, members=a.members, rate=a.rate, warmup=a.warmup, duration=a.duration)
        result["bus"] = kind
        result["game_metrics"] = game_metrics(ports)
        result["tick"] = a.tick
        return result
    finally:
        for proc in procs:
            stop(proc)
        if broker is not None:
            broker.close()


def game_metrics(ports: list[int]) -> dict[str, float]:
    """wirehub_game_* counters summed over the replicas (whole run, warm-up included)."""
    import urllib.request

    totals: dict[str, float] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("wirehub_game_") and "_total{" in line:
                    name = line.split("{", 1)[0].removeprefix("wirehub_game_").removesuffix("_total")
                    totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def render(results: list[dict[str, Any]]) -> str:
    lines = ["| bus | replicas | members | updates/s | frames/member/s | to every member p50 / p99 ms | "
             "per delivery p50 / p99 ms | CPU s (replicas+broker) | loadgen CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['bus']} | {r['replicas']} | {r['members']} | {r['updates_per_s']} | "
                     f"{r['frames_per_member_per_s']} | {r['all_p50_ms']} / {r['all_p99_ms']} | "
                     f"{r['delivery_p50_ms']} / {r['delivery_p99_ms']} | {sum(r['cpu_by_pid'].values()):.1f} | "
                     f"{r['loadgen_cpu']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--scenarios", default="memory,redis")
    p.add_argument("--members", type=int, default=100)
    p.add_argument("--rate", type=float, default=20.0, help="updates per second per member")
    p.add_argument("--replicas", type=int, default=3, help="replicas on a broker (memory runs one)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--tick", type=float, default=0.05, help="the game endpoint's tick (batching interval)")
    a = p.parse_args(argv)
    GAME_OPTIONS["tick"] = a.tick
    raise_nofile()
    results = []
    with tempfile.TemporaryDirectory(prefix="wirehub-bench-game-") as tmp:
        for kind in a.scenarios.split(","):
            results.append(asyncio.run(run_scenario(kind.strip(), a, Path(tmp))))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(render(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
