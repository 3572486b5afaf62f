"""``server.event_loop``: a replica runs on uvloop by default and on asyncio when configured, serves and drains
the same on both, and a loop it cannot have is a config error naming the key.

Servers started with the CLI run on the loop of their config; an in-process server on the loop of its test
(tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

from tests.helpers import ROOT, ServerProcess, run_cli, run_cli_async, write_config
from wirehub.config import ConfigError
from wirehub.event_loop import loop_name, pick_loop
from wirehub.testing import LiveServer, free_port, ws_connect

ECHO = [{"path": "/ws/echo", "handler": "echo"}]


def shadowed_uvloop(tmp_path: Path) -> dict[str, str]:
    """The environment of a process in which ``import uvloop`` fails, as where it is not installed."""
    shadow = tmp_path / "no-uvloop"
    (shadow / "uvloop").mkdir(parents=True, exist_ok=True)
    (shadow / "uvloop" / "__init__.py").write_text("raise ImportError(\"No module named 'uvloop'\")\n")
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{shadow}{os.pathsep}{path}" if path else str(shadow)}


def replica(tmp_path: Path, event_loop: str | None, env: dict[str, str] | None = None) -> ServerProcess:
    port = free_port()
    server: dict[str, Any] = {"host": "127.0.0.1", "port": port, "node_id": "loop"}
    if event_loop is not None:
        server["event_loop"] = event_loop
    config = {"server": server, "endpoints": ECHO, "drain": {"grace": 5, "reconnect_jitter": 0},
              "logging": {"level": "info"}}
    return ServerProcess(write_config(tmp_path / "loop.yaml", config), port, env, unset_env=("WIREHUB_CONFIG",))


async def build_info(url: str) -> dict[str, str]:
    body = (await AsyncHTTPClient().fetch(url, request_timeout=5)).body.decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "wirehub_build_info":
                return dict(sample.labels)
    raise AssertionError(f"no wirehub_build_info in {body}")


@pytest.mark.parametrize(("event_loop", "expected"), [(None, "uvloop"), ("auto", "uvloop"), ("uvloop", "uvloop"),
                                                      ("asyncio", "asyncio")])
async def test_a_served_replica_runs_on_its_loop_and_drains_on_sigterm(tmp_path: Path, event_loop: str | None,
                                                                       expected: str) -> None:
    proc = await replica(tmp_path, event_loop).start_ready()
    try:
        lines = [line for line in proc.output().splitlines() if "listening on port" in line]
        assert len(lines) == 1 and f"; event loop {expected};" in lines[0], proc.output()
        assert (await build_info(proc.url("/metrics")))["event_loop"] == expected
        client = await ws_connect(proc.url("/ws/echo", "ws"))
        await client.send({"n": 1})
        assert await client.recv() == {"echo": {"n": 1}}
        # the drain runs from the loop's signal handler: the session is closed with 1001 and the process exits 0
        proc.proc.send_signal(signal.SIGTERM)
        code, _ = await client.wait_closed(10)
        client.close()
        if client.conn.stream is not None:
            client.conn.stream.close()
        assert code == 1001
        assert await asyncio.to_thread(proc.proc.wait, 15) == 0, proc.output()
        assert "signal received: draining" in proc.output()
    finally:
        proc.stop()


async def test_auto_without_uvloop_runs_on_asyncio(tmp_path: Path) -> None:
    proc = await replica(tmp_path, "auto", shadowed_uvloop(tmp_path)).start_ready()
    try:
        assert (await build_info(proc.url("/metrics")))["event_loop"] == "asyncio"
    finally:
        assert proc.stop() == 0


async def test_uvloop_without_uvloop_fails_at_startup_naming_the_key(tmp_path: Path) -> None:
    proc = replica(tmp_path, "uvloop", shadowed_uvloop(tmp_path)).start()
    assert await asyncio.to_thread(proc.proc.wait, 30) == 2
    out = proc.output()
    assert "server.event_loop" in out and "pip install uvloop" in out, out
    assert "Traceback" not in out and "listening" not in out, out
    code, stdout, stderr = await run_cli_async("check-config", str(proc.config), env=shadowed_uvloop(tmp_path))
    assert code == 2 and "server.event_loop" in stderr and "pip install uvloop" in stderr, (stdout, stderr)


def test_check_config_names_the_loop_and_rejects_an_unknown_one(tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.yaml", {"server": {"event_loop": "asyncio"}})
    proc = run_cli("check-config", str(good))
    assert proc.returncode == 0 and "event loop asyncio" in proc.stdout, proc.stdout + proc.stderr
    proc = run_cli("check-config", str(write_config(tmp_path / "auto.yaml", {})))
    assert proc.returncode == 0 and "event loop uvloop" in proc.stdout, proc.stdout + proc.stderr
    bad = write_config(tmp_path / "bad.yaml", {"server": {"event_loop": "libuv"}})
    proc = run_cli("check-config", str(bad))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "server.event_loop" in proc.stderr and "auto, asyncio, uvloop" in proc.stderr, proc.stderr


def test_pick_loop() -> None:
    assert pick_loop("auto")[0] == pick_loop("uvloop")[0] == "uvloop"
    assert pick_loop("asyncio") == ("asyncio", asyncio.new_event_loop)
    with pytest.raises(ConfigError, match=r"server\.event_loop"):
        pick_loop("tokio")


@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
async def test_an_in_process_server_reports_the_loop_of_its_test(request: pytest.FixtureRequest,
                                                                  wirehub_server: Any) -> None:
    """A test marked with both loops runs once per loop; the server reports the one it runs on."""
    expected = "uvloop" if request.node.name.endswith("[uvloop]") else "asyncio"
    assert loop_name(asyncio.get_running_loop()) == expected
    server: LiveServer = await wirehub_server({"endpoints": ECHO})
    assert (await build_info(f"http://127.0.0.1:{server.port}/metrics"))["event_loop"] == expected
    client = await server.ws("/ws/echo")
    await client.send({"n": 2})
    assert await client.recv() == {"echo": {"n": 2}}


@pytest.mark.timeout(180)
def test_the_loop_pair_bench_runs(tmp_path: Path) -> None:
    """bench/loop_pair.py (both loops at once on one core) keeps working: one short echo run."""
    out = tmp_path / "pair.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "loop_pair.py"), "--scenario", "echo", "--windows",
                           "1", "--duration", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["result"]
    assert set(result["median_us"]) == {"uvloop", "asyncio"} and all(v > 0 for v in result["median_us"].values())
