"""Keeps bench/bench_capacity.py from rotting: a tiny run with ``--before`` (this tree as the "before" tree)
measures both trees and prints the after / before ratio table. No figure is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_bench_capacity_before_and_after_in_one_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_capacity", "--bus", "redis", "--replicas", "1", "--groups", "2",
         "--warmup", "0.5", "--duration", "1", "--burst", "10", "--before", str(ROOT)],
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


def test_bench_capacity_refuses_a_before_that_is_no_tree(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.bench_capacity", "--before", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"--before {tmp_path}: no wirehub tree there" in proc.stderr
