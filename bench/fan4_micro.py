"""The fan-out path alone, in process: server CPU per delivery of ``Hub.on_bus_message`` -> ``Session`` ->
``StreamTransport.offer`` -> the flusher -> ``socket.send``, for this tree and a before tree, alternated (issue 13).

    python bench/fan4_micro.py --before /tmp/before --rounds 6 --json bench/results/fan4-micro.json

A room of ``--members`` sessions, each on a real socket pair (a :class:`wirehub.stream.SocketStream`, as after
the takeover); a step is ``--window`` bus messages fanned out then one flush (one ``send`` per member carrying
the window's frames, as in ``bench_conns --scenarios fanout``). Only the fan-out and the flush are timed (thread
CPU time); the peers are drained between steps, untimed; a run's figure is its median step. Each tree runs in
its own process (both are imported as ``wirehub``), the trees alternate ABBA across rounds. Loopback receive
work is smaller here than under the real load generator (nobody waits in epoll), so the Python's share is
larger than in the server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def measure(members: int, window: int, steps: int) -> float:
    """Nanoseconds of thread CPU per delivery, the median of the steps (the machine's other load shows as
    outliers); run inside a process that imports the tree as ``wirehub``."""
    import asyncio
    import socket
    from types import SimpleNamespace

    from tornado.iostream import IOStream

    from wirehub.auth import Identity
    from wirehub.builtins.bus.memory import create_backend
    from wirehub.hub import Hub, envelope
    from wirehub.metrics import Metrics
    from wirehub.session import Session
    from wirehub.stream import SocketStream
    from wirehub.transport import StreamTransport, _flusher

    class Owner:
        def on_readable(self) -> None: ...
        def on_stream_closed(self) -> None: ...

    async def run() -> float:
        backend = create_backend({}, "bus.memory")
        hub = Hub(backend, Metrics())
        await backend.bus.start(hub)
        hub.on_bus_state(True)
        peers = []
        for _ in range(members):
            a, b = socket.socketpair()
            b.setblocking(False)
            protocol: Any = SimpleNamespace(stream=SocketStream(IOStream(a), Owner()), server_terminated=False)
            s = Session(StreamTransport(protocol, lambda code, reason: None), Identity(user="u"),
                        endpoint="/ws/chat", node="n1", max_queue_bytes=1 << 20, metrics=hub.metrics)
            await hub.join("room", s)
            peers.append(b)
        payload = envelope(b'{"type":"message","room":"room","data":"' + b"x" * 40 + b'"}')
        flusher = _flusher()
        times: list[int] = []
        for i in range(steps):
            t0 = time.thread_time_ns()
            for _ in range(window):
                hub.on_bus_message("room", payload, None)
            flusher._run()
            t1 = time.thread_time_ns()
            if i >= steps // 10:  # the first tenth warms up
                times.append(t1 - t0)
            for b in peers:
                b.recv(1 << 16)
        await asyncio.sleep(0.01)
        return statistics.median(times) / (window * members)

    return asyncio.run(run())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=None, help="another wirehub tree, run as 'before'")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--core", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.child:
        print(measure(a.members, a.window, a.steps))
        return 0
    trees = {"wirehub": ROOT}
    if a.before:
        trees["before"] = Path(a.before).resolve()
    out: dict[str, list[float]] = {name: [] for name in trees}
    link_root = Path(os.environ.get("TMPDIR", "/tmp")) / f"fan4-micro-{os.getpid()}"
    for i in range(a.rounds):
        for name in (list(trees) if i % 2 == 0 else list(reversed(trees))):
            link = link_root / name
            link.mkdir(parents=True, exist_ok=True)
            if not (link / "wirehub").exists():
                (link / "wirehub").symlink_to(trees[name] / "service")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--members", str(a.members),
                   "--window", str(a.window), "--steps", str(a.steps)]
            if a.core is not None and hasattr(os, "sched_setaffinity"):
                cmd = ["taskset", "-c", str(a.core), *cmd]
            env = {**os.environ, "PYTHONPATH": f"{link}{os.pathsep}{ROOT}"}
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
            if res.returncode != 0:
                raise SystemExit(f"{name}: {res.stderr[-3000:]}")
            out[name].append(float(res.stdout.strip().splitlines()[-1]))
            print(f"round {i + 1} {name}: {out[name][-1]:.0f} ns/delivery", file=sys.stderr, flush=True)
    lines = [f"{name}: ns per delivery " + ", ".join(f"{v:.0f}" for v in vals)
             + f" (median {statistics.median(vals):.0f})" for name, vals in out.items()]
    summary: dict[str, Any] = {name: statistics.median(vals) for name, vals in out.items()}
    if a.before:
        ratios = [b / w for w, b in zip(out["wirehub"], out["before"], strict=True)]
        summary["before_over_after"] = statistics.median(ratios)
        lines.append(f"deliveries per CPU-s after/before: median {statistics.median(ratios):.3f}x "
                     f"(rounds {min(ratios):.3f}-{max(ratios):.3f}x)")
    lines.append(f"{a.members} members, window {a.window}, {a.steps} steps; load average "
                 f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}; {time.strftime('%Y-%m-%d %H:%M')}")
    report = "\n".join(lines)
    print(report)
    if a.json:
        Path(a.json).write_text(json.dumps({"ns_per_delivery": out, "summary": summary, "report": report,
                                            "args": vars(a)}, indent=2))
    for link in link_root.glob("*/wirehub"):
        link.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
