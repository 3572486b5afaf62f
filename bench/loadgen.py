"""wirehub's load generator: thousands of WebSocket clients in one asyncio process, cheap per message.

It must never be the bottleneck of a benchmark, so nothing heavy runs per message: each
connection is a raw :class:`asyncio.Protocol` (on uvloop when installed) with a minimal RFC 6455
client. Client frames are masked with a random per-connection key (pre-masked once when the
payload does not change); server frames are parsed in place from each received chunk and a
subclass sees ``(buffer, start, end)`` without a copy. Replies that a chunk triggers are written
in one ``transport.write`` at the end of the chunk.

Every scenario measures a window after a warm-up and reports, besides its throughput and latency
percentiles, the CPU seconds that the server process (``--server-pid``, read from
``/proc/<pid>/stat``) and this process spent in the window: a valid run shows the server's core
saturated (about 100 %) and this process below it.

Scenarios (``python -m bench.loadgen SCENARIO --url ws://127.0.0.1:PORT/PATH ...``; the last line
of stdout is one JSON object with the results):

- ``echo``: ``--conns`` connections, each keeping ``--inflight`` JSON frames in flight; a round
  trip's latency is from the write of a frame to the read of its reply (replies come in order).
- ``fanout``: ``--members`` connections join one room (chat protocol: ``join`` -> ``joined``);
  one of them publishes with the other members' deliveries of at most ``--window`` messages
  outstanding. A delivery's latency is from the publish (timestamp in the payload) to its read,
  sampled on every ``--sample-every``-th member.
- ``idle``: opens ``--conns`` connections in a burst (``--burst`` handshakes at a time), leaves
  them idle and reports the server's RSS growth per connection and the handshake latencies.

Other benchmarks import :class:`WsClient`, :func:`connect`, :class:`Window`, :func:`measure`,
:func:`cpu_seconds`, :func:`rss_bytes` and :func:`summarize` from here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
perf = time.perf_counter

# -- process figures --------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid``: on loopback the system part also carries the receiving
    side's TCP input and its epoll wakeups, which the kernel runs in the sender's context."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def raise_nofile(want: int = 1 << 20) -> int:
    """Raise this process's open-file limit towards ``want`` (capped by the hard limit); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


# -- the WebSocket client -----------------------------------------------------------------------------------------


def mask_payload(mask: bytes, payload: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` (RFC 6455 section 5.3), as one big-int operation."""
    n = len(payload)
    if not n:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def client_frame(payload: bytes, mask: bytes, opcode: int = 0x1) -> bytes:
    """One masked, final client frame."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n < 65536:
        header = bytes((first, 0xFE)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, 0xFF)) + n.to_bytes(8, "big")
    return header + mask + mask_payload(mask, payload)


class HandshakeError(ConnectionError):
    pass


class WsClient(asyncio.Protocol):
    """One client connection. Subclasses override :meth:`on_message` and maybe :meth:`on_chunk_end`.

    Server frames are expected whole (FIN set; wirehub and Tornado never fragment); continuation
    frames are passed on like data frames.
    """

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str] | None = None) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.mask = os.urandom(4)
        self.close_code: int | None = None
        self._open = False
        self._buf = b""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or HandshakeError("closed before the handshake"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self._open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return
            status = data[: data.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                if not self.opened.done():
                    self.opened.set_exception(HandshakeError(status.decode("latin-1")))
                assert self.transport is not None
                self.transport.close()
                return
            self._open = True
            self.opened.set_result(None)
            data = data[end + 4 :]
        n = len(data)
        pos = 0
        on_message = self.on_message
        while n - pos >= 2:
            b0 = data[pos]
            ln = data[pos + 1] & 0x7F
            start = pos + 2
            if ln >= 126:
                if ln == 126:
                    if n - pos < 4:
                        break
                    ln = (data[pos + 2] << 8) | data[pos + 3]
                    start = pos + 4
                else:
                    if n - pos < 10:
                        break
                    ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                    start = pos + 10
            end = start + ln
            if end > n:
                break
            op = b0 & 0x0F
            if op <= 2:
                on_message(data, start, end)
            else:
                self._control(op, data[start:end])
            pos = end
        if pos < n:
            self._buf = data[pos:]
        self.on_chunk_end()

    # frames

    def on_message(self, data: bytes, start: int, end: int) -> None:
        """A data frame whose payload is ``data[start:end]`` (``data`` is only valid during the call)."""

    def on_chunk_end(self) -> None:
        """Called after the frames of one received chunk were handled: the place to batch writes."""

    def _control(self, op: int, payload: bytes) -> None:
        if op == 0x9:
            self.send(payload, 0xA)
        elif op == 0x8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(client_frame(payload[:2], self.mask, 0x8))
                self.transport.close()

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(payload, self.mask, opcode))

    def close(self, code: int = 1000) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(code.to_bytes(2, "big"), self.mask, 0x8))
            self.transport.close()

    @property
    def is_open(self) -> bool:
        return self._open and self.transport is not None and not self.transport.is_closing()


C = TypeVar("C", bound=WsClient)


async def connect(factory: Callable[[], C], host: str, port: int, timeout: float = 15.0) -> C:
    """Open one connection made by ``factory`` and wait for its 101."""
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(loop.create_connection(factory, host, port), timeout)
    return await upgraded(proto, timeout)


async def upgraded(proto: C, timeout: float) -> C:
    """``proto`` once its 101 came (within ``timeout``); its connection aborted if it did not."""
    try:
        await asyncio.wait_for(asyncio.shield(proto.opened), timeout)
    except BaseException:
        if proto.transport is not None:
            proto.transport.abort()
        raise
    return proto


async def connect_many(factory: Callable[[], C], host: str, port: int, n: int, burst: int,
                       timeout: float = 15.0) -> tuple[list[C], list[float], list[str]]:
    """Open ``n`` connections, ``burst`` handshakes at a time: (clients, handshake seconds, failures)."""
    sem = asyncio.Semaphore(burst)
    clients: list[C] = []
    times: list[float] = []
    failures: list[str] = []

    async def one() -> None:
        async with sem:
            t0 = perf()
            try:
                c = await connect(factory, host, port, timeout)
            except (OSError, TimeoutError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            times.append(perf() - t0)
            clients.append(c)

    await asyncio.gather(*(one() for _ in range(n)))
    return clients, times, failures


# -- measurement --------------------------------------------------------------------------------------------------


@dataclass
class Window:
    """What clients record while :attr:`measuring` (the measurement window) is set."""

    measuring: bool = False
    count: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    first_error: str | None = None

    def error(self, text: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = text[:300]


async def measure(window: Window, server_pids: int | Sequence[int] | None, warmup: float,
                  duration: float) -> dict[str, Any]:
    """Warm up, then record for ``duration`` seconds: wall time, the CPU seconds of the server
    processes (summed, and ``cpu_by_pid``) and of this process."""
    pids = [] if not server_pids else [server_pids] if isinstance(server_pids, int) else list(server_pids)
    await asyncio.sleep(warmup)
    me = os.getpid()
    s0 = {pid: cpu_seconds(pid) for pid in pids}
    g0 = cpu_seconds(me)
    t0 = perf()
    window.count, window.errors, window.latencies = 0, 0, []
    window.measuring = True
    await asyncio.sleep(duration)
    window.measuring = False
    wall = perf() - t0
    cpu = {pid: round(cpu_seconds(pid) - s0[pid], 3) for pid in pids}
    return {"wall": wall, "server_cpu": sum(cpu.values()), "loadgen_cpu": cpu_seconds(me) - g0, "cpu_by_pid": cpu}


def summarize(scenario: str, window: Window, times: dict[str, float], **extra: Any) -> dict[str, Any]:
    """The result object: throughput per wall second and per server CPU-second, latency percentiles in ms."""
    lat = sorted(window.latencies)

    def ms(q: float) -> float | None:
        v = percentile(lat, q)
        return None if v is None else round(v * 1000, 3)

    wall, server_cpu = times["wall"], times["server_cpu"]
    result: dict[str, Any] = {
        "scenario": scenario,
        "count": window.count,
        "wall": round(wall, 3),
        "server_cpu": round(server_cpu, 3),
        "loadgen_cpu": round(times["loadgen_cpu"], 3),
        "server_cpu_pct": round(100 * server_cpu / wall, 1) if wall else None,
        "loadgen_cpu_pct": round(100 * times["loadgen_cpu"] / wall, 1) if wall else None,
        "per_wall_s": round(window.count / wall, 1) if wall else None,
        "per_server_cpu_s": round(window.count / server_cpu, 1) if server_cpu > 0 else None,
        "samples": len(lat),
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": round(lat[-1] * 1000, 3) if lat else None,
        "errors": window.errors,
        "first_error": window.first_error,
    }
    result.update(extra)
    return result


# -- echo ---------------------------------------------------------------------------------------------------------


def json_payload(size: int, **fields: Any) -> bytes:
    """A JSON object of about ``size`` bytes: ``fields`` plus a padding string."""
    base = json.dumps({**fields, "pad": ""}, separators=(",", ":")).encode()
    pad = max(0, size - len(base))
    return base[:-2] + b"x" * pad + b'"}'


class EchoClient(WsClient):
    """Keeps ``inflight`` frames in flight; replies come back in order, so send times are a FIFO."""

    def __init__(self, host: str, port: int, path: str, window: Window, inflight: int, payload: bytes,
                 expect: bytes) -> None:
        super().__init__(host, port, path)
        self.window = window
        self.inflight = inflight
        self.frame = client_frame(payload, self.mask)
        self.expect = expect
        self.sent: deque[float] = deque()
        self.running = False
        self._due = 0

    def start(self) -> None:
        assert self.transport is not None
        self.running = True
        now = perf()
        self.sent.extend([now] * self.inflight)
        self.transport.write(self.frame * self.inflight)

    def on_message(self, data: bytes, start: int, end: int) -> None:
        now = perf()
        if not self.sent:
            self.window.error("a reply nobody asked for")
            return
        t0 = self.sent.popleft()
        w = self.window
        if w.measuring:
            w.count += 1
            w.latencies.append(now - t0)
            if not data.startswith(self.expect, start):
                w.error(f"unexpected reply {bytes(data[start:end])[:200]!r}")
        if self.running:
            self._due += 1

    def on_chunk_end(self) -> None:
        due = self._due
        if due and self.transport is not None and not self.transport.is_closing():
            self._due = 0
            self.sent.extend([perf()] * due)
            self.transport.write(self.frame * due)


async def run_echo(host: str, port: int, path: str, *, conns: int, inflight: int, size: int, warmup: float,
                   duration: float, server_pid: int | None, raw: bool = False) -> dict[str, Any]:
    window = Window()
    payload = json_payload(size, seq=1)
    expect = payload[:8] if raw else b'{"echo":'
    clients, _, failures = await connect_many(
        lambda: EchoClient(host, port, path, window, inflight, payload, expect), host, port, conns, 256)
    if failures:
        raise ConnectionError(f"{len(failures)} of {conns} echo connections failed: {failures[0]}")
    for c in clients:
        c.start()
    times = await measure(window, server_pid, warmup, duration)
    for c in clients:
        c.running = False
    closed = sum(1 for c in clients if not c.is_open)
    if closed:
        window.error(f"{closed} connections were closed during the run")
    for c in clients:
        c.close()
    return summarize("echo", window, times, conns=conns, inflight=inflight, size=len(payload),
                     closed=closed)


# -- fan-out ------------------------------------------------------------------------------------------------------

_MESSAGE = b'"op":"message"'
_ERROR = b'"op":"error"'
_T = b'"t":'


class Fan:
    """Flow control of the publisher: at most ``window`` messages' deliveries outstanding."""

    def __init__(self, receivers: int, window: int, rate: float = 0.0) -> None:
        self.receivers = receivers
        self.window = window
        #: publishes per second (0: as fast as the window allows); a paced publisher, below saturation
        self.rate = rate
        self._next = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.published = 0
        self.delivered = 0
        self.running = False
        self.stopped = False
        self.publisher: ChatClient | None = None
        #: set once stopped and every delivery of what was published has been read
        self.drained = asyncio.Event()

    def pump(self) -> None:
        pub = self.publisher
        if not self.running or pub is None:
            if self.stopped and self.delivered >= self.published * self.receivers:
                self.drained.set()
            return
        per, limit = self.receivers, self.window * self.receivers
        if self.rate:
            self._paced(pub, per, limit)
            return
        while self.published * per - self.delivered < limit:
            self.published += 1
            pub.publish(self.published)

    def _paced(self, pub: ChatClient, per: int, limit: int) -> None:
        """One publish every 1/rate seconds (when the window allows), on a timer of its own."""
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._next and self.published * per - self.delivered < limit:
            self.published += 1
            pub.publish(self.published)
            self._next = max(self._next + 1 / self.rate, now)

        def tick() -> None:
            self._timer = None
            self.pump()

        self._timer = loop.call_at(max(self._next, now + 0.0005), tick)


class ChatClient(WsClient):
    """A chat member: ``join`` then counts (and, when ``sampled``, times) the ``message`` frames it gets."""

    def __init__(self, host: str, port: int, path: str, window: Window, fan: Fan, room: str, sampled: bool,
                 pad: bytes) -> None:
        super().__init__(host, port, path)
        self.window = window
        self.fan = fan
        self.room = room
        self.sampled = sampled
        self.pad = pad
        self.joined: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._head = b'{"op":"publish","room":' + json.dumps(room).encode() + b',"id":'
        self.acks = 0
        self.got = 0

    def join(self) -> asyncio.Future[dict[str, Any]]:
        self.send(json.dumps({"op": "join", "room": self.room, "id": "join"}).encode())
        return self.joined

    def publish(self, seq: int) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        payload = b'%s%d,"data":{"t":%.6f,"pad":"%s"}}' % (self._head, seq, perf(), self.pad)
        self.transport.write(client_frame(payload, self.mask))

    def on_message(self, data: bytes, start: int, end: int) -> None:
        if data.find(_MESSAGE, start, end) >= 0:
            self.got += 1
            self.fan.delivered += 1
            w = self.window
            if w.measuring:
                w.count += 1
                if self.sampled:
                    i = data.find(_T, start, end) + 4
                    j = i
                    while data[j] not in (44, 125):  # , }
                        j += 1
                    w.latencies.append(perf() - float(data[i:j]))
            return
        if not self.joined.done():
            msg = json.loads(bytes(data[start:end]))
            if msg.get("op") == "joined":
                self.joined.set_result(msg)
            elif msg.get("op") == "error":
                self.joined.set_exception(ConnectionError(f"join refused: {msg}"))
            return
        if data.find(_ERROR, start, end) >= 0:
            self.window.error(bytes(data[start:end]).decode(errors="replace"))
            if self is self.fan.publisher:  # not published after all: the pump must not wait for it
                self.fan.published -= 1
                asyncio.get_running_loop().call_later(0.01, self.fan.pump)
        elif self is self.fan.publisher:
            self.acks += 1

    def on_chunk_end(self) -> None:
        self.fan.pump()


SEND_CALLS = ("sendto", "sendmsg", "write", "writev")


async def count_sends(pid: int, delay: float, duration: float) -> tuple[int, float] | None:
    """The write system calls (``SEND_CALLS``) ``pid`` makes in ``duration`` seconds after ``delay``, and
    the seconds counted, with ``perf stat`` (None without perf or its tracepoints)."""
    await asyncio.sleep(delay)
    events = ",".join(f"syscalls:sys_enter_{name}" for name in SEND_CALLS)
    try:
        proc = await asyncio.create_subprocess_exec(
            "perf", "stat", "-x", ",", "-e", events, "-p", str(pid), "--", "sleep", str(duration),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    except OSError:
        return None
    t0 = perf()
    _, err = await proc.communicate()
    wall = perf() - t0
    counts = [line.split(",") for line in err.decode(errors="replace").splitlines() if "sys_enter_" in line]
    if proc.returncode != 0 or len(counts) != len(SEND_CALLS) or not all(c[0].isdigit() for c in counts):
        return None
    return sum(int(c[0]) for c in counts), wall


async def run_fanout(host: str, port: int, path: str, *, members: int, window_msgs: int, size: int,
                     sample_every: int, warmup: float, duration: float, burst: int,
                     server_pid: int | None, rate: float = 0.0, count_syscalls: bool = True) -> dict[str, Any]:
    if members < 2:
        raise ValueError("fan-out needs at least 2 members")
    window = Window()
    fan = Fan(members - 1, window_msgs, rate)
    room = f"bench-{uuid.uuid4().hex[:8]}"
    pad = b"x" * max(0, size - 40)
    index = iter(range(members))

    def make() -> ChatClient:
        return ChatClient(host, port, path, window, fan, room, next(index) % sample_every == 0, pad)

    clients, _, failures = await connect_many(make, host, port, members, burst)
    if failures:
        raise ConnectionError(f"{len(failures)} of {members} chat connections failed: {failures[0]}")
    sem = asyncio.Semaphore(burst)

    async def join(c: ChatClient) -> None:
        async with sem:
            await asyncio.wait_for(c.join(), 30)

    await asyncio.gather(*(join(c) for c in clients))
    publisher = clients[0]
    publisher.sampled = False
    fan.publisher = publisher
    await asyncio.sleep(0.2)  # let join events settle before counting
    fan.running = True
    fan.pump()
    sends = (asyncio.ensure_future(count_sends(server_pid, warmup, duration))
             if server_pid and count_syscalls else None)
    times = await measure(window, server_pid, warmup, duration)
    counted = await sends if sends is not None else None
    fan.running, fan.stopped = False, True
    # Integrity: once the last deliveries are in, every receiver got every message, exactly once.
    fan.pump()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(fan.drained.wait(), 10)
    receivers = clients[1:]
    lost = sum(max(0, fan.published - c.got) for c in receivers)
    extra = sum(max(0, c.got - fan.published) for c in receivers)
    if lost or extra:
        window.error(f"{lost} deliveries missing and {extra} extra after {fan.published} publishes")
    closed = sum(1 for c in clients if not c.is_open)
    if closed:
        window.error(f"{closed} connections were closed during the run")
    for c in clients:
        c.close()
    return summarize("fanout", window, times, conns=members, receivers=members - 1, window_msgs=window_msgs,
                     published=fan.published, acks=publisher.acks, lost=lost, closed=closed,
                     size=len(pad) + 40, rate=rate or None,
                     # the server's write system calls per second against deliveries per second (perf stat)
                     server_sends=counted[0] if counted else None,
                     frames_per_send=round(window.count / times["wall"] / (counted[0] / counted[1]), 3)
                     if counted and counted[0] else None)


# -- idle connections ---------------------------------------------------------------------------------------------


class IdleClient(WsClient):
    """Holds a connection open; keeps the last frame so a liveness probe can read it."""

    def __init__(self, host: str, port: int, path: str) -> None:
        super().__init__(host, port, path)
        self.reply: asyncio.Future[bytes] | None = None

    def on_message(self, data: bytes, start: int, end: int) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_result(bytes(data[start:end]))

    async def probe(self, timeout: float = 10.0) -> bytes:
        self.reply = asyncio.get_running_loop().create_future()
        self.send(b'{"probe":1}')
        return await asyncio.wait_for(self.reply, timeout)


async def run_idle(host: str, port: int, path: str, *, conns: int, burst: int, settle: float,
                   server_pid: int | None) -> dict[str, Any]:
    def make() -> IdleClient:
        return IdleClient(host, port, path)

    # Warm the server up (imports, first allocations) so the RSS delta is the connections' own.
    warm, _, _ = await connect_many(make, host, port, 50, 50)
    for c in warm:
        c.close()
    await asyncio.gather(*(c.lost for c in warm))
    await asyncio.sleep(settle)
    me = os.getpid()
    rss0 = rss_bytes(server_pid) if server_pid else 0
    s0, g0, t0 = (cpu_seconds(server_pid) if server_pid else 0.0), cpu_seconds(me), perf()
    clients, times, failures = await connect_many(make, host, port, conns, burst)
    wall = perf() - t0
    s1, g1 = (cpu_seconds(server_pid) if server_pid else 0.0), cpu_seconds(me)
    await asyncio.sleep(settle)
    rss1 = rss_bytes(server_pid) if server_pid else 0
    window = Window(count=len(clients), latencies=times)
    for f in failures[:1]:
        window.error(f)
    window.errors = len(failures)
    step = max(1, len(clients) // 20)
    alive = 0
    for c in clients[::step]:
        try:
            await c.probe()
            alive += 1
        except (TimeoutError, ConnectionError) as exc:
            window.error(f"probe failed: {exc!r}")
    for c in clients:
        c.close()
    if clients:
        await asyncio.wait(list(c.lost for c in clients), timeout=10)
    ok = len(clients)
    return summarize("idle", window, {"wall": wall, "server_cpu": s1 - s0, "loadgen_cpu": g1 - g0},
                     conns=conns, connected=ok, failed=len(failures), probed_alive=alive,
                     rss_before=rss0, rss_after=rss1,
                     rss_per_conn=round((rss1 - rss0) / ok) if ok else None)


# -- command line -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=("echo", "fanout", "idle"))
    p.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/PATH")
    p.add_argument("--server-pid", type=int, default=None, help="the server process, for its CPU and RSS")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--conns", type=int, default=64, help="echo and idle: connections")
    p.add_argument("--inflight", type=int, default=8, help="echo: frames in flight per connection")
    p.add_argument("--size", type=int, default=64, help="approximate payload bytes")
    p.add_argument("--raw", action="store_true", help="echo: the endpoint echoes frames verbatim")
    p.add_argument("--members", type=int, default=1000, help="fanout: connections in the room")
    p.add_argument("--window", type=int, default=8, help="fanout: messages whose deliveries may be outstanding")
    p.add_argument("--sample-every", type=int, default=10, help="fanout: time the deliveries of every n-th member")
    p.add_argument("--rate", type=float, default=0.0,
                   help="fanout: publishes per second (0: closed loop, as fast as --window allows)")
    p.add_argument("--no-perf", action="store_true", help="fanout: do not count the server's sends with perf stat")
    p.add_argument("--burst", type=int, default=1000, help="handshakes at a time")
    p.add_argument("--settle", type=float, default=1.0, help="idle: seconds before reading RSS")
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    return p


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    url = urlsplit(args.url)
    host, port, path = url.hostname or "127.0.0.1", url.port or 80, url.path or "/"
    if args.scenario == "echo":
        return await run_echo(host, port, path, conns=args.conns, inflight=args.inflight, size=args.size,
                              warmup=args.warmup, duration=args.duration, server_pid=args.server_pid, raw=args.raw)
    if args.scenario == "fanout":
        return await run_fanout(host, port, path, members=args.members, window_msgs=args.window, size=args.size,
                                sample_every=args.sample_every, warmup=args.warmup, duration=args.duration,
                                burst=args.burst, server_pid=args.server_pid, rate=args.rate,
                                count_syscalls=not args.no_perf)
    return await run_idle(host, port, path, conns=args.conns, burst=args.burst, settle=args.settle,
                          server_pid=args.server_pid)


def new_event_loop(use_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_nofile()
    loop = new_event_loop(not args.no_uvloop)
    try:
        result = loop.run_until_complete(_main(args))
    finally:
        loop.close()
    result["loop"] = type(loop).__module__.split(".")[0]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
