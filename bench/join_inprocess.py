"""A chat join's CPU in process, on the memory bus: N joins of one room through the chat handler.

    python -m bench.join_inprocess [--members 18000] [--repeat 3] [--before TREE] [--json FILE]

No sockets and no load generator: each session's ``joined`` frame is framed for the wire and dropped, with
the collector set as ``wirehub serve`` sets it (``gc.freeze``, the generation-0 threshold),
so the figure is the handler's own path (op parse and dispatch, authorize, hub and presence join, the
first page, the position, the ``joined`` frame), measured with ``time.process_time()`` around the joins
only, in a fresh process per measurement pinned to core 0. With ``--before`` the measurements alternate
between another wirehub tree (its ``service`` folder imported as ``wirehub``) and this one. The socket
benchmark (``bench_rooms join``) measures the whole replica but swings by 2x on a shared machine; this
one repeats within a few percent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


class _Dropping:
    """A transport that frames what it is given (as a socket transport does) and keeps nothing."""

    __slots__ = ("code",)

    def __init__(self) -> None:
        self.code: int | None = None

    def send_frame(self, frame: Any) -> None:
        frame.wire  # noqa: B018  # framing is part of what a join costs

    def buffered(self) -> int:
        return 0

    def close(self, code: int, reason: str) -> None:
        self.code = code

    @property
    def closed(self) -> bool:
        return self.code is not None


async def measure(n: int) -> float:
    """CPU seconds per join of ``n`` sessions joining one room (guest-like random user ids and names)."""
    from wirehub import cli
    from wirehub.app import Wirehub
    from wirehub.auth import Identity
    from wirehub.config import config_from_dict
    from wirehub.session import Session
    from wirehub.testing import config_for_tests

    chat = {"path": "/ws/chat", "handler": "chat", "options": {"presence_rules": [{"pattern": "*", "events": "off"}]}}
    app = Wirehub.build(config_from_dict(config_for_tests({"endpoints": [chat]})))
    await app.backend.bus.start(app.hub)
    app.hub.on_bus_state(True)
    handler = app.handlers["/ws/chat"]
    sessions = []
    for _ in range(n):
        user = "guest-" + os.urandom(6).hex()
        s = Session(_Dropping(), Identity(user=user, name=user, rooms=("*",)), endpoint="/ws/chat", node=app.node,
                    max_queue_bytes=1 << 20, metrics=app.metrics)
        await handler.on_open(s)
        sessions.append(s)
    requests = [json.dumps({"op": "join", "room": "big", "id": i}) for i in range(n)]
    tune_gc = getattr(cli, "_tune_gc", None)
    if tune_gc is not None:  # as `wirehub serve` does once it has started
        tune_gc()
    t0 = time.process_time()
    for s, request in zip(sessions, requests, strict=True):
        await handler.on_message(s, request)
    spent = time.process_time() - t0
    await app.backend.bus.close()
    return spent / n


def run_in(tree: Path | None, n: int, link_dir: Path) -> float:
    env = dict(os.environ)
    if tree is not None:  # the other tree's `service` folder imported as `wirehub`
        link = link_dir / "wirehub"
        if not link.exists():
            link.symlink_to(tree.resolve() / "service")
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(link_dir), str(tree), env.get("PYTHONPATH")) if x)
    pin = ["taskset", "-c", "0"] if (os.cpu_count() or 1) > 1 else []
    out = subprocess.run([*pin, sys.executable, "-m", "bench.join_inprocess", "--one", str(n)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.join_inprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=18000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--before", default=None, help="another wirehub tree, measured alternately with this one")
    p.add_argument("--json", default=None)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a single measurement (a child)
    a = p.parse_args(argv)
    if a.one is not None:
        print(asyncio.run(measure(a.one)))
        return 0
    codes: list[tuple[str, Path | None]] = ([("before", Path(a.before))] if a.before else []) + [("after", None)]
    results: dict[str, list[float]] = {code: [] for code, _ in codes}
    with tempfile.TemporaryDirectory(prefix="wirehub-join-inprocess-") as tmp:
        for _ in range(a.repeat):
            for code, tree in codes:
                us = round(run_in(tree, a.members, Path(tmp)) * 1e6, 2)
                results[code].append(us)
                print(f"{code}: {us} us per join", file=sys.stderr)
    out: dict[str, Any] = {"members": a.members, "us_per_join": results,
                           "median_us": {k: sorted(v)[len(v) // 2] for k, v in results.items()},
                           "meta": {"argv": sys.argv[1:], "loadavg": os.getloadavg(),
                                    "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}}
    if a.before:
        out["after_vs_before"] = round(out["median_us"]["after"] / out["median_us"]["before"], 2)
    text = json.dumps(out)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
