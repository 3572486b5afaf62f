"""The other pods of a spread fleet, as one process: publishes into the group rooms through the bus
(``bench_capacity --place alone``).

Run by :mod:`bench.bench_capacity` as ``python -m bench.remote_pub SPEC`` with the ``PYTHONPATH`` of the tree
being measured, so that a ``--before`` run's remote publishes go through that tree's bus code (its Lua scripts,
its batching), as the fleet's pods would. A process of its own because at the plan's density it publishes
thousands of messages a second, which in the bench's process starved the load generator's reads.

SPEC is JSON: ``bus`` (the bus block), ``runid``, ``rooms`` (group rooms are ``<runid>-g-<0..rooms-1>``),
``rate`` (publishes/s). Once its bus is started it prints ``ready`` and reads one JSON line from stdin:
``start`` and ``stop``, ``time.perf_counter`` values (CLOCK_MONOTONIC: the same clock in every process on
Linux). It prints one JSON line at the end: ``sent``, ``failed``, ``first_error``, and its own CPU (``cpu_s``)
over its pacing (``paced_s``): the bench reads it from here, as the process has exited by then.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

perf = time.perf_counter


async def start_bus(block: dict[str, Any]) -> Any:
    """A started bus of the ``wirehub`` imported here on the run's broker(s) (``block``: the bus config block),
    publishing as the other pods of a fleet would. Imported late: a ``--before`` tree's ``wirehub`` comes
    first on this process's ``PYTHONPATH``."""
    from wirehub.testing import Recorder

    plugin = block["plugin"]
    if plugin == "redis":
        from wirehub.builtins.bus.redis import create_backend
    else:
        from wirehub.builtins.bus.nats import create_backend
    bus = create_backend(block[plugin], f"bus.{plugin}").bus
    await bus.start(Recorder())
    return bus


async def publish(spec: dict[str, Any]) -> dict[str, Any]:
    from wirehub.hub import envelope
    from wirehub.rooms import message_frame

    bus = await start_bus(spec["bus"])
    sent = failed = 0
    first_error: str | None = None
    calls: set[asyncio.Future[Any]] = set()

    def done(call: asyncio.Future[Any]) -> None:
        nonlocal failed, first_error
        calls.discard(call)
        if not call.cancelled() and call.exception() is not None:
            failed += 1
            first_error = first_error or repr(call.exception())

    try:
        print("ready", flush=True)
        spec.update(json.loads(await asyncio.to_thread(sys.stdin.readline)))
        await asyncio.sleep(max(0.0, spec["start"] - perf()))
        cpu0 = time.process_time()
        while (now := perf()) < spec["stop"]:
            while sent < spec["rate"] * (now - spec["start"]):
                room = f"{spec['runid']}-g-{random.randrange(spec['rooms'])}"
                frame = message_frame(room, "remote", b'{"t":%.6f}' % perf(), round(time.time(), 3))
                call = asyncio.ensure_future(bus.publish(room, envelope(frame), history=True))
                calls.add(call)
                call.add_done_callback(done)
                sent += 1
            await asyncio.sleep(0.02)
        cpu, paced = time.process_time() - cpu0, perf() - spec["start"]
        await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await bus.close()
    return {"sent": sent, "failed": failed, "first_error": first_error, "cpu_s": round(cpu, 3),
            "paced_s": round(paced, 3)}


def main() -> None:
    print(json.dumps(asyncio.run(publish(json.loads(sys.argv[1])))), flush=True)


if __name__ == "__main__":
    main()
