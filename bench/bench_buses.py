"""Fan-out across replicas through each bus: deliveries per second and publish-to-delivery latency.

Scenarios (one room, ``--members`` chat members, one of them publishing with at most ``--window``
messages' deliveries outstanding, as in ``bench.loadgen fanout``):

- ``memory``: one ``wirehub serve`` replica with the memory bus, every member on it;
- ``redis``:  two replicas on one ``redis-server``, members split evenly between them;
- ``nats``:   two replicas on one ``nats-server -js``, members split evenly between them;
- ``redis-cluster``: two replicas on a Redis Cluster of 3 primaries + 3 replicas (sharded pub/sub);
- ``redis-sentinel``: two replicas on a Sentinel-managed master with 2 replicas and 3 sentinels.
- ``nats-cluster``: two replicas on a 3-node NATS cluster, stream and buckets replicated (R3), each
  replica given every node's URL.

The publisher is on the first replica. A delivery's latency is from the publish (a timestamp in the
payload) to its read by a member, sampled on every ``--sample-every``-th member of both replicas.
Brokers are started on free ports in temporary directories (:mod:`wirehub.brokers`); replicas are
real ``wirehub serve`` processes. CPU seconds of the replicas, the broker and this load generator are
reported for the measurement window (on a small machine they compete for the same cores); the
broker's are every data node's (primaries and replicas; sentinels are idle). Beside deliveries per
CPU-second: joins per second (the members' joins, ``--burst`` at a time) and broker operations per
publish and per join: on Redis the commands INFO commandstats of the primaries counts (also each one a
Lua script runs), on NATS the messages in + out of every node (``/varz`` ``in_msgs`` + ``out_msgs``
through the monitoring port: client and route traffic, so R3's replication between nodes counts).

    python -m bench.bench_buses [--members 1000] [--duration 5] [--scenarios memory,redis,nats]
    python -m bench.bench_buses --scenarios redis,redis-cluster,redis-sentinel
    python -m bench.bench_buses --scenarios nats,nats-cluster

The last line of stdout is a JSON list with one result object per scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.loadgen import ChatClient, Fan, Window, connect_many, measure, raise_nofile, summarize
from bench.procs import start_replicas, stop
from wirehub.broker_clusters import RedisCluster, RedisSentinel
from wirehub.brokers import BrokerProcess, NatsServer, RedisServer
from wirehub.nats_cluster import NatsCluster, NatsNode

ROOT = Path(__file__).resolve().parent.parent
CHAT_OPTIONS: dict[str, Any] = {"publish_rate": 1e9, "publish_burst": 1_000_000_000, "presence_events": False}
CHAT_ENDPOINT: dict[str, Any] = {"path": "/ws/chat", "handler": "chat", "options": CHAT_OPTIONS}


Broker = BrokerProcess | RedisCluster | RedisSentinel | NatsCluster


def bus_block(kind: str, broker: Broker | None, prefix: str) -> dict[str, Any]:
    if isinstance(broker, RedisCluster):
        return {"plugin": "redis", "redis": {"mode": "cluster", "cluster": {"nodes": broker.startup_nodes},
                                             "key_prefix": prefix}}
    if isinstance(broker, RedisSentinel):
        return {"plugin": "redis", "redis": {"mode": "sentinel", "key_prefix": prefix, "sentinel": {
            "nodes": broker.sentinel_nodes, "master_name": broker.master_name}}}
    if isinstance(broker, NatsCluster):
        return {"plugin": "nats", "nats": {"servers": broker.urls, "subject_prefix": prefix, "replicas": 3}}
    if kind == "redis":
        assert broker is not None
        return {"plugin": "redis", "redis": {"url": broker.url, "key_prefix": prefix}}
    if kind == "nats":
        assert broker is not None
        return {"plugin": "nats", "nats": {"servers": [broker.url], "subject_prefix": prefix}}
    return {"plugin": "memory"}


def data_nodes(broker: Broker | None) -> list[BrokerProcess]:
    if isinstance(broker, RedisCluster | NatsCluster):
        return list(broker.nodes)
    if isinstance(broker, RedisSentinel):
        return list(broker.servers)
    return [broker] if broker is not None else []


def redis_ops(nodes: list[BrokerProcess]) -> Callable[[], int]:
    """Commands the Redis primaries executed so far (without INFO itself). Each command a Lua script
    runs counts as one, as INFO commandstats counts them; what replicas apply is not counted."""
    import redis

    def ops() -> int:
        total = 0
        for node in nodes:
            with redis.Redis(port=node.port) as client:
                if client.info("replication")["role"] != "master":
                    continue
                stats = client.info("commandstats")
            total += sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
        return total
    return ops


def nats_ops(nodes: list[BrokerProcess]) -> Callable[[], int]:
    """Messages in + out of every NATS node so far (/varz): clients' and routes' (R3 replication) alike."""
    import urllib.request

    def ops() -> int:
        total = 0
        for node in nodes:
            port = node.monitor_port if isinstance(node, NatsServer | NatsNode) else 0
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=2) as resp:
                varz = json.loads(resp.read())
            total += int(varz["in_msgs"]) + int(varz["out_msgs"])
        return total
    return ops


async def fanout(ports: list[int], pids: list[int], *, members: int, window_msgs: int, size: int,
                 sample_every: int, warmup: float, duration: float, burst: int,
                 broker_ops: Callable[[], int] | None = None) -> dict[str, Any]:
    window = Window()
    fan = Fan(members - 1, window_msgs)
    room = f"bench-{uuid.uuid4().hex[:8]}"
    pad = b"x" * max(0, size - 40)
    clients: list[ChatClient] = []
    share = [members // len(ports) + (1 if i < members % len(ports) else 0) for i in range(len(ports))]
    counter = iter(range(members))
    for port, n in zip(ports, share, strict=True):
        def make(port: int = port) -> ChatClient:
            return ChatClient("127.0.0.1", port, "/ws/chat", window, fan, room, next(counter) % sample_every == 0, pad)

        got, _, failures = await connect_many(make, "127.0.0.1", port, n, burst)
        if failures:
            raise ConnectionError(f"{len(failures)} connections to port {port} failed: {failures[0]}")
        clients.extend(got)
    sem = asyncio.Semaphore(burst)

    async def join(c: ChatClient) -> None:
        async with sem:
            await asyncio.wait_for(c.join(), 60)

    ops0 = broker_ops() if broker_ops else 0
    t0 = time.perf_counter()
    joins = await asyncio.gather(*(join(c) for c in clients), return_exceptions=True)
    join_wall = time.perf_counter() - t0
    ops_joins = (broker_ops() - ops0) if broker_ops else None
    failed = [j for j in joins if isinstance(j, BaseException)]
    if failed:
        for c in clients:
            c.close()
        raise RuntimeError(f"{len(failed)} of {members} joins failed; first: {failed[0]}")
    publisher = clients[0]  # connected to the first replica
    publisher.sampled = False
    fan.publisher = publisher
    await asyncio.sleep(0.5)
    fan.running = True
    fan.pump()
    ops1, published0 = (broker_ops() if broker_ops else 0), fan.published
    times = await measure(window, pids, warmup, duration)
    cpu = times.pop("cpu_by_pid")
    fan.running = False
    publishes = fan.published - published0
    ops_publishes = (broker_ops() - ops1) if broker_ops else None
    closed = sum(1 for c in clients if not c.is_open)
    for c in clients:
        c.close()
    return summarize("fanout", window, times, members=members, replicas=len(ports), published=fan.published,
                     closed=closed, cpu_by_pid=cpu, joins_per_s=round(members / join_wall, 1),
                     ops_per_join=round(ops_joins / members, 2) if ops_joins is not None else None,
                     # the window includes the warm-up's publishes as well: ops over every publish in it
                     ops_per_publish=round(ops_publishes / publishes, 2) if ops_publishes and publishes else None)


def show_logs(workdir: Path, kind: str) -> None:
    for log in sorted(workdir.glob(f"{kind}-*.log")):
        print(f"--- {log.name}:\n{log.read_text()[-3000:]}", file=sys.stderr)


async def run_scenario(kind: str, a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    broker: Broker | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if kind == "redis":
            broker = RedisServer()
        elif kind == "redis-cluster":
            broker = RedisCluster()
        elif kind == "redis-sentinel":
            broker = RedisSentinel()
        elif kind == "nats-cluster":
            broker = NatsCluster()
        elif kind == "nats":
            broker = NatsServer()
        if broker is not None:
            broker.start()
        bus = bus_block(kind, broker, f"bench{uuid.uuid4().hex[:6]}")
        procs, ports = start_replicas(workdir, [f"{kind}-{i}" for i in range(1 if kind == "memory" else 2)], bus,
                                      CHAT_ENDPOINT)
        nodes = data_nodes(broker)
        pids = [p.pid for p in procs] + [n.pid for n in nodes if n.pid]
        ops = redis_ops(nodes) if kind.startswith("redis") else nats_ops(nodes) if kind.startswith("nats") else None
        try:
            result = await fanout(ports, pids, members=a.members, window_msgs=a.window, size=a.size,
                                  sample_every=a.sample_every, warmup=a.warmup, duration=a.duration,
                                  burst=a.burst, broker_ops=ops)
        except Exception:
            show_logs(workdir, kind)
            raise
        result["bus"] = kind
        return result
    finally:
        for proc in procs:
            stop(proc)
        if broker is not None:
            broker.close()


def render(results: list[dict[str, Any]]) -> str:
    lines = ["| bus | replicas | members | deliveries/s | p50 ms | p99 ms | CPU s (replicas+broker) | loadgen CPU s "
             "| deliveries/CPU-s | joins/s | broker ops/publish | broker ops/join |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:g}"

    for r in results:
        lines.append(f"| {r['bus']} | {r['replicas']} | {r['members']} | {r['per_wall_s']:,.0f} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['server_cpu']} | {r['loadgen_cpu']} | {num(r['per_server_cpu_s'])} | "
                     f"{num(r['joins_per_s'])} | {num(r['ops_per_publish'])} | {num(r['ops_per_join'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--scenarios", default="memory,redis,nats")
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--window", type=int, default=20, help="messages whose deliveries may be outstanding")
    p.add_argument("--size", type=int, default=100, help="approximate payload bytes")
    p.add_argument("--sample-every", type=int, default=10)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--burst", type=int, default=100)
    a = p.parse_args(argv)
    raise_nofile()
    results = []
    with tempfile.TemporaryDirectory(prefix="wirehub-bench-buses-") as tmp:
        for kind in a.scenarios.split(","):
            result = asyncio.run(run_scenario(kind.strip(), a, Path(tmp)))
            print(f"{kind}: {result['per_wall_s']:,.0f} deliveries/s, p50 {result['p50_ms']} ms, "
                  f"p99 {result['p99_ms']} ms, errors {result['errors']}", file=sys.stderr)
            results.append(result)
    print(render(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
