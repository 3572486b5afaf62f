"""Keeps bench/ from rotting: the benchmark runs end to end with tiny sizes and prints its table.

No timing is asserted: the figures depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import json
import os
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
