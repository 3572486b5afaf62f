"""Keeps bench/ from rotting: the benchmark runs end to end with tiny sizes and prints its table.

No timing is asserted: the figures depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_run_completes_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "scenario" in table and "/srv CPU-s" in table and "p99 ms" in table, table
    for scenario in ("echo", "idle"):
        assert f"\n{scenario:<8} wirehub" in table and f"\n{scenario:<8} baseline" in table, table
    assert "wirehub / baseline" in table
    assert "fanout" in table  # measured, or named as skipped while the chat handler is missing
    assert out.exists()


#: what each big-rooms scenario's rows must report (names only: no figure is asserted)
ROOMS_FIELDS = {
    "join": ("member_vs_idle_cpu", "join_cpu_vs_smallest", "joins_per_s", "rss_member_minus_idle_kib"),
    "latency": ("p99_ms", "p99_vs_memory", "lost", "dup"),
    "fanout": ("per_server_cpu_s", "vs_smallest", "missing_after_drain"),
    "reconnect": ("all_rejoined_s", "recovered_true", "lost", "dup", "storm"),
}


@pytest.mark.parametrize("scenario", sorted(ROOMS_FIELDS))
def test_bench_rooms_quick_run_completes_and_prints_its_json(scenario: str, tmp_path: Path) -> None:
    out = tmp_path / "rooms.json"
    # reconnect with 80 members per load-generator process: several processes, as the big run has
    extra = ["--per-worker", "80"] if scenario == "reconnect" else []
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_rooms", scenario, "--quick", "--json", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    rows = printed[scenario]
    assert rows, printed
    for row in rows:
        missing = [f for f in ROOMS_FIELDS[scenario] if f not in row]
        assert not missing, (missing, row)


def test_before_pairs_alternate_their_order(tmp_path: Path) -> None:
    """``--before``: the first pair of a run measures ``before`` first, the next ``after`` first, and so on (the
    second slot runs on a broker the first already used); without it, only ``after``."""
    from argparse import Namespace

    from bench.bench_rooms import Env, codes

    env = Env(tmp_path)
    orders = [[code for code, _ in codes(env, Namespace(before=str(tmp_path)))] for _ in range(3)]
    assert orders == [["before", "after"], ["after", "before"], ["before", "after"]]
    assert codes(env, Namespace(before=None)) == [("after", None)]

def test_bench_rooms_fanout_netns_takes_the_clients_receive_work_off_the_server(tmp_path: Path) -> None:
    """``fanout --paced --netns off,on --perf``: both rows, every message delivered over the veth too, the
    namespace removed after, and in the replica's samples the clients' receive work (a data segment queued,
    its reader woken) on loopback only. Needs root (ip netns), perf and two cores, as the bench does."""
    for tool, package in (("perf", "linux-perf"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: apt-get install {package} (.ci/run installs it)")
    out = tmp_path / "fanout.json"
    namespaces = set(_namespaces())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_rooms", "fanout", "--sizes", "300", "--paced", "--deliveries", "6000",
         "--duration", "3", "--warmup", "0.5", "--netns", "off,on", "--perf", str(tmp_path / "perf"),
         "--perf-freq", "4999", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=170, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["net"]: r for r in json.loads(out.read_text())["fanout"]}
    assert set(rows) == {"loopback", "netns"}
    for r in rows.values():
        assert r["deliveries"] > 0 and r["missing_after_drain"] == 0 and r["perf_samples"] > 0, r
    assert rows["netns"]["server_rx_thread_cpu"] is not None
    # in samples (the replica's CPU in 3 s is a fraction of a second, so at perf's default rate of 499 a share
    # was a handful of samples and one stray sample failed a share's bound)
    hits = {net: r["perf_client_receive"] * r["perf_samples"] for net, r in rows.items()}
    assert hits["loopback"] >= 10, rows["loopback"]
    # off loopback the clients' receive work is gone: what is left is the publisher's, which stays on the
    # host's loopback (1 socket of 301), and a stray sample on a busy machine
    assert hits["netns"] <= hits["loopback"] / 4 + 3, (rows["netns"], rows["loopback"])
    assert set(_namespaces()) <= namespaces, "the run left its network namespace behind"


def _namespaces() -> list[str]:
    return [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.splitlines() if line.strip()]


def _rooms_bench(tmp_path: Path, *args: str, timeout: float = 170) -> list[dict[str, object]]:
    out = tmp_path / "rooms.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    proc = subprocess.run([sys.executable, "-m", "bench.bench_rooms", *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scenario = args[0]
    rows: list[dict[str, object]] = json.loads(out.read_text())[scenario]
    return rows


def test_bench_rooms_fanout_small_rooms_on_as_many_sockets_and_node_in_the_same_run(tmp_path: Path) -> None:
    """``fanout --paced --sizes 300/100,300 --node``: 300 members in 3 rooms of 100 (a publisher each) and in one
    room, each on wirehub and on Node `ws`; every message delivered, once, to every member of its room."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("needs node 20 and npm (apt-get install nodejs npm)")
    rows = _rooms_bench(tmp_path, "fanout", "--sizes", "300/100,300", "--paced", "--deliveries", "6000",
                        "--duration", "2", "--warmup", "0.5", "--node", "--count-sends")
    got = {(r["room_size"], r["code"]): r for r in rows}
    assert set(got) == {(100, "after"), (100, "node"), (300, "after"), (300, "node")}, rows
    for (room_size, _), r in got.items():
        assert r["rooms"] == 300 // room_size and r["receivers"] == 300, r
        assert r["deliveries"] > 0 and r["missing_after_drain"] == 0 and r["dup"] == 0, r
    assert got[100, "after"]["per_server_cpu_s_vs_node"] is not None
    if shutil.which("perf") is not None and os.geteuid() == 0:  # --count-sends: perf stat's tracepoints
        assert all(r["frames_per_send"] for r in rows), rows


def test_bench_rooms_fanout_after_churn(tmp_path: Path) -> None:
    """``fanout --paced --churn 2 --churn-fraction 0.5``: twice, half the members leave and as many new connections
    join in their place; then every message reaches every member of the room, once."""
    rows = _rooms_bench(tmp_path, "fanout", "--quick", "--paced", "--churn", "2", "--churn-fraction", "0.5")
    assert [r["receivers"] for r in rows] == [100, 200], rows
    for r in rows:
        assert r["churned"] == r["receivers"] and r["join_failed"] == 0 and r["not_joined"] == 0, r
        assert r["deliveries"] > 0 and r["missing_after_drain"] == 0 and r["dup"] == 0, r
        assert "2 rounds of churn" in str(r["joins"]), r


def test_bench_rooms_reconnect_to_one_survivor(tmp_path: Path) -> None:
    """``reconnect --survivors 1``: the killed replica's members all rejoin the one survivor, recovered."""
    (row,) = _rooms_bench(tmp_path, "reconnect", "--quick", "--per-worker", "80", "--survivors", "1")
    assert row["survivors"] == 1 and row["victims"] and row["rejoined"] == row["victims"], row
    assert row["recovered_true"] == row["victims"] and row["lost"] == 0 and row["dup"] == 0, row


def test_the_veth_ends_have_a_queue_in_front_of_them() -> None:
    """A veth has no queue of its own: a fan-out's burst that finds the other end's ring full is dropped and
    retransmitted. Each end gets one, as a NIC's driver has (``bench.netns.QUEUE_PACKETS``)."""
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: apt-get install {package} (.ci/run installs it)")
    from bench.netns import QUEUE_PACKETS, VethNamespace

    with VethNamespace(f"whq{os.getpid()}", server_cpu=0, client_cpu=(os.cpu_count() or 1) - 1) as veth:
        shown = [subprocess.run([*prefix, "tc", "qdisc", "show", "dev", dev], capture_output=True, text=True,
                                check=True).stdout
                 for prefix, dev in (([], veth.host_if), (["ip", "netns", "exec", veth.name], veth.peer_if))]
    for text in shown:
        assert text.startswith("qdisc pfifo"), text
        assert f"limit {QUEUE_PACKETS}p" in text, text


@pytest.mark.parametrize("what", ["join", "close"])
def test_join_inprocess_with_each_events_in_small_rooms(what: str, tmp_path: Path) -> None:
    """``join_inprocess --events each --room-size 5`` (per join, and per disconnect with ``--close``) prints its
    JSON with the options it ran with and a figure per measurement."""
    out = tmp_path / "out.json"
    argv = [sys.executable, "-m", "bench.join_inprocess", "--members", "40", "--repeat", "1", "--events", "each",
            "--room-size", "5", "--json", str(out), *(["--close"] if what == "close" else [])]
    subprocess.run(argv, check=True, capture_output=True, timeout=120, cwd=ROOT)
    result = json.loads(out.read_text())
    assert result["events"] == "each" and result["room_size"] == 5 and result["bus"] == "memory"
    (figure,) = result[f"us_per_{what}"]["after"]
    assert figure > 0
