"""Config loading: every bad input fails at load with the dotted key and the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from wirehub.app import Wirehub
from wirehub.config import ConfigError, config_from_dict, load_config
from wirehub.plugins import PluginError


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
        ({"server": {"worker_stall_timeout": float("nan")}}, "server.worker_stall_timeout",
         "expected a finite number, got nan"),
        ({"server": {"ping_interval": float("inf")}}, "server.ping_interval", "expected a finite number, got inf"),
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
    config = config_from_dict({"plugins": {"block": ["wirehub.builtins.handlers.echo"]},
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


# -- one default: the dataclasses; config/wirehub.yaml lists them ---------------------------------------------


@pytest.mark.parametrize("api_key", [None, "k" * 24])
def test_the_default_file_is_exactly_the_built_in_defaults(monkeypatch: pytest.MonkeyPatch,
                                                            api_key: str | None) -> None:
    """No config means the defaults in the code; config/wirehub.yaml shows them and may not drift from them."""
    from wirehub.builtins.auth.anonymous import AnonymousOptions
    from wirehub.builtins.bus.memory import MemoryOptions
    from wirehub.config import BUILTIN_SOURCE, parse_block

    monkeypatch.delenv("WIREHUB_CONFIG", raising=False)
    if api_key is None:
        monkeypatch.delenv("WIREHUB_API_KEY", raising=False)
    else:
        monkeypatch.setenv("WIREHUB_API_KEY", api_key)
    built_in = load_config(None)
    shown = load_config(Path(__file__).parent.parent / "config" / "wirehub.yaml")
    assert built_in.source == BUILTIN_SOURCE
    for section in ("server", "drain", "logging", "api", "metrics", "plugins", "endpoints", "extensions"):
        assert getattr(shown, section) == getattr(built_in, section), section
    for section, options in (("auth", AnonymousOptions), ("bus", MemoryOptions)):
        a, b = getattr(shown, section), getattr(built_in, section)
        assert a.plugin == b.plugin
        assert parse_block(options, a.options, a.key) == parse_block(options, b.options, b.key), section
    assert built_in.server.host == "127.0.0.1"  # a laptop run is not reachable from the LAN


def test_no_yaml_file_in_the_package() -> None:
    """The package has no copy of a config that could differ from config/wirehub.yaml."""
    assert not list((Path(__file__).parent.parent / "service").glob("*.yaml"))


# -- references are coerced to the key's type --------------------------------------------------------------------


def test_env_references_are_coerced_to_the_type_of_their_key(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"WH_PORT": "8081", "WH_GRACE": " 2.5 ", "WH_XHEADERS": "Yes", "WH_METRICS": "0",
           "WH_ORIGINS": "https://a.example, https://b.example,,", "WH_NODE": "0042", "WH_SIZE": "10"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = config_from_dict({
        "server": {"port": "$env:WH_PORT", "xheaders": "$env:WH_XHEADERS", "allowed_origins": "$env:WH_ORIGINS",
                   "node_id": "$env:WH_NODE"},
        "drain": {"grace": "$env:WH_GRACE"},
        "metrics": {"enabled": "$env:WH_METRICS"},
        "bus": {"plugin": "memory", "memory": {"history_size": "$env:WH_SIZE"}},
    })
    assert config.server.port == 8081 and config.drain.grace == 2.5
    assert config.server.xheaders is True and config.metrics.enabled is False
    assert config.server.allowed_origins == ("https://a.example", "https://b.example")
    assert config.server.node_id == "0042" and type(config.server.node_id) is str  # a str key stays text
    from wirehub.builtins.bus.memory import MemoryOptions
    from wirehub.config import parse_block

    assert parse_block(MemoryOptions, config.bus.options, config.bus.key).history_size == 10  # plugin blocks too


def test_file_references_are_coerced_too(tmp_path: Path) -> None:
    secret = tmp_path / "port"
    secret.write_text("9001\n")
    assert config_from_dict({"server": {"port": f"$file:{secret}"}}).server.port == 9001


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("port", "80eighty", "server.port: expected an integer, got '80eighty' (from $env:WH_VALUE)"),
        ("port", "8080.5", "server.port: expected an integer, got '8080.5' (from $env:WH_VALUE)"),
        ("port", "70000", "server.port: must be at most 65535, got 70000 (from $env:WH_VALUE)"),
        ("xheaders", "maybe",
         "server.xheaders: expected true or false (or yes/no, 1/0), got 'maybe' (from $env:WH_VALUE)"),
        ("ping_interval", "nan", "server.ping_interval: expected a number, got 'nan' (from $env:WH_VALUE)"),
        ("max_message_size", "", "server.max_message_size: expected an integer, got '' (from $env:WH_VALUE)"),
    ],
)
def test_a_reference_that_does_not_parse_names_the_key_the_value_and_the_reference(
        monkeypatch: pytest.MonkeyPatch, key: str, value: str, fragment: str) -> None:
    monkeypatch.setenv("WH_VALUE", value)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"server": {key: "$env:WH_VALUE"}})
    assert str(err.value) == fragment


def test_a_literal_quoted_number_is_still_an_error() -> None:
    """Only values from outside the YAML text are coerced; `port: "8080"` in the file is a mistake."""
    with pytest.raises(ConfigError, match=r"server.port: expected an integer, got '8080'$"):
        config_from_dict({"server": {"port": "8080"}})


def test_overrides_are_validated_like_the_file_and_name_their_origin(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from wirehub.config import Reference

    monkeypatch.delenv("WIREHUB_CONFIG", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 9000, host: 127.0.0.1}\n")
    config = load_config(path, {"server.port": Reference("9001", "--port"), "server.node_id": Reference("a", "x")})
    assert (config.server.port, config.server.host, config.node_id) == (9001, "127.0.0.1", "a")
    with pytest.raises(ConfigError, match=r"^server.port: expected an integer, got 'x' \(from \$WIREHUB_PORT\)$"):
        load_config(path, {"server.port": Reference("x", "$WIREHUB_PORT")})
    assert load_config(None, {"server.host": Reference("0.0.0.0", "--host")}).server.host == "0.0.0.0"
