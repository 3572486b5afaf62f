"""The `wirehub` command as users run it: real processes, real exit codes and messages."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

from service.testing import free_port, ws_connect
from tests.helpers import ROOT, ServerProcess, run_cli, write_config


def test_check_config_accepts_the_embedded_default() -> None:
    result = run_cli("check-config", env={"WIREHUB_CONFIG": ""})
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "bus memory" in result.stdout


@pytest.mark.parametrize("name", ["wirehub.yaml", "redis.yaml", "nats.yaml", "production.example.yaml"])
def test_every_shipped_config_checks(name: str) -> None:
    env = {
        "WIREHUB_REDIS_URL": "redis://127.0.0.1:1/0",
        "WIREHUB_NATS_URL": "nats://127.0.0.1:1",
        "WIREHUB_JWT_SECRET": "x" * 32,
        "WIREHUB_API_KEY": "k" * 24,
    }
    result = run_cli("check-config", str(ROOT / "config" / name), env=env)
    assert result.returncode == 0, result.stderr


def test_check_config_names_the_key_and_the_valid_names(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.yaml", {"bus": {"plugin": "redsi"}})
    result = run_cli("check-config", str(config))
    assert result.returncode == 2
    assert re.search(r"bus\.plugin: 'redsi' is not a registered bus; choose one of: memory, ", result.stderr)
    assert "Traceback" not in result.stderr


def test_check_config_on_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: 8080\n")
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2 and "malformed YAML at line" in result.stderr
    result = run_cli("check-config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "cannot read config file" in result.stderr


def test_missing_env_reference_fails_before_starting(tmp_path: Path) -> None:
    config = write_config(tmp_path / "env.yaml", {"api": {"keys": ["$env:WH_SURELY_UNSET_VAR"]}})
    result = run_cli("--config", str(config), "serve")
    assert result.returncode == 2
    assert "api.keys[0]: environment variable WH_SURELY_UNSET_VAR is not set" in result.stderr


def test_plugins_lists_builtins_with_hooks_and_names() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    assert "plugins.bus.memory  [built-in]" in result.stdout
    assert "registers buses: memory" in result.stdout
    assert "hooks: wirehub_register_buses" in result.stdout


async def test_serve_from_wirehub_config_then_sigterm_drains_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "echo.yaml", {
        "server": {"port": port, "host": "127.0.0.1"},
        "drain": {"grace": 5, "reconnect_jitter": 2},
        "endpoints": [{"path": "/ws/echo", "handler": "echo"}],
    })
    server = ServerProcess(config, port).start()
    try:
        await server.wait_ready()
        client = await ws_connect(server.url("/ws/echo", "ws"))
        await client.send('{"hello":"server"}')
        assert await client.recv_raw() == '{"echo":{"hello":"server"}}'
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code, reason = await client.wait_closed(10)
        assert code == 1001
        assert reason is not None and re.fullmatch(r"server going away; retry_ms=\d+", reason)
        assert int(reason.rsplit("=", 1)[1]) <= 2000
        client.close()
        returncode = await asyncio.to_thread(server.proc.wait, 10)
        assert returncode == 0 and time.monotonic() - started < 5
    finally:
        server.stop()
    log = server.output()
    assert "draining 1 sessions" in log and "session close" in log


async def test_serve_reads_wirehub_config_env(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "env.yaml", {"server": {"port": port, "host": "127.0.0.1"},
                                                  "endpoints": [{"path": "/ws/e", "handler": "echo"}]})
    server = ServerProcess(None, port, env={"WIREHUB_CONFIG": str(config)}, log=tmp_path / "out.log").start()
    try:
        await server.wait_ready()
        health = await AsyncHTTPClient().fetch(server.url("/healthz"))
        assert json.loads(health.body)["status"] == "ok"
    finally:
        assert server.stop() == 0


def test_config_option_works_before_and_after_the_subcommand(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", {"endpoints": [{"path": "/only", "handler": "echo"}]})
    for args in (("--config", str(config), "check-config"), ("check-config", "--config", str(config)),
                 ("plugins", "-c", str(config))):
        result = run_cli(*args)
        assert result.returncode == 0, (args, result.stderr)
    assert "/only" in run_cli("check-config", "-c", str(config)).stdout
