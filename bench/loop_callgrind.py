"""Instructions per handshake, keepalive ping and echo round trip of `wirehub serve` on each event loop.

    python bench/loop_callgrind.py --json bench/results/loop-callgrind.json      # about 3 minutes

valgrind's callgrind counts the user-space instructions of the server (the interpreter, uvloop/libuv or
asyncio, Tornado, wirehub; not the kernel) while real clients open connections (600), idle through
keepalive pings (2,000 connections pinged every 2 s), echo frames or receive a room's messages (200
members; ``bench.loadgen``); instrumentation is switched on around that work only. Unlike CPU
time on a shared machine the counts do not depend on the load, so one run decides what the loop changes
in user space; CPU-time figures are bench/bench_conns.py's (servers ``wirehub`` and ``wirehub-asyncio``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/loop_callgrind.py`
    sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402
from bench.bench_conns import CHAT_OPTIONS, Pool  # noqa: E402
from bench.procs import free_port, spawn, stop  # noqa: E402
from bench.run import wirehub_config  # noqa: E402


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def _instructions(out_dir: Path, pid: int) -> int:
    """The Ir total of the newest dump of ``pid``."""
    dumps = sorted(out_dir.glob(f"callgrind.out.{pid}*"), key=lambda p: p.stat().st_mtime)
    text = dumps[-1].read_text(errors="replace")
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    assert match, f"no totals in {dumps[-1]}"
    return int(match.group(1))


async def counted(pid: int, out_dir: Path, work: Callable[[], Awaitable[int]]) -> tuple[int, int]:
    """(instructions, units of work) of ``work`` alone."""
    _control(pid, "-i", "on")
    _control(pid, "-z")
    units = await work()
    _control(pid, "-d")
    _control(pid, "-i", "off")
    return _instructions(out_dir, pid), units


async def handshakes(port: int, n: int) -> Callable[[], Awaitable[int]]:
    pool = Pool("127.0.0.1", port, "/ws/chat", 1, wait_first=True)
    await pool.open(50, 50)  # warm-up: imports, first allocations
    await pool.close_all()
    await asyncio.sleep(1)

    async def work() -> int:
        times, failures = await pool.open(n, 16)
        assert not failures, failures[:3]
        await pool.close_all()
        await asyncio.sleep(2)  # the closes are handled
        return len(times)
    return work


async def pings(port: int, conns: int, interval: float, duration: float) -> Callable[[], Awaitable[int]]:
    pool = Pool("127.0.0.1", port, "/ws/echo", 1)
    _, failures = await pool.open(conns, 16)
    assert not failures, failures[:3]
    await asyncio.sleep(interval * 2)

    async def work() -> int:
        before = sum(c.pings for c in pool.clients)
        await asyncio.sleep(duration)
        got = sum(c.pings for c in pool.clients) - before
        assert pool.lost() == 0
        return got
    return work


def loadgen_run(scenario: str, port: int, duration: float) -> Callable[[], Awaitable[int]]:
    """``bench.loadgen echo`` (16 connections x 4 in flight) or ``fanout`` (200 members): its count."""
    extra = (["--conns", "16", "--inflight", "4"] if scenario == "echo"
             else ["--members", "200", "--window", "2", "--sample-every", "10"])
    path = "/ws/echo" if scenario == "echo" else "/ws/chat"

    async def work() -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.loadgen", scenario, "--url", f"ws://127.0.0.1:{port}{path}",
            "--warmup", "0", "--duration", str(duration), *extra, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        return int(json.loads(out.decode().strip().splitlines()[-1])["count"])
    return work


def run(loop: str, scenario: str, a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = free_port()
    ping = a.ka_interval if scenario == "keepalive" else None
    cfg = json.loads(wirehub_config(port, 1024, True, CHAT_OPTIONS, ping))
    cfg["server"]["event_loop"] = loop
    path = workdir / f"{loop}-{scenario}.yaml"
    path.write_text(json.dumps(cfg))
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={workdir}/callgrind.out.%p",
           sys.executable, "-m", "wirehub.cli", "--config", str(path), "serve"]
    proc = spawn(cmd, port, workdir / f"{loop}-{scenario}.log", name=f"{loop} {scenario}", timeout=300)
    try:
        async def go() -> tuple[int, int]:
            if scenario == "handshake":
                return await counted(proc.pid, workdir, await handshakes(port, a.conns))
            if scenario == "keepalive":
                return await counted(proc.pid, workdir, await pings(port, a.ka_conns, a.ka_interval, a.duration))
            # a short and a long run of the load generator: their difference is the messages alone, without
            # the connections, joins and process start of a run
            ir1, n1 = await counted(proc.pid, workdir, loadgen_run(scenario, port, a.duration / 3))
            ir2, n2 = await counted(proc.pid, workdir, loadgen_run(scenario, port, a.duration))
            return ir2 - ir1, n2 - n1

        with asyncio.Runner(loop_factory=loadgen.new_event_loop) as runner:
            ir, units = runner.run(go())
    finally:
        stop(proc)
    return {"instructions": ir, "units": units, "per_unit": round(ir / units) if units else None}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/loop_callgrind.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--loops", default="uvloop,asyncio")
    p.add_argument("--scenarios", default="handshake,keepalive,echo,fanout")
    p.add_argument("--conns", type=int, default=600, help="handshake: connections")
    p.add_argument("--ka-conns", type=int, default=2000, help="keepalive: idle connections")
    p.add_argument("--ka-interval", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=10.0, help="keepalive, echo, fanout: seconds counted")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    loops = a.loops.split(",")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="wirehub-callgrind-") as tmp:
        for scenario in a.scenarios.split(","):
            for loop in loops:
                print(f"{scenario} on {loop} ...", file=sys.stderr, flush=True)
                results.setdefault(scenario, {})[loop] = run(loop, scenario, a, Path(tmp))
    unit = {"handshake": "handshake + welcome + close", "keepalive": "ping + pong", "echo": "round trip",
            "fanout": "delivery"}
    lines = []
    for scenario, by_loop in results.items():
        row = "   ".join(f"{loop} {r['per_unit']:,} ({r['units']:,})" for loop, r in by_loop.items())
        lines.append(f"{scenario:<10} instructions per {unit[scenario]}: {row}")
        if len(loops) == 2 and all(by_loop[lp]["per_unit"] for lp in loops):
            ratio = by_loop[loops[0]]["per_unit"] / by_loop[loops[1]]["per_unit"]
            lines[-1] += f"   {loops[0]} / {loops[1]} {ratio:.2f}x"
    report = "\n".join(lines) + f"\n{time.strftime('%Y-%m-%d %H:%M')}"
    print(report)
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "report": report, "args": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
