"""Keeps bench/bench_yjs.py from rotting: a tiny run end to end (three replicas on Redis), no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_yjs_tiny_run_prints_its_tables() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_yjs", "--editors", "4", "--rate", "4", "--duration", "1",
         "--warmup", "0.5", "--documents", "4", "--doc-chars", "100", "--procs", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "update-to-remote p50 / p99 / max ms" in proc.stdout and "RSS per document" in proc.stdout
    result = json.loads(lines[-1])
    assert result["latency"]["remote_deliveries"] > 0 and result["latency"]["remote_missing"] == 0
    assert result["memory"]["loaded"] == 4
    assert result["storage"]["log_without_compaction_kb"] > 0
