"""Where a handshake's server time goes: py-spy samples a `wirehub serve` while clients open connections.

    python bench/profile_handshake.py --out bench/results/profile-handshake-after.txt
    python bench/profile_handshake.py --tree /work/main --out bench/results/profile-handshake-before.txt
    python bench/profile_handshake.py --scenario echo --out bench/results/profile-echo-after.txt

``--tree`` runs wirehub from another source tree (its ``service`` folder imported as ``wirehub``). The
server is pinned to core 0 and the clients to core 1 (as in bench/bench_conns.py); the report lists the
functions by share of the samples, on their own (self) and with what they call (inclusive). Needs
``py-spy`` (PyPI) and the right to ptrace the server (root, or kernel.yama.ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.procs import free_port, spawn, stop  # noqa: E402
from bench.run import _child_setup, wirehub_config  # noqa: E402


def aggregate(raw: Path, top: int) -> str:
    """py-spy's raw (collapsed) stacks as two tables: self and inclusive share per function."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            func, _, where = frame.partition(" (")
            names.append(f"{func} ({where.split(':')[0].rsplit('/', 1)[-1]})")
        own[names[-1]] += n
        for name in set(names):
            incl[name] += n
    out = [f"{total} samples", "", "self:"]
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in incl.most_common(top + 10)]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default=str(ROOT), help="the wirehub source tree to profile")
    p.add_argument("--scenario", choices=("handshake", "echo"), default="handshake")
    p.add_argument("--conns", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rate", type=int, default=300, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="wirehub-profile-") as tmp:
        work = Path(tmp)
        link = work / "path"
        link.mkdir()
        (link / "wirehub").symlink_to(Path(a.tree).resolve() / "service")
        port = free_port()
        cfg = work / "wirehub.yaml"
        cfg.write_text(wirehub_config(port, 4096, True, {"presence_events": False}))
        env = dict(os.environ, PYTHONPATH=f"{link}{os.pathsep}{ROOT}")
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]
        server = spawn([sys.executable, "-m", "wirehub.cli", "--config", str(cfg), "serve"], port, work / "server.log",
                       name="wirehub", preexec_fn=_child_setup(0))
        raw = work / "profile.raw"
        try:
            spy = subprocess.Popen(["py-spy", "record", "-p", str(server.pid), "-r", str(a.rate), "-f", "raw",
                                    "-o", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            results = []
            for _ in range(a.rounds):
                if a.scenario == "handshake":
                    cmd = [sys.executable, "-m", "bench.bench_conns", "client", "handshake", "--port", str(port),
                           "--pid", str(server.pid), "--args",
                           json.dumps({"conns": a.conns, "inflight": 256, "sources": 4})]
                else:
                    cmd = [sys.executable, "-m", "bench.loadgen", "echo", "--url", f"ws://127.0.0.1:{port}/ws/echo",
                           "--server-pid", str(server.pid), "--warmup", "1", "--duration", "8"]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                                      preexec_fn=_child_setup(1), timeout=600)
                results.append(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:])
            spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
            spy.wait(30)
        finally:
            stop(server)
        report = f"wirehub from {Path(a.tree).resolve()}, scenario {a.scenario}\nclient results:\n"
        report += "\n".join(f"  {r}" for r in results) + "\n\n" + aggregate(raw, a.top)
    Path(a.out).write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
