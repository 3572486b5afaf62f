"""The capacity plan's workload scaled down (docs/scaling.md): several ``wirehub serve`` replicas on one
broker layout, every connection in a personal room and a 10-member group room, group messages at a paced
rate, connects/disconnects at a paced churn.

Per run (one ``--bus`` at one ``--groups`` size) it reports, over the measurement window:

- deliveries per second and p50/p99 publish-to-delivery latency (every 10th member timed);
- wirehub CPU per delivery and broker CPU per delivery (microseconds; ``/proc/<pid>/stat``);
- broker operations per publish: NATS messages in + out of every node (``/varz`` ``in_msgs`` +
  ``out_msgs`` deltas through the monitoring port), Redis commands (INFO commandstats deltas, without INFO);
- joins per second of the initial joins and broker operations per join (both rooms of a member: 2 joins);
- RSS per connection of the replicas (after connect + join, over their RSS before).

Run it at two sizes with the rate proportional to the connections: if CPU per delivery, operations per
publish and RSS per connection stay flat, the per-unit figures extrapolate linearly (docs/scaling.md).
Fewer ``--replicas`` at the same connections load each replica more (the plan assumes 70 % of a core);
``--place grouped`` puts each group's 10 members on one replica (what placing groups on few pods buys).
``--place alone`` is the spread layout of a fleet of 10 pods or more, where a group's other 9 members are on
other pods: every connection is its group's only member here; it publishes its own share (a 10th of the
group's messages, as a member does) and a publisher process (:mod:`bench.remote_pub`, running the bus code of
the tree measured) sends the other 9 members' share through the bus, as their pods would, so each delivery is
one bus message for one member (the replicas' figures are those of one pod of such a fleet; the publisher's
CPU is reported apart, ``remote_cpu_pct``, not as wirehub's).

    python -m bench.bench_capacity --bus nats-cluster,nats,redis --groups 300,900 --rate-per-conn 1

``--before TREE`` runs every (bus, size) twice, alternately, ``--rounds`` times: replicas of another
wirehub tree (its ``service`` folder imported as ``wirehub``, e.g. ``/work/main``) and of this one; it
then prints the after / before ratios of the wirehub CPU per delivery.

    python -m bench.bench_capacity --bus redis --groups 150,600 --before /work/main --rounds 2

``--room-streams 1,3`` (NATS) makes every (bus, size) at each ``bus.nats.room_streams``, alternately (the order
swapped each round, ``--rounds``), and prints each count against the first: broker CPU per delivery, the busiest
broker node's share of the broker CPU (``busiest_node_share_pct``; one stream's leader does the most), p99.

    python -m bench.bench_capacity --bus nats-cluster --groups 150 --rate-per-conn 1 --room-streams 1,3 --rounds 2

``--netns off,on`` makes every run both with the clients on loopback and with them in a network namespace
behind a veth pair (:mod:`bench.netns`; root, two cores), alternately: on loopback a replica's send also runs its
client's TCP receive, which on a real network runs on the client's machine. In the namespace the replicas listen on
the veth's host address, the clients' sockets are made in a thread that entered the namespace, and the server
end's receive thread (the replicas' own input) is counted as wirehub CPU. It prints each mode against loopback.

    python -m bench.bench_capacity --bus redis --groups 300 --replicas 1 --place alone --netns off,on --rounds 2

The last line of stdout is a JSON list with one result object per run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.loadgen import WsClient, connect, cpu_seconds, percentile, raise_nofile, rss_bytes, upgraded
from bench.netns import ClientNet, VethNamespace, enter
from bench.procs import start_replicas, stop, tree_path, with_workers
from bench.remote_pub import start_bus
from wirehub.broker_clusters import RedisCluster
from wirehub.brokers import BrokerProcess, NatsServer, RedisServer
from wirehub.hub import envelope
from wirehub.nats_cluster import NatsCluster
from wirehub.rooms import message_frame

perf = time.perf_counter
GROUP = 10
CHAT: dict[str, Any] = {"path": "/ws/chat", "handler": "chat",
                        "options": {"publish_rate": 1e9, "publish_burst": 1_000_000_000, "presence_events": False}}


class Stats:
    def __init__(self) -> None:
        self.measuring = False
        self.deliveries = 0
        self.latencies: list[float] = []
        self.errors = 0


class Member(WsClient):
    """Joins its personal room and its group room; counts (and sometimes times) the group's messages."""

    def __init__(self, port: int, index: int, stats: Stats, group: str) -> None:
        super().__init__("127.0.0.1", port, "/ws/chat")
        self.index, self.stats, self.sampled = index, stats, index % 10 == 0
        self.group = group
        self.pending = 0
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def join(self, run: str) -> asyncio.Future[None]:
        self.pending = 2
        for room in (f"{run}-u-{self.index}", f"{run}-{self.group}"):
            self.send(json.dumps({"op": "join", "room": room, "id": "j"}).encode())
        return self.joined

    def publish(self, run: str) -> None:
        self.send(b'{"op":"publish","room":"%s-%s","data":{"t":%.6f}}' % (run.encode(), self.group.encode(), perf()))

    def on_message(self, data: bytes, start: int, end: int) -> None:
        frame = bytes(data[start:end])
        if frame.startswith(b'{"op":"message"'):
            s = self.stats
            if s.measuring:
                s.deliveries += 1
                if self.sampled:
                    i = frame.find(b'"t":') + 4
                    j = i
                    while frame[j] not in (44, 125):
                        j += 1
                    s.latencies.append(perf() - float(frame[i:j]))
        elif frame.startswith(b'{"op":"joined"'):
            self.pending -= 1
            if self.pending == 0 and not self.joined.done():
                self.joined.set_result(None)
        elif frame.startswith(b'{"op":"error"'):
            self.stats.errors += 1
            if not self.joined.done():
                self.joined.set_exception(ConnectionError(frame.decode(errors="replace")[:200]))


class NamespaceSockets:
    """Client sockets made in a network namespace: a thread that entered it makes them (a socket belongs to
    the namespace of the thread that made it), the event loop uses them. Sources are used in turn, so the
    connections spread over the namespace's addresses (ephemeral ports per address)."""

    def __init__(self, net: ClientNet) -> None:
        self.net = net
        self.pool = ThreadPoolExecutor(max_workers=1, initializer=enter, initargs=(net.namespace,))
        self.next = 0

    def _make(self, source: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source, 0))
        return sock

    async def connect(self, factory: Callable[[], Member], port: int, timeout: float) -> Member:
        loop = asyncio.get_running_loop()
        self.next += 1
        sock = await loop.run_in_executor(self.pool, self._make, self.net.sources[self.next % len(self.net.sources)])
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (self.net.server, port)), timeout)
            _, proto = await loop.create_connection(factory, sock=sock)
        except BaseException:
            sock.close()
            raise
        return await upgraded(proto, timeout)

    def close(self) -> None:
        self.pool.shutdown()


class Layout:
    """The broker(s) of one run: pids, a bus block and an operation counter."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.cluster: NatsCluster | None = None
        self.single: BrokerProcess | None = None
        self.redis_cluster: RedisCluster | None = None
        if kind == "nats-cluster":
            self.cluster = NatsCluster()
            self.cluster.start()
        elif kind == "nats":
            self.single = NatsServer()
            self.single.start()
        elif kind == "redis":
            self.single = RedisServer()
            self.single.start()
        elif kind == "redis-cluster":  # 3 primaries + 3 replicas, sharded pub/sub
            self.redis_cluster = RedisCluster()
            self.redis_cluster.start()
        else:
            raise SystemExit(f"unknown bus {kind!r}: nats-cluster, nats, redis or redis-cluster")

    @property
    def pids(self) -> list[int]:
        procs: list[Any] = (self.cluster.nodes if self.cluster else self.redis_cluster.nodes if self.redis_cluster
                            else [self.single] if self.single else [])
        return [p.pid for p in procs if p is not None and p.pid]

    def bus(self, prefix: str, room_streams: int = 1) -> dict[str, Any]:
        if self.cluster is not None:
            return {"plugin": "nats", "nats": {"servers": self.cluster.urls, "subject_prefix": prefix, "replicas": 3,
                                               "room_streams": room_streams}}
        if self.redis_cluster is not None:
            return {"plugin": "redis", "redis": {"mode": "cluster", "key_prefix": prefix,
                                                 "cluster": {"nodes": self.redis_cluster.startup_nodes}}}
        assert self.single is not None
        if self.kind == "nats":
            return {"plugin": "nats", "nats": {"servers": [self.single.url], "subject_prefix": prefix,
                                               "room_streams": room_streams}}
        return {"plugin": "redis", "redis": {"url": self.single.url, "key_prefix": prefix}}

    def ops(self) -> int:
        """NATS: in_msgs + out_msgs of every node (/varz); Redis: commands executed (INFO commandstats; in a
        Redis Cluster, of every node: the replicas' count is the replication stream)."""
        if self.cluster is not None:
            return sum(int(v["in_msgs"]) + int(v["out_msgs"]) for v in self.cluster.varz())
        if self.redis_cluster is not None:
            skip = ("cmdstat_info", "cmdstat_cluster")
            return sum(int(v["calls"]) for node in self.redis_cluster.nodes
                       for k, v in node.call("INFO", "commandstats").items() if k not in skip)
        if isinstance(self.single, NatsServer):
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{self.single.monitor_port}/varz", timeout=2) as r:
                v = json.loads(r.read())
            return int(v["in_msgs"]) + int(v["out_msgs"])
        import redis

        assert self.single is not None
        with redis.Redis(port=self.single.port) as client:
            stats = client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        if self.redis_cluster is not None:
            self.redis_cluster.close()
        if self.single is not None:
            self.single.close()


def show_logs(workdir: Path, prefix: str) -> None:
    for log in sorted(workdir.glob(f"{prefix}*.log")):
        lines = [ln for ln in log.read_text().splitlines() if "presence of" not in ln]
        print(f"--- {log.name}:\n" + "\n".join(lines[-15:]), file=sys.stderr)


async def run(kind: str, a: argparse.Namespace, groups: int, workdir: Path, *, label: str = "after",
              tree: Path | None = None, room_streams: int = 1, net: ClientNet | None = None) -> dict[str, Any]:
    """One measurement; ``tree``: the replicas run another tree's wirehub (labelled ``label``);
    ``room_streams``: NATS's ``bus.nats.room_streams``; ``net``: the clients in that namespace."""
    layout = Layout(kind)
    procs = []
    members: list[Member] = []
    sockets = NamespaceSockets(net) if net is not None else None
    remote: RemotePublisher | None = None
    try:
        prefix, runid = f"cap{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
        names = [f"{kind}-{groups}-{label}-{i}" for i in range(a.replicas)]
        server: dict[str, Any] = {"processes": a.processes} if a.processes != 1 else {}
        if net is not None:
            server["host"] = net.server  # the veth's host end: reachable from the namespace
        procs, ports = start_replicas(workdir, names, layout.bus(prefix, room_streams), CHAT,
                                      wirehub_path=tree_path(workdir, tree) if tree is not None else None,
                                      server=server or None)
        await asyncio.sleep(1.0)
        wpids = with_workers([p.pid for p in procs])  # with server.processes > 1: the supervisors and workers
        rss0 = sum(rss_bytes(p) for p in wpids)
        stats = Stats()
        conns = groups * GROUP
        if a.history_fill:
            await fill_history(kind, layout, prefix, [f"{runid}-g-{k}" for k in range(
                conns if a.place == "alone" else groups)], a.history_fill)
        sem = asyncio.Semaphore(a.burst)

        def port_of(i: int) -> int:
            """spread: a group's 10 members on every replica in turn (a random balancer's layout, as far as 3
            replicas go); grouped: all of them on one replica (placed by group, docs/scaling.md)"""
            return ports[(i // GROUP if a.place == "grouped" else i) % len(ports)]

        def factory(i: int) -> Callable[[], Member]:
            return lambda: Member(port_of(i), i, stats, f"g-{i}" if a.place == "alone" else f"g-{i // GROUP}")

        failures: list[str] = []

        async def arrive(i: int) -> Member:
            """Connect and join both rooms; a refused or timed-out attempt is counted and retried."""
            async with sem:
                for _ in range(10):
                    m = None
                    try:
                        m = await (sockets.connect(factory(i), port_of(i), 30) if sockets is not None
                                   else connect(factory(i), "127.0.0.1", port_of(i), timeout=30))
                        await asyncio.wait_for(m.join(runid), 60)
                        return m
                    except (OSError, TimeoutError) as exc:
                        failures.append(f"{type(exc).__name__}: {exc}"[:200])
                        if m is not None:
                            m.close()
                        await asyncio.sleep(0.5)
                raise RuntimeError(f"member {i} could not join: {failures[-1]}")

        ops0, t0 = layout.ops(), perf()
        arrived = await asyncio.gather(*(arrive(i) for i in range(conns)), return_exceptions=True)
        failed = [m for m in arrived if isinstance(m, BaseException)]
        members = [m for m in arrived if isinstance(m, Member)]
        if failed:
            show_logs(workdir, f"{kind}-{groups}-")
            raise RuntimeError(f"{len(failed)} of {conns} members could not join; first: {failed[0]}")
        join_wall, ops_join = perf() - t0, layout.ops() - ops0
        await asyncio.sleep(1.0)
        rss_per_conn = (sum(rss_bytes(p) for p in wpids) - rss0) / conns
        # pace: group publishes (9 deliveries each) and churn (leave + arrive again), every 20 ms, by the
        # time elapsed (a tick's sleep overruns its 20 ms; counting ticks fell 5-7 % short of the rate)
        rate = a.rate_per_conn * conns
        publishes_per_s = rate / (GROUP - 1)
        # alone: the group's other members' publishes, one bus message and one delivery each
        remote_per_s = rate if a.place == "alone" else 0.0
        remote = (await RemotePublisher.start(layout.bus(prefix), runid, conns, remote_per_s,
                                              tree_path(workdir, tree) if tree is not None else None)
                  if remote_per_s else None)
        churn_per_s = a.churn_per_min_per_conn * conns / 60
        published = 0
        churned = 0
        paced_from = perf()
        stop_at = perf() + a.warmup + a.duration
        if remote is not None:
            remote.begin(paced_from, stop_at)
        measure_at = perf() + a.warmup
        cpu0: dict[int, float] = {}
        ops1 = pub1 = 0
        t1 = perf()
        churns: set[asyncio.Task[None]] = set()
        # the veth's host end receives in a thread of its own: the replicas' input (their clients' frames, ACKs)
        rx_pids = [net.server_rx_pid] if net is not None and net.server_rx_pid else []

        async def churn(i: int) -> None:
            members[i].close()
            members[i] = await arrive(members[i].index)
        while perf() < stop_at:
            if not stats.measuring and perf() >= measure_at:
                cpu0 = {p: cpu_seconds(p) for p in [*wpids, *layout.pids, os.getpid(), *rx_pids]}
                ops1, pub1, t1 = layout.ops(), published, perf()
                stats.measuring = True
            elapsed = perf() - paced_from
            while published < publishes_per_s * elapsed:
                random.choice(members).publish(runid)
                published += 1
            if remote is not None:
                remote.check()
            while churned < churn_per_s * elapsed:
                task = asyncio.ensure_future(churn(random.randrange(len(members))))
                churns.add(task)
                task.add_done_callback(churns.discard)
                churned += 1
            await asyncio.sleep(0.02)
        stats.measuring = False
        # the window in wall-clock time, to line it up with a replica's logs (or a gc.callbacks probe's)
        print(f"measured: {time.time() - (perf() - t1):.3f} - {time.time():.3f} (epoch s)", file=sys.stderr)
        wall = perf() - t1
        await asyncio.gather(*churns)
        remote_report = await remote.finish() if remote is not None else None
        cpu = {p: cpu_seconds(p) - cpu0[p] for p in cpu0}
        ops_pub, pubs = layout.ops() - ops1, published - pub1
        wcpu = sum(cpu[p] for p in [*wpids, *rx_pids])
        bcpu = sum(cpu[p] for p in layout.pids)
        busiest = max((cpu[p] for p in layout.pids), default=0.0)
        lcpu = cpu[os.getpid()]
        lat = sorted(stats.latencies)
        d = max(1, stats.deliveries)
        return {
            "bus": kind, "wirehub": label, "net": "netns" if net is not None else "loopback",
            "room_streams": room_streams, "replicas": a.replicas,
            "processes": a.processes, "place": a.place,
            "connections": conns,
            "target_deliveries_s": rate,
            "deliveries_s": round(stats.deliveries / wall, 1),
            # under 100 %: the replicas or the load generator fell behind (the target rate was not met)
            "delivered_pct": round(100 * stats.deliveries / wall / rate, 1),
            "p50_ms": round((percentile(lat, 0.5) or 0) * 1000, 1),
            "p99_ms": round((percentile(lat, 0.99) or 0) * 1000, 1),
            "wirehub_cpu_us_per_delivery": round(wcpu / d * 1e6, 2),
            "broker_cpu_us_per_delivery": round(bcpu / d * 1e6, 2),
            "broker_ops_per_publish": round(ops_pub / max(1, pubs), 2),
            "joins_s": round(2 * conns / join_wall, 1), "broker_ops_per_join": round(ops_join / (2 * conns), 2),
            "rss_kib_per_conn": round(rss_per_conn / 1024, 2), "churned": churned, "errors": stats.errors,
            "join_retries": len(failures), "first_failure": failures[0] if failures else None,
            "wirehub_cpu_pct": round(100 * wcpu / wall, 1), "broker_cpu_pct": round(100 * bcpu / wall, 1),
            # the broker node that worked most: its share of all broker CPU, and its % of a core
            "busiest_node_share_pct": round(100 * busiest / bcpu, 1) if bcpu else 0.0,
            "busiest_node_cpu_pct": round(100 * busiest / wall, 1),
            "replica_cpu_pct_each": round(100 * wcpu / wall / a.replicas, 1),  # a replica: all its processes
            "wirehub_cpu_us_per_conn_s": round(wcpu / wall / conns * 1e6, 1),
            "loadgen_cpu_pct": round(100 * lcpu / wall, 1),
            "server_rx_cpu_pct": round(100 * sum(cpu[p] for p in rx_pids) / wall, 1),
            # alone: the process standing in for the other pods (not wirehub CPU), and its refused publishes
            # (its own CPU over its pacing, warm-up included: it reports it, having exited when this is read)
            "remote_cpu_pct": round(100 * remote_report["cpu_s"] / remote_report["paced_s"], 1) if remote_report
            else 0.0,
            "remote_sent": remote_report["sent"] if remote_report else None,
            "remote_failed": remote_report["failed"] if remote_report else None,
        }
    finally:
        if remote is not None:
            await remote.kill()
        for m in members:
            m.close()
        if sockets is not None:
            sockets.close()
        for proc in procs:
            stop(proc)
        layout.close()


async def fill_history(kind: str, layout: Layout, prefix: str, rooms: list[str], n: int) -> None:
    """``n`` messages into each group room's history before the members arrive: a room of the plan's rate
    (a message every two seconds) holds 64 after about two minutes, which a run of seconds never reaches,
    and what a publish or a join costs the broker may grow with what the room holds."""
    bus = await start_bus(layout.bus(prefix))
    sem = asyncio.Semaphore(500)

    async def one(room: str) -> None:
        async with sem:
            for _ in range(n):
                frame = message_frame(room, "filler", b'{"t":0}', round(time.time(), 3))
                await bus.publish(room, envelope(frame), history=True)
    try:
        t0 = perf()
        await asyncio.gather(*(one(room) for room in rooms))
        print(f"history: {n} messages in each of {len(rooms)} rooms in {perf() - t0:.1f} s", file=sys.stderr)
    finally:
        await bus.close()


class RemotePublisher:
    """:mod:`bench.remote_pub` in a process of its own, running ``tree``'s bus code (None: this tree's)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    @classmethod
    async def start(cls, bus: dict[str, Any], runid: str, rooms: int, rate: float,
                    tree: Path | None) -> RemotePublisher:
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join(x for x in (str(tree), env.get("PYTHONPATH")) if x)
        spec = {"bus": bus, "runid": runid, "rooms": rooms, "rate": rate}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.remote_pub", json.dumps(spec), cwd=Path(__file__).parent.parent, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self = cls(proc)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if line.strip() != b"ready":
                raise RuntimeError(f"the remote publisher did not start (exit {proc.returncode}): {line!r}")
        except BaseException:
            await self.kill()
            raise
        return self

    def begin(self, start: float, stop: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"start": start, "stop": stop}).encode() + b"\n")

    def check(self) -> None:
        """Raise if the process died while publishing (its stderr, inherited, says why)."""
        if self.proc.returncode is not None:
            raise RuntimeError(f"the remote publisher exited with {self.proc.returncode} while publishing")

    async def finish(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        await self.proc.wait()
        if not line:
            raise RuntimeError(f"the remote publisher exited with {self.proc.returncode} and no report")
        report: dict[str, Any] = json.loads(line)
        if report["failed"]:
            print(f"remote publisher: {report['failed']} of {report['sent']} publishes failed; first: "
                  f"{report['first_error']}", file=sys.stderr)
        return report

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def render(results: list[dict[str, Any]]) -> str:
    cols = ["bus", "wirehub", "net", "room_streams", "replicas", "processes", "place", "connections",
            "target_deliveries_s", "deliveries_s", "delivered_pct", "p50_ms", "p99_ms",
            "wirehub_cpu_us_per_delivery", "wirehub_cpu_us_per_conn_s", "replica_cpu_pct_each",
            "broker_cpu_us_per_delivery", "busiest_node_share_pct", "busiest_node_cpu_pct", "broker_ops_per_publish",
            "joins_s", "broker_ops_per_join",
            "rss_kib_per_conn", "loadgen_cpu_pct", "server_rx_cpu_pct", "remote_cpu_pct", "churned", "errors"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in results]
    return "\n".join(lines)


def ratios(results: list[dict[str, Any]]) -> str:
    """After / before per (bus, connections): the means of the rounds' wirehub and broker CPU per delivery,
    and the p99s."""
    groups: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for r in results:  # one (bus, connections) per run of this script: --replicas and --place are fixed
        groups.setdefault((r["bus"], r["connections"]), {}).setdefault(r["wirehub"], []).append(r)
    lines = ["| bus | connections | wirehub CPU us/delivery, before | after | after / before "
             "| broker CPU us/delivery, before | after | after / before | p99 ms before | after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cpu, broker = "wirehub_cpu_us_per_delivery", "broker_cpu_us_per_delivery"

    def ratio(by: dict[str, list[dict[str, Any]]], key: str) -> str:
        before = sum(float(r[key]) for r in by["before"]) / len(by["before"])
        after = sum(float(r[key]) for r in by["after"]) / len(by["after"])
        return f"**{after / before:.2f}x**" if before else "-"  # a run too short for a CPU tick: no ratio
    for (bus, conns), by in groups.items():
        if "before" not in by or "after" not in by:
            continue
        each = {label: {key: ", ".join(str(r[key]) for r in by[label]) for key in (cpu, broker, "p99_ms")}
                for label in ("before", "after")}
        lines.append(f"| {bus} | {conns} | {each['before'][cpu]} | {each['after'][cpu]} | {ratio(by, cpu)} | "
                     f"{each['before'][broker]} | {each['after'][broker]} | {ratio(by, broker)} | "
                     f"{each['before']['p99_ms']} | {each['after']['p99_ms']} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def net_ratios(results: list[dict[str, Any]]) -> str:
    """Per (bus, connections, code): the namespace's means against loopback's, over the rounds."""
    groups: dict[tuple[str, int, str, int], dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        key = (r["bus"], r["connections"], r["wirehub"], r["room_streams"])
        groups.setdefault(key, {}).setdefault(r["net"], []).append(r)
    keys = ("wirehub_cpu_us_per_conn_s", "wirehub_cpu_us_per_delivery", "p99_ms", "delivered_pct")
    lines = ["| bus | connections | wirehub | rounds | " + " | ".join(f"{k}, loopback -> netns" for k in keys) + " |",
             "|" + "---|" * (4 + len(keys))]
    for (bus, conns, code, _), by in groups.items():
        if "loopback" not in by or "netns" not in by:
            continue
        mean = {n: {k: sum(float(r[k]) for r in rs) / len(rs) for k in keys} for n, rs in by.items()}
        lo, ns = mean["loopback"], mean["netns"]
        cells = [f"{lo[k]:.1f} -> {ns[k]:.1f}" + (f" (**{ns[k] / lo[k]:.2f}x**)" if lo[k] else "") for k in keys]
        lines.append(f"| {bus} | {conns} | {code} | {len(by['netns'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def stream_ratios(results: list[dict[str, Any]]) -> str:
    """Per (bus, connections): each ``room_streams`` against the first one given, means over the rounds."""
    groups: dict[tuple[str, int], dict[int, list[dict[str, Any]]]] = {}
    for r in results:
        groups.setdefault((r["bus"], r["connections"]), {}).setdefault(r["room_streams"], []).append(r)
    keys = ("broker_cpu_us_per_delivery", "busiest_node_share_pct", "busiest_node_cpu_pct", "p99_ms",
            "wirehub_cpu_us_per_delivery", "delivered_pct")
    lines = ["| bus | connections | room_streams | rounds | " + " | ".join(keys) + " |", "|" + "---|" * (4 + len(keys))]
    for (bus, conns), by in groups.items():
        base = next(iter(by.values()))
        mean = {n: {k: sum(float(r[k]) for r in rs) / len(rs) for k in keys} for n, rs in by.items()}
        first = mean[base[0]["room_streams"]]
        for n, m in mean.items():
            cells = [f"{m[k]:.1f}" + (f" ({m[k] / first[k]:.2f}x)" if first[k] and m is not first else "")
                     for k in keys]
            lines.append(f"| {bus} | {conns} | {n} | {len(by[n])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--bus", default="nats-cluster,nats,redis")
    p.add_argument("--groups", default="300,900", help="10-member groups per run (connections = 10 x groups)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--processes", type=int, default=1, help="server.processes of each replica (worker processes)")
    p.add_argument("--place", choices=("spread", "grouped", "alone"), default="spread",
                   help="a group's members on every replica in turn (spread), all on one (grouped), or one member "
                        "per group here and the other 9 on pods simulated by a publisher (alone)")
    p.add_argument("--history-fill", type=int, default=0,
                   help="messages published into each group room's history before the members join (a room "
                        "that has lived for minutes; the broker's cost per publish and per join may grow with it)")
    p.add_argument("--rate-per-conn", type=float, default=0.5, help="group deliveries/s per connection (plan: 0.5)")
    p.add_argument("--churn-per-min-per-conn", type=float, default=0.2, help="plan: 200,000/min of 1M = 0.2")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--burst", type=int, default=100)
    p.add_argument("--before", default=None, type=Path,
                   help="another wirehub tree (e.g. /work/main): each run is made with it and with this tree")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each (bus, size): with --before a before/after pair each, with several "
                        "--room-streams or --netns modes one of each, alternately")
    p.add_argument("--netns", default="off", help="off, on or off,on: the clients on loopback or in a network "
                   "namespace behind a veth pair (root, two cores); both: alternately, each against loopback")
    p.add_argument("--room-streams", default="1",
                   help="NATS bus.nats.room_streams; several (1,3): each run is made at each, alternately")
    a = p.parse_args(argv)
    if a.before is not None and not (a.before / "service" / "__init__.py").is_file():
        p.error(f"--before {a.before}: no wirehub tree there (no service/__init__.py)")
    modes = [m.strip() for m in a.netns.split(",")]
    if not modes or set(modes) - {"off", "on"}:
        p.error(f"--netns: a list of off and on, not {a.netns!r}")
    if "on" in modes and (os.cpu_count() or 1) < 2:
        p.error("--netns on: needs two cores (the clients' receive work goes to the other)")
    raise_nofile()
    results = []
    with tempfile.TemporaryDirectory(prefix="wirehub-bench-capacity-") as tmp, contextlib.ExitStack() as stack:
        veth = (stack.enter_context(VethNamespace(f"whcap{os.getpid()}", server_cpu=0, client_cpu=1, subnet=204))
                if "on" in modes else None)
        nets = [veth.client_net if m == "on" and veth is not None else None for m in modes]
        for kind in a.bus.split(","):
            for groups in (int(g) for g in a.groups.split(",")):
                counts = [int(n) for n in a.room_streams.split(",")]
                plan: list[tuple[str, Path | None, int]] = [("after", None, n) for n in counts]
                if a.before is not None:  # alternately, so that the machine's load drifts over both
                    pair: list[tuple[str, Path | None, int]] = [("before", a.before, counts[0]),
                                                                  ("after", None, counts[0])]
                    # and the order swapped each round: the second run of a pair was slower in some runs
                    plan = [run for i in range(max(1, a.rounds)) for run in (pair if i % 2 == 0 else pair[::-1])]
                elif len(counts) > 1:  # alternately, and each round in the other order
                    plan = [("after", None, n) for r in range(max(1, a.rounds))
                            for n in (counts if r % 2 == 0 else counts[::-1])]
                else:  # the net modes (if several) alternate within each round
                    plan = plan * max(1, a.rounds)
                for i, (label, tree, n) in enumerate(plan):
                    # each net mode in turn, the order swapped every other step (the machine's load drifts)
                    for net in nets if i % 2 == 0 else nets[::-1]:
                        result = asyncio.run(run(kind.strip(), a, groups, Path(tmp), label=label, tree=tree,
                                                 room_streams=n, net=net))
                        print(json.dumps(result), file=sys.stderr)
                        results.append(result)
    print(render(results))
    if a.before is not None:
        print()
        print(ratios(results))
    elif "," in a.room_streams:
        print()
        print(stream_ratios(results))
    if len(nets) > 1:
        print()
        print(net_ratios(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
