"""Round trips, largest pipeline and wall time of a storm of 3,000 ``join_page`` on Redis into 1, 10 and 100
rooms, on the tree on PYTHONPATH (branch joinmend's figures: run once per tree, alternating)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from wirehub import PresenceEntry
from wirehub.brokers import RedisServer
from wirehub.builtins.bus.redis import create_backend
from wirehub.testing import Recorder


async def storm(url: str, rooms: int, n: int) -> dict[str, Any]:
    backend = create_backend({"url": url, "key_prefix": f"b{uuid.uuid4().hex[:6]}", "op_timeout": 30}, "bus.redis")
    await backend.bus.start(Recorder())
    presence: Any = backend.presence
    await presence.join_page("warm", PresenceEntry("w", "sw", "n0", {}), 20)  # the heartbeat and the scripts
    stats = backend.bus.batch.stats  # type: ignore[attr-defined]
    trips, commands = stats.round_trips, stats.commands
    stats.largest = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(*(presence.join_page(f"r{i % rooms}", PresenceEntry(f"u{i}", f"s{i}", "n0", {"name": "x"}),
                                              20) for i in range(n)))
    out = {"rooms": rooms, "joins": n, "round_trips": stats.round_trips - trips, "commands": stats.commands - commands,
           "largest": stats.largest, "wall_ms": round((loop.time() - start) * 1000)}
    await backend.bus.close()
    return out


async def main() -> None:
    with RedisServer() as redis:
        for rooms in (1, 10, 100):
            print(json.dumps(await storm(redis.url, rooms, 3000)))


if __name__ == "__main__":
    asyncio.run(main())
