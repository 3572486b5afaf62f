"""Run every benchmark scenario against wirehub and the naive Tornado baseline, in one run, and print the table.

    python bench/run.py                 # the issue's sizes: 1,000 fan-out members, 64x8 echo, 5,000 idle
    python bench/run.py --quick         # a smoke run of a few seconds
    python bench/run.py --repeat 3 --json results.json
    python bench/run.py --wirehub-root ../patched    # wirehub from another tree (a change to compare)

Each (scenario, server) pair gets a fresh server process pinned to one core (``--server-core``,
default 0) and a load generator process (:mod:`bench.loadgen`) pinned to another
(``--loadgen-core``, default 1). wirehub runs as ``wirehub serve`` with a bench config (memory bus,
anonymous auth, the production defaults otherwise, logging at warning); the baseline is
:mod:`bench.baseline_server`. With ``--repeat N`` the servers alternate order and the median run
(by throughput per server CPU-second) of each pair is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/run.py`
    sys.path.insert(0, str(ROOT))

from bench.procs import free_port, spawn, stop, tail  # noqa: E402

SCENARIOS = ("fanout", "echo", "idle")
SERVERS = ("wirehub", "baseline")
#: targets from issue 3: (metric, wirehub/baseline ratio, direction)
TARGETS: dict[str, tuple[str, float, str]] = {
    "fanout": ("per_server_cpu_s", 6.0, ">="),
    "echo": ("per_server_cpu_s", 2.0, ">="),
    "idle": ("rss_per_conn", 1.0, "<="),
}
#: wirehub's chat endpoint in the bench: no rate limit (one publisher is the load), and no presence events
#: (1,000 joins would send ~500,000 of them before the measurement starts; the baseline sends none)
CHAT_OPTIONS: dict[str, Any] = {"publish_rate": 1e9, "publish_burst": 1_000_000_000, "presence_events": False}
ENDPOINT = {"fanout": "/ws/chat", "echo": "/ws/echo", "idle": "/ws/echo"}


def _child_setup(core: int | None) -> Any:
    """preexec_fn of the server and load generator: pin to ``core``, open-file limit up to the hard limit."""

    def setup() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        if core is not None:
            os.sched_setaffinity(0, {core})

    return setup


def wirehub_config(port: int, backlog: int, chat: bool, chat_options: dict[str, Any],
                   ping_interval: float | None = None) -> str:
    """The bench config: production defaults except host/port, quiet logs and a short drain."""
    endpoints: list[dict[str, Any]] = [{"path": "/ws/echo", "handler": "echo"}]
    if chat:
        ep: dict[str, Any] = {"path": "/ws/chat", "handler": "chat"}
        if chat_options:
            ep["options"] = chat_options
        endpoints.append(ep)
    server: dict[str, Any] = {"host": "127.0.0.1", "port": port, "backlog": backlog}
    if ping_interval is not None:
        server["ping_interval"] = ping_interval
        server["ping_timeout"] = min(ping_interval, 15)
    cfg = {
        "server": server,
        "logging": {"level": "warning", "access_log": False},
        "drain": {"grace": 2},
        "endpoints": endpoints,
    }
    return json.dumps(cfg)  # JSON is YAML


def chat_available(workdir: Path, root: Path = ROOT) -> tuple[bool, str]:
    """Whether ``wirehub check-config`` accepts ``handler: chat``."""
    path = workdir / "chat-check.yaml"
    path.write_text(wirehub_config(8080, 1024, True, {}))
    proc = subprocess.run([sys.executable, "-m", "wirehub.cli", "check-config", str(path)], cwd=root,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self) -> None:
        stop(self.proc)


def start_server(name: str, workdir: Path, core: int | None, backlog: int, chat: bool,
                 chat_options: dict[str, Any], ping_interval: float | None = None,
                 wirehub_root: Path = ROOT) -> Server:
    port = free_port()
    log = workdir / f"{name}-{port}.log"
    if name == "wirehub":
        cfg = workdir / f"wirehub-{port}.yaml"
        cfg.write_text(wirehub_config(port, backlog, chat, chat_options, ping_interval))
        cmd = [sys.executable, "-m", "wirehub.cli", "--config", str(cfg), "serve"]
    elif name == "node":
        cmd = ["node", str(ROOT / "bench" / "node_ws" / "server.js"), "--port", str(port), "--backlog", str(backlog),
               "--ping-interval", str(20.0 if ping_interval is None else ping_interval)]
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "baseline_server.py"), "--port", str(port),
               "--backlog", str(backlog)]
    cwd = wirehub_root if name == "wirehub" else ROOT
    proc = spawn(cmd, port, log, name=name, cwd=cwd, preexec_fn=_child_setup(core))
    return Server(name, proc, port, log)


def loadgen_args(scenario: str, a: argparse.Namespace) -> list[str]:
    common = ["--warmup", str(a.warmup), "--duration", str(a.duration), "--burst", str(a.burst)]
    if scenario == "echo":
        return [*common, "--conns", str(a.echo_conns), "--inflight", str(a.inflight), "--size", str(a.size)]
    if scenario == "fanout":
        return [*common, "--members", str(a.members), "--window", str(a.window), "--size", str(a.size),
                "--sample-every", str(a.sample_every)]
    return [*common, "--conns", str(a.idle_conns), "--settle", str(a.settle)]


def run_pair(scenario: str, name: str, a: argparse.Namespace, workdir: Path,
             chat_options: dict[str, Any]) -> dict[str, Any]:
    server = start_server(name, workdir, a.server_core, a.backlog, scenario == "fanout" or a.chat,
                          chat_options, a.ping_interval, Path(a.wirehub_root).resolve())
    try:
        url = f"ws://127.0.0.1:{server.port}{ENDPOINT[scenario]}"
        cmd = [sys.executable, "-m", "bench.loadgen", scenario, "--url", url, "--server-pid", str(server.proc.pid),
               *loadgen_args(scenario, a)]
        timeout = a.warmup + a.duration + 120
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_child_setup(a.loadgen_core))
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"loadgen {scenario} against {name} failed ({proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}\nserver log:\n{tail(server.log)}")
        result: dict[str, Any] = json.loads(lines[-1])
        result["server"] = name
        if server.proc.poll() is not None:
            result["errors"] = result.get("errors", 0) + 1
            result["first_error"] = f"server exited with {server.proc.returncode}"
        return result
    finally:
        server.stop()


# -- the report ---------------------------------------------------------------------------------------------------


def _num(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and digits:
        return f"{v:,.{digits}f}"
    return f"{round(v):,}"


def _ms(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:,.0f}"


UNITS = {"fanout": "deliveries", "echo": "round trips", "idle": "handshakes"}


def render(results: dict[tuple[str, str], dict[str, Any]], skipped: dict[str, str], a: argparse.Namespace,
           loads: tuple[str, str]) -> str:
    out: list[str] = []
    head = (f"{'scenario':<8} {'server':<9} {'unit':<12} {'/srv CPU-s':>11} {'/wall s':>10} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'p99.9 ms':>8} {'p99/p50':>8} {'srv CPU':>8} {'gen CPU':>8} {'RSS/conn':>9} {'errors':>6}")
    out += [head, "-" * len(head)]
    for scenario in SCENARIOS:
        if scenario in skipped:
            out.append(f"{scenario:<8} (skipped: {skipped[scenario]})")
            continue
        for name in SERVERS:
            r = results.get((scenario, name))
            if r is None:
                continue
            p50, p99 = r.get("p50_ms"), r.get("p99_ms")
            spread = f"{p99 / p50:,.0f}x" if p50 and p99 else "-"
            rss = f"{r['rss_per_conn'] / 1024:.1f} KiB" if r.get("rss_per_conn") is not None else "-"
            out.append(
                f"{scenario:<8} {name:<9} {UNITS[scenario]:<12} {_num(r.get('per_server_cpu_s')):>11} "
                f"{_num(r.get('per_wall_s')):>10} {_ms(p50):>8} {_ms(p99):>8} {_ms(r.get('p999_ms')):>8} {spread:>8} "
                f"{_num(r.get('server_cpu_pct')) + ' %':>8} {_num(r.get('loadgen_cpu_pct')) + ' %':>8} {rss:>9} "
                f"{r.get('errors', 0):>6}")
    out.append("")
    out.append("wirehub / baseline")
    for scenario in SCENARIOS:
        w, b = results.get((scenario, "wirehub")), results.get((scenario, "baseline"))
        if not w or not b:
            continue
        metric, target, direction = TARGETS[scenario]
        wv, bv = w.get(metric), b.get(metric)
        if not wv or not bv:
            continue
        ratio = wv / bv
        met = ratio >= target if direction == ">=" else ratio <= target
        label = "RSS per idle connection" if metric == "rss_per_conn" else f"{UNITS[scenario]} per server CPU-s"
        verdict = "met" if met else "MISSED"
        line = f"  {scenario:<7} {label:<32} {ratio:6.2f}x   target {direction} {target:g}x: {verdict}"
        if w.get("p99_ms") and b.get("p99_ms"):
            line += f"   p99 {w['p99_ms'] / b['p99_ms']:.2f}x"
        out.append(line)
    warnings = []
    for (scenario, name), r in sorted(results.items()):
        if scenario != "idle" and (r.get("loadgen_cpu_pct") or 0) >= (r.get("server_cpu_pct") or 0):
            warnings.append(f"{scenario}/{name}: the load generator used as much CPU as the server "
                            "(it may be the bottleneck)")
        if r.get("errors"):
            warnings.append(f"{scenario}/{name}: {r['errors']} errors, first: {r.get('first_error')}")
    if warnings:
        out += ["", "warnings:"] + [f"  {w}" for w in warnings]
    out.append("")
    out.append(f"load average before: {loads[0]}; after: {loads[1]}; cores {a.server_core} (server) / "
               f"{a.loadgen_core} (loadgen); duration {a.duration}s after {a.warmup}s warm-up; repeat {a.repeat}")
    return "\n".join(out)


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (a few seconds)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of fanout,echo,idle")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of wirehub,baseline")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per scenario and server")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--members", type=int, default=1000, help="fanout: connections in the room")
    p.add_argument("--window", type=int, default=2, help="fanout: messages with deliveries outstanding")
    p.add_argument("--sample-every", type=int, default=10, help="fanout: members whose deliveries are timed")
    p.add_argument("--echo-conns", type=int, default=64)
    p.add_argument("--inflight", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="approximate payload bytes")
    p.add_argument("--idle-conns", type=int, default=5000)
    p.add_argument("--settle", type=float, default=1.0, help="idle: seconds before reading RSS")
    p.add_argument("--burst", type=int, default=1000, help="handshakes at a time")
    p.add_argument("--backlog", type=int, default=1024, help="listen backlog of both servers")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--loadgen-core", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--ping-interval", type=float, default=None,
                   help="wirehub's server.ping_interval (default: its own, 20 s; 0 = off, like the baseline)")
    p.add_argument("--wirehub-root", default=str(ROOT),
                   help="source tree whose `service` package `wirehub serve` runs (to compare a change)")
    p.add_argument("--chat", action="store_true", help="also serve /ws/chat in the echo and idle runs")
    p.add_argument("--chat-options", default=json.dumps(CHAT_OPTIONS),
                   help="JSON options of wirehub's chat endpoint (default: %(default)s)")
    p.add_argument("--json", default=None, help="write every run's results to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.quick:
        a.duration, a.warmup, a.members, a.echo_conns, a.inflight = 1.0, 0.3, 20, 8, 2
        a.idle_conns, a.settle, a.sample_every, a.burst = 100, 0.2, 2, 100
    if a.no_pin or (os.cpu_count() or 1) < 2:
        a.server_core = a.loadgen_core = None
    scenarios = [s for s in a.scenarios.split(",") if s]
    servers = [s for s in a.servers.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}")
    for s in servers:
        if s not in SERVERS:
            raise SystemExit(f"unknown server {s!r}")
    chat_options: dict[str, Any] = json.loads(a.chat_options)
    skipped: dict[str, str] = {}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="wirehub-bench-") as tmp:
        workdir = Path(tmp)
        if "fanout" in scenarios and "wirehub" in servers:
            ok, why = chat_available(workdir, Path(a.wirehub_root).resolve())
            if not ok:
                skipped["fanout"] = "wirehub check-config does not accept handler: chat yet"
                print(f"fan-out skipped: {why.splitlines()[-1] if why else '?'}", file=sys.stderr)
        a.chat = a.chat and "fanout" not in skipped
        for i in range(a.repeat):
            for scenario in scenarios:
                if scenario in skipped:
                    continue
                order = servers if i % 2 == 0 else list(reversed(servers))
                for name in order:
                    print(f"[{i + 1}/{a.repeat}] {scenario} against {name} ...", file=sys.stderr, flush=True)
                    runs.setdefault((scenario, name), []).append(run_pair(scenario, name, a, workdir, chat_options))
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for key, rs in runs.items():
        metric = TARGETS[key[0]][0]
        ordered = sorted(rs, key=lambda r: r.get(metric) or 0)
        results[key] = ordered[len(ordered) // 2]
        if len(rs) > 1:
            results[key]["spread"] = [r.get(metric) for r in rs]
            results[key]["median_of"] = len(rs)
    report = render(results, skipped, a, (load_before, _load()))
    print(report)
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()},
                                            "chosen": {f"{k[0]}/{k[1]}": v for k, v in results.items()},
                                            "skipped": skipped, "report": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
