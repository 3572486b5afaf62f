"""Config loading: every bad input fails at load with the dotted key and the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.app import Wirehub
from service.config import ConfigError, config_from_dict, load_config
from service.plugins import PluginError


def load_text(tmp_path: Path, text: str) -> object:
    path = tmp_path / "wirehub.yaml"
    path.write_text(text)
    return load_config(path)


def test_embedded_default_config_loads_with_documented_defaults() -> None:
    config = load_config(Path(__file__).parent.parent / "config" / "wirehub.yaml")
    assert config.server.port == 8080
    assert config.server.max_message_size == 65536
    assert config.server.send_queue_bytes == 1048576
    assert config.server.backlog >= 1024
    assert config.auth.plugin == "anonymous" and config.bus.plugin == "memory"
    assert [ep.path for ep in config.endpoints] == ["/ws/echo", "/ws/chat", "/ws/game"]


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"malformed YAML at line 2"):
        load_text(tmp_path, "server:\n  port: 8080: 1\n")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, "servre: {port: 1}\n")
    assert err.value.key == "servre"
    assert "unknown top-level key" in str(err.value) and "server" in str(err.value)


def test_unknown_nested_key_names_the_dotted_path() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"server": {"prot": 1}})
    assert err.value.key == "server.prot"
    assert "valid keys are" in err.value.message and "port" in err.value.message


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"server": {"port": "eighty"}}, "server.port", "expected an integer, got 'eighty'"),
        ({"server": {"port": True}}, "server.port", "expected an integer, got True"),
        ({"server": {"port": 70000}}, "server.port", "at most 65535"),
        ({"server": {"allowed_origins": "https://a"}}, "server.allowed_origins", "expected a list"),
        ({"server": {"allowed_origins": [1]}}, "server.allowed_origins[0]", "expected a string"),
        ({"logging": {"level": "loud"}}, "logging.level", "'loud' is not one of"),
        ({"drain": {"grace": "soon"}}, "drain.grace", "expected a number"),
        ({"server": {"ping_interval": 5, "ping_timeout": 10}}, "server.ping_timeout", "longer than"),
        ({"endpoints": [{"path": "/a", "handler": "echo"}, {"path": "/a", "handler": "echo"}]},
         "endpoints[1].path", "used by two endpoints"),
        ({"endpoints": [{"path": "ws", "handler": "echo"}]}, "endpoints[0].path", "absolute path"),
        ({"endpoints": [{"path": "/ws"}]}, "endpoints[0].handler", "is required"),
        ({"auth": "jwt"}, "auth", "expected a mapping"),
        ({"bus": {"plugin": 3}}, "bus.plugin", "expected a plugin name"),
    ],
)
def test_wrong_types_and_values_name_key_and_value(raw: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert err.value.key == key
    assert fragment in err.value.message


def test_env_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WH_TEST_KEY", "s3cret")
    monkeypatch.delenv("WH_TEST_UNSET", raising=False)
    config = config_from_dict({"api": {"keys": ["$env:WH_TEST_KEY", "$env?:WH_TEST_UNSET", "$$literal"]}})
    assert config.api.keys == ("s3cret", "$literal")


def test_missing_env_variable_names_key_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WH_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"api": {"keys": ["$env:WH_TEST_UNSET"]}})
    assert err.value.key == "api.keys[0]"
    assert "environment variable WH_TEST_UNSET is not set" in err.value.message


def test_file_references(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("from-a-file\n")
    config = config_from_dict({"api": {"keys": [f"$file:{secret}", f"$file?:{tmp_path / 'absent'}"]}})
    assert config.api.keys == ("from-a-file",)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"api": {"keys": [f"$file:{tmp_path / 'absent'}"]}})
    assert err.value.key == "api.keys[0]" and "cannot read" in err.value.message


def test_unknown_plugin_name_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        Wirehub.build(config_from_dict({"bus": {"plugin": "redsi"}, "endpoints": [{"path": "/e", "handler": "echo"}]}))
    assert err.value.key == "bus.plugin"
    assert str(err.value).startswith("bus.plugin: 'redsi' is not a registered bus; choose one of: memory")


def test_unknown_handler_name_names_the_endpoint() -> None:
    with pytest.raises(ConfigError) as err:
        Wirehub.build(config_from_dict({"endpoints": [{"path": "/e", "handler": "ehco"}]}))
    assert err.value.key == "endpoints[0].handler" and "echo" in err.value.message


def test_plugin_options_are_validated_by_the_plugin() -> None:
    with pytest.raises(ConfigError) as err:
        Wirehub.build(config_from_dict({"bus": {"memory": {"history_size": -1}},
                                        "endpoints": [{"path": "/e", "handler": "echo", "options": {"rwa": 1}}]}))
    assert err.value.key == "bus.memory.history_size"
    with pytest.raises(ConfigError) as err:
        Wirehub.build(config_from_dict({"endpoints": [{"path": "/e", "handler": "echo", "options": {"rwa": 1}}]}))
    assert err.value.key == "endpoints[0].options.rwa"


def test_plugin_module_that_does_not_import() -> None:
    config = config_from_dict({"plugins": {"load": ["tests.plugins_for_tests.broken_import"]},
                               "endpoints": [{"path": "/e", "handler": "echo"}]})
    with pytest.raises(ConfigError) as err:
        Wirehub.build(config)
    assert err.value.key == "plugins.load[0]"
    assert "RuntimeError: this plugin is broken on purpose" in err.value.message


def test_plugin_module_that_does_not_exist() -> None:
    config = config_from_dict({"plugins": {"load": ["no.such.module"]}})
    with pytest.raises(ConfigError, match=r"plugins.load\[0\]: cannot import plugin module 'no.such.module'"):
        Wirehub.build(config)


def test_misspelt_hook_fails_at_startup() -> None:
    config = config_from_dict({"plugins": {"load": ["tests.plugins_for_tests.misspelt_hook"]},
                               "endpoints": [{"path": "/e", "handler": "echo"}]})
    with pytest.raises(PluginError) as err:
        Wirehub.build(config)
    assert "wirehub_registr_handlers" in str(err.value)
    assert "tests.plugins_for_tests.misspelt_hook" in str(err.value)


def test_blocked_plugin_is_not_registered() -> None:
    config = config_from_dict({"plugins": {"block": ["plugins.handlers.echo"]},
                               "endpoints": [{"path": "/e", "handler": "echo"}]})
    with pytest.raises(ConfigError, match="'echo' is not a registered handler"):
        Wirehub.build(config)


def test_api_keys_default_to_wirehub_api_key_when_the_file_sets_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WIREHUB_API_KEY", "from-env")
    assert config_from_dict({}).api.keys == ("from-env",)
    assert config_from_dict({"api": {"max_body": 1000}}).api.keys == ("from-env",)
    assert config_from_dict({"api": {"keys": []}}).api.keys == ()  # an explicit empty list turns it off
    monkeypatch.delenv("WIREHUB_API_KEY")
    assert config_from_dict({}).api.keys == ()
