"""Under attack: bystanders' publish-to-delivery p99 while attackers send the worst input the limits allow.

One replica (memory bus, the production defaults of every limit) serves ``--members`` bystanders in one
chat room; one of them publishes ``--rate`` messages per second (paced), and every delivery's latency
(publish -> read, from a timestamp in the payload) is recorded on every ``--sample-every``-th member.

The run has three windows of ``--duration`` seconds on the same server:

1. ``calm``: the bystanders alone;
2. ``attack``: the same, while ``--attackers`` connections each send, at exactly the rates the limits
   allow (``--op-rate`` requests per second, publishes at ``--publish-rate``), a cycle of the most
   expensive frames the server must still read and answer:
   - a publish of a JSON value nested just inside the depth limit, padded to the frame size limit, into
     the attacker's own room (accepted, stored in history);
   - a frame nested far past the depth limit, as large as the frame limit (``bad_json``);
   - a frame of the largest size that is not JSON at all (``bad_json``);
   - ``history`` and ``presence`` of a room name never seen before (answered, nothing created);
   - ``join`` then ``leave`` of a new room (churn);
   - a request whose ``id`` is ``NaN`` (``bad_json``), and one whose ``id`` is a 4 KiB string
     (``bad_request``);
   - an unknown op, and a 125-byte ping (the largest a control frame may be);
3. ``after``: the bystanders alone again (the server recovered; nothing stays expensive).

The figure is ``attack p99 / calm p99`` (the target is at most 2x), beside the server's CPU share, RSS
growth, log bytes, and what the attackers were answered (every answer is counted by ``op``/``code``; an
attacker closed by the server is reported: it means the pacing went over a limit).

    python -m bench.bench_attack [--members 200] [--rate 200] [--attackers 8] [--duration 5]

The last line of stdout is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.loadgen import (
    Window,
    WsClient,
    connect_many,
    cpu_seconds,
    percentile,
    perf,
    raise_nofile,
    rss_bytes,
)
from bench.procs import free_port, spawn, stop, wirehub_cmd

_MESSAGE = b'"op":"message"'
_T = b'"t":'


def nested(depth: int, size: int) -> str:
    """A JSON array ``depth`` levels deep whose innermost value is a string padding it to about ``size``."""
    pad = max(0, size - 2 * depth - 2)
    return "[" * depth + '"' + "x" * pad + '"' + "]" * depth


def attack_frames(index: int, *, depth_limit: int, frame_limit: int) -> list[tuple[str, bytes]]:
    """The non-publish frames of one attack cycle, as (kind, payload); fresh room names per call."""
    tag = f"{index}-{uuid.uuid4().hex[:10]}"
    room = f"atk-{tag}"
    big = frame_limit - 64
    too_deep = ('{"op":"history","room":"r","id":1,"x":' + "[" * (big // 2) + "]" * (big // 2) + "}")
    not_json = '{"op":"publish","room":"r","data":"' + "x" * (frame_limit - 64)
    return [
        ("too_deep", too_deep.encode()),
        ("not_json", not_json.encode()),
        ("history_new_room", json.dumps({"op": "history", "room": room, "id": 1}).encode()),
        ("presence_new_room", json.dumps({"op": "presence", "room": room + "p", "id": 2}).encode()),
        ("join_new_room", json.dumps({"op": "join", "room": room + "j", "id": 3}).encode()),
        ("leave_new_room", json.dumps({"op": "leave", "room": room + "j", "id": 4}).encode()),
        ("nan_id", b'{"op":"ping","id":NaN}'),
        ("long_id", json.dumps({"op": "ping", "id": "i" * 4096}).encode()),
        ("unknown_op", json.dumps({"op": "x" * 200, "id": 5}).encode()),
    ]


class Attacker(WsClient):
    """Sends the attack cycle at the allowed rates; counts every answer by op and code."""

    def __init__(self, host: str, port: int, index: int, *, op_rate: float, publish_rate: float,
                 depth_limit: int, frame_limit: int, data_limit: int, answers: collections.Counter[str]) -> None:
        super().__init__(host, port, "/ws/chat")
        self.index = index
        self.op_rate = op_rate
        self.publish_rate = publish_rate
        self.depth_limit = depth_limit
        self.frame_limit = frame_limit
        self.data_limit = data_limit
        self.answers = answers
        self.sent: collections.Counter[str] = collections.Counter()
        self.room = f"atk-own-{index}-{uuid.uuid4().hex[:6]}"
        self.task: asyncio.Task[None] | None = None

    def on_message(self, data: bytes, start: int, end: int) -> None:
        head = bytes(data[start:min(end, start + 200)])
        op = head[7:head.find(b'"', 7)].decode(errors="replace") if head.startswith(b'{"op":"') else "?"
        if op == "error":
            i = head.find(b'"code":"')
            code = head[i + 8:head.find(b'"', i + 8)].decode(errors="replace") if i >= 0 else "?"
            self.answers[f"error {code}"] += 1
        else:
            self.answers[op] += 1

    def publish_frame(self) -> bytes:
        # the envelope and the array's own level: just inside the depth limit; just under the data limit
        data = nested(self.depth_limit - 2, min(self.data_limit, self.frame_limit - 200) - 8)
        return ('{"op":"publish","room":' + json.dumps(self.room) + ',"id":9,"data":' + data + "}").encode()

    async def run(self, stop_at: float) -> None:
        # Ops and publishes share the op budget; publishes also have their own (lower) rate.
        cycle: list[tuple[str, bytes]] = []
        interval = 1.0 / self.op_rate
        publish_every = max(1, round(self.op_rate / self.publish_rate))
        next_at = perf() + random.random() * interval
        n = 0
        self.send(json.dumps({"op": "join", "room": self.room, "id": 0}).encode())
        while perf() < stop_at and self.is_open:
            delay = next_at - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at += interval
            n += 1
            if n % publish_every == 0:
                kind, frame = "publish_deep_max", self.publish_frame()
            else:
                if not cycle:
                    cycle = attack_frames(self.index, depth_limit=self.depth_limit, frame_limit=self.frame_limit)
                kind, frame = cycle.pop(0)
            self.sent[kind] += 1
            self.send(frame)
            if n % 10 == 0:
                self.send(b"p" * 125, 0x9)
                self.sent["ping_125"] += 1


class Bystander(WsClient):
    """A chat member of the bystanders' room; the publisher among them sends paced, timestamped messages."""

    def __init__(self, host: str, port: int, room: str, window: Window, sampled: bool) -> None:
        super().__init__(host, port, "/ws/chat")
        self.room = room
        self.window = window
        self.sampled = sampled
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.got = 0
        self.seq = 0

    def join(self) -> asyncio.Future[None]:
        self.send(json.dumps({"op": "join", "room": self.room, "id": "j"}).encode())
        return self.joined

    def publish(self) -> None:
        self.seq += 1
        self.send(b'{"op":"publish","room":"%s","id":%d,"data":{"t":%.6f}}' % (self.room.encode(), self.seq, perf()))

    def on_message(self, data: bytes, start: int, end: int) -> None:
        if data.find(_MESSAGE, start, end) >= 0:
            self.got += 1
            w = self.window
            if w.measuring:
                w.count += 1
                if self.sampled:
                    i = data.find(_T, start, end) + 4
                    j = i
                    while data[j] not in (44, 125):
                        j += 1
                    w.latencies.append(perf() - float(data[i:j]))
            return
        if not self.joined.done() and data.find(b'"op":"joined"', start, end) >= 0:
            self.joined.set_result(None)
        elif data.find(b'"op":"error"', start, end) >= 0:
            self.window.error(bytes(data[start:end]).decode(errors="replace"))


async def _publisher(pub: Bystander, rate: float, stop: asyncio.Event) -> None:
    interval = 1.0 / rate
    next_at = perf()
    while not stop.is_set() and pub.is_open:
        delay = next_at - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        next_at += interval
        pub.publish()


def _size(path: Path) -> int:
    return path.stat().st_size


def _lat(window: Window) -> dict[str, float | None]:
    lat = sorted(window.latencies)

    def ms(q: float) -> float | None:
        v = percentile(lat, q)
        return None if v is None else round(v * 1000, 3)

    return {"samples": len(lat), "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
            "max_ms": round(lat[-1] * 1000, 3) if lat else None}


async def run(args: argparse.Namespace, port: int, pid: int, log: Path) -> dict[str, Any]:
    host = "127.0.0.1"
    room = f"bystanders-{uuid.uuid4().hex[:6]}"
    window = Window()
    index = iter(range(args.members))
    members, _, failures = await connect_many(
        lambda: Bystander(host, port, room, window, next(index) % args.sample_every == 0), host, port,
        args.members, 100)
    if failures:
        raise ConnectionError(f"{len(failures)} bystanders failed to connect: {failures[0]}")
    await asyncio.gather(*(asyncio.wait_for(m.join(), 30) for m in members))
    stop_pub = asyncio.Event()
    # several publishers, each within the per-session publish limit that the attackers face too
    pub_tasks = [asyncio.create_task(_publisher(m, args.rate / args.publishers, stop_pub))
                 for m in members[:args.publishers]]
    results: dict[str, Any] = {}

    async def window_of(name: str) -> None:
        await asyncio.sleep(args.warmup)
        c0, r0, l0 = cpu_seconds(pid), rss_bytes(pid), _size(log)
        window.count, window.errors, window.latencies = 0, 0, []
        window.measuring = True
        t0 = perf()
        await asyncio.sleep(args.duration)
        window.measuring = False
        wall = perf() - t0
        results[name] = {
            **_lat(window), "deliveries": window.count, "errors": window.errors, "first_error": window.first_error,
            "server_cpu_pct": round(100 * (cpu_seconds(pid) - c0) / wall, 1),
            "rss_growth_mb": round((rss_bytes(pid) - r0) / 2**20, 2),
            "log_bytes": _size(log) - l0,
        }

    await window_of("calm")
    answers: collections.Counter[str] = collections.Counter()
    numbers = iter(range(args.attackers))
    attackers, _, failures = await connect_many(
        lambda: Attacker(host, port, next(numbers), op_rate=args.op_rate, publish_rate=args.publish_rate,
                         depth_limit=args.depth_limit, frame_limit=args.frame_limit,
                         data_limit=args.data_limit, answers=answers),
        host, port, args.attackers, 100)
    if failures:
        raise ConnectionError(f"{len(failures)} attackers failed to connect: {failures[0]}")
    stop_at = perf() + args.warmup + args.duration + 0.2
    tasks = [asyncio.create_task(a.run(stop_at)) for a in attackers]
    await window_of("attack")
    await asyncio.gather(*tasks)
    sent: collections.Counter[str] = collections.Counter()
    for a in attackers:
        sent.update(a.sent)
    closed = [a.close_code for a in attackers if not a.is_open]
    for a in attackers:
        a.close()
    await window_of("after")
    stop_pub.set()
    await asyncio.gather(*pub_tasks)
    for m in members:
        m.close()
    calm, attack = results["calm"]["p99_ms"], results["attack"]["p99_ms"]
    return {
        "scenario": "under_attack", "members": args.members, "rate": args.rate,
        "publishers": args.publishers, "attackers": args.attackers,
        "op_rate": args.op_rate, "publish_rate": args.publish_rate, "depth_limit": args.depth_limit,
        "frame_limit": args.frame_limit, "windows": results,
        "p99_ratio": round(attack / calm, 2) if calm and attack else None,
        "attack_frames_sent": dict(sent), "attack_answers": dict(answers),
        "attackers_closed": closed,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=200)
    p.add_argument("--rate", type=float, default=200.0, help="bystander publishes per second")
    p.add_argument("--publishers", type=int, default=20, help="bystanders that publish (rate split evenly)")
    p.add_argument("--sample-every", type=int, default=5)
    p.add_argument("--attackers", type=int, default=8)
    p.add_argument("--op-rate", type=float, default=None, help="attacker requests/s (default: the server's limit)")
    p.add_argument("--publish-rate", type=float, default=None, help="attacker publishes/s (default: the limit)")
    p.add_argument("--depth-limit", type=int, default=None, help="default: the server's server.max_json_depth")
    p.add_argument("--frame-limit", type=int, default=None, help="default: the server's server.max_message_size")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--no-pin", action="store_true", help="do not pin the server to core 0 and this process to 1")
    return p


def _defaults(args: argparse.Namespace) -> None:
    """Fill the attack's rates and sizes from the server's own defaults: exactly what the limits allow."""
    from wirehub.builtins.handlers.chat import ChatOptions
    from wirehub.config import ServerConfig

    server, chat = ServerConfig(), ChatOptions()
    if args.op_rate is None:
        args.op_rate = float(getattr(server, "op_rate", chat.publish_rate))
    if args.publish_rate is None:
        args.publish_rate = min(args.op_rate, chat.publish_rate)
    if args.depth_limit is None:
        args.depth_limit = int(getattr(server, "max_json_depth", 32))
    if args.frame_limit is None:
        args.frame_limit = server.max_message_size
    args.data_limit = chat.max_message_bytes
    if args.rate / args.publishers > chat.publish_rate:
        raise SystemExit(f"--rate / --publishers must stay within the publish limit ({chat.publish_rate:g}/s)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _defaults(args)
    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="wirehub-attack-"))
    port = free_port()
    # The production defaults, except: loopback, warnings only, and no presence events (200 joins)
    cfg = {"server": {"host": "127.0.0.1", "port": port, "node_id": "attack"},
           "logging": {"level": "warning", "access_log": False}, "drain": {"grace": 2},
           "endpoints": [{"path": "/ws/chat", "handler": "chat", "options": {"presence_events": False}}]}
    (work / "attack.yaml").write_text(json.dumps(cfg))
    log = work / "attack.log"
    pin = None if args.no_pin else (lambda: os.sched_setaffinity(0, {0}))
    proc = spawn(wirehub_cmd(work / "attack.yaml"), port, log, name="wirehub", preexec_fn=pin)
    try:
        if not args.no_pin:
            os.sched_setaffinity(0, {1})
        result = asyncio.run(run(args, port, proc.pid, log))
    finally:
        stop(proc)
    w = result["windows"]
    print(f"{'window':8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'deliv':>8} {'srv CPU':>8} "
          f"{'RSS MB':>7} {'log B':>7}")
    for name in ("calm", "attack", "after"):
        r = w[name]
        print(f"{name:8} {r['p50_ms']!s:>8} {r['p99_ms']!s:>8} {r['p999_ms']!s:>9} {r['deliveries']:>8} "
              f"{r['server_cpu_pct']:>7}% {r['rss_growth_mb']:>7} {r['log_bytes']:>7}")
    print(f"bystander p99 under attack / calm: {result['p99_ratio']}x (target <= 2x); "
          f"attackers closed: {len(result['attackers_closed'])}")
    print("attack frames:", dict(sorted(result["attack_frames_sent"].items())))
    print("answers:", dict(sorted(result["attack_answers"].items())))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
