"""Keeps bench/ from rotting: the benchmark runs end to end with tiny sizes and prints its table.

No timing is asserted: the figures depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
