"""The plugin host: lifecycle hooks, plugin routes, third-party plugins from real entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.helpers import ROOT, ServerProcess, run_cli, write_config
from tests.plugins_for_tests import lifecycle
from wirehub.config import PluginsConfig
from wirehub.plugins import BUILTIN_PLUGINS, DROP, build_plugin_manager
from wirehub.testing import LiveServer, free_port

Start = Callable[..., Awaitable[LiveServer]]


def test_no_plugin_manager_at_import_and_builtins_in_documented_order() -> None:
    host = build_plugin_manager()
    names = [p.name for p in host.describe()]
    assert names[: len(BUILTIN_PLUGINS)] == list(BUILTIN_PLUGINS)
    assert {p.source for p in host.describe() if p.name in BUILTIN_PLUGINS} == {"built-in"}
    assert repr(DROP) == "DROP"


async def test_lifecycle_hooks_and_plugin_routes(wirehub_server: Start) -> None:
    lifecycle.CALLS.clear()
    server = await wirehub_server({
        "plugins": {"load": ["tests.plugins_for_tests.lifecycle"]},
        "extensions": {"lifecycle": {"flag": True}},
        "endpoints": [{"path": "/ws/echo", "handler": "echo"}],
    })
    hello = await server.http("/hello")
    assert hello.code == 200 and json.loads(hello.body) == {"hello": server.app.node}
    client = await server.ws("/ws/echo")
    await client.send({"a": 1})
    await client.recv()
    client.close(1000)
    for _ in range(50):
        if ("closed", 1000) in lifecycle.CALLS:
            break
        await __import__("asyncio").sleep(0.02)
    await server.app.stop()
    assert [
        ("configure", {"flag": True}),
        ("startup", server.app.node),
        ("opened", "/ws/echo"),
        ("closed", 1000),
        ("shutdown", server.app.node),
    ] == lifecycle.CALLS
    listing = await server.http("/api/plugins") if server.app.server else None
    assert listing is None  # stopped: nothing listens any more


async def test_plugin_listing_over_http(wirehub_server: Start) -> None:
    server = await wirehub_server({"endpoints": [{"path": "/ws/echo", "handler": "echo"}]})
    body = json.loads((await server.http("/api/plugins")).body)
    echo = next(p for p in body["plugins"] if p["name"] == "wirehub.builtins.handlers.echo")
    assert echo["source"] == "built-in" and echo["registers"] == {"handlers": ["echo"]}
    assert "wirehub_register_handlers" in echo["hooks"]


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/uppercase installed with real package metadata into a directory of its own."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT / "examples" / "uppercase")],
        check=True, capture_output=True, timeout=120,
    )
    assert list(target.glob("wirehub_uppercase-*.dist-info"))
    return target


def _env_with(path: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(path), str(ROOT)])}


def test_entry_point_plugin_is_listed_with_its_source(installed_example: Path) -> None:
    result = run_cli("plugins", "--json", env=_env_with(installed_example))
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    upper = plugins["uppercase"]
    assert upper["source"] == "entry point wirehub-uppercase 0.1.0"
    assert upper["registers"] == {"handlers": ["upper"]}
    assert upper["hooks"] == ["wirehub_register_handlers"]
    text = run_cli("plugins", env=_env_with(installed_example)).stdout
    assert "uppercase  [entry point wirehub-uppercase 0.1.0]" in text


async def test_entry_point_plugin_serves_its_endpoint(installed_example: Path, tmp_path: Path) -> None:
    from wirehub.testing import ws_connect

    port = free_port()
    config = write_config(tmp_path / "upper.yaml", {
        "server": {"port": port, "host": "127.0.0.1"},
        "endpoints": [{"path": "/ws/upper", "handler": "upper", "options": {"prefix": "> "}}],
    })
    server = ServerProcess(config, port, env=_env_with(installed_example)).start()
    try:
        await server.wait_ready()
        client = await ws_connect(server.url("/ws/upper", "ws"))
        await client.send("shout")
        assert await client.recv_raw() == "> SHOUT"
        client.close()
    finally:
        assert server.stop() == 0


def test_blocking_an_entry_point_by_name(installed_example: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "block.yaml", {"plugins": {"block": ["uppercase"]},
                                                    "endpoints": [{"path": "/u", "handler": "upper"}]})
    result = run_cli("check-config", str(config), env=_env_with(installed_example))
    assert result.returncode == 2
    assert "endpoints[0].handler: 'upper' is not a registered handler" in result.stderr


def test_a_plugin_route_may_not_shadow_a_core_path() -> None:
    from wirehub.app import Wirehub
    from wirehub.config import config_from_dict
    from wirehub.plugins import PluginError

    config = config_from_dict({"plugins": {"load": ["tests.plugins_for_tests.route_collision"]},
                               "endpoints": [{"path": "/ws/echo", "handler": "echo"}]})
    with pytest.raises(PluginError, match=r"route '/static/evil.js' collides with a core route"):
        Wirehub.build(config)


# -- plugins registered as objects: state without globals -----------------------------------------------------

WORD_FILTER = "tests.plugins_for_tests.word_filter:WordFilter"


async def test_a_plugin_class_keeps_its_parsed_config_per_server(wirehub_server: Start) -> None:
    """Two servers in one process, one plugin class, two configs: each filter uses its own server's config."""
    servers = [await wirehub_server({
        "plugins": {"load": [WORD_FILTER]},
        "extensions": {"word_filter": {"words": [word], "mask": mask}},
        "endpoints": [{"path": "/ws/chat", "handler": "chat"}],
    }) for word, mask in (("darn", "****"), ("heck", "#"))]
    received = []
    for server in servers:
        sender, receiver = [await server.ws("/ws/chat", welcome=True) for _ in range(2)]
        for client in (sender, receiver):
            assert (await client.request({"op": "join", "room": "lobby"}))["op"] == "joined"
        ack = await sender.request({"op": "publish", "room": "lobby", "data": {"text": "darn, heck"}})
        assert ack["op"] == "ack", ack
        received.append((await receiver.recv_op("message"))["data"]["text"])
    assert received == ["****, heck", "darn, #"]


def test_a_plugin_class_named_twice_is_instantiated_once_and_listed_by_its_first_name() -> None:
    host = build_plugin_manager(PluginsConfig(load=(WORD_FILTER, "tests.plugins_for_tests.word_filter:AGAIN")))
    infos = {p.name: p for p in host.describe()}
    assert WORD_FILTER in infos and "tests.plugins_for_tests.word_filter:AGAIN" not in infos
    assert infos[WORD_FILTER].module == "tests.plugins_for_tests.word_filter"
    assert infos[WORD_FILTER].hooks == ("wirehub_configure", "wirehub_filter_message")


def test_plugins_load_names_a_missing_attribute_and_a_bad_option_by_key(tmp_path: Path) -> None:
    from wirehub.config import ConfigError

    with pytest.raises(ConfigError) as err:
        build_plugin_manager(PluginsConfig(load=("tests.plugins_for_tests.word_filter:Nope",)))
    assert err.value.key == "plugins.load[0]"
    assert "module 'tests.plugins_for_tests.word_filter' has no attribute 'Nope'" in err.value.message
    config = write_config(tmp_path / "bad.yaml", {"plugins": {"load": [WORD_FILTER]},
                                                  "extensions": {"word_filter": {"words": "darn"}}})
    result = run_cli("check-config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "extensions.word_filter.words: expected a list of strings, got 'darn'" in result.stderr


def test_an_entry_point_may_name_a_plugin_class(tmp_path: Path) -> None:
    """``name = module:Class`` in group wirehub (real package metadata on sys.path): instantiated and listed;
    the same class in plugins.load as well is not registered twice."""
    dist = tmp_path / "site" / "wordfilter-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wordfilter\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[wirehub]\nwordfilter = {WORD_FILTER}\n")
    config = write_config(tmp_path / "c.yaml", {"plugins": {"load": [WORD_FILTER]}})
    result = run_cli("-c", str(config), "plugins", "--json", env=_env_with(tmp_path / "site"))
    assert result.returncode == 0, result.stderr
    listed = [p for p in json.loads(result.stdout) if p["module"] == "tests.plugins_for_tests.word_filter"]
    assert [(p["name"], p["source"]) for p in listed] == [("wordfilter", "entry point wordfilter 0.1")]
    assert listed[0]["hooks"] == ["wirehub_configure", "wirehub_filter_message"]
