"""What new connections and probes see while one worker of a two-worker pod is stuck (``server.processes``).

A pod of 2 workers on a Redis of its own, with the test plugin ``tests.plugins_for_tests.loop_blocker``:
``--stall-at`` seconds in, worker 1's event loop blocks for good (SIGUSR2: a ``time.sleep`` in a loop callback).
Meanwhile a new connection is opened every ``1 / --rate`` s (a WebSocket upgrade request; served = its
``101`` status line came back) and ``/healthz`` is probed every 0.25 s. Every attempt is classed: served
within 1 s, served late (it waited in a queue), reset, or unanswered after ``--patience`` s.

Each run sets ``net.ipv4.tcp_migrate_req`` (0: a closed SO_REUSEPORT listener's queued connections are reset;
1: they move to another listener of the port, Linux 5.14+), which is per network namespace: so the whole
benchmark re-runs itself in a network namespace of its own (``unshare -n``; needs root) and leaves the host's
value alone. ``--before TREE`` runs the same pod from another wirehub tree, alternately with this one.

    python -m bench.bench_stall --before /tmp/before --migrate 0,1 --rounds 1

The last line of stdout is a JSON list with one result object per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.procs import ROOT, free_port
from wirehub.brokers import RedisServer

LISTENING = re.compile(r"worker (\d+) listening \(pid (\d+)")
UPGRADE = (b"GET /ws/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def attempt(port: int, path: bytes, patience: float) -> tuple[str, float]:
    """One new connection: (``served`` | ``late`` | ``reset`` | ``unanswered`` | ``status NNN``, seconds)."""
    started = time.monotonic()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), patience)
        writer.write(path)
        line = await asyncio.wait_for(reader.readline(), patience - (time.monotonic() - started))
    except TimeoutError:
        return "unanswered", time.monotonic() - started
    except OSError:
        return "reset", time.monotonic() - started
    finally:
        if writer is not None:
            writer.close()
    took = time.monotonic() - started
    if not line:
        return "reset", took
    status = line.split()[1].decode() if len(line.split()) > 1 else "?"
    if status not in ("101", "200"):
        return f"status {status}", took
    return ("served" if took < 1.0 else "late"), took


async def load(port: int, rate: float, seconds: float, patience: float, stall_at: float, block: int
               ) -> dict[str, Any]:
    """The connection attempts and probes of one run; worker pid ``block`` is stuck at ``stall_at``."""
    conns: list[asyncio.Task[tuple[str, float]]] = []
    probes: list[asyncio.Task[tuple[str, float]]] = []
    began = time.monotonic()
    stalled = False
    next_probe = 0.0
    health = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    while (now := time.monotonic() - began) < seconds:
        if not stalled and now >= stall_at:
            os.kill(block, signal.SIGUSR2)
            stalled = True
        if now >= next_probe:
            probes.append(asyncio.ensure_future(probe_status(port, health)))
            next_probe += 0.25
        conns.append(asyncio.ensure_future(attempt(port, UPGRADE, patience)))
        await asyncio.sleep(1 / rate)
    got = await asyncio.gather(*conns)
    answers = await asyncio.gather(*probes)
    late = sorted(t for kind, t in got if kind == "late")
    return {"attempts": len(got), **Counter(kind for kind, _ in got),
            "late_max_s": round(late[-1], 2) if late else 0.0,
            "probes": len(answers), **{f"probe_{k}": v for k, v in Counter(k for k, _ in answers).items()}}


async def probe_status(port: int, request: bytes) -> tuple[str, float]:
    """A /healthz probe with Kubernetes' habit of a short timeout: its status, or ``none``."""
    kind, took = await attempt(port, request, 0.5)
    return ("none" if kind in ("unanswered", "reset") else kind.removeprefix("status ").replace("served", "200")
            .replace("late", "200")), took


def pod_config(directory: Path, redis: RedisServer, port: int) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port, "node_id": "stall", "ping_interval": 0, "processes": 2},
        "logging": {"level": "info", "format": "text", "access_log": False},
        "drain": {"grace": 2},
        "bus": {"plugin": "redis", "redis": {"url": redis.url, "key_prefix": f"s{uuid.uuid4().hex[:6]}"}},
        "plugins": {"load": ["tests.plugins_for_tests.loop_blocker"]},
    }
    path = directory / "stall.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_one(a: argparse.Namespace, label: str, tree: Path, migrate: int, redis: RedisServer, work: Path
            ) -> dict[str, Any]:
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text(f"{migrate}\n")
    link = work / f"path-{label}"
    link.mkdir(exist_ok=True)
    if not (link / "wirehub").exists():
        (link / "wirehub").symlink_to(tree / "service")
    port = free_port()
    log = work / f"{label}-{migrate}.log"
    env = {**os.environ, "PYTHONPATH": f"{link}:{ROOT}"}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "wirehub.cli", "--config", str(pod_config(work, redis, port)),
                                 "serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while len(pids := dict(LISTENING.findall(log.read_text()))) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label}: the pod did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        result = asyncio.run(load(port, a.rate, a.seconds, a.patience, a.stall_at, int(pids["1"])))
        text = log.read_text()
        result.update(tree=label, tcp_migrate_req=migrate, stall_kills=text.count(") stalled: "),
                      restarted=len(LISTENING.findall(text)) > 2)
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def table(results: list[dict[str, Any]]) -> str:
    kinds = ["served", "late", "reset", "unanswered"]
    lines = ["| tree | tcp_migrate_req | attempts | " + " | ".join(kinds) + " | late max s | /healthz 200 | 503 | "
             "no answer | stall kills |", "|" + "---|" * (8 + len(kinds))]
    for r in results:
        lines.append(f"| {r['tree']} | {r['tcp_migrate_req']} | {r['attempts']} | "
                     + " | ".join(str(r.get(k, 0)) for k in kinds)
                     + f" | {r['late_max_s']} | {r.get('probe_200', 0)} | {r.get('probe_503', 0)} | "
                       f"{r.get('probe_none', 0)} | {r['stall_kills']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, default=None, help="another wirehub tree, run alternately with this one")
    p.add_argument("--migrate", default="0,1", help="net.ipv4.tcp_migrate_req values to run")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--rate", type=float, default=40.0, help="new connections per second")
    p.add_argument("--seconds", type=float, default=14.0)
    p.add_argument("--stall-at", type=float, default=2.0)
    p.add_argument("--patience", type=float, default=10.0, help="seconds an attempt waits for its answer")
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.before is not None and not (a.before / "service" / "__init__.py").is_file():
        p.error(f"--before {a.before}: no wirehub tree there (no service/__init__.py)")
    if not a.in_netns:  # the sysctl is per network namespace: a namespace of our own, with its own loopback
        inner = [sys.executable, "-m", "bench.bench_stall", "--in-netns", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner])
    trees = [("after", ROOT)] + ([("before", a.before.resolve())] if a.before is not None else [])
    plan = [(label, tree, int(m)) for _ in range(a.rounds) for m in a.migrate.split(",")
            for label, tree in (trees if _ % 2 == 0 else trees[::-1])]
    results = []
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis:
        for label, tree, migrate in plan:
            results.append(run_one(a, label, tree, migrate, redis, Path(tmp)))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(table(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
