"""A chat join's CPU in process, on the memory bus: N joins of one room through the chat handler.

    python -m bench.join_inprocess [--members 18000] [--repeat 3] [--before TREE] [--json FILE] [--callgrind]
                                   [--close] [--bus memory|redis|nats] [--events off|each] [--room-size K]

No sockets and no load generator: each session's ``joined`` frame is framed for the wire and dropped, with
the collector set as ``wirehub serve`` sets it (``gc.freeze``, the generation-0 threshold),
so the figure is the handler's own path (op parse and dispatch, authorize, hub and presence join, the
first page, the position, the ``joined`` frame), measured with ``time.process_time()`` around the joins
only, in a fresh process per measurement pinned to core 0. With ``--before`` the measurements alternate
between another wirehub tree (its ``service`` folder imported as ``wirehub``) and this one. The socket
benchmark (``bench_rooms join``) measures the whole replica but swings by 2x on a shared machine; this
one repeats within a few percent. With ``--callgrind`` each measurement is the user-space instructions per
join instead (valgrind's callgrind, instrumentation on around the joins only; about 50x slower, so use
``--members 3000 --repeat 1``): the same on a loaded machine and from run to run (the user ids are seeded).
With ``--close`` the figure is what a member's disconnect costs that an idle connection's does not: after
the (untimed) joins, each session's leave of the hub room (``hub.leave_all``) and the chat handler's
``on_close`` (its presence removal), as the core runs them when a connection ends (the socket benchmark
stops measuring before its members disconnect, so this cost is not in its figures). With ``--bus redis`` the
joins (or disconnects) run on the Redis bus against a redis-server started here, ``--in-flight`` at once (500,
as the socket benchmark's storm), so that the bus's per-iteration pipeline batches them as in a replica; the
figure is this process's CPU (or instructions), not the broker's. ``--bus nats`` likewise, against a nats-server
(its batches depend on when the broker answers: counts vary a little from run to run there). ``--events each``
joins with the default ``presence.join`` events (each one a publish to the room's other members, and on a tree
that checks its events a presence read after it) instead of none, and the 0.5 s after the joins (what they set
off) counted as well; ``--room-size K`` spreads the members over
rooms of K (a chat's small rooms, where a join is a user's first in its room), not one room.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
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


def _callgrind(*args: str) -> None:
    """``callgrind_control`` on this process (run under valgrind by :func:`run_in`)."""
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True, timeout=120)


async def measure(n: int, callgrind: bool = False, close: bool = False, redis: str | None = None,
                  in_flight: int = 500, events: str = "off", room_size: int = 0) -> float:
    """CPU seconds per join of ``n`` sessions joining one room (guest-like random user ids and names); with
    ``callgrind`` the joins run with callgrind's instrumentation on (the caller reads the count); with
    ``close``, per disconnect of a member instead (the joins untimed); with ``redis`` (a URL) on that
    Redis, ``in_flight`` at once; ``events`` the rooms' presence events, ``room_size`` members per room (0: one)."""
    import uuid

    from wirehub import cli
    from wirehub.app import Wirehub
    from wirehub.auth import Identity
    from wirehub.config import config_from_dict
    from wirehub.session import Session
    from wirehub.testing import config_for_tests

    chat = {"path": "/ws/chat", "handler": "chat", "options": {"presence_rules": [{"pattern": "*", "events": events}]}}
    prefix = f"ji{uuid.uuid4().hex[:6]}"
    bus: dict[str, Any] = {}
    if redis and redis.startswith("nats://"):
        bus = {"bus": {"plugin": "nats", "nats": {"servers": [redis], "subject_prefix": prefix}}}
    elif redis:
        bus = {"bus": {"plugin": "redis", "redis": {"url": redis, "key_prefix": prefix}}}
    app = Wirehub.build(config_from_dict(config_for_tests({"endpoints": [chat], **bus})))
    await app.backend.bus.start(app.hub)
    app.hub.on_bus_state(True)
    handler = app.handlers["/ws/chat"]
    sessions = []
    rng = random.Random(n)
    for _ in range(n):
        user = f"guest-{rng.getrandbits(48):012x}"
        s = Session(_Dropping(), Identity(user=user, name=user, rooms=("*",)), endpoint="/ws/chat", node=app.node,
                    max_queue_bytes=1 << 20, metrics=app.metrics)
        await handler.on_open(s)
        sessions.append(s)
    requests = [json.dumps({"op": "join", "room": f"r{i // room_size}" if room_size else "big", "id": i})
                for i in range(n)]
    # the collector as `wirehub serve` sets it once it has started (a --before tree may predate gc_policy)
    try:
        from wirehub.gc_policy import CollectorPolicy
    except ImportError:
        tune_gc = getattr(cli, "_tune_gc", None)
        if tune_gc is not None:
            tune_gc()
    else:
        CollectorPolicy(app.config.server).start()
    async def join(s: Session, request: str) -> None:
        await handler.on_message(s, request)

    async def leave(s: Session, request: str) -> None:  # what the core's _finish_session runs for a member
        await app.hub.leave_all(s)
        await handler.on_close(s)

    async def each(step: Any) -> None:
        """``step`` for every session: in order (memory), or ``in_flight`` at once (a bus that waits)."""
        pairs = list(zip(sessions, requests, strict=True))
        if not redis:
            for s, request in pairs:
                await step(s, request)
            return
        width = max(1, len(pairs) // in_flight)

        async def run(group: list[tuple[Session, str]]) -> None:
            for s, request in group:
                await step(s, request)

        await asyncio.gather(*(run(pairs[i:i + width]) for i in range(0, len(pairs), width)))

    if redis:  # the node's first heartbeat and the scripts loaded, outside the measurement
        warm = Session(_Dropping(), Identity(user="warm", name="warm", rooms=("*",)), endpoint="/ws/chat",
                       node=app.node, max_queue_bytes=1 << 20, metrics=app.metrics)
        await handler.on_open(warm)
        await handler.on_message(warm, json.dumps({"op": "join", "room": "big"}))
    if close:
        await each(join)
    if callgrind:
        _callgrind("-i", "on")
        _callgrind("-z")
    t0 = time.process_time()
    await each(leave if close else join)
    if events != "off":  # what the joins set off after them (a tree's checks of its events) counts too
        await asyncio.sleep(0.5)
    spent = time.process_time() - t0
    if callgrind:
        _callgrind("-d")
        _callgrind("-i", "off")
    await app.backend.bus.close()
    return spent / n


def run_in(tree: Path | None, n: int, link_dir: Path, callgrind: bool = False, close: bool = False,
           redis: str | None = None, events: str = "off", room_size: int = 0) -> float:
    """Seconds per join (or instructions per join, ``callgrind``) of one measurement in a fresh process."""
    env = dict(os.environ)
    more = [*(["--close"] if close else []), *(["--redis", redis] if redis else [])]
    more += ["--events", events, "--room-size", str(room_size)]
    if tree is not None:  # the other tree's `service` folder imported as `wirehub`
        link = link_dir / "wirehub"
        if not link.exists():
            link.symlink_to(tree.resolve() / "service")
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(link_dir), str(tree), env.get("PYTHONPATH")) if x)
    pin = ["taskset", "-c", "0"] if (os.cpu_count() or 1) > 1 else []
    if callgrind:
        with tempfile.TemporaryDirectory(prefix="wirehub-join-callgrind-") as out_dir:
            grind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_dir}/cg.%p"]
            subprocess.run([*grind, sys.executable, "-m", "bench.join_inprocess", "--one", str(n), "--callgrind",
                            *more], env=env, check=True, capture_output=True, text=True)
            dump = next(Path(out_dir).glob("cg.*.1"))  # the dump of the joins (the final one is at exit)
            found = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.M)
            assert found, f"no totals in {dump}"
            return int(found.group(1)) / n
    out = subprocess.run([*pin, sys.executable, "-m", "bench.join_inprocess", "--one", str(n), *more], env=env,
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.join_inprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=18000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--before", default=None, help="another wirehub tree, measured alternately with this one")
    p.add_argument("--json", default=None)
    p.add_argument("--callgrind", action="store_true", help="instructions per join (valgrind) instead of CPU time")
    p.add_argument("--close", action="store_true", help="per disconnect of a member instead of per join")
    p.add_argument("--bus", choices=("memory", "redis", "nats"), default="memory")
    p.add_argument("--events", choices=("off", "each"), default="off", help="the rooms' presence events")
    p.add_argument("--room-size", type=int, default=0, help="members per room (default: all in one room)")
    p.add_argument("--redis", default=None, help=argparse.SUPPRESS)  # the child's broker URL (Redis or NATS)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a single measurement (a child)
    a = p.parse_args(argv)
    if a.one is not None:
        print(asyncio.run(measure(a.one, a.callgrind, a.close, a.redis, events=a.events, room_size=a.room_size)))
        return 0
    if a.bus == "nats":
        from wirehub.brokers import NatsServer

        with NatsServer() as nats:
            return _compare(a, nats.url)
    if a.bus == "redis":
        from wirehub.brokers import RedisServer

        with RedisServer() as broker:
            return _compare(a, broker.url)
    return _compare(a, None)


def _compare(a: argparse.Namespace, redis: str | None) -> int:
    """The measurements of ``a`` (this tree, and ``--before``'s alternately), printed and saved."""
    unit = "instructions" if a.callgrind else "us"
    what = "close" if a.close else "join"
    codes: list[tuple[str, Path | None]] = ([("before", Path(a.before))] if a.before else []) + [("after", None)]
    results: dict[str, list[float]] = {code: [] for code, _ in codes}
    with tempfile.TemporaryDirectory(prefix="wirehub-join-inprocess-") as tmp:
        for _ in range(a.repeat):
            for code, tree in codes:
                one = run_in(tree, a.members, Path(tmp), a.callgrind, a.close, redis, a.events, a.room_size)
                value = round(one) if a.callgrind else round(one * 1e6, 2)
                results[code].append(value)
                print(f"{code}: {value} {unit} per {what}", file=sys.stderr)
    out: dict[str, Any] = {"members": a.members, "bus": a.bus, "events": a.events, "room_size": a.room_size,
                           f"{unit}_per_{what}": results,
                           f"median_{unit}": {k: sorted(v)[len(v) // 2] for k, v in results.items()},
                           "meta": {"argv": sys.argv[1:], "loadavg": os.getloadavg(),
                                    "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}}
    if a.before:
        out["after_vs_before"] = round(out[f"median_{unit}"]["after"] / out[f"median_{unit}"]["before"], 3)
    text = json.dumps(out)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
