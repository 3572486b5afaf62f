"""The redis bus's options, authentication and the missing-extra error."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.redis import create_backend
from wirehub.bus import BusUnavailable
from wirehub.config import ConfigError, load_config
from wirehub.testing import Recorder, unique_room

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_config_reads_the_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WIREHUB_REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match="WIREHUB_REDIS_URL"):
        load_config(ROOT / "config" / "redis.yaml")
    monkeypatch.setenv("WIREHUB_REDIS_URL", "rediss://cache.example:6380/0")
    monkeypatch.setenv("WIREHUB_REDIS_PASSWORD", "s3cret")
    config = load_config(ROOT / "config" / "redis.yaml")
    assert config.bus.plugin == "redis"
    backend = create_backend(config.bus.options, config.bus.key)
    opts = backend.extra["options"]
    assert (opts.url, opts.password, opts.key_prefix) == ("rediss://cache.example:6380/0", "s3cret", "wirehub")


@pytest.mark.parametrize(("options", "key", "message"), [
    ({"url": "http://x"}, "bus.redis.url", "redis://, rediss:// or unix://"),
    ({"key_prefix": "a b"}, "bus.redis.key_prefix", "without spaces"),
    ({"history_size": -1}, "bus.redis.history_size", "at least 0"),
    ({"heartbeat_interval": 4, "heartbeat_timeout": 1}, "bus.redis.heartbeat_timeout", "half"),
    ({"presence_ttl": 3, "presence_interval": 3}, "bus.redis.presence_interval", "less than presence_ttl"),
    ({"urls": "redis://x"}, "bus.redis.urls", "unknown key"),
    ({"mode": "shards"}, "bus.redis.mode", "not one of: standalone, cluster, sentinel"),
    ({"mode": "cluster"}, "bus.redis.cluster.nodes", "at least one seed node"),
    ({"mode": "cluster", "cluster": {"nodes": ["10.0.0.1"]}}, "bus.redis.cluster.nodes.0", "host:port"),
    ({"mode": "cluster", "cluster": {"nodes": ["a:1", "b:99999"]}}, "bus.redis.cluster.nodes.1", "host:port"),
    ({"mode": "cluster", "cluster": {"seeds": []}}, "bus.redis.cluster.seeds", "unknown key"),
    ({"mode": "sentinel", "sentinel": {"master_name": "m"}}, "bus.redis.sentinel.nodes", "at least one sentinel"),
    ({"mode": "sentinel", "sentinel": {"nodes": ["s:26379"]}}, "bus.redis.sentinel.master_name", "master's name"),
    ({"tls_ca_file": "/nonexistent/ca.pem"}, "bus.redis.tls_ca_file", "no such file"),
    ({"tls_cert_file": __file__}, "bus.redis.tls_key_file", "go together"),
    ({"url": "rediss://x:1/0", "tls_ca_file": __file__}, "bus.redis.tls_ca_file", "cannot be loaded"),
    ({"url": "redis://x:1/0", "tls": True}, "bus.redis.url", "use rediss://"),
    ({"tls": "yes"}, "bus.redis.tls", "true or false"),
])
def test_bad_options_name_their_key(options: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        create_backend(options, "bus.redis")
    assert err.value.key == key and message in str(err.value)


def test_a_missing_client_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ConfigError, match=r"pip install 'wirehub\[redis\]'") as err:
        create_backend({}, "bus.redis")
    assert err.value.key == "bus.redis"


async def test_password_authentication(redis_server_factory: Callable[..., BrokerProcess]) -> None:
    server = redis_server_factory(password="s3cret")
    url = f"redis://127.0.0.1:{server.port}/0"
    wrong = create_backend({"url": url, "password": "nope", "connect_timeout": 1}, "bus.redis")
    with pytest.raises(BusUnavailable):
        await wrong.bus.start(Recorder())
    assert wrong.bus.healthy is False
    backend = create_backend({"url": url, "password": "s3cret"}, "bus.redis")
    recorder = Recorder()
    await backend.bus.start(recorder)
    try:
        room = unique_room()
        await backend.bus.subscribe(room)
        assert await backend.bus.publish(room, b"hi", history=True) == 1
        assert await recorder.wait_for(room, 1) == [b"hi"]
    finally:
        await backend.bus.close()


async def test_an_unreachable_redis_fails_the_start() -> None:
    from wirehub.testing import free_port

    backend = create_backend({"url": f"redis://127.0.0.1:{free_port()}/0", "connect_timeout": 0.5}, "bus.redis")
    with pytest.raises(BusUnavailable):
        await backend.bus.start(Recorder())
    with pytest.raises(BusUnavailable):
        await backend.bus.publish("room", b"x")
    await backend.bus.close()
