"""What a connection costs: wirehub against Node 20 + ``ws`` 8 and the naive Tornado baseline, in one run.

    python bench/bench_conns.py                       # the issue 13 figures (a few minutes)
    python bench/bench_conns.py --quick               # a smoke run
    python bench/bench_conns.py --scenarios handshake,idle --json bench/results/x.json
    python bench/bench_conns.py --wirehub-root ../other-tree   # wirehub from another tree (before/after)
    python bench/bench_conns.py --servers wirehub,wirehub-asyncio,node   # uvloop (the default) vs asyncio

Scenarios (each server gets a fresh process pinned to ``--server-core``, the client side runs in a process
pinned to ``--loadgen-core``; both servers speak the same JSON, see bench/node_ws/server.js):

- ``handshake``: ``--conns`` connections to ``/ws/chat`` (``--inflight`` at a time) with an ``Origin``
  header, each done when its ``welcome`` arrived: conns/s, server CPU-s per 1,000 connections, p50/p99.
  wirehub runs its default config (origin check, the anonymous auth plugin, session, welcome).
- ``idle``: connections to ``/ws/echo`` opened in steps (``--idle-steps``, e.g. 5,000, 10,000, 19,000)
  and left idle with the default keepalive on; RSS growth per connection at each step (flat = it projects).
- ``keepalive``: ``--ka-conns`` idle connections with pings every ``--ka-interval`` s: server CPU per
  ping, projected to 100,000 connections at the default 20 s interval (% of a core); while it runs, the
  latency of ``/healthz`` and of new handshakes, and how many connections were closed (should be 0).
- ``echo``: ``bench.loadgen echo`` (64 connections x 8 in flight): round trips per wall second and per
  server CPU-second.
- ``fanout``: ``bench.loadgen fanout`` (1,000 members): deliveries per server CPU-second.

Connections are spread over loopback source addresses 127.0.0.2.. (``--sources``): one address runs out
of ephemeral ports near 28,000. Ratios are wirehub / Node from the same run.

Servers: ``wirehub`` (its default ``server.event_loop: auto``, uvloop when installed), ``wirehub-asyncio`` and
``wirehub-uvloop`` (the same tree with ``server.event_loop`` set), ``before`` (``--before TREE``), ``node``,
``baseline`` (naive Tornado).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/bench_conns.py`
    sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402
from bench.procs import free_port, node_ws_ready, spawn  # noqa: E402
from bench.run import Server, _child_setup, start_server, wirehub_config  # noqa: E402

SCENARIOS = ("handshake", "idle", "keepalive", "echo", "fanout")
SERVERS = ("wirehub", "node", "baseline")  # and "before" with --before TREE, "wirehub-asyncio", "wirehub-uvloop"
#: servers that are wirehub with ``server.event_loop`` set, by name
LOOP_SERVERS = {"wirehub-asyncio": "asyncio", "wirehub-uvloop": "uvloop"}
#: the issue 13 targets, as wirehub / Node: (scenario, figure, target, direction)
TARGETS = (
    ("handshake", "cpu_per_1k", 1.0, "<="),
    ("idle", "rss_per_conn", 1.0, "<="),
    ("echo", "per_server_cpu_s", 0.8, ">="),  # round trips per second of a saturated core
    ("echo", "per_wall_s", 0.8, ">="),  # the same only when both servers saturate their core
    ("fanout", "per_server_cpu_s", 2.0, ">="),
)
CHAT_OPTIONS: dict[str, Any] = {"publish_rate": 1e9, "publish_burst": 1_000_000_000, "presence_events": False}


# -- the client side (runs in its own process) ------------------------------------------------------------------


class _Client(loadgen.WsClient):
    """Done when its first frame (the chat ``welcome``) arrived, with ``first`` set; counts pings."""

    pings = 0

    def __init__(self, host: str, port: int, path: str, wait_first: bool) -> None:
        super().__init__(host, port, path, {"Origin": f"http://{host}:{port}"})
        self.first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not wait_first:
            self.first.set_result(None)

    def on_message(self, data: bytes, start: int, end: int) -> None:
        if not self.first.done():
            self.first.set_result(None)

    def _control(self, op: int, payload: bytes) -> None:
        if op == 0x9:
            self.pings += 1
        super()._control(op, payload)


class Pool:
    """Opens connections, ``inflight`` at a time, from loopback source addresses taken in turn."""

    def __init__(self, host: str, port: int, path: str, sources: int, wait_first: bool = False) -> None:
        self.host, self.port, self.path, self.wait_first = host, port, path, wait_first
        self.sources = [f"127.0.0.{2 + i}" for i in range(sources)] if sources else [None]
        self.clients: list[_Client] = []
        self._n = 0

    async def one(self, timeout: float = 30.0) -> tuple[_Client, float]:
        loop = asyncio.get_running_loop()
        src = self.sources[self._n % len(self.sources)]
        self._n += 1
        t0 = time.perf_counter()
        _, c = await asyncio.wait_for(loop.create_connection(
            lambda: _Client(self.host, self.port, self.path, self.wait_first), self.host, self.port,
            local_addr=(src, 0) if src else None), timeout)
        try:
            await asyncio.wait_for(asyncio.shield(c.opened), timeout)
            await asyncio.wait_for(asyncio.shield(c.first), timeout)
        except BaseException:
            if c.transport is not None:
                c.transport.abort()
            raise
        return c, time.perf_counter() - t0

    async def open(self, n: int, inflight: int) -> tuple[list[float], list[str]]:
        sem = asyncio.Semaphore(inflight)
        times: list[float] = []
        failures: list[str] = []

        async def go() -> None:
            async with sem:
                try:
                    c, dt = await self.one()
                except (OSError, TimeoutError, ConnectionError) as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    return
                times.append(dt)
                self.clients.append(c)

        await asyncio.gather(*(go() for _ in range(n)))
        return times, failures

    async def close_all(self) -> None:
        for c in self.clients:
            c.close()
        if self.clients:
            await asyncio.wait([c.lost for c in self.clients], timeout=20)
        self.clients = []

    def lost(self) -> int:
        return sum(1 for c in self.clients if c.lost.done())


def _ms(values: list[float], q: float) -> float | None:
    v = loadgen.percentile(sorted(values), q)
    return None if v is None else round(v * 1000, 2)


async def client_handshake(host: str, port: int, pid: int, conns: int, inflight: int, sources: int) -> dict[str, Any]:
    pool = Pool(host, port, "/ws/chat", sources, wait_first=True)
    await pool.open(100, 100)  # warm-up: imports, first allocations
    await pool.close_all()
    await asyncio.sleep(0.5)
    s0, t0 = loadgen.cpu_seconds(pid), time.perf_counter()
    times, failures = await pool.open(conns, inflight)
    wall = time.perf_counter() - t0
    cpu = loadgen.cpu_seconds(pid) - s0
    await pool.close_all()
    ok = len(times)
    return {"conns": ok, "failed": len(failures), "first_error": failures[0] if failures else None,
            "wall": round(wall, 3), "server_cpu": round(cpu, 3), "conns_per_s": round(ok / wall, 1),
            "cpu_per_1k": round(1000 * cpu / ok, 4) if ok else None, "p50_ms": _ms(times, 0.5),
            "p99_ms": _ms(times, 0.99)}


async def client_idle(host: str, port: int, pid: int, steps: list[int], inflight: int, sources: int,
                      settle: float) -> dict[str, Any]:
    pool = Pool(host, port, "/ws/echo", sources)
    await pool.open(100, 100)
    await pool.close_all()
    await asyncio.sleep(settle)
    rss0 = loadgen.rss_bytes(pid)
    out: list[dict[str, Any]] = []
    failed = 0
    for n in steps:
        _, failures = await pool.open(n - len(pool.clients), inflight)
        failed += len(failures)
        await asyncio.sleep(settle)
        rss = loadgen.rss_bytes(pid)
        held = len(pool.clients) - pool.lost()
        out.append({"conns": held, "rss": rss, "rss_per_conn": round((rss - rss0) / held) if held else None})
    await pool.close_all()
    return {"rss_before": rss0, "steps": out, "failed": failed,
            "rss_per_conn": out[-1]["rss_per_conn"] if out else None}


async def _healthz(host: str, port: int) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    await reader.read()
    writer.close()
    return time.perf_counter() - t0


async def client_keepalive(host: str, port: int, pid: int, conns: int, inflight: int, sources: int,
                           interval: float, duration: float) -> dict[str, Any]:
    pool = Pool(host, port, "/ws/echo", sources)
    _, failures = await pool.open(conns, inflight)
    await asyncio.sleep(interval * 1.5)  # every connection pinged at least once before the window
    # a quiet window: the server does nothing but keepalive
    pings0 = sum(c.pings for c in pool.clients)
    s0, t0 = loadgen.cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(duration)
    wall = time.perf_counter() - t0
    cpu = loadgen.cpu_seconds(pid) - s0
    pings = sum(c.pings for c in pool.clients) - pings0
    # then probes: /healthz and new handshakes while every connection is held and pinged
    health: list[float] = []
    fresh: list[float] = []
    probes = Pool(host, port, "/ws/echo", sources)
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < duration:
        health.append(await _healthz(host, port))
        _, dt = await probes.one()
        fresh.append(dt)
        await asyncio.sleep(0.1)
    lost = pool.lost()
    await probes.close_all()
    await pool.close_all()
    per_ping = cpu / pings if pings else None
    return {"conns": conns, "failed": len(failures), "interval": interval, "wall": round(wall, 3),
            "server_cpu": round(cpu, 3), "pings": pings, "cpu_pct": round(100 * cpu / wall, 2),
            "us_per_ping": round(per_ping * 1e6, 2) if per_ping else None,
            # 100,000 connections pinged every default interval (CPU of everything in the window)
            "projected_100k_pct": round(100 * per_ping * 100_000 / _default_ping_interval(), 2) if per_ping else None,
            "projected_interval_s": _default_ping_interval(),
            "healthz_p99_ms": _ms(health, 0.99), "handshake_p99_ms": _ms(fresh, 0.99), "closed": lost}


def _default_ping_interval() -> float:
    """``server.ping_interval``'s default: the interval the 100,000-connection projection is for."""
    from wirehub.config import ServerConfig

    return next(float(f.default) for f in dataclasses.fields(ServerConfig) if f.name == "ping_interval")


def client_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--args", required=True)
    a = p.parse_args(argv)
    kw = json.loads(a.args)
    loadgen.raise_nofile()
    loop = loadgen.new_event_loop()
    fn = {"handshake": client_handshake, "idle": client_idle, "keepalive": client_keepalive}[a.scenario]
    try:
        result = loop.run_until_complete(fn("127.0.0.1", a.port, a.pid, **kw))  # type: ignore[operator]
    finally:
        loop.close()
    print(json.dumps(result), flush=True)
    return 0


# -- the orchestrator -----------------------------------------------------------------------------------------------


def _run_client(cmd: list[str], core: int | None, timeout: float) -> dict[str, Any]:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_child_setup(core))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"client failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _start_wirehub(loop: str, name: str, workdir: Path, core: int | None, backlog: int, ping: float | None,
                   root: Path) -> Server:
    """bench.run's wirehub server with ``server.event_loop: loop``."""
    port = free_port()
    cfg = json.loads(wirehub_config(port, backlog, True, CHAT_OPTIONS, ping))
    cfg.setdefault("server", {})["event_loop"] = loop
    path = workdir / f"{name}-{port}.yaml"
    path.write_text(json.dumps(cfg))
    log = workdir / f"{name}-{port}.log"
    proc = spawn([sys.executable, "-m", "wirehub.cli", "--config", str(path), "serve"], port, log, name=name,
                 cwd=root, preexec_fn=_child_setup(core))
    return Server(name, proc, port, log)


def run_one(scenario: str, name: str, a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ping = a.ka_interval if scenario == "keepalive" else None  # None: the server's default keepalive
    env = os.environ.get("PYTHONPATH")
    if name == "before":  # wirehub from another tree: its `service` folder imported as `wirehub`
        link = workdir / "before-path"
        link.mkdir(exist_ok=True)
        if not (link / "wirehub").exists():
            (link / "wirehub").symlink_to(Path(a.before).resolve() / "service")
        os.environ["PYTHONPATH"] = f"{link}{os.pathsep}{env}" if env else str(link)
    try:
        if name in LOOP_SERVERS:
            server = _start_wirehub(LOOP_SERVERS[name], name, workdir, a.server_core, a.backlog, ping,
                                    Path(a.wirehub_root).resolve())
        else:
            server = start_server("wirehub" if name == "before" else name, workdir, a.server_core, a.backlog,
                                  True, CHAT_OPTIONS, ping, Path(a.wirehub_root).resolve())
    finally:
        if env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env
    pid = server.proc.pid
    try:
        if scenario in ("echo", "fanout"):
            path = "/ws/echo" if scenario == "echo" else "/ws/chat"
            extra = (["--conns", "64", "--inflight", "8"] if scenario == "echo"
                     else ["--members", str(a.members), "--window", "2", "--sample-every", "10"])
            cmd = [sys.executable, "-m", "bench.loadgen", scenario, "--url", f"ws://127.0.0.1:{server.port}{path}",
                   "--server-pid", str(pid), "--warmup", str(a.warmup), "--duration", str(a.duration), *extra]
            result = _run_client(cmd, a.loadgen_core, a.warmup + a.duration + 180)
        else:
            steps = [int(s) for s in a.idle_steps.split(",")]
            kw: dict[str, Any] = {
                "handshake": {"conns": a.conns, "inflight": a.inflight, "sources": a.sources},
                "idle": {"steps": steps, "inflight": a.inflight, "sources": a.sources, "settle": a.settle},
                "keepalive": {"conns": a.ka_conns, "inflight": a.inflight, "sources": a.sources,
                              "interval": a.ka_interval, "duration": a.duration},
            }[scenario]
            cmd = [sys.executable, "-m", "bench.bench_conns", "client", scenario, "--port", str(server.port),
                   "--pid", str(pid), "--args", json.dumps(kw)]
            result = _run_client(cmd, a.loadgen_core, 900)
        if server.proc.poll() is not None:
            result["server_exited"] = server.proc.returncode
        return result
    finally:
        server.stop()


FIGURES = {
    "handshake": [("conns/s", "conns_per_s", 0), ("CPU-s/1k", "cpu_per_1k", 3), ("p50 ms", "p50_ms", 1),
                  ("p99 ms", "p99_ms", 1), ("failed", "failed", 0)],
    "idle": [("RSS/conn KiB", "rss_per_conn", -1), ("failed", "failed", 0)],
    "keepalive": [("% core", "cpu_pct", 2), ("us/ping", "us_per_ping", 1), ("100k %", "projected_100k_pct", 1),
                  ("healthz p99", "healthz_p99_ms", 1), ("hs p99 ms", "handshake_p99_ms", 1),
                  ("closed", "closed", 0)],
    "echo": [("rt/s", "per_wall_s", 0), ("rt/CPU-s", "per_server_cpu_s", 0), ("srv CPU %", "server_cpu_pct", 0),
             ("gen CPU %", "loadgen_cpu_pct", 0), ("p99 ms", "p99_ms", 2)],
    "fanout": [("deliv/CPU-s", "per_server_cpu_s", 0), ("deliv/s", "per_wall_s", 0), ("p99 ms", "p99_ms", 1)],
}


def _fmt(v: Any, digits: int) -> str:
    if v is None:
        return "-"
    if digits == -1:
        return f"{v / 1024:.2f}"
    return f"{v:,.{digits}f}" if digits else f"{round(v):,}"


def render(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    out: list[str] = []
    for scenario, by_server in results.items():
        cols = FIGURES[scenario]
        out.append(f"{scenario:<10} {'server':<15} " + " ".join(f"{c[0]:>12}" for c in cols))
        for name, r in by_server.items():
            out.append(f"{'':<10} {name:<15} " + " ".join(f"{_fmt(r.get(k), d):>12}" for _, k, d in cols))
            if scenario == "idle":
                steps = ", ".join(f"{s['conns']:,}: {s['rss_per_conn'] / 1024:.2f} KiB" for s in r["steps"]
                                  if s["rss_per_conn"] is not None)
                out.append(f"{'':<27}per step: {steps}")
            # a per-server-CPU figure is only a server's cost when the clients kept up with it
            if scenario in ("echo", "fanout") and (r.get("loadgen_cpu_pct") or 0) >= 95:
                out.append(f"{'':<27}NOT VALID: the load generator used {r['loadgen_cpu_pct']:.0f} % of its core "
                           f"(the server {r.get('server_cpu_pct') or 0:.0f} %): it, not {name}, set the rate")
    out += ["", "wirehub / node (targets of issue 13)"]
    for scenario, key, target, direction in TARGETS:
        w, n = results.get(scenario, {}).get("wirehub"), results.get(scenario, {}).get("node")
        if not w or not n or not w.get(key) or not n.get(key):
            continue
        ratio = w[key] / n[key]
        met = ratio <= target if direction == "<=" else ratio >= target
        out.append(f"  {scenario:<10} {key:<17} {ratio:6.2f}x   target {direction} {target:g}x: "
                   f"{'met' if met else 'MISSED'}")
        for other, label in (("before", "before"), ("baseline", "naive Tornado"),
                             ("wirehub-asyncio", "wirehub-asyncio"), ("wirehub-uvloop", "wirehub-uvloop")):
            b = results.get(scenario, {}).get(other)
            if b and b.get(key):
                out[-1] += f"   (wirehub / {label} {w[key] / b[key]:.2f}x)"
    for name in ("wirehub", *LOOP_SERVERS):
        ka = results.get("keepalive", {}).get(name)
        if ka and ka.get("projected_100k_pct") is not None:
            out.append(f"  keepalive  100k projected    {ka['projected_100k_pct']:.1f} % of a core at "
                       f"{ka.get('projected_interval_s', 20):g} s   target < 10 %: "
                       f"{'met' if ka['projected_100k_pct'] < 10 else 'MISSED'}; closed {ka['closed']}"
                       + ("" if name == "wirehub" else f" ({name})"))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    p = argparse.ArgumentParser(prog="python bench/bench_conns.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--conns", type=int, default=5000, help="handshake: connections")
    p.add_argument("--inflight", type=int, default=256, help="handshakes at a time")
    p.add_argument("--idle-steps", default="5000,10000,19000")
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--ka-conns", type=int, default=19000)
    p.add_argument("--ka-interval", type=float, default=5.0, help="keepalive: ping interval in the measurement")
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--sources", type=int, default=4, help="loopback source addresses 127.0.0.2..")
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--loadgen-core", type=int, default=1)
    p.add_argument("--wirehub-root", default=str(ROOT))
    p.add_argument("--before", default=None, help="another wirehub tree, measured as server 'before'")
    p.add_argument("--json", default=None)
    p.add_argument("--render", default=None, help="print the report of an earlier --json file again")
    a = p.parse_args(argv)
    if a.render:
        print(render(json.loads(Path(a.render).read_text())["results"]))
        return 0
    if a.quick:
        a.conns, a.idle_steps, a.ka_conns, a.members, a.duration, a.warmup = 300, "200,400", 300, 50, 2.0, 0.5
        a.settle = 0.5
    if (os.cpu_count() or 1) < 2:
        a.server_core = a.loadgen_core = None
    if "node" in a.servers.split(","):
        node_ws_ready()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="wirehub-conns-") as tmp:
        for scenario in a.scenarios.split(","):
            for name in a.servers.split(","):
                if name == "before" and not a.before:
                    raise SystemExit("server 'before' needs --before TREE")
                if scenario == "keepalive" and name == "baseline":
                    continue  # the naive baseline has no keepalive
                print(f"{scenario} against {name} ...", file=sys.stderr, flush=True)
                results.setdefault(scenario, {})[name] = run_one(scenario, name, a, Path(tmp))
    report = render(results)
    report += f"\n\nload average: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; " \
              f"cores {a.server_core} (server) / {a.loadgen_core} (clients); {time.strftime('%Y-%m-%d %H:%M')}"
    print(report)
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "report": report, "args": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
