"""User-space instructions of a replica per idle connection and per join, over real sockets (issue 11).

    python -m bench.join_callgrind [--members 2000] [--bus memory,redis,nats] [--before TREE] [--json FILE]
                                   [--presence-limits 100,20,0] [--url-join off,on]

``bench_rooms join``'s storm (real clients from ``bench.rooms_load``, events off, 500 joins in flight), with the
replica run under valgrind's callgrind: instrumentation is on around the connect phase (the idle connection:
handshake and welcome) and around the join phase only, so the figures are instructions per connection and per
join, the same on a loaded machine (CPU-time figures swing by 20 % from run to run here). Not counted: the
kernel (the ``recv``, ``send`` and ``epoll`` system calls, about a third of a join's CPU time on loopback) and the
broker. ``1 + join / idle`` is then the member's cost against an idle connection's in user space. With
``--before`` each bus runs another tree's code first, in the same broker, then this tree's.

``--presence-limits`` (the chat's ``presence_limit``: members listed in ``joined``, 0 = the count only) and
``--url-join off,on``: one replica per bus, code, page size and kind of join. A URL-joining member's connect
phase carries its join (the 101, the welcome and the ``joined`` reply): its ``1 + join / idle`` is its connect
phase's instructions per connection over the idle connection of the frame-joining replica of the same page
size and code (no ratio with ``--url-join on`` alone).
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
import uuid
from pathlib import Path
from typing import Any

from bench import bench_rooms, procs
from bench.bench_rooms import Env, on_all, split, start_workers, stop_workers, workers_for


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=300)


def _dumps(out: Path, pid: int) -> set[Path]:
    return set(out.glob(f"cg.{pid}.*"))


def _dumped(out: Path, pid: int, before: set[Path]) -> int:
    """The instructions of the dump ``callgrind_control -d`` just wrote for ``pid``."""
    deadline = time.monotonic() + 120
    while True:
        new = [p for p in out.glob(f"cg.{pid}.*") if p not in before]
        if new:
            text = max(new, key=lambda p: p.stat().st_mtime).read_text(errors="replace")
            found = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
            if found:
                return int(found.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError(f"no callgrind dump of {pid} in {out}")
        time.sleep(0.2)


async def counted(pid: int, out: Path, work: Any) -> tuple[int, Any]:
    """(instructions, result) of ``await work`` with the replica's instrumentation on."""
    _control(pid, "-i", "on")
    _control(pid, "-z")
    result = await work
    seen = _dumps(out, pid)
    _control(pid, "-d")
    _control(pid, "-i", "off")
    return _dumped(out, pid, seen), result


async def measure(env: Env, kind: str, n: int, out: Path, url_join: bool = False) -> dict[str, Any]:
    proc, port = env.replica(env.bus(kind), False)
    workers = await start_workers(workers_for(n))
    try:
        warm = workers[0]  # imports and first allocations, as bench_rooms join does
        await warm.call("connect", targets=[(port, 50, 0)], room=f"warm-{uuid.uuid4().hex[:6]}", burst=50)
        await warm.call("join", burst=50, timeout=300)
        await warm.call("drop")
        await asyncio.sleep(1)
        room = f"big-{uuid.uuid4().hex[:8]}"
        connect = asyncio.gather(*(w.call("connect", targets=[(port, k, 0)], room=room, burst=500, join_timeout=300,
                                          url_join=url_join)
                                   for w, k in zip(workers, split(n, len(workers)), strict=True)))
        ir_connect, conns = await counted(proc.pid, out, connect)
        ir_join, joins = await counted(proc.pid, out, on_all(workers, "join", burst=500 // len(workers), timeout=300))
        connected = sum(r["connected"] for r in conns)
        joined = sum(r["joined"] for r in joins)
        assert connected and joined, (connected, joined)
        # under valgrind on a loaded machine a few handshakes may time out: per connection and join made
        if url_join:  # the connect phase made the members (with their joins); the join phase only waited
            return {"bus": kind, "members": n, "url_join": "on", "connected": connected, "joined": joined,
                    "instructions_per_member_connection": round(ir_connect / connected),
                    "instructions_join_phase_wait": ir_join, "joined_bytes_avg": _joined_bytes(joins)}
        idle, join = ir_connect / connected, ir_join / joined
        return {"bus": kind, "members": n, "url_join": "off", "connected": connected, "joined": joined,
                "instructions_per_idle_connection": round(idle),
                "instructions_per_join": round(join), "one_plus_join_over_idle": round(1 + join / idle, 3),
                "joined_bytes_avg": _joined_bytes(joins)}
    finally:
        await stop_workers(workers)
        env.stop(proc)


def _joined_bytes(joins: list[dict[str, Any]]) -> int:
    return round(sum(r["joined_bytes"] for r in joins) / max(1, sum(r["joined"] for r in joins)))


def _valgrind(out: Path) -> None:
    """The replicas started from here run under callgrind (instrumentation off until asked), given time to start."""
    plain, spawn = procs.wirehub_cmd, procs.spawn
    procs.wirehub_cmd = lambda config: ["valgrind", "--tool=callgrind", "--instr-atstart=no",  # type: ignore[assignment]
                                        f"--callgrind-out-file={out}/cg.%p", *plain(config)]

    def slow_spawn(*args: Any, **kw: Any) -> Any:
        return spawn(*args, **{**kw, "timeout": 300.0})
    procs.spawn = slow_spawn  # type: ignore[assignment]


async def run(a: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    _valgrind(out)
    env = Env(out)
    limits = [int(x) for x in a.presence_limits.split(",")] if a.presence_limits else [None]
    url_modes = [x.strip() == "on" for x in a.url_join.split(",")]
    try:
        for kind in a.bus.split(","):
            for code, tree in ([("before", Path(a.before))] if a.before else []) + [("after", None)]:
                env.code = tree
                for limit in limits:
                    env.chat_options = {} if limit is None else {"presence_limit": limit}
                    for url_join in url_modes:
                        if url_join and code == "before":
                            continue
                        row = {"code": code, "presence_limit": limit,
                               **await measure(env, kind, a.members, out, url_join)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        env.close()
    _url_ratios(rows)
    for r in rows:
        if r["url_join"] == "on" and "one_plus_join_over_idle" in r:
            print(f"{r['bus']} presence_limit {r['presence_limit']} url-join: member "
                  f"{r['instructions_per_member_connection']} / idle {r['idle_of_frame_replica']} = "
                  f"{r['one_plus_join_over_idle']}", flush=True)
        elif r["url_join"] == "off":
            print(f"{r['bus']} presence_limit {r['presence_limit']} {r['code']} frame join: "
                  f"{r['instructions_per_join']} per join, 1 + join/idle {r['one_plus_join_over_idle']}", flush=True)
    for kind in a.bus.split(","):
        pair = {r["code"]: r for r in rows if r["bus"] == kind and r["url_join"] == "off"
                and r["presence_limit"] == limits[0]}
        if "before" in pair:
            b, x = pair["before"], pair["after"]
            print(f"{kind}: join {b['instructions_per_join']} -> {x['instructions_per_join']} instructions "
                  f"({x['instructions_per_join'] / b['instructions_per_join']:.2f}x), 1 + join/idle "
                  f"{b['one_plus_join_over_idle']} -> {x['one_plus_join_over_idle']}")
    return rows


def _url_ratios(rows: list[dict[str, Any]]) -> None:
    """A URL-join row's ``1 + join / idle``: its member's connect over the idle connection of the frame row of the
    same bus, code and page size (an idle connection's handshake and welcome do not depend on the page size)."""
    for r in rows:
        if r["url_join"] != "on":
            continue
        frames = next((f for f in rows if f["url_join"] == "off" and f["bus"] == r["bus"] and f["code"] == r["code"]
                       and f["presence_limit"] == r["presence_limit"]), None)
        if frames is not None:
            idle = frames["instructions_per_idle_connection"]
            r["idle_of_frame_replica"] = idle
            r["one_plus_join_over_idle"] = round(r["instructions_per_member_connection"] / idle, 3)
            r["instructions_per_join"] = r["instructions_per_member_connection"] - idle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.join_callgrind", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=2000)
    p.add_argument("--bus", default="memory,redis,nats")
    p.add_argument("--before", default=None, help="another wirehub tree, measured first on each bus")
    p.add_argument("--presence-limits", default=None,
                   help="the chat's presence_limit per replica, e.g. 100,20,0 (default: the chat's default)")
    p.add_argument("--url-join", default="off", help="off, on, or off,on: members join with a frame or in the URL")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", default=None, help="a folder for the callgrind dumps (callgrind_annotate them)")
    a = p.parse_args(argv)
    bench_rooms.raise_nofile()
    with tempfile.TemporaryDirectory(prefix="wirehub-join-callgrind-") as tmp:
        out = Path(a.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        rows = asyncio.run(run(a, out))
    if a.json:
        Path(a.json).write_text(json.dumps({"join_callgrind": rows, "meta": {"argv": sys.argv[1:]}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
