"""Big rooms (issue 11): join storm, cross-replica latency, fan-out by room size, reconnect storm.

    python -m bench.bench_rooms join      [--sizes 1000,5000,18000] [--bus memory,redis,nats] [--events off,on]
    python -m bench.bench_rooms latency   [--bus redis,nats] [--subscribers 1000] [--rate 20] [--duration 20]
    python -m bench.bench_rooms fanout    [--sizes 1000,10000,18000] [--bus memory]
    python -m bench.bench_rooms reconnect [--members 18000] [--stayers 1000] [--bus redis]
    python -m bench.bench_rooms all --quick      # every scenario with tiny sizes (each under ~20 s: the smoke test)
    python -m bench.bench_rooms render bench/results/before-*.json     # the README's tables from saved results
    python -m bench.bench_rooms join --bus redis --sizes 18000 --before /work/main   # before/after in one run

Every figure is a ratio against a baseline measured in the same run (the machine is shared, absolute
figures are noisy):

- ``join``: per size N and bus, a fresh replica takes N connections that join nothing (the baseline),
  another fresh replica N connections that each join one room. Figures: server CPU per joined member /
  server CPU per idle connection (target <= 1.2x at 50,000: shown flat from 1,000 to 18,000), the
  join's own CPU per join against the smallest size, joins per second, and RSS per member minus RSS per
  idle connection (target <= 1 KiB). ``--events off`` is the storm baseline; ``on`` is the default.
  ``--url-join on`` (or ``off,on``: both, after the same idle baseline) has each member join in its
  upgrade URL (docs/protocol.md, "Joining in the upgrade URL"): the member's CPU is then the connect
  phase's (plus the few joins still finishing after it); the ``on`` rows carry ``*_vs_frame_join``, the
  ratio to the same code's ``off`` row. A ``--before`` tree is measured with join frames only.
- ``latency``: publisher on replica A, ``--subscribers`` on replica B, ``--rate`` messages per second
  (20 x 1,000 = 20,000 deliveries/s), p50/p99/p99.9 per bus, against the memory bus on one replica
  in the same run (target p99 <= 1.5x). ``presence_ttl`` is ``--presence-ttl`` (3 s: a refresh every
  second, so the window covers many); ``--presence-ttl 3,600`` also runs each bus with no refresh in the
  window and gives the p99 ratio of the two (the refresh's own effect; no spike: about 1.0x).
- ``fanout``: one replica, a room of each size, one member publishing with ``--window`` messages'
  deliveries outstanding: deliveries per server CPU-second against the first size (target >= 1.0).
  ``--paced`` paces the publisher to ``--deliveries`` per second instead, the members over load generators
  of ``--per-worker`` each; the rows split the server's CPU into user and system. On loopback the system
  part is not all the server's: a send runs the receiving client socket's TCP input and epoll wakeup in the
  sender's context. ``--netns on`` (or ``off,on``: both, alternating) runs the load generators in a
  network namespace of their own behind a veth pair (:mod:`bench.netns`; needs root) whose ends receive in
  NAPI threads, the clients' on their core: the replica's CPU is then its own work (Python, its sends, the
  veth's transmit) and nothing of its clients', and its own receive work (its clients' ACKs, which loopback
  charges to the clients) is the server end's thread, given apart (``server_rx_thread_cpu``,
  ``per_server_cpu_with_rx_s``). What it does not model: a NIC (a veth transmit is a ring and a wakeup, no
  DMA or driver), and the clients share one core. ``--perf DIR`` records the replica with ``perf`` while
  measured; the rows give the share of its samples with TCP input (``tcp_v4_rcv``) and the clients' receive
  work (``tcp_data_queue``, ``sock_def_readable``) in their call chains: the check that netns moved it.
  ``--before TREE`` measures each size on both codes. ``--node`` measures Node `ws` (bench/node_ws: every
  message encoded once, one ``ws.send`` per member) in the same run: its rows against its own smallest
  size, and each wirehub row against Node's at its size (``per_server_cpu_s_vs_node``). A size ``N/S``
  puts N members in rooms of S, each room with a publisher of its own at the same rate per member: as many
  sockets, sends per socket and deliveries as ``N``, only the rooms smaller (``--sizes 18000/1000,18000``
  tells the room's size from the number of sockets, which ``--sizes 1000,18000`` changes too).
  ``--member-rate R`` paces every room to R messages per second instead of ``--deliveries`` in total.
  ``--shuffle-joins``: members join in an order drawn at random, not the order they connected in (a
  long-lived room), measured once the hub counts them settled (the warm-up at least its ``SETTLE`` + 2 s).
  ``--churn R`` (``--churn-fraction F``, 0.3): after the joins, R rounds in which a fraction F of the members
  disconnect and as many new connections join, so the replica's heap is one members came and went in (each
  new session's objects in the memory that others left), measured settled too.
  ``--count-sends`` (one replica): deliveries per ``send`` of the replica (perf stat).
- ``reconnect``: three replicas on one broker, all on the server core; ``--members`` members of one room
  on the first, ``--stayers`` on the other two (held by a load-generator worker of their own, so that the
  storm's client side does not delay their reads), a publisher on the second at ``--rate``. The first is
  SIGKILLed; its members reconnect to the survivors and join with ``since``. ``--survivors 1``: two
  replicas, so the one survivor has the core to itself after the kill and takes every rejoin (the issue's
  layout per survivor: 20,000 members over two one-core survivors are ``--members 10000 --survivors 1``).
  Figures: seconds until all rejoined (target < 20), ``recovered: true`` count (target all), messages
  lost / duplicated over every member (target 0), and the stayers' p99 during the storm (target < 100 ms)
  against their p99 before it.
  ``--url-join on`` (or ``off,on``): members join, and rejoin with ``since``, in their upgrade URL.

``--before TREE`` (join, reconnect) runs every measurement twice in the same run, interleaved: on the
code of another wirehub tree (``before``: its ``service`` folder imported as ``wirehub``) and on this
one (``after``); rows carry ``code`` and the after rows the ratio to their before row. The order
alternates from pair to pair (the first pair of a run ``before`` first, the second ``after`` first, ...;
rows carry ``slot``, 1 or 2): the second slot runs on a broker the first one already used (a reconnect
storm's streams and keys, a busier machine), which biased every pair the same way when ``before`` always
went first. ``--rounds N`` (reconnect) measures N pairs per bus, so an even N puts each code first
equally often.

Replicas run pinned to core 0, load-generator worker processes (:mod:`bench.rooms_load`) and this
process (the publisher) to core 1; the brokers, started by this process, inherit core 1. The last line
of stdout is a JSON object ``{scenario: [results...], meta: {...}}``; above it the same as Markdown
tables; ``--json FILE`` writes the JSON to a file too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.bench_buses import bus_block
from bench.loadgen import count_sends, cpu_seconds, cpu_split, raise_nofile, rss_bytes
from bench.netns import ClientNet, VethNamespace, net_rx, perf_record, perf_shares, softirq_seconds, tcp_retransmits
from bench.procs import free_port, node_ws_ready, spawn, start_replica, stop, tail
from bench.rooms_load import Stats, Worker, _open_publisher, latency_ms, pacing
from wirehub.brokers import BrokerProcess, NatsServer, RedisServer

SERVER_CORE, LOADGEN_CORE = 0, 1
#: members one worker process holds (below the 20,000 open files of a process, with room to spare)
PER_WORKER = 15_000
#: the bench's chat options: no publish rate limit (the publisher is the load); events as the run says
CHAT_BASE: dict[str, Any] = {"publish_rate": 1e9, "publish_burst": 1_000_000_000}
perf = time.perf_counter


def server_setup() -> None:
    """preexec_fn of every replica: open-file limit up to the hard limit, pinned to the server core."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {SERVER_CORE})


class Env:
    """Brokers (one per bus for the whole run), replicas, workers; everything stopped at the end."""

    def __init__(self, workdir: Path, chat_options: dict[str, Any] | None = None,
                 server_options: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.chat_options = chat_options or {}
        #: more server keys for this tree's replicas (a --before tree may not know them)
        self.server_options = server_options or {}
        self.presence_ttl: float | None = None
        self.brokers: dict[str, BrokerProcess] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._n = 0
        #: another wirehub tree whose code the next replicas run (--before), None for this one
        self.code: Path | None = None
        #: before/after pairs measured so far (their order alternates)
        self.pairs = 0
        #: the next fan-out replica is Node `ws` (bench/node_ws/server.js), not wirehub
        self.node = False

    def bus(self, kind: str, presence_ttl: float | None = None) -> dict[str, Any]:
        broker = None
        if kind in ("redis", "nats"):
            broker = self.brokers.get(kind)
            if broker is None:
                broker = self.brokers[kind] = RedisServer() if kind == "redis" else NatsServer()
                broker.start()
        block = bus_block(kind, broker, f"rooms{uuid.uuid4().hex[:6]}")
        ttl = presence_ttl if presence_ttl is not None else self.presence_ttl
        if ttl is not None and kind in block:
            block[kind]["presence_ttl"] = ttl
        return block

    def broker_commands(self, kind: str) -> dict[str, int]:
        """Redis: the commands the broker has run so far, by name (INFO commandstats); else empty."""
        broker = self.brokers.get(kind)
        if kind != "redis" or broker is None:
            return {}
        import redis

        with redis.Redis.from_url(broker.url) as client:
            stats = client.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    def broker_pids(self) -> list[int]:
        return [b.pid for b in self.brokers.values() if b.pid]

    def replica(self, bus: dict[str, Any], events: bool | None, host: str | None = None
                ) -> tuple[subprocess.Popen[bytes], int]:
        """A replica on ``bus``; ``host``: the address it listens on (a veth's for clients in a namespace)."""
        self._n += 1
        options = {**CHAT_BASE, **self.chat_options}
        if events is not None and "presence_events" not in self.chat_options:
            options["presence_events"] = events
        endpoint = {"path": "/ws/chat", "handler": "chat", "options": options}
        name = f"{bus['plugin']}-{self._n}"
        saved = os.environ.get("PYTHONPATH")
        if self.code is not None:  # the other tree's `service` folder imported as `wirehub`
            link = self.workdir / "before-path"
            link.mkdir(exist_ok=True)
            if not (link / "wirehub").exists():
                (link / "wirehub").symlink_to(self.code.resolve() / "service")
            os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(link), saved) if x)
        try:
            server = {**(self.server_options if self.code is None else {}), **({"host": host} if host else {})}
            proc, port, _ = start_replica(self.workdir, name, bus, endpoint, preexec_fn=server_setup,
                                          server=server or None)
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved
        self.procs.append(proc)
        return proc, port

    def node_replica(self, host: str | None = None) -> tuple[subprocess.Popen[bytes], int]:
        """Node `ws` speaking the chat JSON on a free port, pinned to the server core (``--node``)."""
        host = host or "127.0.0.1"
        port = free_port(host)
        cmd = ["node", str(node_ws_ready()), "--port", str(port), "--host", host, "--backlog", "2048",
               "--ping-interval", "0"]
        self._n += 1
        proc = spawn(cmd, port, self.workdir / f"node-{self._n}.log", name="node", preexec_fn=server_setup,
                     host=host)
        self.procs.append(proc)
        return proc, port

    def log_tail(self, proc: subprocess.Popen[bytes]) -> str:
        i = self.procs.index(proc) + 1
        logs = sorted(self.workdir.glob(f"*-{i}.log"))
        return tail(logs[0]) if logs else ""

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        stop(proc)

    def close(self) -> None:
        for p in self.procs:
            stop(p)
        for b in self.brokers.values():
            b.close()


def renice(pid: int | None, niceness: int) -> None:
    """Set the niceness of every thread of ``pid`` (setpriority applies to one thread on Linux)."""
    if not pid:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)
        except PermissionError as exc:
            raise SystemExit(f"--priority needs CAP_SYS_NICE (run as root): {exc}") from exc
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def workers_for(n: int) -> int:
    return max(1, math.ceil(n / PER_WORKER))


def set_per_worker(n: int) -> None:
    global PER_WORKER
    PER_WORKER = n


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


async def start_workers(n: int, net: ClientNet | None = None) -> list[Worker]:
    """``n`` load-generator processes on the load generator's core; with ``net`` in that client namespace."""
    return [Worker(i, LOADGEN_CORE, net) for i in range(n)]


async def stop_workers(workers: Sequence[Worker]) -> None:
    await asyncio.gather(*(w.exit() for w in workers))


async def on_all(workers: Sequence[Worker], name: str, **kw: Any) -> list[Any]:
    return list(await asyncio.gather(*(w.call(name, **kw) for w in workers)))


def total(results: Sequence[dict[str, Any]], key: str) -> Any:
    return sum(r[key] for r in results)


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return round(a / b, digits) if a is not None and b else None


# -- join storm ------------------------------------------------------------------------------------------------


async def join_phase(env: Env, kind: str, n: int, *, join: bool, events: bool, burst: int,
                     join_timeout: float, settle: float, idle_window: float = 0.0,
                     profile: Path | None = None, blocking_profile: bool = False,
                     url_join: bool = False) -> dict[str, Any]:
    """A fresh replica; ``n`` connections (then joins of one room when ``join``, or with ``url_join`` joins in
    their upgrade URLs, waited for after the connect phase): its CPU and RSS growth.
    Without ``join``, also the CPU per second of the ``n`` idle connections over ``idle_window``
    seconds (keepalive pings, timers): a join phase that takes longer on a loaded machine pays more of
    it, which the ``net`` join figures take out."""
    proc, port = env.replica(env.bus(kind), events)
    pid = proc.pid
    workers = await start_workers(workers_for(n))
    try:
        # warm-up: 50 connections that join and leave a room, in both phases (imports, first allocations)
        warm = workers[0]
        await warm.call("connect", targets=[(port, 50, 0)], room=f"warm-{uuid.uuid4().hex[:6]}", burst=50)
        await warm.call("join", burst=50, timeout=join_timeout)
        await warm.call("drop")
        await asyncio.sleep(settle)
        room = f"big-{uuid.uuid4().hex[:8]}"
        rss0, c0 = rss_bytes(pid), cpu_seconds(pid)
        # the connect phase's own profile (where the URL joins run), beside the join phase's
        spy = py_spy(pid, profile.with_name("connect-" + profile.name), blocking_profile) if profile else None
        try:
            conn = await asyncio.gather(*(w.call("connect", targets=[(port, k, 0)], room=room, burst=burst,
                                                 url_join=url_join and join, join_timeout=join_timeout)
                                          for w, k in zip(workers, split(n, len(workers)), strict=True)))
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
        c1 = cpu_seconds(pid)
        res: dict[str, Any] = {"bus": kind, "size": n, "join": join, "events": events, "url_join": url_join,
                               "connected": total(conn, "connected"), "connect_failed": total(conn, "failed"),
                               "connect_cpu": round(c1 - c0, 3),
                               "connect_wall": round(max(r["t1"] for r in conn) - min(r["t0"] for r in conn), 3)}
        if join:
            spy = py_spy(pid, profile, blocking_profile) if profile is not None else None
            try:
                joins = await on_all(workers, "join", burst=max(1, burst // len(workers)), timeout=join_timeout)
            finally:
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
                    spy.wait(30)
            c2 = cpu_seconds(pid)
            wall = max(r["t1"] for r in joins) - min(r["t0"] for r in joins)
            res.update(joined=total(joins, "joined"), join_failed=total(joins, "failed"),
                       first_join_error=next((r["first_error"][0] for r in joins if r["first_error"]), None),
                       join_cpu=round(c2 - c1, 3), join_wall=round(wall, 3),
                       joins_per_s=round(total(joins, "joined") / wall, 1) if wall else None,
                       joined_bytes_avg=round(total(joins, "joined_bytes") / max(1, total(joins, "joined"))),
                       joined_bytes_max=max(r["joined_max"] for r in joins),
                       events_received=total(joins, "events"))
        elif idle_window > 0:
            await asyncio.sleep(idle_window)
            res["idle_cpu_per_s"] = round((cpu_seconds(pid) - c1) / idle_window, 4)
        await asyncio.sleep(settle)
        res["rss_growth"] = rss_bytes(pid) - rss0
        res["rss_per_conn"] = round(res["rss_growth"] / max(1, res["connected"]))
        res["server_alive"] = proc.poll() is None
        return res
    finally:
        await stop_workers(workers)
        env.stop(proc)


def py_spy(pid: int, path: Path, blocking: bool) -> subprocess.Popen[bytes]:
    """``py-spy record`` of the replica ``pid`` (the join phase) at 1 kHz, collapsed stacks written to
    ``path``. Non-blocking by default (the replica is not paused per sample, so its CPU figures hold, but
    line numbers are approximate); ``blocking``: exact stacks, the run's CPU figures inflated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = [] if blocking else ["--nonblocking"]
    return subprocess.Popen(["py-spy", "record", "-p", str(pid), *mode, "--format", "raw", "-r", "1000",
                             "-o", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def codes(env: Env, a: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """The code each measurement of the next pair runs: ``after`` (this tree), and with --before also
    ``before``, first in every other pair of the run (the first pair included): see the module's docstring."""
    if not a.before:
        return [("after", None)]
    env.pairs += 1
    pair: list[tuple[str, Path | None]] = [("before", Path(a.before)), ("after", None)]
    return pair if env.pairs % 2 else pair[::-1]


def compare(rows: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """With --before: each after row gets ``<key>_vs_before`` = after / before for ``keys``."""
    before = next((r for r in rows if r.get("code") == "before"), None)
    after = next((r for r in rows if r.get("code") == "after"), None)
    if before is None or after is None:
        return
    for key in keys:
        b, x = before.get(key), after.get(key)
        after[f"{key}_vs_before"] = ratio(x, b) if isinstance(b, int | float) and isinstance(x, int | float) else None


async def scenario_join(env: Env, a: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for kind in a.bus:
        for events in a.events:
            first_per_join: dict[tuple[str, bool], float] = {}
            for n in a.sizes:
                pair: list[dict[str, Any]] = []
                url_rows: list[dict[str, Any]] = []
                for code, url_join, idle in await _join_phases(env, kind, n, events, a):
                    full = idle.pop("_full")
                    cpu_idle = idle["connect_cpu"] / n
                    cpu_member = (full["connect_cpu"] + full.get("join_cpu", 0)) / n
                    per_join = full.get("join_cpu", 0) / n
                    # the join phase's CPU less what the idle connections cost over as long (keepalive)
                    net = (max(0.0, full.get("join_cpu", 0) - idle.get("idle_cpu_per_s", 0) * full.get("join_wall", 0))
                           / n)
                    first_per_join.setdefault((code, url_join), per_join)
                    r = {"scenario": "join", "bus": kind, "size": n, "events": "on" if events else "off",
                         "code": code if a.before or a.node else None, "url_join": "on" if url_join else "off",
                         "cpu_per_idle_conn_us": round(cpu_idle * 1e6, 1),
                         "cpu_per_member_us": round(cpu_member * 1e6, 1),
                         "member_vs_idle_cpu": ratio(cpu_member, cpu_idle),
                         "join_cpu_per_join_us": round(per_join * 1e6, 1),
                         "join_cpu_vs_smallest": ratio(per_join, first_per_join[(code, url_join)]),
                         "join_cpu_net_per_join_us": round(net * 1e6, 1),
                         "member_vs_idle_cpu_net": ratio(full["connect_cpu"] / n + net, cpu_idle),
                         "joins_per_s": full.get("joins_per_s"),
                         "joins_per_server_cpu_s": round(n / full["join_cpu"], 1) if full.get("join_cpu") else None,
                         "rss_per_idle_conn": idle["rss_per_conn"], "rss_per_member": full["rss_per_conn"],
                         "rss_member_minus_idle_kib": round((full["rss_per_conn"] - idle["rss_per_conn"]) / 1024,
                                                            2),
                         "idle": idle, "joined": full}
                    (url_rows if url_join else pair).append(r)
                compare(pair, ("join_cpu_per_join_us", "member_vs_idle_cpu", "joins_per_s", "join_cpu_net_per_join_us"))
                for r in url_rows:  # against the same code's join frames, after the same idle baseline
                    frames = next((f for f in pair if f["code"] == r["code"]), None)
                    for key in ("cpu_per_member_us", "member_vs_idle_cpu", "member_vs_idle_cpu_net"):
                        r[f"{key}_vs_frame_join"] = ratio(r[key], frames[key]) if frames else None
                pair += url_rows
                for r in pair:
                    vs = (f", join CPU {r['join_cpu_per_join_us_vs_before']}x before"
                          if r.get("join_cpu_per_join_us_vs_before") is not None else "")
                    print(f"join {kind:6} events {r['events']:3} N={n:>6}{' ' + r['code'] if r['code'] else ''}"
                          f"{' url-join' if r['url_join'] == 'on' else ''}: "
                          f"{r['joins_per_s']} joins/s, CPU/member {r['member_vs_idle_cpu']}x idle, join CPU "
                          f"{r['join_cpu_per_join_us']} us ({r['join_cpu_vs_smallest']}x N={a.sizes[0]}){vs}, net of "
                          f"keepalive {r['join_cpu_net_per_join_us']} us, CPU/member net "
                          f"{r['member_vs_idle_cpu_net']}x idle, "
                          f"RSS +{r['rss_member_minus_idle_kib']} KiB over idle, "
                          f"failed {r['joined'].get('join_failed')}",
                          file=sys.stderr)
                out += pair
    return out


async def _join_phases(env: Env, kind: str, n: int, events: bool,
                       a: argparse.Namespace) -> list[tuple[str, bool, dict[str, Any]]]:
    """Per code: the idle phase, then one joining phase per ``--url-join`` mode (the idle result of each
    carries its joining phase as ``_full``). A ``before`` tree joins with frames only (it may not know URL joins)."""
    out = []
    for code, tree in codes(env, a):
        env.code = tree
        try:
            kw = {"events": events, "burst": a.burst, "join_timeout": a.join_timeout, "settle": a.settle}
            idle = await join_phase(env, kind, n, join=False, idle_window=a.idle_window, **kw)
            for url_join in a.url_join:
                if url_join and code == "before":
                    continue
                tag = "-url" if url_join else ""
                spy = (Path(a.profile) / f"join-{kind}-{n}-{code}{tag}.txt") if a.profile else None
                full = await join_phase(env, kind, n, join=True, profile=spy, blocking_profile=a.profile_blocking,
                                        url_join=url_join, **kw)
                out.append((code, url_join, {**idle, "_full": full}))
        finally:
            env.code = None
    return out


# -- cross-replica latency ---------------------------------------------------------------------------------------


async def latency_run(env: Env, kind: str, a: argparse.Namespace, presence_ttl: float) -> dict[str, Any]:
    bus = env.bus(kind, presence_ttl)
    pub_proc, pub_port = env.replica(bus, False)
    procs = [pub_proc]
    sub_port = pub_port
    if kind != "memory":
        sub_proc, sub_port = env.replica(bus, False)
        procs.append(sub_proc)
    pids = [p.pid for p in procs] + (env.broker_pids() if kind != "memory" else [])
    room = f"lat-{uuid.uuid4().hex[:8]}"
    workers = await start_workers(workers_for(a.subscribers))
    try:
        await asyncio.gather(*(w.call("connect", targets=[(sub_port, k, a.sample_every)], room=room, burst=a.burst)
                               for w, k in zip(workers, split(a.subscribers, len(workers)), strict=True)))
        joins = await on_all(workers, "join", burst=a.burst, timeout=a.join_timeout)
        pub = await _open_publisher(pub_port, room, Stats())
        stop_pub = asyncio.Event()
        task = pacing(a.rate, pub.publish, stop_pub)
        await asyncio.sleep(a.warmup)
        gen_pids = [os.getpid(), *(w.proc.pid for w in workers if w.proc.pid)]
        s0 = {p: cpu_seconds(p) for p in pids}
        g0 = sum(map(cpu_seconds, gen_pids))
        seq0 = pub.seq
        await on_all(workers, "measure", on=True)
        t0 = perf()
        await asyncio.sleep(a.duration)
        got = await on_all(workers, "measure", on=False)
        wall = perf() - t0
        cpu = {p: round(cpu_seconds(p) - s0[p], 3) for p in pids}
        gen = sum(map(cpu_seconds, gen_pids)) - g0
        stop_pub.set()
        await task
        await asyncio.sleep(min(1.0, a.duration / 2))  # the last deliveries
        reports = await on_all(workers, "report", top=pub.top)
        lat = latency_ms([x for g in got for x in g["latencies"]])
        pub.close()
        return {"scenario": "latency", "bus": kind, "replicas": len(procs), "subscribers": a.subscribers,
                "rate": a.rate, "duration": round(wall, 2),
                "presence_ttl": presence_ttl if kind != "memory" else None,
                "published": pub.seq - seq0, "deliveries": total(got, "count"),
                "expected": round(a.rate * a.subscribers * wall), **lat,
                "lost": total(reports, "lost"), "dup": total(reports, "dup"),
                "not_joined": total(reports, "not_joined"), "errors": total(reports, "errors") + pub.refused,
                "join_failed": total(joins, "failed"), "cpu_by_pid": cpu,
                "servers_cpu_pct": round(100 * sum(cpu.values()) / wall, 1),
                "loadgen_cpu_pct": round(100 * gen / wall, 1)}
    finally:
        await stop_workers(workers)
        for p in procs:
            env.stop(p)


async def scenario_latency(env: Env, a: argparse.Namespace) -> list[dict[str, Any]]:
    """``--presence-ttl`` may list several TTLs (``3,600``): each bus then runs once per TTL, and the rows of the
    first carry ``p99_vs_last_ttl``. With the last TTL long enough that no presence upkeep falls in the window
    (upkeep runs every TTL / 3), that ratio is the refresh's own effect on latency (no spike: about 1.0x)."""
    ttls = a.presence_ttl
    base = await latency_run(env, "memory", a, ttls[0])
    base["p99_vs_memory"] = 1.0
    out = [base]
    for kind in a.bus:
        if kind == "memory":
            continue
        rows = []
        for ttl in ttls:
            r = await latency_run(env, kind, a, ttl)
            r["p99_vs_memory"] = ratio(r["p99_ms"], base["p99_ms"])
            rows.append(r)
        if len(rows) > 1:
            rows[0]["p99_vs_last_ttl"] = ratio(rows[0]["p99_ms"], rows[-1]["p99_ms"])
        out += rows
    for r in out:
        refresh = f", {r['p99_vs_last_ttl']}x the p99 with presence_ttl {ttls[-1]}" if "p99_vs_last_ttl" in r else ""
        print(f"latency {r['bus']:6} presence_ttl {r['presence_ttl']}: p50 {r['p50_ms']} p99 {r['p99_ms']} "
              f"p99.9 {r['p999_ms']} ms ({r['p99_vs_memory']}x memory p99{refresh}), "
              f"{r['deliveries']}/{r['expected']} deliveries, lost {r['lost']}", file=sys.stderr)
    return out


# -- fan-out by room size ----------------------------------------------------------------------------------------


async def fanout_spread(env: Env, kind: str, n: int, a: argparse.Namespace, net: ClientNet | None = None,
                        room_size: int = 0) -> dict[str, Any]:
    """A room of ``n`` members spread over ``a.replicas`` replicas (and as many load-generator processes as
    needed); a publisher on the first replica paced to ``a.deliveries`` deliveries per second (or to
    ``a.member_rate`` messages per second, whatever the size). With ``net``
    the load generators run in that client namespace (the publisher stays on the host's loopback). With
    ``room_size`` (< ``n``) the members are in ``n // room_size`` rooms of that size, each with a publisher of
    its own at the same rate: as many sockets, sends and deliveries, only the rooms smaller."""
    bus = env.bus(kind)
    # with clients in a namespace the replicas listen on the veth's host address (the publisher reaches it too)
    host = net.server if net else None
    started = ([env.node_replica(host)] if env.node else
               [env.replica(bus, False, host) for _ in range(a.replicas)])
    procs, ports = [p for p, _ in started], [port for _, port in started]
    pids = [p.pid for p in procs] + env.broker_pids()
    room = f"fan-{uuid.uuid4().hex[:8]}"
    rooms = [f"{room}-{j}" for j in range(n // room_size)] if 0 < room_size < n else [room]
    workers = await start_workers(workers_for(n), net)
    try:
        shares = split(n, len(workers))
        await asyncio.gather(*(
            w.call("connect", targets=[(port, k, a.sample_every) for port, k in zip(ports, split(share, len(ports)),
                                                                                     strict=True)],
                   room=room, burst=a.burst, rooms=rooms if len(rooms) > 1 else None)
            for w, share in zip(workers, shares, strict=True)))
        joins = await on_all(workers, "join", burst=max(1, a.burst // len(workers)), timeout=a.join_timeout,
                             shuffled=a.shuffle_joins)
        churned = (await on_all(workers, "churn", rounds=a.churn, fraction=a.churn_fraction,
                                burst=max(1, a.burst // len(workers)), timeout=a.join_timeout) if a.churn else [])
        pubs = [await _open_publisher(ports[0], r, Stats(), host or "127.0.0.1") for r in rooms]
        rate = a.member_rate or a.deliveries / n  # messages per second into each room
        stop_pub = asyncio.Event()
        turn = itertools.count()
        task = pacing(rate * len(pubs), lambda: pubs[next(turn) % len(pubs)].publish(), stop_pub)
        await asyncio.sleep(a.warmup)
        gen_pids = [os.getpid(), *(w.proc.pid for w in workers if w.proc.pid)]
        s0, g0 = sum(map(cpu_seconds, pids)), [cpu_seconds(p) for p in gen_pids]
        u0 = sum(cpu_split(p)[0] for p in pids)
        rx0, si0, re0 = net_rx(), softirq_seconds(), tcp_retransmits()
        napi0 = cpu_seconds(net.server_rx_pid) if net else 0.0
        record = None
        if a.perf:
            os.makedirs(a.perf, exist_ok=True)
            code = "before" if env.code else "after"
            record = os.path.join(a.perf, f"fanout-{n}-{'netns' if net else 'loopback'}-{code}.data")
            spy = perf_record(procs[0].pid, record, a.perf_freq)
        await on_all(workers, "measure", on=True)
        t0 = perf()
        # the replica's write system calls in the window (perf stat): deliveries per send, the frames that
        # shared one (a pass that corked two messages for a member sends them in one)
        sends = (asyncio.create_task(count_sends(procs[0].pid, 0.0, max(1.0, a.duration - 1.0)))
                 if a.count_sends else None)
        await asyncio.sleep(a.duration)
        got = await on_all(workers, "measure", on=False)
        wall = perf() - t0
        counted = await sends if sends is not None else None
        if record is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        cpu = sum(map(cpu_seconds, pids)) - s0
        user = sum(cpu_split(p)[0] for p in pids) - u0
        # where the receive processing ran: NET_RX softirqs and softirq time per core (all traffic of the machine)
        rx = [b - x for x, b in zip(rx0, net_rx(), strict=True)]
        napi = cpu_seconds(net.server_rx_pid) - napi0 if net else None
        si = [b - x for x, b in zip(si0, softirq_seconds(), strict=True)]
        retrans = tcp_retransmits() - re0  # the replicas' (in the host's namespace; on loopback the clients' too)
        gens = [cpu_seconds(p) - g for p, g in zip(gen_pids, g0, strict=True)]  # each load generator's own core
        stop_pub.set()
        await task
        for _ in range(20):  # the last deliveries: up to 10 s
            await asyncio.sleep(0.5)
            reports = await on_all(workers, "report", top=pubs[0].top if len(pubs) == 1 else
                                   {r: p.top for r, p in zip(rooms, pubs, strict=True)})
            if not total(reports, "lost_tail"):
                break
        for p in pubs:
            p.close()
        deliveries = total(got, "count")
        # the replica's samples with the clients' receive work in their call chains (loopback: most sends)
        shares = {f"perf_{k}": v for k, v in perf_shares(record).items()} if record is not None else {}
        return {**shares, "deliveries": deliveries, "wall": round(wall, 3), "server_cpu": round(cpu, 3),
                "server_user_cpu": round(user, 3), "loadgen_cpu": round(sum(gens), 3),
                "server_rx_thread_cpu": round(napi, 3) if napi is not None else None,
                "net_rx_server_core": rx[SERVER_CORE] if len(rx) > SERVER_CORE else None,
                "net_rx_loadgen_core": rx[LOADGEN_CORE] if len(rx) > LOADGEN_CORE else None,
                "softirq_s_server_core": round(si[SERVER_CORE], 3) if len(si) > SERVER_CORE else None,
                "softirq_s_loadgen_core": round(si[LOADGEN_CORE], 3) if len(si) > LOADGEN_CORE else None,
                "loadgen_busiest_cpu": round(max(gens), 3), "tcp_retransmits": retrans,
                "frames_per_send": (round(total(got, "count") / wall / (counted[0] / counted[1]), 3)
                                    if counted and counted[0] else None),
                "receivers": n, "replicas": a.replicas, "rate": round(rate, 3),
                "published": sum(p.seq for p in pubs), "rooms": len(rooms),
                "missing_after_drain": total(reports, "lost"), "dup": total(reports, "dup"),
                "not_joined": total(reports, "not_joined"),
                "join_failed": total(joins, "failed") + total(churned, "failed"),
                "churned": total(churned, "replaced"), "latencies": [x for g in got for x in g["latencies"]]}
    finally:
        await stop_workers(workers)
        for p in procs:
            env.stop(p)


#: a fan-out row whose load generators used this much of their core measured them, not the servers
LOADGEN_SATURATED = 95.0


def _validity(row: dict[str, Any]) -> str:
    if row["valid"]:
        return ""
    if not row.get("deliveries", 1):
        return " NOT VALID: nothing was delivered"
    return " NOT VALID: the load generator's core was saturated (it set the rate)"


async def scenario_fanout(env: Env, a: argparse.Namespace) -> list[dict[str, Any]]:
    spread = a.replicas > 1 or a.paced
    if a.netns != [False] and not spread:
        raise SystemExit("fanout --netns on: with --paced (or --replicas > 1) only")
    with contextlib.ExitStack() as stack:
        veth = (stack.enter_context(VethNamespace(f"whfan{os.getpid()}", server_cpu=SERVER_CORE,
                                                  client_cpu=LOADGEN_CORE))
                if True in a.netns and (os.cpu_count() or 1) > 1 else None)
        if True in a.netns and veth is None:
            raise SystemExit("fanout --netns on: needs two cores (the clients' receive work goes to the other)")
        return await _fanout(env, a, veth.client_net if veth else None) if spread else await _fanout_window(env, a)


async def _fanout(env: Env, a: argparse.Namespace, net: ClientNet | None) -> list[dict[str, Any]]:
    """The paced fan-out; per size, each ``--netns`` mode (and with ``--before`` each code) in turn, the order
    alternating from size to size; each mode's rows against its own smallest size, after rows against before."""
    out: list[dict[str, Any]] = []
    variants = [(code, tree, ns) for code, tree in codes(env, a) for ns in a.netns]
    variants += [("node", None, ns) for ns in a.netns] if a.node else []
    for kind in a.bus:
        if kind == "memory" and a.replicas > 1:
            raise SystemExit("fanout --replicas > 1 needs --bus redis or nats")
        if a.node and (kind != "memory" or a.replicas > 1):
            raise SystemExit("fanout --node: one replica on the memory bus only (Node `ws` has no bus)")
        first: dict[tuple[str, bool], float | None] = {}
        first_user: dict[tuple[str, bool], float | None] = {}
        for i, (n, room_size) in enumerate(zip(a.sizes, a.room_sizes, strict=True)):
            rows: dict[tuple[str, bool], dict[str, Any]] = {}
            for code, tree, ns in (variants if i % 2 == 0 else variants[::-1]):
                env.code, env.node = tree, code == "node"
                try:
                    f = await fanout_spread(env, kind, n, a, net if ns else None, room_size)
                finally:
                    env.code, env.node = None, False
                per_cpu = f["deliveries"] / f["server_cpu"] if f["server_cpu"] > 0 else None
                per_user = f["deliveries"] / f["server_user_cpu"] if f["server_user_cpu"] > 0 else None
                first.setdefault((code, ns), per_cpu)
                first_user.setdefault((code, ns), per_user)
                lat = latency_ms(f.pop("latencies"))
                rx_cpu = f["server_rx_thread_cpu"]
                r = {"scenario": "fanout", "bus": kind, "size": n, "room_size": room_size or n,
                     "joins": ("shuffled" if a.shuffle_joins else "in connect order") +
                              (f", {a.churn} rounds of churn ({a.churn_fraction:.0%})" if a.churn else ""),
                     "net": "netns" if ns else "loopback",
                     # netns: with the server end's receive thread (its clients' ACKs, not charged to the replica)
                     "per_server_cpu_with_rx_s": (round(f["deliveries"] / (f["server_cpu"] + rx_cpu), 1)
                                                  if rx_cpu is not None and f["server_cpu"] + rx_cpu > 0 else None),
                     "code": code if a.before or a.node else None,
                     "per_server_cpu_s": round(per_cpu, 1) if per_cpu else None,
                     "per_wall_s": round(f["deliveries"] / f["wall"], 1),
                     "vs_smallest": ratio(per_cpu, first[code, ns]),
                     # the user-space part alone (the Python): the system part grows with the sockets touched
                     "per_server_user_cpu_s": round(per_user, 1) if per_user else None,
                     "user_vs_smallest": ratio(per_user, first_user[code, ns]),
                     "server_sys_share": (round(1 - f["server_user_cpu"] / f["server_cpu"], 3) if f["server_cpu"]
                                          else None),
                     "server_cpu_pct": round(100 * f["server_cpu"] / f["wall"], 1),
                     "loadgen_cpu_pct": round(100 * f["loadgen_cpu"] / f["wall"], 1),
                     "loadgen_busiest_cpu_pct": round(100 * f["loadgen_busiest_cpu"] / f["wall"], 1), **f, **lat}
                r["valid"] = r["loadgen_busiest_cpu_pct"] < LOADGEN_SATURATED and r["deliveries"] > 0
                label = f"{n}/{room_size}" if room_size else str(n)
                print(f"fanout {kind:6} {a.replicas} replicas N={label:>6} {r['net']:8} {code:6}: "
                      f"{r['per_server_cpu_s']} "
                      f"deliveries per CPU-s of replicas+broker ({r['vs_smallest']}x N={a.sizes[0]}; user space "
                      f"alone {r['user_vs_smallest']}x, system share {r['server_sys_share']}), p99 {r['p99_ms']} ms, "
                      f"server {r['server_cpu_pct']} %, loadgen {r['loadgen_cpu_pct']} % (busiest process "
                      f"{r['loadgen_busiest_cpu_pct']} %), NET_RX server/loadgen core {r['net_rx_server_core']}/"
                      f"{r['net_rx_loadgen_core']}, TCP retransmits {r['tcp_retransmits']}, frames per send "
                      f"{r['frames_per_send']}{_validity(r)}",
                      file=sys.stderr)
                rows[code, ns] = r
            for ns in a.netns:
                compare([rows[c, ns] for c, _ in codes(env, a)], ("per_server_cpu_s", "per_server_user_cpu_s"))
                node = rows.get(("node", ns))
                for c, _ in codes(env, a) if node else ():  # wirehub against Node at this size
                    rows[c, ns]["per_server_cpu_s_vs_node"] = ratio(rows[c, ns]["per_server_cpu_s"],
                                                                    node["per_server_cpu_s"])
            out += [rows[v[0], v[2]] for v in variants]
    return out


async def _fanout_window(env: Env, a: argparse.Namespace) -> list[dict[str, Any]]:
    """The unpaced fan-out: one load generator, ``--window`` messages' deliveries outstanding."""
    out: list[dict[str, Any]] = []
    for kind in a.bus:
        first: float | None = None
        for n in a.sizes:
            if n > PER_WORKER + 4000:
                raise SystemExit(f"fanout: {n} members do not fit one load-generator process")
            proc, port = env.replica(env.bus(kind), False)
            pids = [proc.pid] + (env.broker_pids() if kind != "memory" else [])
            workers = await start_workers(1)
            try:
                room = f"fan-{uuid.uuid4().hex[:8]}"
                w = workers[0]
                await w.call("connect", targets=[(port, n, a.sample_every)], room=room, burst=a.burst)
                joins = await w.call("join", burst=a.burst, timeout=a.join_timeout)
                f = await w.call("fanout", window=a.window, warmup=a.warmup, duration=a.duration, pids=pids,
                                 size=a.size)
            finally:
                await stop_workers(workers)
                env.stop(proc)
            per_cpu = f["deliveries"] / f["server_cpu"] if f["server_cpu"] > 0 else None
            if first is None:
                first = per_cpu
            lat = latency_ms(f.pop("latencies"))
            r = {"scenario": "fanout", "bus": kind, "size": n, "join_failed": joins["failed"],
                 "per_server_cpu_s": round(per_cpu, 1) if per_cpu else None,
                 "per_wall_s": round(f["deliveries"] / f["wall"], 1),
                 "vs_smallest": ratio(per_cpu, first),
                 "server_cpu_pct": round(100 * f["server_cpu"] / f["wall"], 1),
                 "loadgen_cpu_pct": round(100 * f["loadgen_cpu"] / f["wall"], 1), **f, **lat}
            r["valid"] = r["loadgen_cpu_pct"] < LOADGEN_SATURATED
            print(f"fanout {kind:6} N={n:>6}: {r['per_server_cpu_s']} deliveries/server CPU-s "
                  f"({r['vs_smallest']}x N={a.sizes[0]}), p99 {r['p99_ms']} ms, server {r['server_cpu_pct']} %, "
                  f"loadgen {r['loadgen_cpu_pct']} %{_validity(r)}", file=sys.stderr)
            out.append(r)
    return out


# -- reconnect storm ---------------------------------------------------------------------------------------------

#: histograms of the survivors read before and after the storm: the server's own share of the stayers' latency
SERVER_HISTOGRAMS = ("wirehub_publish_to_delivery_seconds", "wirehub_loop_lag_seconds")


def scrape_buckets(port: int) -> dict[str, dict[float, float]]:
    """The cumulative buckets (upper bound -> count) of :data:`SERVER_HISTOGRAMS` on a replica's /metrics."""
    import urllib.request

    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, dict[float, float]] = {name: {} for name in SERVER_HISTOGRAMS}
    for line in text.splitlines():
        for name in SERVER_HISTOGRAMS:
            if line.startswith(name + '_bucket{le="'):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[name][math.inf if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


class ProbePoller:
    """Asks ``/healthz`` of each port every ``every`` s from a thread of its own (as a kubelet would) and keeps
    how long each answer took: the survivors' responsiveness during the storm, on any tree."""

    def __init__(self, ports: Sequence[int], every: float = 0.1) -> None:
        import threading

        self.ports, self.every = ports, every
        self.times: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(port,), daemon=True) for port in ports]
        for t in self._threads:
            t.start()

    def _run(self, port: int) -> None:
        import socket

        while not self._stop.is_set():
            t0 = perf()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    ok = sock.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                ok = False
            if ok:
                self.times.append(perf() - t0)
            else:
                self.failed += 1
            self._stop.wait(self.every)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        for t in self._threads:
            t.join(35)
        return {**latency_ms(self.times), "failed": self.failed}


def bucket_quantiles(before: list[dict[str, dict[float, float]]], after: list[dict[str, dict[float, float]]],
                     name: str) -> dict[str, Any] | None:
    """p50 / p99 (the upper bound of the bucket holding it, ms) of ``name`` between two scrapes, summed over
    replicas; None when the replicas do not export it (an older tree)."""
    delta: dict[float, float] = {}
    for b, a in zip(before, after, strict=True):
        for le, n in a.get(name, {}).items():
            delta[le] = delta.get(le, 0.0) + n - b.get(name, {}).get(le, 0.0)
    if not delta or not delta.get(math.inf):
        return None
    total_n = delta[math.inf]

    def q(p: float) -> float | None:
        le = next(le for le in sorted(delta) if delta[le] >= p * total_n)
        return None if le == math.inf else round(le * 1000, 1)

    return {"samples": int(total_n), "p50_le_ms": q(0.5), "p99_le_ms": q(0.99)}



async def reconnect_run(env: Env, kind: str, a: argparse.Namespace, url_join: bool = False) -> dict[str, Any]:
    bus = env.bus(kind)
    events = None if a.reconnect_events else False
    victim, kport = env.replica(bus, events)
    survivors = [env.replica(bus, events) for _ in range(a.survivors)]
    ports = [port for _, port in survivors]
    room = f"storm-{uuid.uuid4().hex[:8]}"
    own_niceness = os.getpriority(os.PRIO_PROCESS, 0)
    # the stayers live in a worker of their own: the storm's client side (thousands of handshakes, joins and
    # replays in the victims' workers) must not delay their reads, or the load generator is what is measured
    workers = await start_workers(workers_for(a.members) + 1)
    n_w = len(workers)
    try:
        vict = split(a.members, n_w - 1)
        stayers = [(port, k, a.sample_every) for port, k in zip(ports, split(a.stayers, len(ports)), strict=True)]
        targets = [[(kport, v, 0)] for v in vict] + [stayers]
        await asyncio.gather(*(w.call("connect", targets=targets[i], room=room, burst=a.burst, url_join=url_join)
                               for i, w in enumerate(workers)))
        if a.priority:
            # the stayers' clients, the publisher (this process) and the broker would each have a machine of
            # their own: ahead of the victims' workers on the load generator's core, so that the stayers'
            # latency is the survivors' and not that of 18,000 clients reconnecting on one core
            # (this process is set back after the storm: what it starts later must not inherit the niceness)
            for pid in (workers[-1].proc.pid, os.getpid(), *env.broker_pids()):
                renice(pid, -a.priority)
        t_join = perf()
        joins = await on_all(workers, "join", burst=max(1, a.burst // n_w), timeout=a.join_timeout)
        join_wall = perf() - t_join
        # --publishers sessions publish in turn (the rate in total): one session's ops run one after the other,
        # each waiting for its bus round trip, so a single publisher measures its own op queue when that is slow
        pubs = [await _open_publisher(ports[0], room, Stats()) for _ in range(a.publishers)]
        turn = itertools.count()
        stop_pub = asyncio.Event()
        task = pacing(a.rate, lambda: pubs[next(turn) % len(pubs)].publish(), stop_pub)
        await asyncio.sleep(a.warmup)
        await on_all(workers, "measure", on=True)
        await asyncio.sleep(a.calm)
        calm = await on_all(workers, "measure", on=False)
        await on_all(workers, "measure", on=True)
        storms = [asyncio.create_task(w.call("storm", dead_port=kport, ports=ports, burst=a.burst,
                                             timeout=a.storm_timeout, jitter=a.jitter)) for w in workers]
        await asyncio.sleep(0.2)
        gen_pids = [w.proc.pid for w in workers if w.proc.pid]
        srv_pids = [p.pid for p, _ in survivors] + env.broker_pids()
        g0, s0 = sum(map(cpu_seconds, gen_pids)), sum(map(cpu_seconds, srv_pids))
        r0 = env.broker_commands(kind)
        h0 = [await asyncio.to_thread(scrape_buckets, p) for p in ports]
        probes = ProbePoller(tuple(ports))
        t_kill = perf()
        victim.kill()
        victim.wait(10)
        results = await asyncio.gather(*storms)
        storm_wall = perf() - t_kill
        healthz = probes.stop()
        h1 = [await asyncio.to_thread(scrape_buckets, p) for p in ports]
        during = await on_all(workers, "measure", on=False)
        gen_pct = round(100 * (sum(map(cpu_seconds, gen_pids)) - g0) / storm_wall, 1)
        srv_cpu = sum(map(cpu_seconds, srv_pids)) - s0
        srv_pct = round(100 * srv_cpu / storm_wall, 1)
        r1 = env.broker_commands(kind)
        await asyncio.sleep(a.after)
        stop_pub.set()
        await task
        await asyncio.sleep(min(2.0, 4 * a.after))  # the last deliveries
        top = max(p.top for p in pubs)
        reports = await on_all(workers, "report", top=top)
        times = sorted(t - t_kill for r in results for t in r["rejoined_at"])
        drops = sorted(t - t_kill for r in results for t in r.get("dropped_at", []))
        calm_lat = latency_ms([x for g in calm for x in g["latencies"]])
        storm_lat = latency_ms([x for g in during for x in g["latencies"]])
        for p in pubs:
            p.close()
        return {"scenario": "reconnect", "bus": kind, "members": a.members, "stayers": a.stayers, "rate": a.rate,
                "priority": a.priority, "survivors": a.survivors,
                "url_join": "on" if url_join else "off",
                "events": "on" if a.reconnect_events else "off", "join_wall": round(join_wall, 2),
                "join_failed": total(joins, "failed"),
                "rejoined": len(times), "victims": total(results, "victims"),
                "all_rejoined_s": round(times[-1], 2) if times and len(times) == total(results, "victims") else None,
                "rejoin_p50_s": round(times[len(times) // 2], 2) if times else None,
                "rejoin_last_s": round(times[-1], 2) if times else None,
                "dropped_p50_s": round(drops[len(drops) // 2], 2) if drops else None,
                "dropped_last_s": round(drops[-1], 2) if drops else None, "storm_wall_s": round(storm_wall, 2),
                "storm_survivors_cpu_pct": srv_pct, "storm_loadgen_cpu_pct": gen_pct,
                # CPU of the survivors and the broker per rejoin (a ratio that holds on a shared machine)
                "survivors_cpu_ms_per_rejoin": round(1000 * srv_cpu / len(times), 3) if times else None,
                # Redis: commands it ran during the storm per rejoin, by name (INFO commandstats)
                "broker_commands_per_rejoin": {k: round((r1[k] - r0.get(k, 0)) / len(times), 2) for k in r1
                                               if r1[k] != r0.get(k, 0)} if times and r1 else None,
                "recovered_true": total(results, "recovered"), "recovered_false": total(results, "unrecovered"),
                # members whose first join had failed: they rejoin without a position to recover from
                "rejoined_without_since": len(times) - total(results, "recovered") - total(results, "unrecovered"),
                "reconnect_attempts_failed": total(results, "attempts_failed"),
                "first_failure": next((r["first_failure"][0] for r in results if r["first_failure"]), None),
                "publishers": len(pubs), "published": sum(p.seq for p in pubs), "acked_top": top,
                "publish_errors": sum(p.refused for p in pubs),
                "lost": total(reports, "lost"), "lost_tail": total(reports, "lost_tail"),
                "dup": total(reports, "dup"), "members_behind": total(reports, "members_behind"),
                "not_joined": total(reports, "not_joined"),
                "calm": calm_lat, "storm": storm_lat,
                "storm_p99_vs_calm": ratio(storm_lat["p99_ms"], calm_lat["p99_ms"]),
                # the survivors' own view during the storm (bucket bounds): publish to fan-out, and loop lag
                "storm_server": {name: bucket_quantiles(h0, h1, name) for name in SERVER_HISTOGRAMS},
                # /healthz asked of both survivors every 0.1 s during the storm: answer times (ms)
                "storm_healthz": healthz,
                "errors": total(reports, "errors"), "first_error": next((r["first_error"] for r in reports
                                                                        if r["first_error"]), None)}
    finally:
        if a.priority:
            renice(os.getpid(), own_niceness)
        await stop_workers(workers)
        for p in (victim, *(s for s, _ in survivors)):
            env.stop(p)


async def scenario_reconnect(env: Env, a: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for kind in a.bus:
        if kind == "memory":
            print("reconnect: the memory bus has one replica; skipped", file=sys.stderr)
            continue
        for rnd in range(a.rounds):
            out += await _reconnect_pair(env, kind, a, rnd + 1)
    return out


async def _reconnect_pair(env: Env, kind: str, a: argparse.Namespace, rnd: int) -> list[dict[str, Any]]:
    """One storm per code (alternating which goes first, see :func:`codes`), and per ``--url-join`` mode."""
    pair, url_rows = [], []
    order = codes(env, a)
    for code, tree, url_join in ((c, t, u) for c, t in order for u in a.url_join if not (u and c == "before")):
        env.code = tree
        load = os.getloadavg()[0]
        try:
            r = await reconnect_run(env, kind, a, url_join)
        finally:
            env.code = None
        r["code"] = code if a.before else None
        r["round"], r["slot"] = rnd, [c for c, _ in order].index(code) + 1
        r["loadavg_start"], r["loadavg_end"] = round(load, 2), round(os.getloadavg()[0], 2)
        r["storm_p99_ms"] = r["storm"]["p99_ms"]
        code = code + (" url-join" if url_join else "")
        print(f"reconnect {kind:6} {code}: survivors+broker CPU {r['survivors_cpu_ms_per_rejoin']} ms per rejoin, "
              f"broker commands per rejoin {r['broker_commands_per_rejoin']}", file=sys.stderr)
        print(f"reconnect {kind:6} M={a.members}{' ' + code if a.before else ''} (round {rnd}, slot {r['slot']}, "
              f"load {r['loadavg_start']}-{r['loadavg_end']}): all rejoined after "
              f"{r['all_rejoined_s']} s ({r['rejoined']}/{r['victims']}, last {r['rejoin_last_s']} s), recovered "
              f"true {r['recovered_true']} false {r['recovered_false']}, lost {r['lost']} dup {r['dup']}, stayers "
              f"p99 {r['storm']['p99_ms']} ms during the storm (calm {r['calm']['p99_ms']} ms), survivors "
              f"{r['storm_survivors_cpu_pct']} % CPU; /healthz p99 {r['storm_healthz']['p99_ms']} ms; published "
              f"{r['published']}, acked up to {r['acked_top']}", file=sys.stderr)
        (url_rows if url_join else pair).append(r)
    keys = ("rejoin_last_s", "rejoin_p50_s", "storm_p99_ms", "survivors_cpu_ms_per_rejoin")
    compare(pair, keys)
    for r in url_rows:  # against the same code's rejoins with a join frame
        frames = next((f for f in pair if f["code"] == r["code"]), None)
        for key in keys:
            r[f"{key}_vs_frame_join"] = ratio(r[key], frames[key]) if frames else None
    return pair + url_rows


# -- tables ------------------------------------------------------------------------------------------------------


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join("-" if c is None else str(c) for c in cells) + " |"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def render(results: dict[str, Any]) -> str:
    """Markdown tables of a result object (what bench/README.md shows)."""
    out: list[str] = []
    heads = {
        "join": ("bus", "events", "N", "code", "URL join", "joins/s", "joins/server CPU-s", "CPU/member vs idle conn",
                 "join CPU us", "join CPU vs before", "join CPU net us", "net vs before", "CPU/member net vs idle",
                 "join CPU vs smallest N", "RSS/idle conn", "RSS/member",
                 "member - idle KiB", "joined bytes avg", "failed"),
        "latency": ("bus", "replicas", "presence_ttl", "subscribers", "deliveries/s", "p50 ms", "p99 ms", "p99.9 ms",
                    "p99 vs memory", "p99 vs last TTL", "lost", "dup", "servers CPU %", "loadgen CPU %"),
        "fanout": ("bus", "N", "deliveries/server CPU-s", "vs smallest N", "user space alone vs smallest N",
                   "system share", "deliveries/s", "p99 ms", "server CPU %", "loadgen CPU %", "valid", "missing",
                   "net", "code", "vs before", "user space vs before", "NET_RX server/loadgen core",
                   "softirq s server/loadgen core"),
        "reconnect": ("bus", "code", "URL join", "members killed", "stayers", "msg/s", "all rejoined s", "rejoin p50 s",
                      "recovered true", "recovered false", "lost", "dup", "stayers p99 calm ms",
                      "stayers p99 storm ms", "storm vs calm"),
    }
    for name, rows in results.items():
        if name not in heads or not rows:
            continue
        out += [f"**{name}**", "", _row(heads[name]), _row(["---"] * len(heads[name]))]
        for r in rows:
            if name == "join":
                j = r["joined"]
                jps = r.get("joins_per_server_cpu_s") or (
                    round(r["size"] / j["join_cpu"], 1) if j.get("join_cpu") else None)
                cells: list[Any] = [r["bus"], r["events"], r["size"], r.get("code"), r.get("url_join"),
                                    r["joins_per_s"], jps,
                                    r["member_vs_idle_cpu"], r["join_cpu_per_join_us"],
                                    r.get("join_cpu_per_join_us_vs_before"), r.get("join_cpu_net_per_join_us"),
                                    r.get("join_cpu_net_per_join_us_vs_before"), r.get("member_vs_idle_cpu_net"),
                                    r["join_cpu_vs_smallest"],
                                    r["rss_per_idle_conn"], r["rss_per_member"], r["rss_member_minus_idle_kib"],
                                    j.get("joined_bytes_avg"), j.get("join_failed")]
            elif name == "latency":
                cells = [r["bus"], r["replicas"], r.get("presence_ttl"), r["subscribers"],
                         round(r["deliveries"] / r["duration"]), r["p50_ms"], r["p99_ms"], r["p999_ms"],
                         r["p99_vs_memory"], r.get("p99_vs_last_ttl"), r["lost"], r["dup"],
                         r.get("servers_cpu_pct"), r.get("loadgen_cpu_pct")]
            elif name == "fanout":
                cells = [r["bus"], r["size"], r["per_server_cpu_s"], r["vs_smallest"], r.get("user_vs_smallest"),
                         r.get("server_sys_share"), r["per_wall_s"], r["p99_ms"], r["server_cpu_pct"],
                         r["loadgen_cpu_pct"],
                         r.get("valid", r["loadgen_cpu_pct"] < LOADGEN_SATURATED), r["missing_after_drain"],
                         r.get("net", "loopback"), r.get("code"), r.get("per_server_cpu_s_vs_before"),
                         r.get("per_server_user_cpu_s_vs_before"),
                         f"{r.get('net_rx_server_core')}/{r.get('net_rx_loadgen_core')}",
                         f"{r.get('softirq_s_server_core')}/{r.get('softirq_s_loadgen_core')}"]
            else:
                cells = [r["bus"], r.get("code"), r.get("url_join"), r["members"], r["stayers"], r["rate"],
                         r["all_rejoined_s"], r["rejoin_p50_s"], r["recovered_true"], r["recovered_false"],
                         r["lost"], r["dup"],
                         r["calm"]["p99_ms"], r["storm"]["p99_ms"], r["storm_p99_vs_calm"]]
            out.append(_row(cells))
        out.append("")
    return "\n".join(out)


# -- command line ------------------------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Env, argparse.Namespace], Any]] = {
    "join": scenario_join, "latency": scenario_latency, "fanout": scenario_fanout, "reconnect": scenario_reconnect,
}
#: per scenario: the defaults of --sizes and --bus
DEFAULTS: dict[str, tuple[str, str]] = {
    "join": ("1000,5000,18000", "memory,redis,nats"),
    "latency": ("", "redis,nats"),
    "fanout": ("1000,10000,18000", "memory"),
    "reconnect": ("", "redis"),
}
QUICK: dict[str, dict[str, Any]] = {
    "join": {"sizes": [100, 200], "bus": ["memory"], "events": [False], "settle": 0.2, "idle_window": 0.5},
    "latency": {"bus": ["redis"], "subscribers": 100, "duration": 1.0, "warmup": 0.2},
    "fanout": {"sizes": [100, 200], "bus": ["memory"], "duration": 0.5, "warmup": 0.2, "deliveries": 5000.0},
    "reconnect": {"bus": ["redis"], "members": 100, "stayers": 20, "calm": 0.3, "after": 0.3, "warmup": 0.2},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_rooms", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=(*SCENARIOS, "all"))
    p.add_argument("--sizes", default=None, help="room sizes (join, fanout)")
    p.add_argument("--bus", default=None, help="memory,redis,nats (default: per scenario)")
    p.add_argument("--events", default="off", help="join: presence events off,on (on = the default config)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and windows (a smoke run)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    p.add_argument("--burst", type=int, default=500, help="handshakes (and joins) in flight per process")
    p.add_argument("--join-timeout", type=float, default=300.0, help="seconds one join may take")
    p.add_argument("--settle", type=float, default=1.0, help="join: seconds before reading RSS")
    p.add_argument("--idle-window", type=float, default=20.0,
                   help="join: seconds the idle connections' CPU is measured (the keepalive's ping_interval)")
    p.add_argument("--subscribers", type=int, default=1000, help="latency: members on replica B")
    p.add_argument("--rate", type=float, default=None, help="messages/s (latency: 20; reconnect: 5)")
    p.add_argument("--presence-ttl", type=_floats, default=[3.0],
                   help="latency: the bus's presence_ttl (upkeep every ttl / 3); a list such as 3,600 runs each bus "
                        "once per TTL and compares the first's p99 with the last's (the refresh's own effect)")
    p.add_argument("--sample-every", type=int, default=10, help="time the deliveries of every n-th member")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=None, help="seconds measured (latency: 20; fanout: 5)")
    p.add_argument("--window", type=int, default=8, help="fanout: messages whose deliveries may be outstanding")
    p.add_argument("--size", type=int, default=100, help="fanout: approximate payload bytes")
    p.add_argument("--replicas", type=int, default=1,
                   help="fanout: spread the room over this many replicas (redis/nats; the publisher is paced)")
    p.add_argument("--member-rate", type=float, default=0.0,
                   help="fanout with --replicas > 1 or --paced: messages per second to every member whatever the "
                        "room's size, instead of --deliveries in total (each socket's sends as far apart)")
    p.add_argument("--deliveries", type=float, default=100_000.0,
                   help="fanout with --replicas > 1 or --paced: deliveries per second the publisher is paced to")
    p.add_argument("--shuffle-joins", action="store_true",
                   help="fanout --paced: members join in an order drawn at random, not the order they connected "
                        "in (a long-lived room's order, after churn); the warm-up is then at least the hub's "
                        "SETTLE + 2 s, so that they are measured settled, in the order the hub gives them then")
    p.add_argument("--churn", type=int, default=0,
                   help="fanout --paced: after the joins, this many rounds in which --churn-fraction of the members "
                        "(drawn at random) disconnect and as many new ones connect and join: the replica's heap "
                        "after members came and went; measured settled, as with --shuffle-joins")
    p.add_argument("--churn-fraction", type=float, default=0.3, help="fanout --churn: members replaced per round")
    p.add_argument("--count-sends", action="store_true",
                   help="fanout --paced: count the replica's write system calls in the window (perf stat) and "
                        "give deliveries per send (frames_per_send)")
    p.add_argument("--node", action="store_true",
                   help="fanout --paced: also measure Node `ws` (bench/node_ws, `npm ci` there) as a replica, "
                        "each size against its own smallest")
    p.add_argument("--paced", action="store_true",
                   help="fanout on one replica as with --replicas > 1: the publisher paced to --deliveries and the "
                        "members spread over load generators of --per-worker each (else: a window of messages)")
    p.add_argument("--netns", default="off",
                   help="fanout --paced: off (loopback), on (load generators in a network namespace of their own "
                        "behind a veth pair, their receive processing steered to their core), or off,on (both)")
    p.add_argument("--perf", default=None,
                   help="fanout --paced: perf record (kernel call chains) of the replica while measured, into this "
                        "folder; rows get the share of samples with the clients' receive work (tcp_data_queue, "
                        "sock_def_readable; client_receive: either) in their chains")
    p.add_argument("--perf-freq", type=int, default=499,
                   help="fanout --perf: samples per second of the replica's CPU time (a short run needs more)")
    p.add_argument("--members", type=int, default=18000, help="reconnect: members on the replica killed")
    p.add_argument("--stayers", type=int, default=1000, help="reconnect: members on the survivors")
    p.add_argument("--survivors", type=int, default=2, choices=(1, 2),
                   help="reconnect: replicas left after the kill, all on the server core (1: the survivor has the "
                        "core to itself, as each of the issue's one-core survivors has)")
    p.add_argument("--calm", type=float, default=3.0, help="reconnect: seconds measured before the kill")
    p.add_argument("--after", type=float, default=2.0, help="reconnect: seconds of publishing after the storm")
    p.add_argument("--server-options", default=None,
                   help='server keys (JSON) for this tree\'s replicas, not --before\'s: \'{"admission_lag": 0.025}\'')
    p.add_argument("--priority", type=int, default=0,
                   help="reconnect: niceness -N for the stayers' worker, the publisher (this process) and the "
                        "broker, ahead of the victims' workers on the load generator's core (in production each "
                        "has a machine of its own); needs root")
    p.add_argument("--publishers", type=int, default=1,
                   help="reconnect: sessions publishing in turn (the --rate in total), on the first survivor")
    p.add_argument("--storm-timeout", type=float, default=120.0, help="reconnect: give up after this many s")
    p.add_argument("--rounds", type=int, default=1,
                   help="reconnect: pairs (or runs) per bus; with --before the order alternates from pair to pair")
    p.add_argument("--jitter", type=float, default=0.0, help="reconnect: random delay before a reconnect, s")
    p.add_argument("--chat-options", default=None,
                   help='JSON merged into every replica\'s chat options, e.g. \'{"presence_limit": 100}\'')
    p.add_argument("--per-worker", type=int, default=PER_WORKER,
                   help="members per load-generator process (more members: more processes)")
    p.add_argument("--before", default=None,
                   help="join, reconnect, fanout --paced: also measure the code of this wirehub tree (e.g. "
                        "/work/main), interleaved")
    p.add_argument("--profile", default=None,
                   help="join: py-spy record (collapsed stacks) of each joining replica's connect phase (connect-*: "
                        "where URL joins run) and join phase (join-*) into this folder")
    p.add_argument("--profile-blocking", action="store_true",
                   help="join --profile: py-spy pauses the replica per sample (exact stacks, inflated CPU figures)")
    p.add_argument("--url-join", default="off",
                   help="join, reconnect: members join in their upgrade URL: off, on, or off,on (both, paired)")
    p.add_argument("--reconnect-events", dest="reconnect_events", action="store_true",
                   help="reconnect: presence events on (default off)")
    return p


def options_for(scenario: str, a: argparse.Namespace) -> argparse.Namespace:
    o = argparse.Namespace(**vars(a))
    sizes, buses = DEFAULTS[scenario]
    # fanout --paced: "N/S" is N members in rooms of S (as many sockets and sends, smaller rooms)
    tokens = [x.partition("/") for x in (a.sizes or sizes).split(",") if x]
    o.sizes = [int(n) for n, _, _ in tokens]
    o.room_sizes = [int(r or 0) for _, _, r in tokens]
    spread = scenario == "fanout" and (a.paced or a.replicas > 1)
    if any(o.room_sizes) and not spread:
        raise SystemExit("--sizes N/S (rooms of S members): fanout with --paced or --replicas > 1 only")
    for n, room_size in zip(o.sizes, o.room_sizes, strict=True):
        if room_size and (room_size > n or n % room_size):
            raise SystemExit(f"--sizes {n}/{room_size}: the rooms' size must divide the members")
    if scenario == "fanout" and not spread and (a.node or a.shuffle_joins or a.count_sends or a.member_rate
                                                 or a.churn):
        raise SystemExit("--node, --shuffle-joins, --churn, --count-sends, --member-rate: fanout with --paced or "
                         "--replicas > 1 only")
    if a.churn < 0 or not 0 < a.churn_fraction <= 1:
        raise SystemExit("--churn: rounds >= 0; --churn-fraction: more than 0, at most 1")
    if a.count_sends and a.replicas > 1:
        raise SystemExit("--count-sends: one replica only (the sends of the first are counted)")
    if (a.shuffle_joins or a.churn) and scenario == "fanout":
        # a member is a newcomer for the hub's SETTLE seconds, taken after the settled ones in join order
        # (service/hub.py): measure once they settled, as a long-lived room's members have
        from wirehub import hub

        o.warmup = max(a.warmup, getattr(hub, "SETTLE", 0.0) + 2.0)
    o.bus = [x.strip() for x in (a.bus or buses).split(",") if x.strip()]
    modes = [x.strip() for x in a.events.split(",")]
    if not modes or any(m not in ("off", "on") for m in modes):
        raise SystemExit(f"--events: a list of off and on, not {a.events!r}")
    o.events = [m == "on" for m in modes]
    url_modes = [x.strip() for x in a.url_join.split(",")]
    if not url_modes or any(m not in ("off", "on") for m in url_modes):
        raise SystemExit(f"--url-join: a list of off and on, not {a.url_join!r}")
    o.url_join = [m == "on" for m in url_modes]
    net_modes = [x.strip() for x in a.netns.split(",")]
    if not net_modes or any(m not in ("off", "on") for m in net_modes):
        raise SystemExit(f"--netns: a list of off and on, not {a.netns!r}")
    o.netns = [m == "on" for m in net_modes]
    o.rate = a.rate if a.rate is not None else (20.0 if scenario == "latency" else 5.0)
    o.duration = a.duration if a.duration is not None else (20.0 if scenario == "latency" else 5.0)
    if a.quick:
        for k, v in QUICK[scenario].items():
            if k == "bus" and a.bus:
                continue
            setattr(o, k, v)
            if k == "sizes":  # one room per size
                o.room_sizes = [0] * len(v)
    return o


async def run(a: argparse.Namespace) -> dict[str, Any]:
    names = list(SCENARIOS) if a.scenario == "all" else [a.scenario]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="wirehub-bench-rooms-") as tmp:
        env = Env(Path(tmp), json.loads(a.chat_options) if a.chat_options else None,
                  json.loads(a.server_options) if a.server_options else None)
        try:
            for name in names:
                results[name] = await SCENARIOS[name](env, options_for(name, a))
        finally:
            env.close()
    results["meta"] = {"argv": sys.argv[1:], "loadavg": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                               time.gmtime()),
                       "cores": {"replicas": SERVER_CORE, "loadgen_and_publisher": LOADGEN_CORE}}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["render"]:  # python -m bench.bench_rooms render RESULT.json ...
        for path in argv[1:]:
            print(render(json.loads(Path(path).read_text())))
        return 0
    a = build_parser().parse_args(argv)
    raise_nofile()
    set_per_worker(a.per_worker)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {LOADGEN_CORE})
    results = asyncio.run(run(a))
    text = json.dumps(results)
    print(render(results))
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
