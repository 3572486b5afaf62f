"""Keeps bench/bench_capacity.py from rotting: a tiny run with ``--before`` (this tree as the "before" tree)
measures both trees and prints the after / before ratio table. No figure is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_bench_capacity_before_and_after_in_one_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_capacity", "--bus", "redis", "--replicas", "1", "--groups", "2",
         "--warmup", "0.5", "--duration", "1", "--burst", "10", "--before", str(ROOT), "--history-fill", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["wirehub"] for r in results] == ["before", "after"]
    for r in results:
        assert r["connections"] == 20 and r["errors"] == 0
        for key in ("wirehub_cpu_us_per_delivery", "wirehub_cpu_us_per_conn_s", "replica_cpu_pct_each",
                    "loadgen_cpu_pct"):
            assert key in r
    assert "after / before" in proc.stdout
    assert proc.stderr.count("history: 3 messages in each of 2 rooms") == 2, proc.stderr[-3000:]


def test_bench_capacity_refuses_a_before_that_is_no_tree(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.bench_capacity", "--before", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"--before {tmp_path}: no wirehub tree there" in proc.stderr


@pytest.mark.timeout(150)
def test_bench_capacity_compares_room_streams_in_one_run() -> None:
    """``--room-streams 1,3``: each run at each count (``bus.nats.room_streams``), with the busiest broker node's
    share of the broker CPU, and the table of each count against the first."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_capacity", "--bus", "nats", "--replicas", "1", "--groups", "2",
         "--warmup", "0.5", "--duration", "1", "--burst", "10", "--room-streams", "1,3"],
        cwd=ROOT, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["room_streams"] for r in results] == [1, 3]
    for r in results:
        assert r["connections"] == 20 and r["errors"] == 0
        assert r["busiest_node_share_pct"] in (0.0, 100.0)  # one node: all of the broker's CPU, if any ticked
    assert "| room_streams | rounds |" in proc.stdout


@pytest.mark.timeout(150)
def test_bench_capacity_runs_the_clients_in_a_network_namespace_too() -> None:
    """``--netns off,on``: each run with the clients on loopback and in a namespace behind a veth pair (the
    replica listening on the veth's address), both delivering, the server end's receive thread counted, the
    table of the namespace against loopback, and the namespace removed after, with a dead run's left
    behind (a SIGKILL). Needs root (ip netns)."""
    if shutil.which("ip") is None:
        pytest.skip("ip is not installed: apt-get install iproute2 (.ci/run installs it)")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process is gone: the namespace of a run killed before it could remove it
    stale = f"whcap{gone.pid}"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    before = _namespaces()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_capacity", "--bus", "redis", "--replicas", "1", "--groups", "2",
         "--warmup", "0.5", "--duration", "1.5", "--burst", "10", "--netns", "off,on", "--place", "alone"],
        cwd=ROOT, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(r["net"] for r in results) == ["loopback", "netns"]
    for r in results:
        assert r["connections"] == 20 and r["errors"] == 0 and r["join_retries"] == 0, r
        assert r["deliveries_s"] > 0, r
        # alone: the other pods' share came from the publisher process (bench/remote_pub.py), none refused
        assert r["remote_sent"] > 0 and r["remote_failed"] == 0, r
    assert "loopback -> netns" in proc.stdout
    assert set(_namespaces()) <= set(before) - {stale}, "the run left a namespace behind, or a dead run's"


def test_bench_capacity_refuses_an_unknown_net_mode() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.bench_capacity", "--netns", "off,maybe"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--netns: a list of off and on" in proc.stderr


def _namespaces() -> list[str]:
    return [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.splitlines() if line.strip()]
