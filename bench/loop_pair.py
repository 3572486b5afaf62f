"""wirehub on uvloop and on asyncio, both servers running at once on one core: keepalive, echo, fan-out.

    python bench/loop_pair.py --json bench/results/loop-pair-keepalive.json
    python bench/loop_pair.py --scenario echo --windows 6     # handshake, echo, fanout: CPU per unit

bench/bench_conns.py measures one server after the other, so a change in the machine's load between
them (other work on a shared machine) shows in their ratio. Here both servers (``server.event_loop:
uvloop`` and ``asyncio``, the same tree) are pinned to the same core and hold ``--conns`` idle
connections each, pinged every ``--interval`` s, and each window measures both over the same seconds:
whatever else runs on the machine weighs on both alike. The clients run in this process on another core.
``echo`` and ``fanout`` run one ``bench.loadgen`` per server at the same time (both on the client core),
``handshake`` one bench_conns handshake client per server (5,000 connections), ``--windows`` times, and
compare server CPU per round trip, delivery or handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/loop_pair.py`
    sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402
from bench.bench_conns import Pool, _start_wirehub  # noqa: E402

LOOPS = ("uvloop", "asyncio")


def _ratio(row: dict[str, float]) -> float:
    """uvloop / asyncio of one window; NaN when asyncio's CPU time did not reach a clock tick (10 ms)."""
    return row["uvloop"] / row["asyncio"] if row["asyncio"] else float("nan")


async def measure(ports: dict[str, int], pids: dict[str, int], a: argparse.Namespace) -> dict[str, Any]:
    pools = {loop: Pool("127.0.0.1", port, "/ws/echo", a.sources) for loop, port in ports.items()}
    for loop, pool in pools.items():
        _, failures = await pool.open(a.conns, 256)
        assert not failures, (loop, failures[:3])
    await asyncio.sleep(a.interval * 1.5)  # every connection pinged before the first window
    windows: list[dict[str, float]] = []
    total_cpu = dict.fromkeys(LOOPS, 0.0)
    total_pings = dict.fromkeys(LOOPS, 0)
    for _ in range(a.windows):
        cpu0 = {loop: loadgen.cpu_seconds(pid) for loop, pid in pids.items()}
        pings0 = {loop: sum(c.pings for c in pool.clients) for loop, pool in pools.items()}
        await asyncio.sleep(a.interval)
        row: dict[str, float] = {}
        for loop, pool in pools.items():
            pings = sum(c.pings for c in pool.clients) - pings0[loop]
            cpu = loadgen.cpu_seconds(pids[loop]) - cpu0[loop]
            total_cpu[loop] += cpu
            total_pings[loop] += pings
            row[loop] = 1e6 * cpu / pings if pings else float("nan")
        windows.append(row)
        print("  ".join(f"{loop} {row[loop]:.1f} us" for loop in LOOPS), f"{_ratio(row):.2f}x",
              file=sys.stderr, flush=True)
    lost = {loop: pool.lost() for loop, pool in pools.items()}
    for pool in pools.values():
        await pool.close_all()
    ratios = [_ratio(w) for w in windows]
    total = {loop: round(1e6 * total_cpu[loop] / total_pings[loop], 2) for loop in LOOPS}
    return {"windows": windows, "lost": lost, "total_us_per_ping": total,
            "total_ratio": round(total["uvloop"] / total["asyncio"], 3),
            "median_us_per_ping": {loop: round(statistics.median(w[loop] for w in windows), 2) for loop in LOOPS},
            "median_ratio": round(statistics.median(ratios), 3), "min_ratio": round(min(ratios), 3),
            "max_ratio": round(max(ratios), 3), "lower_in": sum(r < 1 for r in ratios)}


async def measure_load(scenario: str, ports: dict[str, int], pids: dict[str, int],
                       a: argparse.Namespace) -> dict[str, Any]:
    path = "/ws/echo" if scenario == "echo" else "/ws/chat"
    extra = (["--conns", "64", "--inflight", "8"] if scenario == "echo"
             else ["--members", "1000", "--window", "2", "--sample-every", "10"])

    def cmd(loop: str) -> list[str]:
        if scenario == "handshake":  # bench_conns' handshake client: 5,000 connections, 256 at a time
            kw = {"conns": 5000, "inflight": 256, "sources": a.sources}
            return [sys.executable, "-m", "bench.bench_conns", "client", "handshake", "--port", str(ports[loop]),
                    "--pid", str(pids[loop]), "--args", json.dumps(kw)]
        return [sys.executable, "-m", "bench.loadgen", scenario, "--url", f"ws://127.0.0.1:{ports[loop]}{path}",
                "--server-pid", str(pids[loop]), "--warmup", "2", "--duration", str(a.duration), *extra]

    def us(result: dict[str, Any]) -> float:
        if scenario == "handshake":
            return 1000 * float(result["cpu_per_1k"])
        return 1e6 / float(result["per_server_cpu_s"])

    windows: list[dict[str, float]] = []
    for _ in range(a.windows):
        procs = {loop: await asyncio.create_subprocess_exec(*cmd(loop), cwd=ROOT, stdout=asyncio.subprocess.PIPE)
                 for loop in LOOPS}
        outs = {loop: (await proc.communicate())[0] for loop, proc in procs.items()}
        row = {loop: us(json.loads(out.decode().strip().splitlines()[-1])) for loop, out in outs.items()}
        windows.append(row)
        print("  ".join(f"{loop} {row[loop]:.2f} us" for loop in LOOPS), f"{_ratio(row):.2f}x",
              file=sys.stderr, flush=True)
    ratios = [_ratio(w) for w in windows]
    med = {loop: round(statistics.median(w[loop] for w in windows), 2) for loop in LOOPS}
    return {"windows": windows, "median_us": med, "median_ratio": round(statistics.median(ratios), 3),
            "min_ratio": round(min(ratios), 3), "max_ratio": round(max(ratios), 3),
            "lower_in": sum(r < 1 for r in ratios)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/loop_pair.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="keepalive", choices=("keepalive", "handshake", "echo", "fanout"))
    p.add_argument("--conns", type=int, default=9000, help="keepalive: idle connections per server")
    p.add_argument("--duration", type=float, default=8.0, help="echo, fanout: seconds per window")
    p.add_argument("--interval", type=float, default=5.0, help="ping interval, and the length of a window")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--sources", type=int, default=4)
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)  # both ignored on a machine with one core
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        a.server_core = a.client_core = None
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="wirehub-pair-") as tmp:
        ping = a.interval if a.scenario == "keepalive" else None
        servers = {loop: _start_wirehub(loop, f"wirehub-{loop}", Path(tmp), a.server_core, 4096, ping, ROOT)
                   for loop in LOOPS}
        try:
            if a.client_core is not None:
                os.sched_setaffinity(0, {a.client_core})
            ports, pids = {k: s.port for k, s in servers.items()}, {k: s.proc.pid for k, s in servers.items()}
            with asyncio.Runner(loop_factory=loadgen.new_event_loop) as runner:
                if a.scenario == "keepalive":
                    result = runner.run(measure(ports, pids, a))
                else:
                    result = runner.run(measure_load(a.scenario, ports, pids, a))
        finally:
            for server in servers.values():
                server.stop()
    if a.scenario != "keepalive":
        unit = {"handshake": "handshake", "echo": "round trip", "fanout": "delivery"}[a.scenario]
        report = (f"{a.scenario}, {a.windows} runs of both at once: server CPU us per {unit}, median uvloop "
                  f"{result['median_us']['uvloop']} / asyncio {result['median_us']['asyncio']}; uvloop / asyncio "
                  f"median {result['median_ratio']:.2f}x ({result['min_ratio']:.2f}-{result['max_ratio']:.2f}x, "
                  f"lower in {result['lower_in']} of {a.windows}); {time.strftime('%Y-%m-%d %H:%M')}")
        print(report)
        if a.json:
            Path(a.json).write_text(json.dumps({"result": result, "report": report, "args": vars(a)}, indent=2))
        return 0
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    tot, med = result["total_us_per_ping"], result["median_us_per_ping"]
    report = (f"keepalive, {a.conns:,} idle connections per server, pinged every {a.interval:g} s, "
              f"{a.windows} windows: us per ping + pong over all windows uvloop {tot['uvloop']} / "
              f"asyncio {tot['asyncio']} = {result['total_ratio']:.2f}x; per window, median uvloop "
              f"{med['uvloop']} / asyncio {med['asyncio']}; "
              f"uvloop / asyncio median {result['median_ratio']:.2f}x ({result['min_ratio']:.2f}-"
              f"{result['max_ratio']:.2f}x, lower in {result['lower_in']} of {a.windows}); closed {result['lost']}; "
              f"load average {load}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(report)
    if a.json:
        Path(a.json).write_text(json.dumps({"result": result, "report": report, "args": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
