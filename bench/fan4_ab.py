"""Fan-out, this tree against a before tree (and Node `ws`), alternated in one run (issue 13).

    python bench/fan4_ab.py --before /tmp/before --rounds 4 --duration 8 --json bench/results/fan4-ab.json

Each round runs wirehub (this tree) and before, in ABBA order across rounds (so drift in the machine's load
falls on both alike), and Node every ``--node-every`` rounds; every run is a fresh server process pinned to
``--server-core`` with ``bench.loadgen fanout`` (closed loop, window 2, 1,000 members, as
``bench/bench_conns.py --scenarios fanout``) pinned to ``--loadgen-core``. The report has each round's
after/before ratio of deliveries per server CPU-second, their median, and the medians against Node.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
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


def start(name: str, tree: Path | None, workdir: Path, core: int | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = workdir / f"{name}-{port}.log"
    if tree is None:  # Node
        cmd = ["node", str(ROOT / "bench" / "node_ws" / "server.js"), "--port", str(port), "--backlog", "4096",
               "--ping-interval", "20"]
        return _spawn(cmd, port, log, name=name, preexec_fn=_child_setup(core)), port
    cfg = json.loads(wirehub_config(port, 4096, True, CHAT_OPTIONS))
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


def run_one(name: str, tree: Path | None, a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    proc, port = start(name, tree, workdir, a.server_core)
    try:
        cmd = [sys.executable, "-m", "bench.loadgen", "fanout", "--url", f"ws://127.0.0.1:{port}/ws/chat",
               "--server-pid", str(proc.pid), "--warmup", str(a.warmup), "--duration", str(a.duration),
               "--members", str(a.members), "--window", "2",
               "--sample-every", "10"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.warmup + a.duration + 180,
                             preexec_fn=_child_setup(a.loadgen_core))
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"load generator failed: {out.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result
    finally:
        stop(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="another wirehub tree, run as 'before'")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--node-every", type=int, default=2, help="run Node every this many rounds (0: never)")
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--loadgen-core", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    trees: dict[str, Path | None] = {"wirehub": ROOT, "before": Path(a.before).resolve(), "node": None}
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="wirehub-fan4-") as tmp:
        for i in range(a.rounds):
            order = ["wirehub", "before"] if i % 2 == 0 else ["before", "wirehub"]
            if a.node_every and i % a.node_every == 0:
                order.append("node")
            rnd: dict[str, dict[str, Any]] = {}
            for name in order:
                print(f"round {i + 1}: fanout against {name} ...", file=sys.stderr, flush=True)
                rnd[name] = run_one(name, trees[name], a, Path(tmp))
            rounds.append(rnd)
    key = "per_server_cpu_s"
    lines = [f"{'round':<6}{'wirehub':>10}{'before':>10}{'node':>10}{'after/before':>14}"]
    ratios = []
    for i, rnd in enumerate(rounds):
        w, b, n = (rnd.get(s, {}).get(key) for s in ("wirehub", "before", "node"))
        ratio = w / b if w and b else None
        if ratio:
            ratios.append(ratio)
        cells = "".join(f"{v if v is not None else '-':>10}" for v in (w, b, n))
        lines.append(f"{i + 1:<6}{cells}{(f'{ratio:.3f}x' if ratio else '-'):>14}")
    med = {s: statistics.median([r[s][key] for r in rounds if r.get(s, {}).get(key)] or [0]) for s in trees}
    summary = {"median_ratio": statistics.median(ratios) if ratios else None, "medians": med,
               "vs_node": {s: (med[s] / med["node"] if med["node"] else None) for s in ("wirehub", "before")}}
    lines.append(f"deliveries per server CPU-s: after/before median {summary['median_ratio']:.3f}x "
                 f"(rounds {min(ratios):.3f}-{max(ratios):.3f}x); medians wirehub {med['wirehub']:.0f}, "
                 f"before {med['before']:.0f}, node {med['node']:.0f}"
                 + (f"; vs node {summary['vs_node']['wirehub']:.2f}x / {summary['vs_node']['before']:.2f}x"
                    if med["node"] else ""))
    lines.append(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; "
                 f"{time.strftime('%Y-%m-%d %H:%M')}")
    report = "\n".join(lines)
    print(report)
    if a.json:
        Path(a.json).write_text(json.dumps({"rounds": rounds, "summary": summary, "report": report,
                                            "args": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
