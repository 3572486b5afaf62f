"""A chat join's CPU in process on the NATS bus: N joins of one room as a storm, against a real nats-server.

    python -m bench.nats_join_inprocess [--members 6000] [--in-flight 500] [--profile FILE.prof]

The socket benchmark (``bench_rooms join --bus nats``) measures the whole replica and swings with the
machine's load; this one runs the chat handler's joins (``bench.join_inprocess``'s dropping transport)
against a nats-server started here, ``--in-flight`` joins at once as the bench's storm has, and reports
the replica's CPU per join (``time.process_time()``: this process only, not the broker's). With
``--profile`` the joins run under cProfile (its overhead inflates the figure; read the shares).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import time
import uuid
from typing import Any

from bench.join_inprocess import _Dropping


async def measure(n: int, in_flight: int, url: str, profile: str | None) -> dict[str, Any]:
    from wirehub.app import Wirehub
    from wirehub.auth import Identity
    from wirehub.config import config_from_dict
    from wirehub.session import Session
    from wirehub.testing import config_for_tests

    chat = {"path": "/ws/chat", "handler": "chat", "options": {"presence_rules": [{"pattern": "*", "events": "off"}]}}
    bus = {"plugin": "nats", "nats": {"servers": [url], "subject_prefix": f"bj{uuid.uuid4().hex[:6]}"}}
    app = Wirehub.build(config_from_dict(config_for_tests({"endpoints": [chat], "bus": bus})))
    await app.backend.bus.start(app.hub)
    app.hub.on_bus_state(True)
    handler = app.handlers["/ws/chat"]

    def session() -> Session:
        user = "guest-" + os.urandom(6).hex()
        return Session(_Dropping(), Identity(user=user, name=user, rooms=("*",)), endpoint="/ws/chat",
                       node=app.node, max_queue_bytes=1 << 20, metrics=app.metrics)

    async def joins(group: list[Session], first: int) -> None:
        for i, s in enumerate(group):
            await handler.on_message(s, json.dumps({"op": "join", "room": "big", "id": first + i}))

    async def storm(sessions: list[Session]) -> None:
        step = max(1, len(sessions) // in_flight)
        await asyncio.gather(*(joins(sessions[i:i + step], i) for i in range(0, len(sessions), step)))

    warm = [session() for _ in range(200)]
    for s in warm:
        await handler.on_open(s)
    await storm(warm)
    sessions = [session() for _ in range(n)]
    for s in sessions:
        await handler.on_open(s)
    await asyncio.sleep(0.5)
    prof = cProfile.Profile() if profile else None
    t0, w0 = time.process_time(), time.monotonic()
    if prof is not None:
        prof.enable()
    await storm(sessions)
    if prof is not None:
        prof.disable()
    spent, wall = time.process_time() - t0, time.monotonic() - w0
    closed = sum(1 for s in sessions if s.closed)
    count = (await app.backend.presence.count("big")).connections if app.backend.presence else None
    await app.backend.bus.close()
    if prof is not None and profile:
        prof.dump_stats(profile)
    return {"members": n, "in_flight": in_flight, "cpu_us_per_join": round(spent / n * 1e6, 1),
            "wall_s": round(wall, 2), "closed": closed, "count": count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, default=6000)
    p.add_argument("--in-flight", type=int, default=500)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--profile", default=None)
    a = p.parse_args()
    from wirehub.brokers import NatsServer

    with NatsServer() as broker:
        for _ in range(a.repeat):
            print(json.dumps(asyncio.run(measure(a.members, a.in_flight, broker.url, a.profile))), flush=True)


if __name__ == "__main__":
    main()
