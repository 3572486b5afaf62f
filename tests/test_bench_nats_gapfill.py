"""Keeps bench/nats_gapfill.py from rotting: a small gap with ``--before`` (this tree as the "before" tree) is
filled in order in both and the ratio line is printed. No figure is asserted but the read count of this tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_bench_nats_gapfill_before_and_after_in_one_run() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.nats_gapfill", "--gap", "300", "--rounds", "1",
                           "--before", str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["tree"] for r in results] == ["before", "after"]
    assert [r["reads"] for r in results] == [2, 2]  # 300 messages: two batched direct gets
    assert "after / before" in proc.stdout
