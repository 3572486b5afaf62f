"""One NATS gap fill: a reader's subscription misses N history messages of a room, the next message shows the
gap, and the reader reads them back from the stream. Reports the time from that message's publish to the
delivery of all N + 1, and the stream reads that reached the broker (direct and leader gets, counted by a
subscription of their API subjects).

    python -m bench.nats_gapfill [--gap 2000] [--rounds 2] [--before TREE]

With ``--before TREE`` every round runs once in a process importing that tree's ``service`` folder as
``wirehub`` and once with this one, alternately (the order swapped each round), on one nats-server started
here; it prints the after / before ratios. The last line of stdout is a JSON list of the results.
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
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


async def measure(url: str, gap: int) -> dict[str, Any]:
    import nats

    from wirehub.builtins.bus.nats import create_backend
    from wirehub.testing import Recorder

    opts = {"servers": [url], "subject_prefix": f"g{uuid.uuid4().hex[:6]}", "storage": "memory",
            "history_size": gap + 10}
    reader, writer = create_backend(opts, "bus.nats"), create_backend(opts, "bus.nats")
    recorder = Recorder()
    await reader.bus.start(recorder)
    await writer.bus.start(Recorder())
    bus: Any = reader.bus
    room = "gap"
    await bus.subscribe(room)
    real = bus._receive

    def lossy(room_: str, st: Any, msg: Any) -> None:  # the subscription never sees the gap's messages
        if msg.data == b"last":
            real(room_, st, msg)

    bus._receive = lossy
    for i in range(gap):
        await writer.bus.publish(room, b"m%d" % i, history=True)
    nc = await nats.connect(url)
    reads: list[str] = []

    async def note(msg: Any) -> None:
        reads.append(msg.subject)

    for subject in (f"$JS.API.DIRECT.GET.{bus.stream}", f"$JS.API.STREAM.MSG.GET.{bus.stream}"):
        await nc.subscribe(subject, cb=note)
    await nc.flush()
    cpu0, t0 = time.process_time(), time.perf_counter()
    await writer.bus.publish(room, b"last", history=True)
    got = await recorder.wait_for(room, gap + 1, timeout=120)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await nc.flush()
    await nc.close()
    await reader.bus.close()
    await writer.bus.close()
    assert got == [b"m%d" % i for i in range(gap)] + [b"last"], "out of order or lost"
    return {"gap": gap, "fill_ms": round(wall * 1000, 1), "cpu_ms": round(cpu * 1000, 1), "reads": len(reads)}


def child(tree: Path | None, url: str, gap: int) -> dict[str, Any]:
    """One measurement in a new process importing ``tree``'s wirehub (None: this one)."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="wirehub-gapfill-") as tmp:
        if tree is not None:
            os.symlink(tree / "service", Path(tmp) / "wirehub")
            env["PYTHONPATH"] = os.pathsep.join([tmp, str(ROOT)])
        proc = subprocess.run([sys.executable, "-m", "bench.nats_gapfill", "--child", url, "--gap", str(gap)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--gap", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before", type=Path, default=None, help="another wirehub tree, e.g. /work/main")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a nats-server URL: measure once
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(asyncio.run(measure(a.child, a.gap))))
        return 0
    from wirehub.brokers import NatsServer

    server = NatsServer()
    server.start()
    results = []
    try:
        for r in range(a.rounds):
            plan: list[tuple[str, Path | None]] = [("after", None)]
            if a.before is not None:
                plan = [("before", a.before), ("after", None)][:: 1 if r % 2 == 0 else -1]
            for label, tree in plan:
                result = {"tree": label, **child(tree, server.url, a.gap)}
                print(json.dumps(result), file=sys.stderr)
                results.append(result)
    finally:
        server.close()
    print("| tree | gap | fill ms | replica CPU ms | stream reads |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tree']} | {r['gap']} | {r['fill_ms']} | {r['cpu_ms']} | {r['reads']} |")
    if a.before is not None:
        def mean(label: str, key: str) -> float:
            vals = [float(r[key]) for r in results if r["tree"] == label]
            return sum(vals) / len(vals)

        print("\nafter / before: " + ", ".join(f"{k} {mean('after', k) / mean('before', k):.3f}x"
                                               for k in ("fill_ms", "cpu_ms", "reads") if mean("before", k)))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
