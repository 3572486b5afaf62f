"""Fan-out with write coalescing (issue 13): wirehub at several ``server.write_coalesce_ms``, a before tree
and Node `ws`, in one run, closed loop or paced.

    python bench/fan_coalesce.py --coalesce 0,5 --before /tmp/before --window 2 --duration 8 \\
        --json bench/results/fan3-closed.json
    python bench/fan_coalesce.py --coalesce 0,5 --before /tmp/before --rate 20 --json bench/results/fan3-paced.json

Each server is a fresh process pinned to ``--server-core``; ``bench.loadgen fanout`` runs pinned to
``--loadgen-core`` with ``--window`` and ``--rate`` (``bench/bench_conns.py --scenarios fanout`` fixes the
window at 2 and has no rate). Every result has the load generator's ``frames_per_send`` (the server's write
system calls counted with ``perf stat``) and the latency percentiles of the deliveries.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_conns import CHAT_OPTIONS
from bench.procs import free_port, stop
from bench.procs import spawn as _spawn
from bench.run import ROOT, _child_setup, wirehub_config

KEYS = ("per_server_cpu_s", "per_wall_s", "server_cpu_pct", "loadgen_cpu_pct", "frames_per_send", "p50_ms",
        "p99_ms")


def start(name: str, tree: Path | None, coalesce: float | None, workdir: Path,
          core: int | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = workdir / f"{name}-{port}.log"
    if tree is None:  # Node
        cmd = ["node", str(ROOT / "bench" / "node_ws" / "server.js"), "--port", str(port), "--backlog", "4096",
               "--ping-interval", "20"]
        return _spawn(cmd, port, log, name=name, preexec_fn=_child_setup(core)), port
    cfg = json.loads(wirehub_config(port, 4096, True, CHAT_OPTIONS))
    if coalesce is not None:
        cfg["server"]["write_coalesce_ms"] = coalesce
    path = workdir / f"{name}-{port}.yaml"
    path.write_text(json.dumps(cfg))
    link = workdir / f"{name}-path"  # the tree's `service` folder imported as `wirehub`
    link.mkdir(exist_ok=True)
    if not (link / "wirehub").exists():
        (link / "wirehub").symlink_to(tree / "service")
    env = {**os.environ, "PYTHONPATH": str(link)}
    cmd = [sys.executable, "-m", "wirehub.cli", "--config", str(path), "serve"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_child_setup(core))
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)


def run_one(name: str, tree: Path | None, coalesce: float | None, a: argparse.Namespace,
            workdir: Path) -> dict[str, Any]:
    proc, port = start(name, tree, coalesce, workdir, a.server_core)
    try:
        cmd = [sys.executable, "-m", "bench.loadgen", "fanout", "--url", f"ws://127.0.0.1:{port}/ws/chat",
               "--server-pid", str(proc.pid), "--warmup", str(a.warmup), "--duration", str(a.duration),
               "--members", str(a.members), "--window", str(a.window), "--rate", str(a.rate),
               "--sample-every", "10"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.warmup + a.duration + 180,
                             preexec_fn=_child_setup(a.loadgen_core))
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"load generator failed: {out.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        result["write_coalesce_ms"] = coalesce
        return result
    finally:
        stop(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coalesce", default="0,5", help="server.write_coalesce_ms of the wirehub servers")
    p.add_argument("--before", default=None, help="another wirehub tree, run with its defaults as 'before'")
    p.add_argument("--before-runs", type=int, default=1, help="run the before tree this many times")
    p.add_argument("--no-node", action="store_true")
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--rate", type=float, default=0.0, help="publishes per second (0: closed loop)")
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--loadgen-core", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    servers: list[tuple[str, Path | None, float | None]] = []
    for c in a.coalesce.split(","):  # a value given twice is run twice (wirehub-c5, wirehub-c5-2)
        name = base = f"wirehub-c{float(c):g}"
        while any(name == s[0] for s in servers):
            name = f"{base}-{sum(s[0].startswith(base) for s in servers) + 1}"
        servers.append((name, ROOT, float(c)))
    for i in range(a.before_runs if a.before else 0):
        servers.append(("before" if i == 0 else f"before-{i + 1}", Path(a.before).resolve(), None))
    if not a.no_node:
        servers.append(("node", None, None))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="wirehub-fan-") as tmp:
        for name, tree, coalesce in servers:
            print(f"fanout against {name} ...", file=sys.stderr, flush=True)
            results[name] = run_one(name, tree, coalesce, a, Path(tmp))
    node = results.get("node", {}).get("per_server_cpu_s")
    lines = [f"{'server':<14}" + "".join(f"{k:>18}" for k in KEYS) + f"{'/ node':>9}"]
    for name, r in results.items():
        cells = "".join(f"{r.get(k) if r.get(k) is not None else '-':>18}" for k in KEYS)
        ratio = f"{r['per_server_cpu_s'] / node:8.2f}x" if node and r.get("per_server_cpu_s") else ""
        lines.append(f"{name:<14}{cells}{ratio}")
    lines.append(f"window {a.window}, rate {a.rate or 'closed loop'}, {a.members} members; load average "
                 f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}; {time.strftime('%Y-%m-%d %H:%M')}")
    report = "\n".join(lines)
    print(report)
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "report": report, "args": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
