"""bench/bench_capacity.py's ``--place grouped`` (a group's members on one replica), ``--place alone`` (one member
per group, the other members' publishes through the bus) and the paced rate it reports
(``delivered_pct``): a tiny run on two replicas. No figure is asserted beyond the rate being met roughly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
@pytest.mark.parametrize("place", ["spread", "grouped", "alone"])
def test_bench_capacity_places_groups_and_reports_the_rate_met(place: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_capacity", "--bus", "redis", "--replicas", "2", "--place", place,
         "--groups", "4", "--rate-per-conn", "2", "--warmup", "0.5", "--duration", "2", "--burst", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["place"] == place and result["connections"] == 40 and result["errors"] == 0
    # paced by the time elapsed: the target is met (a tick-counting pacer fell 5-7 % short)
    assert 85 <= result["delivered_pct"] <= 115, result


def test_bench_capacity_refuses_an_unknown_placement() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.bench_capacity", "--place", "random"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--place" in proc.stderr
