"""Load generator of the big-rooms benchmarks (:mod:`bench.bench_rooms`): chat members in worker processes.

One process holds at most about 19,900 sockets (RLIMIT_NOFILE is 20,000 hard on these machines), so
the members of a big room live in one or more *worker processes* (:class:`Worker`, a
``multiprocessing`` child each) that the benchmark drives with small commands over a pipe:
``connect``, ``join``, ``measure``, ``storm``, ``fanout``, ``report``, ``close``. Each worker spreads
its connections over several loopback source addresses (``127.0.0.2``, ``127.0.0.3``, ...: the
socket is bound before connect), so no address runs out of ephemeral ports.

A member checks its room's stream: every ``message`` must carry the offset after the last one it
saw (``lost`` counts the gaps, ``dup`` the repeats), across reconnects too: a member that lost its
connection reconnects and joins with ``since {offset, epoch}`` of the last message it got. Latency
is from the publish (a ``time.perf_counter`` timestamp in the payload: CLOCK_MONOTONIC on Linux,
the same clock in every process) to the read, on every ``sample_every``-th member. The ``joined``
reply is never parsed as JSON (it carries the whole presence list today): its offset, epoch and
``recovered`` are read with a regular expression.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import WsClient, client_frame, cpu_seconds, raise_nofile, upgraded
from bench.netns import ClientNet, enter

perf = time.perf_counter
_MESSAGE = b'{"op":"message"'
_JOINED = b'{"op":"joined"'
_ACK = b'{"op":"ack"'
_EVENT = b'{"op":"presence.'
_ERROR = b'{"op":"error"'
_OFFSET = b'"offset":'
_T = b'"t":'
_OFFSET_RE = re.compile(rb'"offset":(-?\d+)')
_EPOCH_RE = re.compile(rb'"epoch":"([^"]*)"')
_RECOVERED_RE = re.compile(rb'"recovered":(true|false)')
#: loopback source addresses the connections are spread over
SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 10))


@dataclass(eq=False)
class MemberState:
    """What a member knows of its room; it survives a reconnect (a new :class:`Member` takes it over)."""

    sampled: bool
    port: int
    source: str
    host: str = "127.0.0.1"  # the server's address (another one from a client network namespace)
    last: int | None = None  # offset of the last message read (or the room's top at the join)
    epoch: str | None = None
    got: int = 0
    lost: int = 0
    dup: int = 0
    recovered: int = 0
    unrecovered: int = 0
    rejoined_at: float | None = None


@dataclass(eq=False)
class Stats:
    """One worker's counters; latencies only while ``measuring``."""

    measuring: bool = False
    count: int = 0
    latencies: list[float] = field(default_factory=list)
    deliveries: int = 0
    events: int = 0
    errors: int = 0
    first_error: str | None = None
    joined_bytes: int = 0
    joined_max: int = 0

    def error(self, text: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = text[:300]


def _consume(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()


def join_request(room: str, state: MemberState, since: bool) -> dict[str, Any]:
    """A member's join (``id`` "j"), with ``since`` the position of the last message it read when it has one."""
    req: dict[str, Any] = {"room": room, "id": "j"}
    if since and state.last is not None and state.epoch is not None:
        req["since"] = {"offset": state.last, "epoch": state.epoch}
    return req


class Member(WsClient):
    """One connection of a member of ``room``. With ``url_join`` its join (with ``since`` when it has a position)
    rides in the upgrade URL (docs/protocol.md, "Joining in the upgrade URL"): ``joined`` then completes
    without a join frame."""

    def __init__(self, host: str, port: int, room: str, state: MemberState, stats: Stats,
                 on_delivery: Callable[[], None] | None = None, url_join: bool = False) -> None:
        path = "/ws/chat"
        if url_join:
            path += "?join=" + urllib.parse.quote(json.dumps(join_request(room, state, True)), safe="")
        super().__init__(host, port, path)
        self.room = room
        self.state = state
        self.stats = stats
        self.on_delivery = on_delivery
        self.joined: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # an attempt given up (timeout, storm over) fails these later: nobody awaits them any more
        self.opened.add_done_callback(_consume)
        self.joined.add_done_callback(_consume)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.joined.done():  # a join in flight (or in the URL) never gets its reply now
            self.joined.set_exception(ConnectionError(f"closed before joined (close code {self.close_code})"))

    def join(self, since: bool = False) -> asyncio.Future[bool]:
        self.send(json.dumps({"op": "join", **join_request(self.room, self.state, since)}).encode())
        return self.joined

    def on_message(self, data: bytes, start: int, end: int) -> None:
        if data.startswith(_MESSAGE, start):
            i = data.rfind(_OFFSET, start, end)
            off = int(data[i + 9 : end - 1])
            st, stats = self.state, self.stats
            if st.last is not None:
                if off <= st.last:
                    st.dup += 1
                    return
                if off > st.last + 1:
                    st.lost += off - st.last - 1
            st.last = off
            st.got += 1
            stats.deliveries += 1
            if stats.measuring:
                stats.count += 1
                if st.sampled:
                    i = data.find(_T, start, end) + 4
                    j = i
                    while data[j] not in (44, 125):  # , }
                        j += 1
                    stats.latencies.append(perf() - float(data[i:j]))
            if self.on_delivery is not None:
                self.on_delivery()
        elif data.startswith(_EVENT, start):
            self.stats.events += 1
        elif data.startswith(_JOINED, start) and not self.joined.done():
            self._joined(bytes(data[start:end]))
        elif data.startswith(_ERROR, start):
            text = bytes(data[start:end]).decode(errors="replace")
            if not self.joined.done():
                self.joined.set_exception(ConnectionError(f"join refused: {text}"))
            else:
                self.stats.error(text)

    def _joined(self, frame: bytes) -> None:
        st, stats = self.state, self.stats
        stats.joined_bytes += len(frame)
        stats.joined_max = max(stats.joined_max, len(frame))
        m_off, m_epoch, m_rec = _OFFSET_RE.search(frame), _EPOCH_RE.search(frame), _RECOVERED_RE.search(frame)
        top = int(m_off.group(1)) if m_off else 0
        recovered = bool(m_rec and m_rec.group(1) == b"true")
        rejoin = st.last is not None
        if rejoin:
            if recovered:
                st.recovered += 1  # the replay after `since` follows, then live messages
            else:
                st.unrecovered += 1
                st.lost += max(0, top - (st.last or 0))
                st.last = top
        else:
            st.last = top
        st.epoch = m_epoch.group(1).decode() if m_epoch else None
        self.joined.set_result(recovered)


class Publisher(Member):
    """A member that publishes ``{"t": <perf_counter>, "s": seq}``; counts acks and the highest acked offset."""

    def __init__(self, host: str, port: int, room: str, stats: Stats) -> None:
        super().__init__(host, port, room, MemberState(False, port, "127.0.0.1"), stats)
        self.seq = 0
        self.acks = 0
        self.top = 0
        self.refused = 0
        self._head = b'{"op":"publish","room":' + json.dumps(room).encode() + b',"id":'

    def publish(self, pad: bytes = b"") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.seq += 1
        payload = b'%s%d,"data":{"t":%.6f,"s":%d,"pad":"%s"}}' % (self._head, self.seq, perf(), self.seq, pad)
        self.transport.write(client_frame(payload, self.mask))

    def on_message(self, data: bytes, start: int, end: int) -> None:
        if data.startswith(_ACK, start):
            self.acks += 1
            m = _OFFSET_RE.search(data, start, end)
            if m:
                self.top = max(self.top, int(m.group(1)))
        elif data.startswith(_ERROR, start) and self.joined.done():
            self.refused += 1
            self.stats.error(bytes(data[start:end]).decode(errors="replace"))
        else:
            super().on_message(data, start, end)


async def open_member(port: int, room: str, state: MemberState, stats: Stats, timeout: float = 20.0,
                      on_delivery: Callable[[], None] | None = None, url_join: bool = False) -> Member:
    """Connect from ``state.source`` (bound before connect) and wait for the 101."""
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(lambda: Member(state.host, port, room, state, stats, on_delivery, url_join),
                               state.host, port, local_addr=(state.source, 0)), timeout)
    return await upgraded(proto, timeout)


def pacing(rate: float, publish: Callable[[], None], stop: asyncio.Event) -> asyncio.Task[None]:
    """Call ``publish`` ``rate`` times a second (catching up in a burst when the loop was late) until ``stop``."""

    async def run() -> None:
        interval, next_at = 1.0 / rate, perf()
        while not stop.is_set():
            now = perf()
            while next_at <= now:
                publish()
                next_at += interval
            await asyncio.sleep(next_at - perf())

    return asyncio.create_task(run())


def latency_ms(values: list[float]) -> dict[str, float | int | None]:
    """p50 / p99 / p99.9 / max in ms of raw seconds (nearest rank)."""
    lat = sorted(values)

    def q(p: float) -> float | None:
        if not lat:
            return None
        return round(lat[min(len(lat) - 1, max(0, int(p * len(lat) + 0.5) - 1))] * 1000, 3)

    return {"samples": len(lat), "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999),
            "max_ms": round(lat[-1] * 1000, 3) if lat else None}


# -- the worker process ------------------------------------------------------------------------------------------


class _WorkerLoop:
    """The child's side: the members and the command handlers."""

    def __init__(self, index: int, net: ClientNet | None = None) -> None:
        self.index = index
        #: the server's address and the source addresses (loopback, or a client namespace's veth)
        self.host, self.sources = (net.server, net.sources) if net is not None else ("127.0.0.1", SOURCES)
        self.stats = Stats()
        self.members: list[Member] = []
        self.room = ""
        self.delivered = 0
        #: members join in their upgrade URL (connect, storm) instead of with a join frame
        self.url_join = False

    def _delivery(self) -> None:
        self.delivered += 1

    async def connect(self, targets: list[tuple[int, int, int]], room: str, burst: int,
                      url_join: bool = False, join_timeout: float = 300.0,
                      rooms: list[str] | None = None) -> dict[str, Any]:
        """``targets``: (port, how many, sample every n-th of them; 0 = none) for each server. With ``url_join``
        every member joins ``room`` in its upgrade URL (then and on reconnects): :meth:`join` only waits.
        ``rooms``: the members take these rooms in turn instead of ``room`` (not for :meth:`storm`)."""
        self.room = room
        self.url_join = url_join
        sem = asyncio.Semaphore(burst)
        failures: list[str] = []
        n = 0
        states = []
        for port, count, every in targets:
            for i in range(count):
                source = self.sources[(n + self.index) % len(self.sources)]
                states.append(MemberState(every > 0 and i % every == 0, port, source, host=self.host))
                n += 1

        # each room gets as many members, drawn at random (as joins land in a server's memory)
        drawn = random.Random(self.index).sample(range(len(states)), len(states))

        async def one(k: int, st: MemberState) -> None:
            async with sem:
                try:
                    m = await open_member(st.port, rooms[drawn[k] % len(rooms)] if rooms else room, st, self.stats,
                                          on_delivery=self._delivery, url_join=url_join)
                    self.members.append(m)
                    if url_join:  # as many joins in flight as with join frames (``burst``): the 101 may come first
                        with contextlib.suppress(ConnectionError, TimeoutError):  # counted by join()
                            await asyncio.wait_for(asyncio.shield(m.joined), join_timeout)
                except (OSError, TimeoutError) as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

        t0 = perf()
        await asyncio.gather(*(one(k, st) for k, st in enumerate(states)))
        return {"connected": len(self.members), "failed": len(failures), "first_failure": failures[:1],
                "t0": t0, "t1": perf()}

    async def join(self, burst: int, timeout: float, shuffled: bool = False) -> dict[str, Any]:
        """Every connected member joins (without ``since``), ``burst`` joins in flight at a time; with URL joins,
        the joins still under way are waited for (the ones done already are counted too). ``shuffled``: in an
        order drawn at random, not the order they connected in (which is the order of their state in the
        server's memory: a room's fan-out, in join order, then walks it in a different order)."""
        sem = asyncio.Semaphore(burst)
        errors: list[str] = []
        done = 0
        if self.url_join:
            for m in self.members:
                if m.joined.done():
                    if m.joined.cancelled() or m.joined.exception() is not None:
                        errors.append(f"join refused: {m.joined.exception()}"[:300])
                    else:
                        done += 1

        async def one(m: Member) -> None:
            nonlocal done
            async with sem:
                try:
                    await asyncio.wait_for(asyncio.shield(m.joined) if self.url_join else m.join(), timeout)
                    done += 1
                except (ConnectionError, TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])

        t0 = perf()
        members = random.Random(self.index + 1).sample(self.members, len(self.members)) if shuffled else self.members
        await asyncio.gather(*(one(m) for m in members if not m.joined.done()))
        return {"joined": done, "failed": len(errors), "first_error": errors[:1], "t0": t0, "t1": perf(),
                "joined_bytes": self.stats.joined_bytes, "joined_max": self.stats.joined_max,
                "events": self.stats.events}

    async def churn(self, rounds: int, fraction: float, burst: int, timeout: float) -> dict[str, Any]:
        """``rounds`` times: a ``fraction`` of the members drawn at random disconnect, then as many new
        connections open (from the same sources, into the same rooms) and join, ``burst`` at a time. The server
        frees those sessions and allocates the new ones into the memory they left: a heap after a room's members
        came and went for a while, not a fresh one in which each connection's objects lie together."""
        rng = random.Random(self.index + 7)
        sem = asyncio.Semaphore(burst)
        errors: list[str] = []
        replaced = 0

        async def one(old: Member) -> Member | None:
            async with sem:
                try:
                    m = await open_member(old.state.port, old.room, old.state, self.stats, on_delivery=self._delivery)
                    await asyncio.wait_for(m.join(), timeout)
                    return m
                except (OSError, TimeoutError, ConnectionError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    return None

        t0 = perf()
        for _ in range(rounds):
            gone = set(rng.sample(range(len(self.members)), int(len(self.members) * fraction)))
            leaving = [self.members[i] for i in gone]
            for m in leaving:
                m.close()
            if leaving:
                await asyncio.wait([asyncio.ensure_future(m.lost) for m in leaving], timeout=timeout)
            new = [m for m in await asyncio.gather(*(one(m) for m in leaving)) if m is not None]
            replaced += len(new)
            self.members = [m for i, m in enumerate(self.members) if i not in gone] + new
        return {"replaced": replaced, "failed": len(errors), "first_error": errors[:1], "t0": t0, "t1": perf()}

    def measure(self, on: bool) -> dict[str, Any]:
        s = self.stats
        if on:
            s.count, s.latencies, s.measuring = 0, [], True
            return {}
        s.measuring = False
        return {"count": s.count, "latencies": s.latencies}

    async def storm(self, dead_port: int, ports: list[int], burst: int, timeout: float,
                    jitter: float) -> dict[str, Any]:
        """Members on ``dead_port`` wait for their connection to drop, then reconnect to ``ports`` (spread
        evenly) and join with ``since``; returns when all rejoined or after ``timeout`` seconds."""
        sem = asyncio.Semaphore(burst)
        failures: list[str] = []
        victims = [m for m in self.members if m.state.port == dead_port]
        keep = [m for m in self.members if m.state.port != dead_port]

        dropped: list[float] = []

        async def one(i: int, old: Member) -> Member | None:
            await old.lost
            dropped.append(perf())
            if jitter:
                await asyncio.sleep(random.random() * jitter)
            st = old.state
            st.port = ports[(i + self.index) % len(ports)]
            while True:
                async with sem:
                    try:
                        m = await open_member(st.port, self.room, st, self.stats, on_delivery=self._delivery,
                                              url_join=self.url_join)
                        await asyncio.wait_for(asyncio.shield(m.joined) if self.url_join else m.join(since=True), 30)
                        st.rejoined_at = perf()
                        return m
                    except (OSError, TimeoutError, ConnectionError) as exc:
                        failures.append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.5 + random.random())  # what a client's backoff would do

        tasks = [asyncio.create_task(one(i, m)) for i, m in enumerate(victims)]
        done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        new = [t.result() for t in done if t.result() is not None]
        self.members = keep + [m for m in new if m is not None]
        times = [m.state.rejoined_at for m in victims if m.state.rejoined_at is not None]
        return {"victims": len(victims), "rejoined": len(times), "unfinished": len(pending),
                "attempts_failed": len(failures), "first_failure": failures[:1],
                "rejoined_at": times, "dropped_at": dropped, "recovered": sum(m.state.recovered for m in victims),
                "unrecovered": sum(m.state.unrecovered for m in victims)}

    async def fanout(self, window: int, warmup: float, duration: float, pids: list[int],
                     size: int) -> dict[str, Any]:
        """Member 0 publishes with at most ``window`` messages' deliveries to the others outstanding."""
        pub_state = self.members[0].state
        old = self.members[0]
        old.close()
        pub = await _open_publisher(pub_state.port, self.room, self.stats)
        receivers = [m for m in self.members[1:] if m.is_open]
        per = len(receivers)
        published = 0
        running = True
        pad = b"x" * max(0, size - 40)

        drained = asyncio.Event()

        def pump() -> None:
            nonlocal published
            if not running:
                if self.delivered >= published * per:
                    drained.set()
                return
            while published * per - self.delivered < window * per:
                published += 1
                pub.publish(pad)

        def on_delivery() -> None:
            self.delivered += 1
            pump()

        self.delivered = 0
        for m in receivers:
            m.on_delivery = on_delivery
        pump()
        await asyncio.sleep(warmup)
        s0 = {p: cpu_seconds(p) for p in pids}
        g0, d0, t0 = cpu_seconds(os.getpid()), self.delivered, perf()
        self.measure(True)
        await asyncio.sleep(duration)
        lat = self.measure(False)
        wall, delivered = perf() - t0, self.delivered - d0
        cpu = sum(cpu_seconds(p) - s0[p] for p in pids)
        gen = cpu_seconds(os.getpid()) - g0
        running = False
        pump()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drained.wait(), 10)
        short = published * per - self.delivered
        pub.close()
        return {"deliveries": delivered, "wall": round(wall, 3), "server_cpu": round(cpu, 3),
                "loadgen_cpu": round(gen, 3), "receivers": per, "published": published,
                "missing_after_drain": short, "latencies": lat["latencies"]}

    def report(self, top: int | dict[str, int] | None) -> dict[str, Any]:
        """Totals; with ``top`` (the publisher's last acked offset, or each room's) a member behind it lost the
        rest."""
        tail = 0
        behind = 0
        never = [m for m in self.members if m.state.last is None]  # their join failed: nothing to check
        if top is not None:
            for m in self.members:
                if m.state.last is None:
                    continue
                gap = (top[m.room] if isinstance(top, dict) else top) - m.state.last
                if gap > 0:
                    tail += gap
                    behind += 1
        s = self.stats
        return {"members": len(self.members), "open": sum(1 for m in self.members if m.is_open),
                "got": sum(m.state.got for m in self.members),
                "lost": sum(m.state.lost for m in self.members) + tail, "lost_tail": tail,
                "members_behind": behind, "not_joined": len(never), "dup": sum(m.state.dup for m in self.members),
                "events": s.events, "errors": s.errors, "first_error": s.first_error}

    async def drop(self) -> dict[str, Any]:
        """Close every member and forget them (the warm-up's connections)."""
        members, self.members, self.stats = self.members, [], Stats()
        for m in members:
            m.close()
        if members:
            await asyncio.wait([asyncio.ensure_future(m.lost) for m in members], timeout=10)
        return {"closed": len(members)}

    def close(self) -> None:
        for m in self.members:
            m.close()


async def _open_publisher(port: int, room: str, stats: Stats, host: str = "127.0.0.1") -> Publisher:
    loop = asyncio.get_running_loop()
    _, pub = await loop.create_connection(lambda: Publisher(host, port, room, stats), host, port)
    await asyncio.wait_for(pub.opened, 20)
    await asyncio.wait_for(pub.join(), 60)
    return pub


def _worker_main(conn: multiprocessing.connection.Connection, index: int, core: int | None,
                 net: ClientNet | None) -> None:
    raise_nofile()
    if core is not None:
        os.sched_setaffinity(0, {core})
    if net is not None:  # before any socket: the members' connections go over the namespace's veth
        enter(net.namespace)
    asyncio.run(_serve(conn, index, net))


async def _serve(conn: multiprocessing.connection.Connection, index: int, net: ClientNet | None) -> None:
    w = _WorkerLoop(index, net)
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[int, str, dict[str, Any]]] = asyncio.Queue(maxsize=64)
    loop.add_reader(conn.fileno(), lambda: inbox.put_nowait(conn.recv()))
    tasks: set[asyncio.Task[None]] = set()

    async def run(tag: int, name: str, kw: dict[str, Any]) -> None:
        try:
            fn = getattr(w, name)
            result = fn(**kw)
            if asyncio.iscoroutine(result):
                result = await result
            conn.send((tag, True, result))
        except Exception as exc:  # reported to the parent, which raises it
            conn.send((tag, False, f"{type(exc).__name__}: {exc}"))

    while True:
        tag, name, kw = await inbox.get()
        if name == "exit":
            w.close()
            await asyncio.sleep(0.05)
            conn.send((tag, True, None))
            return
        t = asyncio.create_task(run(tag, name, kw))
        tasks.add(t)
        t.add_done_callback(tasks.discard)


class Worker:
    """The parent's handle of one worker process; :meth:`call` runs a command and awaits its answer."""

    def __init__(self, index: int, core: int | None, net: ClientNet | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, index, core, net), daemon=True)
        self.proc.start()
        child.close()
        self.index = index
        self._tag = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reading = False

    def _on_readable(self) -> None:
        try:
            tag, ok, result = self.conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            for f in self._waiting.values():
                if not f.done():
                    f.set_exception(RuntimeError(f"worker {self.index} died"))
            return
        f = self._waiting.pop(tag)
        if ok:
            f.set_result(result)
        else:
            f.set_exception(RuntimeError(f"worker {self.index}: {result}"))

    async def call(self, name: str, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        if not self._reading:
            loop.add_reader(self.conn.fileno(), self._on_readable)
            self._reading = True
        self._tag += 1
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting[self._tag] = fut
        self.conn.send((self._tag, name, kw))
        return await fut

    async def exit(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.call("exit"), 10)
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            self._reading = False
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
