"""Several worker processes in one pod (``server.processes``): a supervisor and N forked workers.

The supervisor validates the config, takes the port, forks the workers and then only watches them: it
forwards SIGTERM/SIGINT (each worker drains as a single process does), restarts a worker that dies while
serving (capped backoff), and makes the whole ``serve`` fail when a worker fails before it listens (bad
config, broker unreachable): a restart would fail the same way. It runs no event loop and serves nothing.

Each worker is a full replica (its own node id ``<node_id>-w<index>``, bus connection, hub and loop). The
port is shared either by a listening socket per worker with SO_REUSEPORT (the kernel hashes each new
connection to one of them: an even spread) or by one socket bound before the fork (``shared``).

``/metrics`` answers for the pod: the worker that gets the scrape renders its own metrics and merges the
others' latest snapshots, every series labelled ``worker``. Each worker writes its snapshot into a slot of
an anonymous shared mapping made before the fork (no file: the root file system is read-only in the
Kubernetes manifests) every :data:`SNAPSHOT_INTERVAL` seconds, so nothing is added to the hot path.

A worker that lives but whose event loop is stuck (a plugin doing blocking I/O, a CPU-bound bug) would only fail
the probes that land on it. So each worker's loop also beats into :class:`Heartbeats`, another shared mapping:
a worker's ``/healthz`` and ``/readyz`` answer 503 naming any sibling whose heartbeat is older than
``server.worker_stall_timeout``, and the supervisor has such a worker write its Python stack (faulthandler), then
SIGKILLs it and restarts it as a crashed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import faulthandler
import logging
import math
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tornado.netutil import bind_sockets

from wirehub.config import Config

log = logging.getLogger("wirehub.supervisor")

#: the signals that stop a worker (a drain) and that the supervisor forwards
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
#: seconds between two metrics snapshots of a worker (the staleness of the other workers' series)
SNAPSHOT_INTERVAL = 1.0
#: the first restart of a crashed worker waits this long; each crash in a row doubles it, up to MAX_BACKOFF
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: a worker that served this long before it died starts the backoff over
STABLE_AFTER = 30.0
#: seconds past ``drain.grace`` before the supervisor kills the workers that still run
KILL_AFTER_GRACE = 5.0
#: seconds between two heartbeats of a worker's loop, and between two looks at them by the supervisor
HEARTBEAT_INTERVAL = 0.25
#: the signal at which a worker writes every thread's Python stack to stderr (faulthandler: from the C signal
#: handler, so also while its loop is stuck); the supervisor sends it to a stalled worker before the kill
STACK_SIGNAL = signal.SIGUSR1
#: seconds the supervisor leaves a stalled worker to write its stack before SIGKILL
STACK_WAIT = 0.1


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a Kubernetes
    CPU limit), rounded up."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    limit = _cgroup_cpus(Path("/sys/fs/cgroup"))
    if limit is not None:
        count = min(count, limit)
    return max(1, count)


def _cgroup_cpus(root: Path) -> int | None:
    """The CPU limit of this cgroup, rounded up: cgroup v2's ``cpu.max``, else v1's CFS quota and period;
    None when there is none (or no cgroup file system)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 else max(1, math.ceil(quota_us / period_us))
    return None


def migrate_req(sysctl: Path = Path("/proc/sys/net/ipv4/tcp_migrate_req")) -> int | None:
    """``net.ipv4.tcp_migrate_req`` of this network namespace (the pod's), None without it (Linux before 5.14):
    at 1, the connections queued on a SO_REUSEPORT listener that closes move to another listener of the port."""
    try:
        return int(sysctl.read_text())
    except (OSError, ValueError):
        return None


def _signal_name(signum: int) -> str:
    """SIGKILL, or the number of a signal Python has no name for (the real-time ones)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def worker_count(config: Config) -> int:
    """``server.processes``, with 0 meaning :func:`available_cpus`."""
    return config.server.processes or available_cpus()


def worker_config(config: Config, index: int) -> Config:
    """``config`` for worker ``index``: its node id is the pod's with ``-w<index>`` (presence and the bus
    need one identity per process)."""
    server = dataclasses.replace(config.server, node_id=f"{config.node_id}-w{index}")
    return dataclasses.replace(config, server=server)


# -- metrics across workers -------------------------------------------------------------------------------------


class MetricsShare:
    """One slot per worker (and one for the supervisor) in an anonymous shared mapping, each holding the latest
    Prometheus exposition of its writer. Made before the fork, inherited by every worker.

    A slot is ``seq, written_at, length`` then the text; a writer makes ``seq`` odd while it writes (a seqlock),
    so a reader retries instead of reading a half-written text. Pages never written take no memory.
    """

    SLOT = 4 << 20
    _HEAD = struct.Struct("=Qdq")

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.buf = mmap.mmap(-1, self.SLOT * (workers + 1))  # MAP_SHARED: the workers see each other's writes
        self._too_big_logged = False

    def write(self, slot: int, data: bytes) -> None:
        base = slot * self.SLOT
        if len(data) > self.SLOT - self._HEAD.size:
            if not self._too_big_logged:
                self._too_big_logged = True
                log.warning("metrics exposition of %d bytes is over the %d-byte slot; other workers keep the "
                            "previous snapshot", len(data), self.SLOT)
            return
        # odd while writing, even after; ``| 1`` also recovers a slot left odd by a writer killed mid-write
        writing = (self._HEAD.unpack_from(self.buf, base)[0] + 1) | 1
        self._HEAD.pack_into(self.buf, base, writing, 0.0, 0)
        self.buf[base + self._HEAD.size:base + self._HEAD.size + len(data)] = data
        self._HEAD.pack_into(self.buf, base, writing + 1, time.time(), len(data))

    def read(self, slot: int) -> tuple[float, bytes] | None:
        """``(written_at, text)`` of ``slot``, or None if it was never written (or kept changing)."""
        base = slot * self.SLOT
        for _ in range(20):
            seq, written_at, length = self._HEAD.unpack_from(self.buf, base)
            if seq % 2:
                time.sleep(0.0001)
                continue
            data = self.buf[base + self._HEAD.size:base + self._HEAD.size + length]
            if self._HEAD.unpack_from(self.buf, base)[0] == seq:
                return (written_at, data) if seq else None
        return None

    def pod_exposition(self, index: int, own: bytes) -> bytes:
        """What ``/metrics`` answers on worker ``index``: its own ``own`` text (and snapshot, refreshed) and
        every other worker's latest snapshot, each series labelled ``worker``, then the supervisor's series."""
        self.write(index, own)
        now = time.time()
        parts: list[tuple[str | None, bytes]] = []
        ages: list[tuple[str, float]] = []
        for slot in range(self.workers):
            if slot == index:
                parts.append((str(slot), own))
                ages.append((str(slot), 0.0))
                continue
            snapshot = self.read(slot)
            if snapshot is not None:
                parts.append((str(slot), snapshot[1]))
                ages.append((str(slot), max(0.0, now - snapshot[0])))
        supervisor = self.read(self.workers)
        if supervisor is not None:
            parts.append((None, supervisor[1]))
        age = ("# HELP wirehub_worker_metrics_age_seconds Seconds since each worker's series in this answer were "
               "taken (0 for the worker that answered)\n# TYPE wirehub_worker_metrics_age_seconds gauge\n"
               + "".join(f'wirehub_worker_metrics_age_seconds{{worker="{w}"}} {a:.3f}\n' for w, a in ages))
        return merge_expositions(parts) + age.encode()


def _labelled(line: str, worker: str) -> str:
    """A sample line with ``worker="<worker>"`` as its first label."""
    cut = next((i for i, ch in enumerate(line) if ch in "{ "), len(line))
    if cut < len(line) and line[cut] == "{":
        sep = "" if line[cut + 1:cut + 2] == "}" else ","
        return f'{line[:cut + 1]}worker="{worker}"{sep}{line[cut + 1:]}'
    return f'{line[:cut]}{{worker="{worker}"}}{line[cut:]}'


def merge_expositions(parts: list[tuple[str | None, bytes]]) -> bytes:
    """One Prometheus text exposition from several: each family's ``# HELP``/``# TYPE`` once, then its samples
    from every part in order, labelled ``worker`` (a part whose worker is None keeps its samples as they are)."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in parts:
        family: str | None = None
        for line in text.decode("utf-8", "replace").splitlines():
            if not line:
                continue
            if line.startswith("#"):
                fields = line.split(" ", 3)
                if len(fields) >= 3 and fields[1] in ("HELP", "TYPE"):
                    family = fields[2]
                    head = heads.setdefault(family, [])
                    samples.setdefault(family, [])
                    if not any(h.split(" ", 2)[1] == fields[1] for h in head):
                        head.append(line)
                continue
            if family is None:  # a sample before any header: a family of its own name
                family = line.split("{", 1)[0].split(" ", 1)[0]
                heads.setdefault(family, [])
                samples.setdefault(family, [])
            samples[family].append(line if worker is None else _labelled(line, worker))
    out: list[str] = []
    for family, head in heads.items():
        out.extend(head)
        out.extend(samples[family])
    return ("\n".join(out) + "\n").encode()


# -- heartbeats ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stall:
    """A worker whose loop has not beaten for ``age`` seconds."""

    index: int
    pid: int
    age: float


class Heartbeats:
    """One slot per worker in an anonymous shared mapping made before the fork: ``beat_at, pid``, the
    ``time.monotonic()`` of its loop's latest heartbeat (CLOCK_MONOTONIC: one clock for every process of the
    host, deaf to wall-clock steps) and its pid. ``beat_at`` 0 means "not judged": the worker is starting,
    draining, or dead and not yet restarted. Each field is one aligned 8-byte store, which a reader never sees
    half-written on the 64-bit CPUs we run on; ``pid`` is written before the first ``beat_at``."""

    _SLOT = struct.Struct("=dq")

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.buf = mmap.mmap(-1, max(mmap.PAGESIZE, self._SLOT.size * workers))

    def start(self, index: int, pid: int) -> None:
        """Worker ``index`` (``pid``) serves: judge it from now on."""
        struct.pack_into("=q", self.buf, index * self._SLOT.size + 8, pid)
        self.beat(index)

    def beat(self, index: int) -> None:
        struct.pack_into("=d", self.buf, index * self._SLOT.size, time.monotonic())

    def clear(self, index: int) -> None:
        """Worker ``index`` stops serving (a drain, an exit, a fork to come): no longer judged."""
        self._SLOT.pack_into(self.buf, index * self._SLOT.size, 0.0, 0)

    def stalled(self, limit: float, skip: int | None = None) -> list[Stall]:
        """The judged workers (but ``skip``) whose latest heartbeat is more than ``limit`` seconds old."""
        now = time.monotonic()
        found: list[Stall] = []
        for index in range(self.workers):
            beat_at, pid = self._SLOT.unpack_from(self.buf, index * self._SLOT.size)
            if index != skip and beat_at and now - beat_at > limit:
                found.append(Stall(index, pid, now - beat_at))
        return found


class HeartbeatWriter:
    """In a worker: a timer on its loop that beats every :data:`HEARTBEAT_INTERVAL` seconds. A loop that
    stops running stops the beats; that is all it detects (a loop that runs but serves badly is not stalled)."""

    def __init__(self, heartbeats: Heartbeats, index: int) -> None:
        self.heartbeats = heartbeats
        self.index = index
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.heartbeats.start(self.index, os.getpid())
        self._timer = asyncio.get_running_loop().call_later(HEARTBEAT_INTERVAL, self._beat)

    def _beat(self) -> None:
        self.heartbeats.beat(self.index)
        self._timer = asyncio.get_running_loop().call_later(HEARTBEAT_INTERVAL, self._beat)

    def stop(self) -> None:
        """At the drain: its siblings stop judging this worker (the drain has its own deadline)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.heartbeats.clear(self.index)


def stalled_siblings(heartbeats: Heartbeats, index: int, limit: float, node: str) -> list[dict[str, object]]:
    """What the probes of worker ``index`` (node id ``node``) name: each other worker stalled for more than
    ``limit`` seconds. A worker that answers is not stalled itself, even if its own beat is late."""
    pod = node.removesuffix(f"-w{index}")
    return [{"worker": s.index, "node": f"{pod}-w{s.index}", "pid": s.pid, "heartbeat_age": round(s.age, 3)}
            for s in heartbeats.stalled(limit, skip=index)]


# -- the supervisor ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Worker:
    index: int
    pid: int = 0
    #: the read end of the pipe the worker writes one byte into once it listens; -1 when closed
    ready_fd: int = -1
    listening: bool = False
    started_at: float = 0.0
    #: crashes in a row (reset when it served STABLE_AFTER seconds), and when a pending restart is due
    crashes: int = 0
    restarts: int = 0
    restart_at: float | None = None
    #: kills for a stalled heartbeat; ``killed`` is set from the kill until its exit is reaped
    stalls: int = 0
    killed: bool = False


def _reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bound, not listening, SO_REUSEPORT sockets on every address of ``host``: they hold ``port`` (or pick one
    for port 0) for the workers' own listening sockets, and take no connection themselves."""
    held: list[socket.socket] = []
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    for family, kind, proto, _, addr in sorted(set(infos)):
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if port == 0 and held:
            addr = (addr[0], held[0].getsockname()[1], *addr[2:])
        try:
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            if family == socket.AF_INET6 and exc.errno == errno.EADDRNOTAVAIL:
                continue  # no IPv6 on this host ("localhost" -> ::1), as Tornado's bind_sockets skips it
            for other in held:
                other.close()
            raise
        held.append(sock)
    if not held:
        raise OSError(errno.EADDRNOTAVAIL, f"no address to listen on for host {host!r}")
    return held


def _die_with_parent(supervisor: int) -> None:
    """Ask Linux to send this worker SIGTERM (a drain) if the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Runs ``count`` workers of ``config`` until SIGTERM/SIGINT; :meth:`run` returns the exit code."""

    def __init__(self, config: Config, count: int,
                 run_worker: Callable[[Config, int, list[socket.socket] | None, Callable[[], None], MetricsShare,
                                       Heartbeats], int]) -> None:
        self.config = config
        self.count = count
        self.run_worker = run_worker
        self.workers = [_Worker(i) for i in range(count)]
        self.share = MetricsShare(count)
        self.heartbeats = Heartbeats(count)
        self.stopping = False
        self.failed = False
        self.kill_at: float | None = None
        self._signals: list[int] = []
        self._wake_r, self._wake_w = -1, -1
        self.sockets: list[socket.socket] = []  # shared mode: the listening sockets; reuseport: the reservation
        self.port = 0

    # -- setup --------------------------------------------------------------------------------------------

    def _listen(self) -> None:
        cfg = self.config.server
        if cfg.process_listen == "shared":
            self.sockets = bind_sockets(cfg.port, cfg.host or None, backlog=cfg.backlog)
        else:
            self.sockets = _reserve_port(cfg.host, cfg.port)
        self.port = self.sockets[0].getsockname()[1]

    def worker_sockets(self) -> list[socket.socket] | None:
        """In a worker: the sockets to serve (the shared ones, or its own SO_REUSEPORT ones)."""
        cfg = self.config.server
        if cfg.process_listen == "shared":
            return self.sockets
        return bind_sockets(self.port, cfg.host or None, backlog=cfg.backlog, reuse_port=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)  # the wakeup fd wakes the select; the loop acts on it

    # -- workers ------------------------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        self.heartbeats.clear(worker.index)
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        # SIGTERM/SIGINT stay blocked in the worker until its drain handlers are in place (``_serve``
        # unblocks them): one forwarded meanwhile waits for them instead of killing the worker outright.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            raise
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_r)
                self._become_worker()
                code = self._worker_main(worker.index, ready_w)
            except BaseException:  # a forked child must never return into the supervisor
                logging.getLogger("wirehub").exception("worker %d failed", worker.index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        worker.pid, worker.ready_fd, worker.listening = pid, ready_r, False
        worker.started_at, worker.restart_at, worker.killed = time.monotonic(), None, False
        log.info("worker %d started (pid %d)", worker.index, pid)

    def _become_worker(self) -> None:
        """In a fresh child: undo the supervisor's signal set-up and close its descriptors."""
        supervisor = os.getppid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        for other in self.workers:
            if other.ready_fd >= 0:
                os.close(other.ready_fd)
        if self.config.server.process_listen != "shared":
            for sock in self.sockets:
                sock.close()
        faulthandler.register(STACK_SIGNAL, all_threads=True, chain=False)
        _die_with_parent(supervisor)

    def _worker_main(self, index: int, ready_w: int) -> int:
        def listening() -> None:
            try:
                os.write(ready_w, b"r")
            finally:
                os.close(ready_w)

        sockets = self.worker_sockets()
        return self.run_worker(worker_config(self.config, index), index, sockets, listening, self.share,
                               self.heartbeats)

    def _signal_workers(self, sig: int) -> None:
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, sig)

    def _stop(self, why: str) -> None:
        if not self.stopping:
            log.info("%s: stopping %d workers", why, sum(1 for w in self.workers if w.pid))
            self.stopping = True
            self.kill_at = time.monotonic() + self.config.drain.grace + KILL_AFTER_GRACE
        for worker in self.workers:
            worker.restart_at = None
        self._signal_workers(signal.SIGTERM)

    def _read_ready(self, worker: _Worker) -> None:
        if worker.ready_fd < 0:
            return
        try:
            data = os.read(worker.ready_fd, 16)
        except BlockingIOError:
            return
        if data:
            worker.listening = True
            log.info("worker %d listening (pid %d, node %s-w%d)", worker.index, worker.pid, self.config.node_id,
                     worker.index)
            if all(w.listening for w in self.workers):
                log.info("all %d workers listening on port %d", self.count, self.port)
        os.close(worker.ready_fd)  # one byte, then EOF: either way the pipe has said all it will
        worker.ready_fd = -1

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is None:
                continue
            self._read_ready(worker)
            self.heartbeats.clear(worker.index)
            worker.pid = 0
            code = os.waitstatus_to_exitcode(status)
            what = f"signal {_signal_name(-code)}" if code < 0 else f"exit code {code}"
            if self.stopping:
                if code != 0:
                    self.failed = True
                    log.error("worker %d exited with %s while stopping", worker.index, what)
                else:
                    log.info("worker %d stopped", worker.index)
            elif not worker.listening:
                self.failed = True
                log.error("worker %d failed at startup (%s): stopping the pod's workers", worker.index, what)
                self._stop("a worker failed at startup")
            else:
                served = time.monotonic() - worker.started_at
                worker.crashes = 1 if served >= STABLE_AFTER else worker.crashes + 1
                delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (worker.crashes - 1))
                worker.restart_at = time.monotonic() + delay
                log.error("worker %d (pid %d) died with %s after %.1fs; restarting it in %.1fs", worker.index, pid,
                          what, served, delay)

    def _publish_restarts(self) -> None:
        lines = ["# HELP wirehub_worker_restarts_total Workers restarted by the supervisor after they died",
                 "# TYPE wirehub_worker_restarts_total counter"]
        lines += [f'wirehub_worker_restarts_total{{worker="{w.index}"}} {w.restarts}' for w in self.workers]
        lines += ["# HELP wirehub_worker_stalls_total Workers killed by the supervisor because their event loop "
                  "stopped beating for server.worker_stall_timeout",
                  "# TYPE wirehub_worker_stalls_total counter"]
        lines += [f'wirehub_worker_stalls_total{{worker="{w.index}"}} {w.stalls}' for w in self.workers]
        lines += ["# HELP wirehub_workers Worker processes this pod runs (server.processes)",
                  "# TYPE wirehub_workers gauge", f"wirehub_workers {self.count}"]
        self.share.write(self.count, ("\n".join(lines) + "\n").encode())

    # -- the loop -----------------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._listen()
        except OSError as exc:  # as a single process's startup failure: logged, exit 1
            log.error("startup failed: cannot listen on %s:%d: %s", self.config.server.host, self.config.server.port,
                      exc.strerror or exc)
            return 1
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        log.info("supervisor (pid %d): %d workers on port %d (%s)", os.getpid(), self.count, self.port,
                 self.config.server.process_listen)
        if self.config.server.process_listen == "reuseport":
            migrate = migrate_req()
            if migrate:
                log.info("queued connections of a dying worker move to the other workers (net.ipv4.tcp_migrate_req "
                         "= %d)", migrate)
            else:
                log.info("queued connections of a dying worker are reset (net.ipv4.tcp_migrate_req = %s); "
                         "docs/operations.md, several processes per pod", "absent" if migrate is None else migrate)
        self._publish_restarts()
        try:
            for worker in self.workers:
                self._spawn(worker)
            while self.stopping is False or any(w.pid for w in self.workers):
                self._wait()
                self._step()
        finally:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for sock in self.sockets:
                sock.close()
        log.info("all workers exited%s", " (a worker failed)" if self.failed else "")
        return 1 if self.failed else 0

    def _wait(self) -> None:
        now = time.monotonic()
        due = [w.restart_at for w in self.workers if w.restart_at is not None]
        if self.kill_at is not None:
            due.append(self.kill_at)
        if not self.stopping:  # the next look at the heartbeats
            due.append(now + HEARTBEAT_INTERVAL)
        timeout = max(0.0, min(due) - now) if due else None
        fds = [self._wake_r] + [w.ready_fd for w in self.workers if w.ready_fd >= 0]
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
            readable = []
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        for worker in self.workers:
            if worker.ready_fd in readable:
                self._read_ready(worker)

    def _step(self) -> None:
        signals, self._signals = self._signals, []
        for signum in signals:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop(f"{_signal_name(signum)} received")
        self._reap()
        if not self.stopping:  # a drain has its own deadline (kill_at)
            self._kill_stalled()
        now = time.monotonic()
        for worker in self.workers:
            if worker.restart_at is not None and now >= worker.restart_at and not self.stopping:
                worker.restarts += 1
                self._publish_restarts()
                self._spawn(worker)
        if self.kill_at is not None and now >= self.kill_at:
            alive = [w.index for w in self.workers if w.pid]
            if alive:
                log.error("workers %s still running %.0fs after the drain grace: killing them", alive,
                          KILL_AFTER_GRACE)
                self.failed = True
                self._signal_workers(signal.SIGKILL)
            self.kill_at = None

    def _kill_stalled(self) -> None:
        limit = self.config.server.worker_stall_timeout
        for stall in self.heartbeats.stalled(limit):
            worker = self.workers[stall.index]
            if not worker.pid or worker.killed or stall.pid != worker.pid:
                continue
            log.error("worker %d (pid %d) stalled: its event loop has not run for %.1fs (server.worker_stall_timeout:"
                      " %gs); its Python stack follows; killing it (SIGKILL) to restart it", worker.index, worker.pid,
                      stall.age, limit)
            worker.killed = True
            worker.stalls += 1
            self._publish_restarts()
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, STACK_SIGNAL)
                # where it is stuck is the one clue an operator gets; the supervisor has nothing else to do meanwhile
                time.sleep(STACK_WAIT)
                os.kill(worker.pid, signal.SIGKILL)


def snapshot_task(share: MetricsShare, index: int, render: Callable[[], bytes]) -> asyncio.Task[None]:
    """In a worker: write its metrics into its slot every :data:`SNAPSHOT_INTERVAL` seconds."""

    async def loop() -> None:
        while True:
            share.write(index, render())
            await asyncio.sleep(SNAPSHOT_INTERVAL)

    return asyncio.ensure_future(loop())
