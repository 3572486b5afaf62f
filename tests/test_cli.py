"""The `wirehub` command as users run it: real processes, real exit codes and messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

from tests.helpers import ROOT, ServerProcess, run_cli, write_config
from wirehub.testing import free_port, ws_connect


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
    assert "wirehub.builtins.bus.memory  [built-in]" in result.stdout
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


# -- everyday CLI: --version, help, serve overrides, fail-fast listen/send, closed pipes ------------------------

OVERRIDE_ENV = ("WIREHUB_CONFIG", "WIREHUB_HOST", "WIREHUB_PORT", "WIREHUB_NODE_ID", "POD_NAME")


def test_version_is_the_package_version() -> None:
    from wirehub import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout == f"wirehub {__version__}\n"


def test_every_subcommand_and_option_is_described_with_the_environment_it_reads() -> None:
    import argparse

    from wirehub.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"serve", "check-config", "plugins", "token", "listen", "send", "plugin"}
    described = {choice.dest for choice in subparsers._choices_actions if choice.help}
    assert described == set(subparsers.choices)
    nested = next(a for a in subparsers.choices["plugin"]._actions if isinstance(a, argparse._SubParsersAction))
    assert set(nested.choices) == {"new"} and all(choice.help for choice in nested._choices_actions)
    for name, sub in [*subparsers.choices.items(), ("plugin new", nested.choices["new"])]:
        assert sub.description, name
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    helps = {(name, a.dest): a.help for name, sub in subparsers.choices.items() for a in sub._actions}
    for (name, dest), env in {("serve", "host"): "$WIREHUB_HOST", ("serve", "port"): "$WIREHUB_PORT",
                              ("serve", "node_id"): "$WIREHUB_NODE_ID", ("listen", "url"): "$WIREHUB_URL",
                              ("send", "token"): "$WIREHUB_TOKEN", ("serve", "config"): "$WIREHUB_CONFIG"}.items():
        assert env in str(helps[name, dest]), (name, dest)
    assert "$POD_NAME" in str(helps["serve", "node_id"])
    # and as a user sees it
    result = run_cli("serve", "--help")
    assert result.returncode == 0 and "--node-id" in result.stdout and "WIREHUB_PORT" in result.stdout


async def test_serve_options_override_the_config_file(tmp_path: Path) -> None:
    file_port, port = free_port(), free_port()
    config = write_config(tmp_path / "c.yaml", {"server": {"port": file_port, "host": "127.0.0.1", "node_id": "f"}})
    server = ServerProcess(config, port, unset_env=OVERRIDE_ENV, env={"WIREHUB_PORT": str(file_port)},
                           serve_args=("--port", str(port), "--node-id", "a")).start()
    try:
        await server.wait_ready()
        client = await ws_connect(server.url("/ws/chat", "ws"))
        assert (await client.recv())["node"] == "a"
        client.close()
    finally:
        assert server.stop() == 0


async def test_serve_reads_host_port_and_node_id_from_the_environment_without_a_config(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(None, port, log=tmp_path / "env.log", unset_env=OVERRIDE_ENV,
                           env={"WIREHUB_PORT": str(port), "WIREHUB_NODE_ID": "b", "WIREHUB_HOST": "127.0.0.1"})
    server.start()
    try:
        await server.wait_ready()
        client = await ws_connect(server.url("/ws/chat", "ws"))
        assert (await client.recv())["node"] == "b"
        client.close()
    finally:
        assert server.stop() == 0
    assert "config <built-in defaults>" in server.output()


def test_a_bad_override_names_the_key_and_where_it_came_from() -> None:
    env = {"WIREHUB_CONFIG": "", "WIREHUB_PORT": "80eighty"}
    result = run_cli("serve", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "server.port: expected an integer, got '80eighty' (from $WIREHUB_PORT)" in result.stderr
    result = run_cli("serve", "--port", "70000", env={"WIREHUB_CONFIG": ""})
    assert result.returncode == 2 and "argument --port: expected a port number 0-65535, got '70000'" in result.stderr


def test_a_kubernetes_service_link_in_wirehub_port_is_ignored_with_a_warning() -> None:
    result = run_cli("check-config", env={"WIREHUB_CONFIG": "", "WIREHUB_PORT": "tcp://10.0.0.7:80"})
    assert result.returncode == 0, result.stderr
    assert "ignoring WIREHUB_PORT=tcp://10.0.0.7:80: it is a Kubernetes service link" in result.stderr


@pytest.mark.parametrize("command", [("listen", "lobby"), ("send", "lobby", '"hi"')])
def test_listen_and_send_fail_fast_when_no_server_is_there(command: tuple[str, ...]) -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws/chat"  # nothing listens there
    result = run_cli(*command, "--url", url, timeout=8)  # the old behaviour retried for 10 s and more
    assert result.returncode == 1
    assert result.stderr == f"wirehub: connection refused: no wirehub server at {url}\n"
    assert result.stdout == ""


async def test_listen_retry_waits_for_the_server_then_receives(tmp_path: Path) -> None:
    from tests.helpers import run_cli_async

    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws/chat"
    listen = asyncio.ensure_future(run_cli_async("listen", "lobby", "--url", url, "--retry", "--count", "1",
                                                 timeout=30))
    await asyncio.sleep(1.0)
    assert not listen.done()  # still trying: nothing listens yet
    server = ServerProcess(None, port, log=tmp_path / "late.log", unset_env=OVERRIDE_ENV,
                           env={"WIREHUB_PORT": str(port)}).start()
    try:
        await server.wait_ready()
        for _ in range(100):  # until the listener has joined (its join is not visible from here)
            code, out, err = await run_cli_async("send", "lobby", '{"n": 1}', "--url", url)
            assert code == 0, err
            if listen.done():
                break
            await asyncio.sleep(0.2)
        code, out, err = await listen
        assert code == 0, err
        assert json.loads(out)["data"] == {"n": 1}
    finally:
        assert server.stop() == 0


def test_output_into_a_closed_pipe_exits_quietly() -> None:
    """The reader is gone before the first write (the deterministic end of `| head -1`)."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "wirehub.cli", "plugins"], stdout=write, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, timeout=60, env={**os.environ, "WIREHUB_CONFIG": ""})
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 1


async def test_listen_piped_into_head_stops_without_a_traceback(tmp_path: Path) -> None:
    from tests.helpers import run_cli_async

    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws/chat"
    server = ServerProcess(None, port, log=tmp_path / "head.log", unset_env=OVERRIDE_ENV,
                           env={"WIREHUB_PORT": str(port)}).start()
    err_path = tmp_path / "listen.err"
    try:
        await server.wait_ready()
        import shlex
        import sys

        argv = (sys.executable, "-m", "wirehub.cli", "listen", "lobby", "--url", url)
        listen = " ".join(shlex.quote(a) for a in argv)
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", f"{listen} 2>{shlex.quote(str(err_path))} | head -1; echo \"${{PIPESTATUS[0]}}\"",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        for _ in range(150):  # publish until the pipeline has ended: head after line 1, listen at its next write
            if shell.returncode is not None:
                break
            code, _, err = await run_cli_async("send", "lobby", '{"n": 1}', "--url", url)
            assert code == 0, err
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shell.wait(), 0.2)
        out, _ = await asyncio.wait_for(shell.communicate(), 10)
    finally:
        assert server.stop() == 0
    first, status = out.decode().splitlines()
    assert json.loads(first)["data"] == {"n": 1}
    assert status == "1"  # listen exited as Python does on EPIPE
    errors = err_path.read_text()
    assert "Traceback" not in errors and "BrokenPipeError" not in errors and "Exception ignored" not in errors


async def test_listen_keeps_retrying_once_it_was_connected(tmp_path: Path) -> None:
    """Fail-fast is for the first connection only: a replica that restarts under a listener is waited for."""
    import os

    from tests.helpers import run_cli_async, wirehub_cmd

    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws/chat"
    config = write_config(tmp_path / "restart.yaml", {"server": {"port": port}, "drain": {"reconnect_jitter": 0.2}})
    server = ServerProcess(config, port, unset_env=OVERRIDE_ENV)
    await server.start_ready()
    listen = await asyncio.create_subprocess_exec(
        *wirehub_cmd("listen", "lobby", "--url", url, "--count", "1"), cwd=ROOT,
        env={**os.environ, "WIREHUB_TOKEN": ""}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert listen.stdout is not None and listen.stderr is not None
    try:
        assert b"joined lobby" in await asyncio.wait_for(listen.stderr.readline(), 15)
        assert server.stop() == 0
        assert b"disconnected (1001" in await asyncio.wait_for(listen.stderr.readline(), 5)
        await asyncio.sleep(1.0)  # nothing listens now: its reconnects are refused, and it keeps trying
        assert listen.returncode is None
        await server.start_ready()
        rejoined = b""
        while b"rejoined lobby" not in rejoined:
            rejoined = await asyncio.wait_for(listen.stderr.readline(), 20)
        code, _, err = await run_cli_async("send", "lobby", '"back"', "--url", url)
        assert code == 0, err
        assert json.loads(await asyncio.wait_for(listen.stdout.readline(), 5))["data"] == "back"
        assert await asyncio.wait_for(listen.wait(), 5) == 0
    finally:
        if listen.returncode is None:
            listen.kill()
            await listen.wait()
        server.stop()
