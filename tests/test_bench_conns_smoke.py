"""Keeps bench/bench_conns.py from rotting: every scenario runs end to end, with tiny sizes, against wirehub
and the Node `ws` baseline, and prints its table and ratios. No figure is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_bench_conns_quick_run_prints_every_scenario_for_wirehub_and_node(tmp_path: Path) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("needs node 20 and npm (apt-get install nodejs npm)")
    out = tmp_path / "conns.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_conns.py"), "--quick", "--servers", "wirehub,node",
         "--ka-interval", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout
    for scenario in ("handshake", "idle", "keepalive", "echo", "fanout"):
        assert f"\n{scenario:<10} server" in report or report.startswith(f"{scenario:<10} server"), report
    assert "wirehub / node" in report and "100k projected" in report, report
    results = json.loads(out.read_text())["results"]
    for scenario, by_server in results.items():
        assert set(by_server) == {"wirehub", "node"}, scenario
        for name, r in by_server.items():
            assert not r.get("failed"), (scenario, name, r)
            assert "server_exited" not in r, (scenario, name, r)
    assert results["keepalive"]["wirehub"]["closed"] == 0
    assert all(s["rss_per_conn"] is not None for s in results["idle"]["wirehub"]["steps"])
