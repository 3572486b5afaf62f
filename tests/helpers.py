"""Helpers for tests that run `wirehub` as a real process: the CLI, and `wirehub serve` replicas."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from wirehub.brokers import BrokerProcess
from wirehub.bus import Backend
from wirehub.testing import WsClient, free_port

ROOT = Path(__file__).resolve().parent.parent

#: Fast failure detection for the Redis and NATS buses in tests; the defaults are 2 s / 6 s.
FAST_BUS: dict[str, Any] = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0, "op_timeout": 1.0,
                            "connect_timeout": 1.0, "max_backoff": 0.5, "presence_ttl": 1.5}

# Readiness probes go straight to 127.0.0.1, whatever proxy the environment names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wirehub_cmd(*args: str, installed: bool = False) -> list[str]:
    """``python -m wirehub.cli ARGS``; with ``installed``, the ``wirehub`` entry point on PATH if there is one."""
    exe = shutil.which("wirehub") if installed else None
    return [exe, *args] if exe else [sys.executable, "-m", "wirehub.cli", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(wirehub_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


async def run_cli_async(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
                        cwd: Path | None = ROOT) -> tuple[int, str, str]:
    """``wirehub ARGS`` without blocking the event loop: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *wirehub_cmd(*args), cwd=cwd, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def bus_options(kind: str, broker: BrokerProcess, prefix: str, **extra: Any) -> dict[str, Any]:
    """Options of the ``kind`` bus ("redis" or "nats") on ``broker``, with :data:`FAST_BUS` timings."""
    if kind == "redis":
        return {"url": broker.url, "key_prefix": prefix, **FAST_BUS, **extra}
    return {"servers": [broker.url], "subject_prefix": prefix, **FAST_BUS, **extra}


@asynccontextmanager
async def nats_replicas(broker: BrokerProcess, prefix: str, **extra: Any
                        ) -> AsyncIterator[Callable[[], Awaitable[Backend]]]:
    """``await make()``: a started NATS backend on ``broker``; all of them share one key prefix and are closed
    on exit (several "replicas" of one install, in process)."""
    from wirehub.builtins.bus.nats import create_backend
    from wirehub.testing import Recorder

    opts = bus_options("nats", broker, prefix, **extra)
    made: list[Backend] = []

    async def make() -> Backend:
        backend = create_backend(opts, "bus.nats")
        await backend.bus.start(Recorder())
        made.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in made:
            await backend.bus.close()


@asynccontextmanager
async def started_nats() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[tuple[Any, Any]]]]:
    """``await start(options)``: a started NATS bus (``bus.nats`` options) and the Recorder it pushes to; every
    one is closed on exit."""
    from wirehub.builtins.bus.nats import NatsBus, create_backend
    from wirehub.testing import Recorder

    made: list[Backend] = []

    async def start(options: dict[str, Any]) -> tuple[NatsBus, Recorder]:
        backend = create_backend(options, "bus.nats")
        made.append(backend)
        recorder = Recorder()
        await backend.bus.start(recorder)
        assert isinstance(backend.bus, NatsBus)
        return backend.bus, recorder

    try:
        yield start
    finally:
        for backend in made:
            await backend.bus.close()


@asynccontextmanager
async def started_redis(server: BrokerProcess, prefix: str) -> AsyncIterator[Callable[..., Awaitable[tuple[Any, Any]]]]:
    """``await start(**options)``: a started Redis backend (a replica) on ``server`` with key prefix ``prefix`` and
    the Recorder it pushes to; every one is closed on exit."""
    from wirehub.builtins.bus.redis import create_backend
    from wirehub.testing import Recorder

    made: list[Backend] = []

    async def start(**extra: Any) -> tuple[Backend, Recorder]:
        backend = create_backend(bus_options("redis", server, prefix, **extra), "bus.redis")
        made.append(backend)
        recorder = Recorder()
        await backend.bus.start(recorder)
        return backend, recorder

    try:
        yield start
    finally:
        for backend in made:
            await backend.bus.close()


def bus_block(kind: str, broker: BrokerProcess, prefix: str) -> dict[str, Any]:
    """The ``bus:`` section of a config for the ``kind`` bus on ``broker``."""
    return {"plugin": kind, kind: bus_options(kind, broker, prefix)}


class ServerProcess:
    """A ``wirehub serve`` subprocess on ``port``; stdout and stderr go to a log file that tests can read.

    Nothing runs until :meth:`start` (which returns the process, so ``ServerProcess(...).start()``); it may
    be started again after :meth:`stop` (on the same port; the log is appended to)."""

    def __init__(self, config: Path | None, port: int, env: dict[str, str] | None = None, log: Path | None = None,
                 *, name: str | None = None, unset_env: Collection[str] = (), cwd: Path | None = ROOT,
                 new_session: bool = False, installed: bool = False, serve_args: Collection[str] = (),
                 preexec_fn: Callable[[], object] | None = None) -> None:
        """Runs ``wirehub --config CONFIG serve``, or plain ``wirehub serve`` when config is None (then a
        ``log`` path is required; the default is CONFIG with the suffix ``.log``).

        The environment is this process's without the names in ``unset_env``, plus ``env``; ``cwd`` None
        inherits the working directory; ``new_session`` starts the process in a session (and process group)
        of its own; ``installed`` runs the ``wirehub`` entry point when it is on PATH; ``serve_args`` are
        options after ``serve`` (``--port``, ``--node-id``).
        """
        if log is None:
            assert config is not None, "wirehub serve without --config needs a log path"
            log = config.with_suffix(".log")
        self.config = config
        self.port = port
        self.log_path = log
        self.name = name or (config.stem if config is not None else "wirehub")
        self.env = env or {}
        self.unset_env = unset_env
        self.cwd = cwd
        self.new_session = new_session
        self.installed = installed
        self.preexec_fn = preexec_fn
        self.serve_args = tuple(serve_args)
        #: True once :meth:`stop` or :meth:`kill` was called (until the next :meth:`start`)
        self.stopped = False
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None, f"{self.name} was never started"
        return self._proc

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> ServerProcess:
        args = ("--config", str(self.config), "serve") if self.config is not None else ("serve",)
        args += self.serve_args
        env = {k: v for k, v in os.environ.items() if k not in self.unset_env}
        # a fresh log on the first start, appended to on a restart
        with self.log_path.open("ab" if self._proc is not None else "wb") as log:
            self._proc = subprocess.Popen(wirehub_cmd(*args, installed=self.installed), cwd=self.cwd,
                                          env={**env, **self.env}, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=self.new_session,
                                          preexec_fn=self.preexec_fn)
        self.stopped = False
        return self

    async def start_ready(self, timeout: float = 20.0) -> ServerProcess:
        """:meth:`start`, then :meth:`wait_ready`; a process that never got ready is stopped, not orphaned."""
        self.start()
        try:
            await self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET ``path`` (blocking): the status and the body; ``(0, "")`` when nothing answers."""
        try:
            with _OPENER.open(self.url(path), timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response, and so the connection
            return exc.code, ""
        except OSError:
            return 0, ""

    async def status(self, path: str, timeout: float = 2.0) -> int:
        """The status of a GET of ``path`` (on the event loop); 0 when nothing answers in time."""
        try:
            resp = await AsyncHTTPClient().fetch(self.url(path), raise_error=False, request_timeout=timeout)
            return int(resp.code)
        except (OSError, HTTPClientError):
            return 0

    def _poll_again(self, code: int, want: int, deadline: float, timeout: float) -> bool:
        """False once ``/readyz`` answered ``want``; AssertionError, with the log, when the process
        exited or ``timeout`` ran out first."""
        if code == want:
            return False
        if not self.running:
            returncode = self._proc.returncode if self._proc is not None else None
            raise AssertionError(f"{self.name} exited with {returncode}:\n{self.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{self.name} not {want} on /readyz after {timeout}s:\n{self.output()}")
        return True

    async def wait_ready(self, timeout: float = 20.0, *, want: int = 200, interval: float = 0.1,
                         request_timeout: float = 1.0) -> None:
        """Until ``/readyz`` answers ``want`` (polled every ``interval``), for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if not self._poll_again(await self.status("/readyz", request_timeout), want, deadline, timeout):
                return
            await asyncio.sleep(interval)

    def wait_ready_sync(self, timeout: float = 20.0, *, want: int = 200, interval: float = 0.1,
                        request_timeout: float = 1.0) -> None:
        """:meth:`wait_ready`, blocking (for a thread, or a fixture outside the event loop)."""
        deadline = time.monotonic() + timeout
        while self._poll_again(self.get("/readyz", request_timeout)[0], want, deadline, timeout):
            time.sleep(interval)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the drain), then SIGKILL if the process has not exited within ``timeout``; the exit code
        (None if it was never started)."""
        try:
            return self._signal(signal.SIGTERM, timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self, timeout: float = 10.0) -> int | None:
        """SIGKILL: no drain, no goodbye; the exit code (None if it was never started)."""
        return self._signal(signal.SIGKILL, timeout)

    def _signal(self, sig: signal.Signals, timeout: float) -> int | None:
        self.stopped = True
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            self._proc.wait(timeout)
        return self._proc.returncode


class Cluster:
    """``wirehub serve`` replicas, each with a config of its own and in a session (process group) of its own,
    started and stopped together."""

    #: how long :meth:`stop` gives each replica's drain before SIGKILL
    stop_timeout = 10.0

    def __init__(self, replicas: list[ServerProcess]) -> None:
        self.replicas = replicas

    @classmethod
    def configure(cls, directory: Path, names: Iterable[str], config: dict[str, Any],
                  **process: Any) -> Cluster:
        """One replica per name (its node id, and the stem of its config and log files in ``directory``)
        on a free port of 127.0.0.1, with no pings, warning logs, a 2 s drain grace, and ``config`` on
        top (``bus``, ``endpoints``...). ``process``: :class:`ServerProcess` options. Not started."""
        replicas = []
        for name in names:
            port = free_port()
            full = {
                "server": {"host": "127.0.0.1", "port": port, "node_id": name, "ping_interval": 0},
                "logging": {"level": "warning", "access_log": False},
                "drain": {"grace": 2},
                **config,
            }
            path = write_config(directory / f"{name}.yaml", full)
            replicas.append(ServerProcess(path, port, name=name, new_session=True, **process))
        return cls(replicas)

    def start(self) -> None:
        for r in self.replicas:
            r.start()

    def stop(self) -> None:
        for r in self.replicas:
            r.stop(self.stop_timeout)

    def _remaining(self, timeout: float) -> Iterator[tuple[ServerProcess, float]]:
        """Each replica not stopped on purpose, with what is left of ``timeout`` for it."""
        deadline = time.monotonic() + timeout
        for r in self.replicas:
            if not r.stopped:
                yield r, max(0.0, deadline - time.monotonic())

    async def wait_ready(self, timeout: float = 20.0, want: int = 200) -> None:
        """Until every replica not stopped on purpose answers ``want`` on ``/readyz``, all within ``timeout``."""
        for r, left in self._remaining(timeout):
            await r.wait_ready(left, want=want, interval=0.05, request_timeout=2)

    def wait_ready_sync(self, timeout: float = 20.0, want: int = 200) -> None:
        """:meth:`wait_ready`, blocking."""
        for r, left in self._remaining(timeout):
            r.wait_ready_sync(left, want=want, interval=0.05, request_timeout=2)


async def rejoin_collecting(ws: WsClient, room: str, since: dict[str, Any], got: list[int]) -> dict[str, Any]:
    """Join with ``since``, appending the offset of every message frame, even one before ``joined``."""
    await ws.send({"op": "join", "id": "rejoin", "room": room, "since": since})
    while True:
        frame = await ws.recv()
        if frame["op"] == "message":
            got.append(frame["offset"])
        elif frame.get("id") == "rejoin":
            return frame
