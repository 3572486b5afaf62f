"""Starting and stopping the servers a benchmark measures (wirehub replicas, the baseline)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


#: the Node `ws` baseline server (bench/node_ws/server.js) and its package
NODE_WS = ROOT / "bench" / "node_ws"


def node_ws_ready() -> Path:
    """bench/node_ws/server.js, with its ``ws`` package installed (``npm ci`` there on first use)."""
    if not (NODE_WS / "node_modules" / "ws").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_WS, check=True, timeout=300)
    return NODE_WS / "server.js"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def spawn(cmd: list[str], port: int, log: Path, *, name: str, cwd: Path = ROOT,
          preexec_fn: Callable[[], None] | None = None, timeout: float = 30.0, host: str = "127.0.0.1",
          ) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with its output in ``log`` and wait until it listens on ``host``:``port``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail(log)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout:g} s:\n{tail(log)}")


def wirehub_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "wirehub.cli", "--config", str(config), "serve"]


def start_replica(workdir: Path, name: str, bus: dict[str, Any], endpoint: dict[str, Any], *,
                  preexec_fn: Callable[[], None] | None = None,
                  server: dict[str, Any] | None = None) -> tuple[subprocess.Popen[bytes], int, Path]:
    """A `wirehub serve` replica on a free port with one endpoint and ``bus``; (process, port, log).
    ``preexec_fn`` runs in the child before it starts (pin it to a core, raise its open-file limit);
    ``server``: more ``server.`` keys (a ``host`` other than loopback: the address the replica listens on)."""
    host = (server or {}).get("host", "127.0.0.1")
    port = free_port(host)
    cfg = {
        "server": {"host": "127.0.0.1", "port": port, "backlog": 2048, "node_id": name, **(server or {})},
        "logging": {"level": os.environ.get("BENCH_LOG_LEVEL", "warning"), "access_log": False},
        "drain": {"grace": 2},
        "bus": bus,
        "endpoints": [endpoint],
    }
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    log = workdir / f"{name}.log"
    return spawn(wirehub_cmd(path), port, log, name=name, preexec_fn=preexec_fn, host=host), port, log


def start_replicas(workdir: Path, names: list[str], bus: dict[str, Any], endpoint: dict[str, Any], *,
                   wirehub_path: Path | None = None, server: dict[str, Any] | None = None,
                   ) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """One `wirehub serve` replica per name on one bus (see :func:`start_replica`); (processes, ports).
    ``wirehub_path``: a folder holding a ``wirehub`` package (another tree's ``service``) that the
    replicas import instead of this one, for before/after runs; ``server``: more ``server.`` keys (e.g.
    ``processes``). If one fails to start, the ones
    already started are stopped and the error is raised."""
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    env = os.environ.get("PYTHONPATH")
    if wirehub_path is not None:
        os.environ["PYTHONPATH"] = f"{wirehub_path}{os.pathsep}{env}" if env else str(wirehub_path)
    try:
        for name in names:
            proc, port, _ = start_replica(workdir, name, bus, endpoint, server=server)
            procs.append(proc)
            ports.append(port)
    except BaseException:
        for proc in procs:
            stop(proc)
        raise
    finally:
        if env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env
    return procs, ports


def tree_path(workdir: Path, tree: Path) -> Path:
    """A folder in ``workdir`` whose ``wirehub`` is ``tree``'s ``service`` folder (for ``wirehub_path``)."""
    link = workdir / f"path-{tree.resolve().name}"
    link.mkdir(exist_ok=True)
    if not (link / "wirehub").exists():
        (link / "wirehub").symlink_to(tree.resolve() / "service")
    return link


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM (wirehub drains), then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def with_workers(pids: list[int]) -> list[int]:
    """``pids`` and their child processes (the workers of a replica with ``server.processes`` > 1), whose CPU
    and memory the parent's /proc figures do not include."""
    out: list[int] = []
    for pid in pids:
        out.append(pid)
        with contextlib.suppress(OSError):  # it has exited
            out += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return out
