"""Collaborative editing: y-websocket editors on three replicas (Redis), latency, memory, stored size.

Part 1, latency: ``--editors`` clients (default 50) open one document, spread evenly over
``--replicas`` replicas (default 3) sharing one Redis, and each sends ``--rate`` Yjs updates per
second (default 5; paced, random phase): one character typed into a shared ``Y.Text`` (a pycrdt
update, sent as the y-websocket sync update message). The server forwards an update's bytes
unchanged, so a receiver recognises each one. *Update-to-remote latency* is from the send to the
moment an editor connected to **another replica** read the update (``remote_*``); ``local_*`` is the
same for editors on the sender's replica. Only updates sent inside the measurement window count.

Part 2, memory: ``--documents`` documents (default 200), each typed to about ``--doc-chars``
characters (default 2000) by one client, are loaded on one replica; the replica's RSS growth divided
by the number of documents is the memory per document (pycrdt's in-memory structures, the bus
subscription, the awareness map), beside the encoded size (``wirehub_yjs_document_bytes``).

Part 3, storage: for the part-1 document, the bytes the update log would hold without compaction
(every update, as stored: bus envelope included) against what is stored with compaction (the
snapshot in the state store plus the log tail after it).

    python -m bench.bench_yjs [--editors 50] [--rate 5] [--replicas 3] [--duration 10] [--documents 200]

The last line of stdout is a JSON object with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pycrdt
from tornado.websocket import WebSocketClientConnection, websocket_connect

from bench.loadgen import cpu_seconds, percentile, raise_nofile
from bench.procs import start_replica, stop
from wirehub.brokers import RedisServer
from wirehub.builtins.bus.redis import create_backend as redis_backend
from wirehub.builtins.handlers.yjs import wire
from wirehub.builtins.handlers.yjs.store import DocumentStore
from wirehub.hub import envelope
from wirehub.testing import Recorder

ENDPOINT: dict[str, Any] = {"path": "/ws/yjs/*", "handler": "yjs",
                            "options": {"messages_per_second": 0, "idle_unload": 600}}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Editor:
    """One y-websocket client: types into its own pycrdt document and records what it reads."""

    def __init__(self, index: int, replica: int) -> None:
        self.index = index
        self.replica = replica
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc()
        self.text = self.doc.get("text", type=pycrdt.Text)
        self.updates: list[bytes] = []
        self.doc.observe(lambda event: self.updates.append(event.update))
        self.sent: list[tuple[bytes, float]] = []
        self.received: list[tuple[bytes, float]] = []
        self.recording = False
        self.synced = asyncio.Event()
        self.conn: WebSocketClientConnection | None = None
        self.reader: asyncio.Future[None] | None = None

    async def connect(self, url: str) -> None:
        self.conn = await websocket_connect(url, max_message_size=64 << 20)
        await self.conn.write_message(wire.sync_step1(self.doc.get_state()), binary=True)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.conn is not None
        while True:
            msg = await self.conn.read_message()
            if msg is None:
                return
            now = time.perf_counter()
            assert isinstance(msg, bytes)
            if msg[:2] == bytes((wire.MESSAGE_SYNC, wire.SYNC_UPDATE)):
                if self.recording:
                    self.received.append((msg, now))
                continue
            r = wire.Reader(msg)
            if r.uint() != wire.MESSAGE_SYNC:
                continue
            step, body = r.uint(), r.blob()
            if step == wire.SYNC_STEP1:
                await self.conn.write_message(wire.sync_step2(self.doc.get_update(body)), binary=True)
            elif step == wire.SYNC_STEP2:
                self.synced.set()

    async def type_one(self, record: bool) -> int:
        self.text.insert(0, chr(97 + self.index % 26))
        update = self.updates.pop()
        self.updates.clear()
        message = wire.sync_update(update)
        if record:
            self.sent.append((message, time.perf_counter()))
        assert self.conn is not None
        await self.conn.write_message(message, binary=True)
        return len(update)


def editors_process(ports: list[int], indices: list[int], doc: str, rate: float, begin: float, record_from: float,
                    record_to: float, stop_at: float) -> dict[str, Any]:
    """One load-generating process: its editors type from ``begin`` to ``stop_at`` (perf_counter times,
    which are CLOCK_MONOTONIC and so shared by the processes) and record what they send and read in the
    window (reads until 5 s after it)."""
    async def main() -> dict[str, Any]:
        editors = [Editor(i, i % len(ports)) for i in indices]
        for e in editors:
            await e.connect(f"ws://127.0.0.1:{ports[e.replica]}/ws/yjs/{doc}")
        await asyncio.wait_for(asyncio.gather(*(e.synced.wait() for e in editors)), 60)
        totals = {"bytes": 0, "count": 0}

        async def pace(e: Editor, phase: float) -> None:
            interval = 1.0 / rate
            nxt = begin + phase
            while nxt < stop_at:
                await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
                now = time.perf_counter()
                totals["bytes"] += await e.type_one(record_from <= now <= record_to)
                totals["count"] += 1
                nxt += interval

        async def window() -> float:
            await asyncio.sleep(max(0.0, record_from - time.perf_counter()))
            cpu0 = cpu_seconds(os.getpid())
            for e in editors:
                e.recording = True
            await asyncio.sleep(max(0.0, record_to - time.perf_counter()))
            cpu = cpu_seconds(os.getpid()) - cpu0
            await asyncio.sleep(max(0.0, record_to + 5.0 - time.perf_counter()))
            for e in editors:
                e.recording = False
            return cpu

        rng = random.Random(indices[0] if indices else 0)
        timer = asyncio.ensure_future(window())
        await asyncio.gather(*(pace(e, rng.uniform(0, 1.0 / rate)) for e in editors))
        cpu = await timer
        for e in editors:
            assert e.conn is not None
            e.conn.close()
        return {"sent": [(m, t, e.replica) for e in editors for m, t in e.sent],
                "received": [(m, t, e.replica) for e in editors for m, t in e.received],
                "bytes": totals["bytes"], "count": totals["count"], "cpu": cpu}

    return asyncio.run(main())


async def latency(ports: list[int], pids: list[int], doc: str, a: argparse.Namespace) -> dict[str, Any]:
    begin = time.perf_counter() + 4.0 + a.editors * 0.05
    record_from = begin + a.warmup
    record_to = record_from + a.duration
    stop_at = record_to + 0.5
    groups = [list(range(a.editors))[i::a.procs] for i in range(a.procs)]
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(a.procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [loop.run_in_executor(pool, editors_process, ports, g, doc, a.rate, begin, record_from, record_to,
                                        stop_at) for g in groups if g]
        await asyncio.sleep(max(0.0, record_from - time.perf_counter()))
        cpu0 = {pid: cpu_seconds(pid) for pid in pids}
        await asyncio.sleep(max(0.0, record_to - time.perf_counter()))
        cpu = {pid: round(cpu_seconds(pid) - cpu0[pid], 2) for pid in pids}
        results = await asyncio.gather(*futures)
    sent = {m: (t, r) for res in results for m, t, r in res["sent"]}
    local: list[float] = []
    remote: list[float] = []
    for res in results:
        for m, t_recv, replica in res["received"]:
            found = sent.get(m)
            if found is not None:
                (local if found[1] == replica else remote).append(t_recv - found[0])
    local.sort()
    remote.sort()
    per_replica = [sum(1 for i in range(a.editors) if i % len(ports) == r) for r in range(len(ports))]
    expected_remote = sum(a.editors - per_replica[r] for _, r in sent.values())

    def ms(values: list[float], q: float) -> float | None:
        v = percentile(values, q)
        return None if v is None else round(v * 1000, 1)

    return {
        "editors": a.editors, "replicas": len(ports), "rate_per_editor": a.rate, "loadgen_procs": a.procs,
        "updates_per_s": round(len(sent) / a.duration, 1), "updates_total": sum(r["count"] for r in results),
        "update_bytes_total": sum(r["bytes"] for r in results),
        "remote_p50_ms": ms(remote, 0.5), "remote_p99_ms": ms(remote, 0.99), "remote_max_ms": ms(remote, 1.0),
        "local_p50_ms": ms(local, 0.5), "local_p99_ms": ms(local, 0.99),
        "remote_deliveries": len(remote), "remote_missing": expected_remote - len(remote),
        "cpu_s_by_pid": cpu, "loadgen_cpu_s": round(sum(r["cpu"] for r in results), 2), "wall_s": a.duration,
    }


async def memory(port: int, pid: int, a: argparse.Namespace) -> dict[str, Any]:
    """RSS growth of one replica per loaded document."""
    async def fill(name: str) -> None:
        conn = await websocket_connect(f"ws://127.0.0.1:{port}/ws/yjs/{name}")
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        text = doc.get("text", type=pycrdt.Text)
        rng = random.Random(name)
        for i in range(a.doc_chars // 20):  # typed in bursts of 20 characters at random places
            text.insert(rng.randint(0, len(text)), "".join(chr(97 + rng.randint(0, 25)) for _ in range(20)))
            if i % 10 == 0 and len(text) > 40:
                del text[5:8]
        await conn.write_message(wire.sync_update(doc.get_update()), binary=True)
        await conn.write_message(wire.sync_step1(doc.get_state()), binary=True)
        while True:  # the step-1 answer comes after the update was handled
            msg = await conn.read_message()
            if isinstance(msg, bytes) and msg[:2] == bytes((wire.MESSAGE_SYNC, wire.SYNC_STEP2)):
                break
        conn.close()

    await asyncio.sleep(1.0)
    before = rss_bytes(pid), yjs_gauges(port)
    names = [f"mem-{uuid.uuid4().hex[:8]}-{i}" for i in range(a.documents)]
    for i in range(0, len(names), 20):
        await asyncio.gather(*(fill(n) for n in names[i:i + 20]))
    await asyncio.sleep(2.0)
    after = rss_bytes(pid), yjs_gauges(port)
    loaded = after[1]["documents"] - before[1]["documents"]
    return {"documents": a.documents, "chars_per_document": a.doc_chars, "loaded": loaded,
            "rss_growth_per_document_kb": round((after[0] - before[0]) / a.documents / 1024, 1),
            "encoded_per_document_kb": round((after[1]["bytes"] - before[1]["bytes"]) / max(1.0, loaded) / 1024, 1)}


def yjs_gauges(port: int) -> dict[str, float]:
    """``wirehub_yjs_documents`` and ``wirehub_yjs_document_bytes`` of one replica."""
    out = {"documents": 0.0, "bytes": 0.0}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("wirehub_yjs_document_bytes{"):
                out["bytes"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("wirehub_yjs_documents{"):
                out["documents"] = float(line.rsplit(" ", 1)[1])
    return out


async def storage(redis_url: str, prefix: str, doc: str, lat: dict[str, Any]) -> dict[str, Any]:
    backend = redis_backend({"url": redis_url, "key_prefix": prefix}, "bus.redis")
    await backend.bus.start(Recorder())
    try:
        snap = await DocumentStore(backend, 1).load(f"yjs/{doc}")
        page = await backend.history.read(f"yjs/{doc}", snap.offset, 100_000)
        tail = sum(len(p) for _, p in page.messages)
        # every update as the log stores it: bus envelope + bus frame header + the update
        per_update = len(envelope(wire.bus_frame(wire.BUS_UPDATE, "redis-0/00000000", "0" * 16)))
        uncompacted = lat["update_bytes_total"] + lat["updates_total"] * per_update
        stored = len(json.dumps((await backend.state.get(f"yjs/{doc}") or (0, {}))[1])) + tail
        return {"log_without_compaction_kb": round(uncompacted / 1024, 1),
                "stored_with_compaction_kb": round(stored / 1024, 1),
                "snapshot_kb": round(len(snap.update) / 1024, 1), "log_tail_updates": len(page.messages),
                "snapshot_covers_offset": snap.offset}
    finally:
        await backend.bus.close()


async def scenario(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    broker = RedisServer()
    broker.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        prefix = f"benchyjs{uuid.uuid4().hex[:6]}"
        bus = {"plugin": "redis", "redis": {"url": broker.url, "key_prefix": prefix}}
        ports = []
        for i in range(a.replicas):
            proc, port, _ = start_replica(workdir, f"redis-{i}", bus, ENDPOINT)
            procs.append(proc)
            ports.append(port)
        pids = [p.pid for p in procs] + ([broker.pid] if broker.pid else [])
        doc = f"bench-{uuid.uuid4().hex[:8]}"
        result: dict[str, Any] = {"latency": await latency(ports, pids, doc, a)}
        await asyncio.sleep(1.0)
        result["storage"] = await storage(broker.url, prefix, doc, result["latency"])
        result["memory"] = await memory(ports[0], procs[0].pid, a)
        return result
    finally:
        for proc in procs:
            stop(proc)
        broker.close()


def render(r: dict[str, Any]) -> str:
    lat, mem, st = r["latency"], r["memory"], r["storage"]
    return "\n".join([
        "| editors | replicas | updates/s | update-to-remote p50 / p99 / max ms | same replica p50 / p99 ms | "
        "remote deliveries (missing) | CPU s (replicas+redis) | loadgen CPU s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {lat['editors']} | {lat['replicas']} | {lat['updates_per_s']} | {lat['remote_p50_ms']} / "
        f"{lat['remote_p99_ms']} / {lat['remote_max_ms']} | {lat['local_p50_ms']} / {lat['local_p99_ms']} | "
        f"{lat['remote_deliveries']} ({lat['remote_missing']}) | {sum(lat['cpu_s_by_pid'].values()):.1f} | "
        f"{lat['loadgen_cpu_s']} |",
        "",
        "| documents loaded | characters each | RSS per document | encoded size per document |",
        "|---|---|---|---|",
        f"| {mem['documents']} | {mem['chars_per_document']} | {mem['rss_growth_per_document_kb']} kB | "
        f"{mem['encoded_per_document_kb']} kB |",
        "",
        "| updates | log without compaction | stored with compaction (snapshot + log tail) | snapshot |",
        "|---|---|---|---|",
        f"| {lat['updates_total']} | {st['log_without_compaction_kb']} kB | {st['stored_with_compaction_kb']} kB "
        f"({st['log_tail_updates']} updates in the tail) | {st['snapshot_kb']} kB |",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--editors", type=int, default=50)
    p.add_argument("--rate", type=float, default=5.0, help="updates per second per editor")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--documents", type=int, default=200, help="documents loaded for the memory figure")
    p.add_argument("--doc-chars", type=int, default=2000, help="characters typed into each of them")
    p.add_argument("--procs", type=int, default=3, help="load-generating processes the editors are spread over")
    a = p.parse_args(argv)
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="wirehub-bench-yjs-") as tmp:
        result = asyncio.run(scenario(a, Path(tmp)))
    result["params"] = vars(a)
    print(render(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("BENCH_LOG_LEVEL", "warning")
    sys.exit(main())
