"""Redis CPU per run of the redis bus's publish and history-read scripts, this tree against another (issue 15).

    python -m bench.redis_script_cost [--before TREE] [--fills 0,10,100,1000] [--runs 20000] [--rounds 5]
                                      [--history-size 1000] [--payload 180] [--json FILE]

What a broker spends per publish is most of its CPU in the capacity plan (docs/scaling.md). This measures it
where it is spent: one ``redis-server`` (:mod:`wirehub.brokers`), each tree's ``PUBLISH`` and ``READ`` scripts
(``plugins/bus/redis_scripts.py``) loaded, and for each stream fill (entries already in the room's stream,
within ``history_ttl``: a room that has had traffic) ``--runs`` script runs pipelined 200 at a time, as the
bus's publish batcher sends them. The figure is Redis's own ``usec_per_call`` of ``EVALSHA`` (INFO
commandstats, reset before each run): the script's CPU in the server, the same whatever the client's speed.
Both trees run in every round, in alternating order; the rows give the median over ``--rounds`` and the
ratio this tree / before. ``failover`` 1 is the cluster and Sentinel modes' flag (the scripts then read
``INFO replication`` to check the primary's lineage). ``read`` is a join's history position read
(``after`` -1, limit 0: the top and epoch, no entries).
"""

from __future__ import annotations

import argparse
import json
import runpy
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATCH = 200


def scripts(tree: Path) -> dict[str, str]:
    """The publish and read scripts of a tree (the module holds strings only, so it is run by path)."""
    module = runpy.run_path(str(tree / "plugins" / "bus" / "redis_scripts.py"))
    return {"publish": module["PUBLISH"], "read": module["READ"]}


def _keys(room: str) -> list[str]:
    return [f"wh:h:{{{room}}}", f"wh:m:{{{room}}}", f"wh:m:{{{room}}}", "wh:epoch"]


def measure(r: Any, sha: dict[str, str], room: str, kind: str, a: argparse.Namespace, failover: str,
            payload: bytes) -> float:
    """Redis's microseconds per ``EVALSHA`` of ``kind`` over ``a.runs`` runs into ``room``."""
    ttl = str(3_600_000)
    r.config_resetstat()
    pipe = r.pipeline(transaction=False)
    for _ in range(a.runs):
        if kind == "publish":
            pipe.evalsha(sha["publish"], 4, *_keys(room), f"wh:c:{room}", payload, a.history_size, ttl, "cand", 0,
                         "PUBLISH", failover)
        else:
            keys = _keys(room)
            pipe.evalsha(sha["read"], 3, keys[0], keys[1], keys[3], -1, 0, ttl, "cand", failover)
        if len(pipe) >= BATCH:
            pipe.execute()
    pipe.execute()
    return float(r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])


def fill(r: Any, sha: dict[str, str], room: str, n: int, a: argparse.Namespace, failover: str,
         payload: bytes) -> None:
    """``n`` entries in the room's stream (the publish script itself writes them, so the keys are the bus's)."""
    pipe = r.pipeline(transaction=False)
    for _ in range(n):
        pipe.evalsha(sha["publish"], 4, *_keys(room), f"wh:c:{room}", payload, a.history_size, str(3_600_000),
                     "cand", 0, "PUBLISH", failover)
    pipe.execute()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, default=None, help="another tree (e.g. `git archive` of main)")
    p.add_argument("--fills", default="0,10,100,1000", help="entries in the room's stream before the runs")
    p.add_argument("--runs", type=int, default=20000, help="script runs per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--history-size", type=int, default=1000, help="the bus's history_size (its default)")
    p.add_argument("--payload", type=int, default=180, help="bytes per message (a chat message's envelope)")
    p.add_argument("--failover", default="0,1", help="the scripts' failover flag: 0 standalone, 1 cluster/sentinel")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import redis

    from wirehub.brokers import RedisServer

    trees = {"after": ROOT, **({"before": a.before} if a.before else {})}
    payload = b'{"type":"message","data":"' + b"x" * max(0, a.payload - 28) + b'"}'
    rows: list[dict[str, Any]] = []
    with RedisServer() as server:
        r = redis.Redis(port=server.port)
        shas = {code: {k: r.script_load(v) for k, v in scripts(tree).items()} for code, tree in trees.items()}
        for failover in a.failover.split(","):
            for n in (int(x) for x in a.fills.split(",")):
                for kind in ("publish", "read"):
                    got: dict[str, list[float]] = {code: [] for code in trees}
                    for rnd in range(a.rounds):
                        order = list(trees) if rnd % 2 == 0 else list(trees)[::-1]
                        for code in order:
                            room = f"cost-{code}-{failover}-{n}-{kind}-{rnd}"
                            fill(r, shas[code], room, n, a, failover, payload)
                            got[code].append(measure(r, shas[code], room, kind, a, failover, payload))
                    row: dict[str, Any] = {"script": kind, "failover": int(failover), "fill": n,
                                           **{f"{code}_us": round(statistics.median(v), 2) for code, v in got.items()},
                                           "samples": got}
                    if a.before:
                        row["after_vs_before"] = round(row["after_us"] / row["before_us"], 3)
                    rows.append(row)
                    ratio = f", {row['after_vs_before']}x before ({row['before_us']} us)" if a.before else ""
                    print(f"{kind:8} failover {failover} fill {n:>5}: {row['after_us']} us per run{ratio}",
                          file=sys.stderr)
    print("| script | failover | entries in the stream | " + " | ".join(f"{c} us per run" for c in trees)
          + (" | after / before |" if a.before else " |"))
    print("|---" * (3 + len(trees) + (1 if a.before else 0)) + "|")
    for row in rows:
        cells = [row["script"], str(row["failover"]), str(row["fill"]), *(str(row[f"{c}_us"]) for c in trees)]
        if a.before:
            cells.append(f"{row['after_vs_before']}x")
        print("| " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"redis_script_cost": rows, "meta": {"argv": sys.argv[1:]}}, indent=1))


if __name__ == "__main__":
    main()
