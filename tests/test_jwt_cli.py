"""`wirehub token` (in process and as a real subprocess) and config/production.example.yaml."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from tests.helpers import ROOT, run_cli_async
from tests.plugins_for_tests.jwt_probe import PATH, SECRET, server_config
from wirehub.builtins.auth.jwt import mint_token_from_config, parse_ttl
from wirehub.config import ConfigError, config_from_dict, load_config
from wirehub.plugins import build_plugin_manager
from wirehub.testing import LiveServer

Start = Callable[..., Awaitable[LiveServer]]


def jwt_config(**options: Any) -> Any:
    return config_from_dict({"auth": {"plugin": "jwt", "jwt": {"algorithms": ["HS256"], "secret": SECRET,
                                                              **options}}})


@pytest.mark.parametrize(("ttl", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600), ("7d", 604800)])
def test_ttl(ttl: str, seconds: int) -> None:
    assert parse_ttl(ttl) == seconds


@pytest.mark.parametrize("ttl", ["", "1", "1y", "0s", "-5m", "1.5h", "h"])
def test_bad_ttl_names_the_option(ttl: str) -> None:
    with pytest.raises(ConfigError) as err:
        mint_token_from_config(jwt_config(), sub="alice", rooms="*", ttl=ttl, name=None)
    assert err.value.key == "--ttl"


def test_minted_claims() -> None:
    before = int(time.time())
    minted = mint_token_from_config(jwt_config(audience="wirehub", issuer="https://issuer.test"),
                                    sub="alice", rooms="lobby, team-*,", ttl="15m", name="Alice")
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"], audience="wirehub", issuer="https://issuer.test")
    assert claims["sub"] == "alice" and claims["name"] == "Alice" and claims["rooms"] == ["lobby", "team-*"]
    assert before + 900 <= claims["exp"] <= int(time.time()) + 900
    assert jwt.get_unverified_header(minted)["alg"] == "HS256"


@pytest.mark.parametrize(("config", "key"), [
    ({}, "auth.plugin"),  # anonymous
    ({"auth": {"plugin": "jwt", "jwt": {"algorithms": ["ES256"], "jwks_url": "https://idp.test/jwks"}}},
     "auth.jwt.secret"),
    ({"auth": {"plugin": "jwt", "jwt": {"algorithms": ["HS256"], "secret": "short"}}}, "auth.jwt.secret"),
])
def test_minting_needs_the_jwt_plugin_with_a_secret(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        mint_token_from_config(config_from_dict(config), sub="alice", rooms="*", ttl="1h", name=None)
    assert err.value.key == key


def test_minting_refuses_an_unprintable_sub() -> None:
    with pytest.raises(ConfigError) as err:
        mint_token_from_config(jwt_config(), sub="alice\nroot", rooms="*", ttl="1h", name=None)
    assert err.value.key == "--sub"


async def test_wirehub_token_subprocess_mints_a_token_the_server_accepts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wirehub_server: Start) -> None:
    overrides = server_config(secret="$env:WIREHUB_JWT_SECRET", audience="wirehub")
    path = tmp_path / "wirehub.yaml"
    path.write_text(yaml.safe_dump(overrides))
    monkeypatch.setenv("WIREHUB_JWT_SECRET", SECRET)
    code, out, err = await run_cli_async("--config", str(path), "token", "--sub", "alice", "--rooms", "lobby,team-*",
                                   "--ttl", "1h", "--name", "Alice", env={"WIREHUB_JWT_SECRET": SECRET})
    assert code == 0, err
    minted = out.strip()
    assert "\n" not in minted and minted.count(".") == 2
    server = await wirehub_server(overrides)
    client = await server.ws(PATH, headers={"Authorization": f"Bearer {minted}"})
    welcome = await client.recv()
    assert (welcome["user"], welcome["name"]) == ("alice", "Alice")
    assert time.time() + 3500 < welcome["expires_at"] <= time.time() + 3600
    assert (await client.request({"op": "whoami"}))["rooms"] == ["lobby", "team-*"]


async def test_wirehub_token_subprocess_errors(tmp_path: Path) -> None:
    code, out, err = await run_cli_async("token", "--sub", "alice", env={"WIREHUB_CONFIG": ""})
    assert (code, out) == (2, "")
    assert err.startswith("wirehub: auth.plugin: `wirehub token` signs with the jwt plugin's HMAC secret")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"auth": {"plugin": "jwt", "jwt": {"algorithms": ["HS256"], "secret": SECRET}}}))
    code, out, err = await run_cli_async("-c", str(path), "token", "--sub", "alice", "--ttl", "forever")
    assert (code, out) == (2, "")
    assert err.startswith("wirehub: --ttl: expected a duration like 30s, 15m, 1h or 7d")
    code, _, err = await run_cli_async("-c", str(path), "token", "--sub", "alice", "--ttl", "30s")
    assert code == 0, err


def test_production_example_uses_jwt_with_secrets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    path = ROOT / "config" / "production.example.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["auth"]["plugin"] == "jwt"
    options = raw["auth"]["jwt"]
    assert options["secret"] == "$env:WIREHUB_JWT_SECRET"
    assert options["previous_secret"].startswith("$env?:")
    assert all(str(k).startswith("$env:") for k in raw["api"]["keys"])
    monkeypatch.setenv("WIREHUB_JWT_SECRET", SECRET)
    monkeypatch.setenv("WIREHUB_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("WIREHUB_API_KEY", "k" * 24)
    for name in ("WIREHUB_JWT_PREVIOUS_SECRET", "WIREHUB_JWT_PREVIOUS_SECRET_UNTIL"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(path)
    authenticator = build_plugin_manager().authenticators()["jwt"].factory(config.auth.options, config.auth.key)
    assert authenticator.describe().startswith("auth jwt: algorithms ['HS256']; keys: secret;")
    assert config.server.max_connections_per_user > 0 and config.server.max_connections_per_ip > 0
    # a rotation in progress is configured through the environment alone
    monkeypatch.setenv("WIREHUB_JWT_PREVIOUS_SECRET", "p" * 40)
    monkeypatch.setenv("WIREHUB_JWT_PREVIOUS_SECRET_UNTIL", "2099-01-01T00:00:00Z")
    config = load_config(path)
    authenticator = build_plugin_manager().authenticators()["jwt"].factory(config.auth.options, config.auth.key)
    assert "previous_secret until 2099-01-01" in authenticator.describe()
    assert mint_token_from_config(config, sub="alice", rooms="*", ttl="1h", name=None).count(".") == 2
